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
(see `StopAgreement`).

`train_phase` reads top to bottom: set-up; restore or initialise; the step
loop with its sections (metrics and the NaN check; evaluation; checkpoint
and preemption); the final evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import time
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import dynamics_monitor as dynamics_monitor_lib
from bnn_jax import input_pipeline
from bnn_jax import logs
from bnn_jax import models
from bnn_jax import multihost
from bnn_jax import optim
from bnn_jax import paths
from bnn_jax import train_step

# With several processes, how often (in steps) they agree on whether to stop
# after a SIGTERM: one all-gather of one int per process (see StopAgreement
# and docs/scaling.md for its cost).
STOP_CHECK_EVERY_STEPS = 10


class TrainingError(RuntimeError):
  """Training cannot continue (NaN/Inf, bad configuration discovered late)."""


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
def make_mesh(devices=None) -> Mesh:
  """A 1-D `data` mesh over all devices (every process's), ordered by process.

  Ordering by process gives each process one contiguous block of every
  batch sharded `P('data')`, the rows its input pipeline provides (see
  `input_pipeline.train_iterator`).
  """
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: d.process_index)  # stable
  return Mesh(np.asarray(devices), ("data",))


def build_model(config: ml_collections.ConfigDict,
                model_cfg: ml_collections.ConfigDict,
                num_classes: int) -> nn.Module:
  """The phase's model: `model_cfg` (name + attributes) + the shared `config.model`.

  An attribute set in `model_cfg` wins over the shared one; an unset (None)
  `model_cfg.dtype` takes `config.model.dtype`.
  """
  overrides = {k: v for k, v in model_cfg.items()
               if k != "name" and not (k == "dtype" and v is None)}
  shared = dict(config.model)
  fields = models.model_fields(model_cfg.name)
  for key, value in shared.items():
    if key in fields and key not in overrides:
      overrides[key] = value
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  return models.create(model_cfg.name, num_classes=num_classes, **overrides)


def params_sha256(params: Any) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes (sorted paths)."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def check_variables_match(expected: Any, given: Any, what: str) -> None:
  """Raises ValueError listing missing, unexpected and mis-shaped variables."""
  exp = {paths.tree_path(p): tuple(v.shape) for p, v in
         jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {paths.tree_path(p): tuple(np.shape(v)) for p, v in
         jax.tree_util.tree_flatten_with_path(given)[0]}
  missing = sorted(set(exp) - set(got))
  extra = sorted(set(got) - set(exp))
  shapes = sorted(f"{k} {got[k]} (model wants {exp[k]})"
                  for k in set(exp) & set(got) if exp[k] != got[k])
  problems = []
  for label, names in (("missing", missing), ("unexpected", extra),
                       ("mis-shaped", shapes)):
    if names:
      shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)"
                                      if len(names) > 8 else "")
      problems.append(f"{label}: {shown}")
  if problems:
    raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


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


def _format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
      f"{s // 60}m{s % 60:02d}s")


