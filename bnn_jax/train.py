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

Determinism: the data order is a function of (seed, step) (see
`input_pipeline.train_iterator`), the model has no other randomness, and a
checkpoint holds the whole state, so a run resumed from a checkpoint ends
with bitwise the same parameters as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import signal
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import periodic_actions
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import dynamics
from bnn_jax import input_pipeline
from bnn_jax import logs
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import train_step


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


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_variables_match(expected: Any, given: Any, what: str) -> None:
  """Raises ValueError listing missing, unexpected and mis-shaped variables."""
  exp = {_path_str(p): tuple(v.shape) for p, v in
         jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {_path_str(p): tuple(np.shape(v)) for p, v in
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


class _StopSignal:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
      f"{s // 60}m{s % 60:02d}s")


# ---------------------------------------------------------------------------
# One phase.
# ---------------------------------------------------------------------------
def train_phase(config: ml_collections.ConfigDict, phase_name: str,
                phase_index: int, workdir: str, *,
                init_variables: Optional[dict] = None,
                teacher: Optional[tuple[nn.Module, dict]] = None,
                mesh: Optional[Mesh] = None) -> PhaseResult:
  """Trains (or resumes) phase `phase_name`; returns its final result.

  Args:
    config: the whole run's config.
    phase_name: key in `config.phases`.
    phase_index: position in `config.phase_order` (folded into the seeds).
    workdir: run directory; the phase writes `<workdir>/<phase_name>/`.
    init_variables: {'params', 'batch_stats'} to start from (hand-off or
      `init_from`); must match the model exactly. None = fresh init.
    teacher: (model, variables) of a frozen teacher for distillation.
    mesh: device mesh (default: all devices on a `data` axis).
  """
  phase_cfg = config.phases[phase_name]
  mesh = make_mesh() if mesh is None else mesh
  phase_dir = os.path.join(workdir, phase_name)
  os.makedirs(phase_dir, exist_ok=True)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  # --- Data and step counts. ---
  info = input_pipeline.get_info(config.dataset)
  steps_per_epoch = input_pipeline.steps_per_epoch(info, config.batch_size)
  num_epochs = phase_cfg.num_epochs
  total_steps = steps_per_epoch * num_epochs

  # --- Model, optimizer (built once, outside any jit) and state. ---
  model = build_model(config, phase_cfg.model, info.num_classes)
  tx = optim.build_optimizer(phase_cfg.optimizer,
                             steps_per_epoch=steps_per_epoch,
                             num_epochs=max(num_epochs, 1))
  rng = jax.random.fold_in(jax.random.key(config.seed), phase_index)
  dummy = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)

  def init_state(rng):
    variables = model.init(rng, dummy, train=False)
    params = variables["params"]
    return train_step.TrainState(step=jnp.zeros((), jnp.int32),
                                 params=params,
                                 batch_stats=variables.get("batch_stats", {}),
                                 opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state, rng)
  state_shardings = jax.tree.map(lambda _: replicated, abstract_state)
  if init_variables is not None:
    check_variables_match(abstract_state.variables, init_variables,
                          f"the variables handed to phase {phase_name!r}")

    def init_from_variables(variables):
      return train_step.TrainState(step=jnp.zeros((), jnp.int32),
                                   params=variables["params"],
                                   batch_stats=variables["batch_stats"],
                                   opt_state=tx.init(variables["params"]))

    state = jax.jit(init_from_variables, out_shardings=state_shardings)(
        jax.tree.map(jnp.asarray, init_variables))
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(rng)

  # --- Resume from the phase's own checkpoint, if any. ---
  ckpt = checkpoint_lib.Checkpointer(os.path.join(phase_dir, "checkpoints"),
                                     max_to_keep=config.keep_checkpoints)
  meta = {"phase": phase_name, "best_top1": 0.0, "last_eval": None,
          "seconds": 0.0, "model": phase_cfg.model.to_dict()}
  latest = ckpt.latest_step()
  if latest is not None:
    abstract_with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_shardings)
    state, saved_meta = ckpt.restore(latest, abstract_with_shardings)
    meta.update(saved_meta)
    logging.info("phase %s: resumed from step %d", phase_name, latest)
  step = int(jax.device_get(state.step))

  # --- Teacher and jitted steps. ---
  teacher_model, teacher_vars = (None, {}) if teacher is None else teacher
  teacher_vars = jax.device_put(teacher_vars, replicated)
  step_fn = jax.jit(
      train_step.make_train_step(model, tx, phase_cfg.loss, teacher_model,
                                 learning_rate=optim.build_schedule(
                                     phase_cfg.optimizer,
                                     steps_per_epoch=steps_per_epoch,
                                     num_epochs=max(num_epochs, 1))),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))
  eval_step = jax.jit(train_step.make_eval_step(model),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)

  def run_eval(state) -> dict:
    batches = input_pipeline.eval_iterator(
        config.dataset, global_batch_size=config.eval_batch_size,
        sharding=batch_sharding)
    return train_step.evaluate(eval_step, state.variables, batches)

  writer = logs.create_writer(workdir, phase_name)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer,
      every_steps=config.log_every_steps)
  # Weight dynamics (flip-flops, C2I, dead weights): None unless
  # config.dynamics.every is set; its own jitted step, run every N steps.
  dynamics_monitor = dynamics.DynamicsMonitor.create(
      config, phase_name, phase_index, workdir, model=model,
      teacher_model=teacher_model, state=state, step=step,
      replicated=replicated, writer=writer)

  def save(state, step):
    ckpt.save(step, state, meta)

  # --- The loop. ---
  data_seed = config.seed * 1000 + phase_index
  train_iter = input_pipeline.train_iterator(
      config.dataset, global_batch_size=config.batch_size, seed=data_seed,
      start_step=step, sharding=batch_sharding) if step < total_steps else None
  pending: list[tuple[int, dict]] = []
  t_start, step_start = time.time(), step
  seconds_before = float(meta["seconds"])

  def flush_metrics():
    """Checks the steps run since the last flush for NaN/Inf; logs their mean."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not bool(m["finite"]):
        raise TrainingError(
            f"phase {phase_name!r}: loss or gradients became NaN/Inf at step "
            f"{s}; the last good checkpoint in {ckpt.directory} is left intact "
            "(lower the learning rate or check the data)")
    last_step = pending[-1][0]
    means = {k: float(np.mean([m[k] for m in fetched]))
             for k in fetched[0] if k != "finite"}
    means["train/lr"] = float(fetched[-1]["train/lr"])
    writer.write_scalars(last_step, means)
    pending.clear()
    elapsed = time.time() - t_start
    rate = (last_step - step_start) / max(elapsed, 1e-9)
    eta = (total_steps - last_step) / max(rate, 1e-9)
    print(f"[{phase_name}] step {last_step}/{total_steps} "
          f"epoch {math.ceil(last_step / steps_per_epoch)}/{num_epochs} "
          f"loss {means['train/loss']:.4f} top1 {means['train/top1']:.3f} "
          f"lr {means['train/lr']:.3g} | {rate:.1f} steps/s, "
          f"ETA {_format_seconds(eta)}", flush=True)

  with _StopSignal() as stop:
    while step < total_steps:
      batch = next(train_iter)
      state, metrics = step_fn(state, batch, teacher_vars)
      step += 1
      pending.append((step, metrics))
      report_progress(step)
      if dynamics_monitor is not None:  # --- dynamics hook ---
        dynamics_monitor.after_step(step, state, batch, teacher_vars)
      end_of_epoch = step % steps_per_epoch == 0
      epoch = step // steps_per_epoch
      if step % config.log_every_steps == 0 or end_of_epoch:
        flush_metrics()
      if end_of_epoch and (epoch % config.eval_every_epochs == 0
                           or step == total_steps):
        result = run_eval(state)
        meta["last_eval"] = result
        meta["best_top1"] = max(meta["best_top1"], result["eval/top1"])
        writer.write_scalars(step, {k: v for k, v in result.items()
                                    if k != "eval/count"})
        print(f"[{phase_name}] epoch {epoch}/{num_epochs} eval top1 "
              f"{result['eval/top1']:.4f} top5 {result['eval/top5']:.4f} "
              f"(best {meta['best_top1']:.4f})", flush=True)
      preempted = stop.received or ckpt.reached_preemption(step)
      if (step % config.checkpoint_every_steps == 0 or step == total_steps
          or preempted):
        flush_metrics()  # never checkpoint a NaN state
        meta["seconds"] = seconds_before + time.time() - t_start
        save(state, step)
      if preempted:
        writer.flush()
        raise Preempted(
            f"phase {phase_name!r} stopped at step {step}/{total_steps} on "
            f"request; checkpoint saved in {ckpt.directory}; re-run the same "
            "command to resume")

  # --- Final evaluation (also for 0-epoch phases that only load weights). ---
  if meta["last_eval"] is None:
    meta["last_eval"] = run_eval(state)
    meta["best_top1"] = max(meta["best_top1"], meta["last_eval"]["eval/top1"])
    writer.write_scalars(step, {k: v for k, v in meta["last_eval"].items()
                                if k != "eval/count"})
  writer.flush()
  ckpt.close()
  variables = jax.device_get(state.variables)
  return PhaseResult(
      top1=meta["last_eval"]["eval/top1"], top5=meta["last_eval"]["eval/top5"],
      best_top1=meta["best_top1"], steps=step,
      seconds=float(meta["seconds"]),
      params_sha256=params_sha256(variables["params"]),
      variables=variables, model=model)
