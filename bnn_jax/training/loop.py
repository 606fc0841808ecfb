"""One training phase: sharded jitted step, loop, evaluation, checkpoints, logs.

A phase trains one model (`phase_cfg.model`) for `phase_cfg.num_epochs` epochs
with its own optimizer chain and loss, optionally distilling from a frozen
teacher whose forward pass runs inside the jitted step (eval mode, same
augmented batch). The step itself is `bnn_jax.train_step`; `bnn_jax.phases`
strings phases together.

Parallelism: one `data` mesh axis over every device of every process. The
batch is sharded `P('data')`, the state replicated; `jax.jit` with explicit
in/out shardings partitions the step (BatchNorm statistics are then over the
global batch, or per group with `config.model.bn_group_size`). Losses and
metrics are means over the global batch, so results do not depend on the
device count.

Determinism: the initialisation and the data order are functions of
(config.seed, the phase's name, step) (see `phase_seeds` and
`input_pipeline.train_iterator`), the model has no other randomness, and a
checkpoint holds the whole state, so a run resumed from a checkpoint ends
with bitwise the same parameters as an uninterrupted one (on CPU), and a
phase run alone starts as it does within the whole run.

Preemption: SIGTERM on any process, or the platform's preemption notice
(orbax), stops every process at the same step, after the same checkpoint
(see `multihost.StopAgreement`).

`train_phase` reads top to bottom: set-up; restore or initialise; the step
loop with its sections (metrics and the NaN check; evaluation; checkpoint
and preemption); the final evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import paths
from bnn_jax import train_step
from bnn_jax.training import dynamics_monitor as dynamics_monitor_lib
from bnn_jax.training import evaluation
from bnn_jax.training import input_pipeline
from bnn_jax.training import logs
from bnn_jax.training import multihost
from bnn_jax.training import topology


class Preempted(Exception):
  """The run was asked to stop (SIGTERM / platform preemption); state saved."""


@dataclasses.dataclass
class PhaseResult:
  """What a finished phase reports (results.json) and hands to the next one."""
  top1: float
  top5: float
  best_top1: float
  steps: int
  seconds: float
  params_sha256: str
  variables: dict = dataclasses.field(repr=False)
  model: nn.Module = dataclasses.field(repr=False)

  def summary(self) -> dict:
    return {"top1": self.top1, "top5": self.top5, "best_top1": self.best_top1,
            "steps": self.steps, "seconds": round(self.seconds, 3),
            "params_sha256": self.params_sha256}


# ---------------------------------------------------------------------------
# Building blocks.
# ---------------------------------------------------------------------------
def phase_seeds(seed: int, phase_name: str) -> tuple[jax.Array, int]:
  """(init rng, data seed) of phase `phase_name` in a run seeded with `seed`.

  Both come from the phase's *name*, never its position in `phase_order`:
    init rng  = fold_in(key(seed), crc32(name))
    data seed = crc32(f"{seed}/{name}")
  so a phase run alone, or after `phase_order` changed on resume, gets the
  same initialisation and data order as in the whole run.
  """
  name_hash = zlib.crc32(phase_name.encode("utf-8"))
  data_seed = zlib.crc32(f"{seed}/{phase_name}".encode("utf-8"))
  return jax.random.fold_in(jax.random.key(seed), name_hash), data_seed


# ---------------------------------------------------------------------------
# Restore or initialise.
# ---------------------------------------------------------------------------
def _restore_or_initialise(
    ckpt: checkpoint_lib.Checkpointer, *, model: nn.Module, tx,
    rng: jax.Array, image_shape: tuple[int, ...],
    init_variables: Optional[dict], replicated: NamedSharding,
    phase_name: str) -> tuple[train_step.TrainState, Any, dict]:
  """(state, state shardings, saved meta or {}) at the phase's start.

  The phase's own latest checkpoint wins; else `init_variables` (checked
  against the model); else a fresh initialisation at `rng`.
  """
  abstract = jax.eval_shape(lambda r: train_step.init_state(model, tx, r, image_shape),
                            rng)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  latest = ckpt.latest_step()
  if latest is not None:
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, shardings)
    state, meta = ckpt.restore(latest, target)
    logging.info("phase %s: resumed from step %d", phase_name, latest)
    return state, shardings, meta
  if init_variables is not None:
    checkpoint_lib.check_variables_match(abstract.variables, init_variables,
                          f"the variables handed to phase {phase_name!r}")
    state = jax.jit(lambda v: train_step.TrainState.create(tx, v),
                    out_shardings=shardings)(
                        jax.tree.map(jnp.asarray, init_variables))
    return state, shardings, {}
  state = jax.jit(lambda r: train_step.init_state(model, tx, r, image_shape),
                  out_shardings=shardings)(rng)
  return state, shardings, {}


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------
def _with_eval(meta: dict, result: dict, writer, step: int) -> dict:
  """`meta` with `result` as the last evaluation (best top-1 updated); logs it."""
  writer.write_scalars(step, {k: v for k, v in result.items()
                              if k != "eval/count"})
  return {**meta, "last_eval": result,
          "best_top1": max(meta["best_top1"], result["eval/top1"])}


# ---------------------------------------------------------------------------
# One phase.
# ---------------------------------------------------------------------------
def train_phase(config: ml_collections.ConfigDict, phase_name: str,
                phase_index: int, workdir: paths.PathLike, *,
                init_variables: Optional[dict] = None,
                teacher: Optional[tuple[nn.Module, dict]] = None,
                mesh: Optional[Mesh] = None) -> PhaseResult:
  """Trains (or resumes) phase `phase_name`; returns its final result.

  Args:
    config: the whole run's config.
    phase_name: key in `config.phases` (the seeds derive from it).
    phase_index: position in `config.phase_order` (dynamics logging reads
      the previous phase's files).
    workdir: run directory (local or gs://); the phase writes
      `<workdir>/<phase_name>/`.
    init_variables: {'params', 'batch_stats'} to start from (hand-off or
      `init_from`); must match the model exactly. None = fresh init.
    teacher: (model, variables) of a frozen teacher for distillation.
    mesh: device mesh (default: all devices on a `data` axis).
  """
  # --- Set-up: mesh, step counts, model, optimizer. ---
  phase_cfg = config.phases[phase_name]
  mesh = topology.make_mesh() if mesh is None else mesh
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  info = input_pipeline.get_info(config.dataset)
  steps_per_epoch = input_pipeline.steps_per_epoch(info, config.batch_size)
  num_epochs = phase_cfg.num_epochs
  total_steps = steps_per_epoch * num_epochs
  model = models.from_config(config, phase_cfg.model, info.num_classes)
  # The optimizer config resolved once; the chain and the logged rate come
  # from the same schedule(s).
  opt = optim.build(optim.resolve_config(phase_cfg.optimizer),
                    steps_per_epoch=steps_per_epoch,
                    num_epochs=max(num_epochs, 1))
  tx = opt.tx
  init_rng, data_seed = phase_seeds(config.seed, phase_name)

  # --- Restore or initialise. ---
  ckpt = checkpoint_lib.Checkpointer(
      paths.resolve(workdir) / phase_name / "checkpoints",
      max_to_keep=config.keep_checkpoints)
  state, state_shardings, saved_meta = _restore_or_initialise(
      ckpt, model=model, tx=tx, rng=init_rng, image_shape=info.image_shape,
      init_variables=init_variables, replicated=replicated,
      phase_name=phase_name)
  meta = {"phase": phase_name, "best_top1": 0.0, "last_eval": None,
          "seconds": 0.0, "model": phase_cfg.model.to_dict(), **saved_meta}
  step = int(jax.device_get(state.step))

  # --- Teacher, jitted steps, writers. ---
  teacher_model, teacher_vars = (None, {}) if teacher is None else teacher
  teacher_vars = jax.device_put(teacher_vars, replicated)
  step_fn = jax.jit(
      train_step.make_train_step(model, tx, phase_cfg.loss, teacher_model,
                                 learning_rate=opt.learning_rate),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  eval_step = evaluation.sharded_eval_step(model, mesh)
  writer = logs.create_writer(workdir, phase_name)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer,
      every_steps=config.log_every_steps)
  # Weight dynamics (flip-flops, C2I, dead weights): None unless
  # config.dynamics.every is set; its own jitted step, run every N steps.
  dynamics_monitor = dynamics_monitor_lib.DynamicsMonitor.create(
      config, phase_name, phase_index, workdir, model=model,
      teacher_model=teacher_model, state=state, step=step,
      replicated=replicated, writer=writer)
  metric_log = logs.MetricLog(writer, phase_name=phase_name,
                         total_steps=total_steps,
                         steps_per_epoch=steps_per_epoch,
                         num_epochs=num_epochs, start_step=step,
                         checkpoint_dir=ckpt.directory)
  train_iter = input_pipeline.train_iterator(
      config.dataset, global_batch_size=config.batch_size, seed=data_seed,
      start_step=step, sharding=batch_sharding) if step < total_steps else None
  t_start, seconds_before = time.time(), float(meta["seconds"])

  # --- The step loop. ---
  try:
    with multihost.StopAgreement(ckpt) as stop:
      while step < total_steps:
        batch = next(train_iter)
        state, metrics = step_fn(state, batch, teacher_vars)
        step += 1
        metric_log.add(step, metrics)
        report_progress(step)
        if dynamics_monitor is not None:
          dynamics_monitor.after_step(step, state, batch, teacher_vars)
        epoch = step // steps_per_epoch
        end_of_epoch = step % steps_per_epoch == 0

        # --- Metrics and the NaN check. ---
        if step % config.log_every_steps == 0 or end_of_epoch:
          metric_log.flush()

        # --- Evaluation. ---
        if end_of_epoch and (epoch % config.eval_every_epochs == 0
                             or step == total_steps):
          meta = _with_eval(meta, evaluation.evaluate_split(eval_step, state.variables,
                                            config, batch_sharding),
                            writer, step)
          multihost.report(
              f"[{phase_name}] epoch {epoch}/{num_epochs} eval top1 "
              f"{meta['last_eval']['eval/top1']:.4f} top5 "
              f"{meta['last_eval']['eval/top5']:.4f} "
              f"(best {meta['best_top1']:.4f})")

        # --- Checkpoint and preemption. ---
        stopping = stop.agreed(step)
        if (step % config.checkpoint_every_steps == 0 or step == total_steps
            or stopping):
          metric_log.flush()  # Never checkpoint a NaN state.
          meta["seconds"] = seconds_before + time.time() - t_start
          ckpt.save(step, state, meta)
          writer.flush()
        if stopping:
          raise Preempted(
              f"phase {phase_name!r} stopped at step {step}/{total_steps} on "
              f"request; checkpoint saved in {ckpt.directory}; re-run the "
              "same command to resume")

    # --- Final evaluation (also for 0-epoch phases that only load weights). ---
    if meta["last_eval"] is None:
      meta = _with_eval(meta, evaluation.evaluate_split(eval_step, state.variables, config,
                                        batch_sharding), writer, step)
    writer.close()
    ckpt.close()
  except BaseException as e:
    # Close what can be closed without masking why the phase stopped; a
    # failed write into the workdir (metrics, events) becomes one line that
    # names the last good checkpoint (checkpoint.StorageError).
    with contextlib.suppress(Exception):
      writer.close()
    with contextlib.suppress(Exception):
      ckpt.close()
    if (isinstance(e, OSError) and
        not isinstance(e, checkpoint_lib.StorageError)):
      what = (str(e.filename) if getattr(e, "filename", None)
              else f"into {workdir}")
      raise ckpt.storage_error(what, e) from e
    raise
  variables = jax.device_get(state.variables)
  return PhaseResult(
      top1=meta["last_eval"]["eval/top1"], top5=meta["last_eval"]["eval/top5"],
      best_top1=meta["best_top1"], steps=step,
      seconds=float(meta["seconds"]),
      params_sha256=checkpoint_lib.params_sha256(variables["params"]),
      variables=variables, model=model)