# ---------------------------------------------------------------------------
# Restore or initialise.
# ---------------------------------------------------------------------------
def _init_state(model: nn.Module, tx, rng: jax.Array,
                image_shape: tuple[int, ...]) -> train_step.TrainState:
  """A fresh state: `model.init` at `rng`, step 0, the optimizer's init."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init(rng, dummy, train=False)
  return _state_from_variables(tx, variables)


def _state_from_variables(tx, variables: dict) -> train_step.TrainState:
  """Step 0 from given {'params', 'batch_stats'} (hand-off, `init_from`)."""
  return train_step.TrainState(step=jnp.zeros((), jnp.int32),
                               params=variables["params"],
                               batch_stats=variables.get("batch_stats", {}),
                               opt_state=tx.init(variables["params"]))


def _restore_or_initialise(
    ckpt: checkpoint_lib.Checkpointer, *, model: nn.Module, tx,
    rng: jax.Array, image_shape: tuple[int, ...],
    init_variables: Optional[dict], replicated: NamedSharding,
    phase_name: str) -> tuple[train_step.TrainState, Any, dict]:
  """(state, state shardings, saved meta or {}) at the phase's start.

  The phase's own latest checkpoint wins; else `init_variables` (checked
  against the model); else a fresh initialisation at `rng`.
  """
  abstract = jax.eval_shape(lambda r: _init_state(model, tx, r, image_shape),
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
    check_variables_match(abstract.variables, init_variables,
                          f"the variables handed to phase {phase_name!r}")
    state = jax.jit(lambda v: _state_from_variables(tx, v),
                    out_shardings=shardings)(
                        jax.tree.map(jnp.asarray, init_variables))
    return state, shardings, {}
  state = jax.jit(lambda r: _init_state(model, tx, r, image_shape),
                  out_shardings=shardings)(rng)
  return state, shardings, {}


# ---------------------------------------------------------------------------
# Metrics and the NaN check.
# ---------------------------------------------------------------------------
class MetricLog:
  """The train metrics of the steps since the last flush.

  `add` keeps each step's (device) metrics without waiting for them;
  `flush` fetches them, raises `TrainingError` if a step's loss or
  gradients were not finite, writes their means (lr: the last step's) and
  prints a progress line on process 0.
  """

  def __init__(self, writer, *, phase_name: str, total_steps: int,
               steps_per_epoch: int, num_epochs: int, start_step: int,
               checkpoint_dir: Any):
    self._writer = writer
    self._phase_name = phase_name
    self._total_steps = total_steps
    self._steps_per_epoch = steps_per_epoch
    self._num_epochs = num_epochs
    self._start_step = start_step
    self._start_time = time.time()
    self._checkpoint_dir = checkpoint_dir
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self) -> None:
    if not self._pending:
      return
    steps = [s for s, _ in self._pending]
    fetched = jax.device_get([m for _, m in self._pending])
    self._pending = []
    for s, m in zip(steps, fetched):
      if not bool(m["finite"]):
        raise TrainingError(
            f"phase {self._phase_name!r}: loss or gradients became NaN/Inf at "
            f"step {s}; the last good checkpoint in {self._checkpoint_dir} is "
            "left intact (lower the learning rate or check the data)")
    last_step = steps[-1]
    means = {k: float(np.mean([m[k] for m in fetched]))
             for k in fetched[0] if k != "finite"}
    for key in fetched[-1]:  # rates: the last step's, not a mean
      if key == "train/lr" or key.startswith("train/lr/"):
        means[key] = float(fetched[-1][key])
    group_rates = "".join(
        f" lr/{k[len('train/lr/'):]} {v:.3g}" for k, v in means.items()
        if k.startswith("train/lr/"))
    self._writer.write_scalars(last_step, means)
    elapsed = time.time() - self._start_time
    rate = (last_step - self._start_step) / max(elapsed, 1e-9)
    eta = (self._total_steps - last_step) / max(rate, 1e-9)
    multihost.report(
        f"[{self._phase_name}] step {last_step}/{self._total_steps} "
        f"epoch {math.ceil(last_step / self._steps_per_epoch)}/"
        f"{self._num_epochs} loss {means['train/loss']:.4f} "
        f"top1 {means['train/top1']:.3f} lr {means['train/lr']:.3g}"
        f"{group_rates} | "
        f"{rate:.1f} steps/s, ETA {_format_seconds(eta)}")


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------
def _evaluate(eval_step: Callable, variables: Any,
              config: ml_collections.ConfigDict,
              batch_sharding: NamedSharding) -> dict:
  """Top-1, top-5, loss and count over the whole eval split."""
  batches = input_pipeline.eval_iterator(
      config.dataset, global_batch_size=config.eval_batch_size,
      sharding=batch_sharding)
  return train_step.evaluate(eval_step, variables, batches)


def _with_eval(meta: dict, result: dict, writer, step: int) -> dict:
  """`meta` with `result` as the last evaluation (best top-1 updated); logs it."""
  writer.write_scalars(step, {k: v for k, v in result.items()
                              if k != "eval/count"})
  return {**meta, "last_eval": result,
          "best_top1": max(meta["best_top1"], result["eval/top1"])}


# ---------------------------------------------------------------------------
# Checkpoint and preemption.
# ---------------------------------------------------------------------------
class StopAgreement:
  """Decides, identically on every process, at which step the run stops.

  Inside `with StopAgreement(ckpt) as stop:`, SIGTERM sets a flag on the
  process that receives it; `stop.agreed(step)`, called by every process
  after every step, is True on all of them at the same step when

  * some process received SIGTERM: the processes compare flags every
    `every` steps (one all-gather of one int per process; every step, for
    free, in a single-process run), or
  * orbax reports the platform's preemption notice (`reached_preemption`,
    itself agreed across processes).

  A process acting on its own signal would enter the checkpoint's
  collectives while the others enter the next step's: a hang.
  """

  def __init__(self, ckpt: checkpoint_lib.Checkpointer,
               every: Optional[int] = None):
    self._ckpt = ckpt
    self._every = every or (1 if jax.process_count() == 1
                            else STOP_CHECK_EVERY_STEPS)
    self._received = False
    self._previous = None

  def __enter__(self) -> "StopAgreement":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._received = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    platform = self._ckpt.reached_preemption(step)
    if step % self._every:
      return platform
    return multihost.any_process(self._received) or platform


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
  mesh = make_mesh() if mesh is None else mesh
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  info = input_pipeline.get_info(config.dataset)
  steps_per_epoch = input_pipeline.steps_per_epoch(info, config.batch_size)
  num_epochs = phase_cfg.num_epochs
  total_steps = steps_per_epoch * num_epochs
  model = build_model(config, phase_cfg.model, info.num_classes)
  tx = optim.build_optimizer(phase_cfg.optimizer,
                             steps_per_epoch=steps_per_epoch,
                             num_epochs=max(num_epochs, 1))
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
                                 learning_rate=optim.logged_learning_rate(
                                     phase_cfg.optimizer,
                                     steps_per_epoch=steps_per_epoch,
                                     num_epochs=max(num_epochs, 1))),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(train_step.make_eval_step(model),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)
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
  metric_log = MetricLog(writer, phase_name=phase_name,
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
    with StopAgreement(ckpt) as stop:
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
          meta = _with_eval(meta, _evaluate(eval_step, state.variables,
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
      meta = _with_eval(meta, _evaluate(eval_step, state.variables, config,
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
      params_sha256=params_sha256(variables["params"]),
      variables=variables, model=model)
