"""The training hook that logs `bnn_jax.dynamics` metrics during a phase.

`DynamicsMonitor.create(...)` builds it from `config.dynamics` (every N
steps; 0 = off), and `after_step` runs the jitted `dynamics.make_dynamics_step`
on the last training batch every N steps and writes the metrics under
'dynamics/' through a clu metric writer (TensorBoard + metrics.jsonl). The
binary signs at the phase start and at the run's initialisation are kept in
`<phase_dir>/dynamics_signs.npz`, so a resumed phase compares against the
same references. Separate from `bnn_jax.dynamics` because clu's writers
import TensorFlow; the metrics do not.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from etils import epath

from bnn_jax import dynamics
from bnn_jax import paths
from bnn_jax.training import multihost

SIGNS_FILE = dynamics.SIGNS_FILE


def _read_signs(path: epath.Path) -> dict[str, dict[str, np.ndarray]]:
  with path.open("rb") as f:
    data = np.load(io.BytesIO(f.read()))
    out: dict[str, dict[str, np.ndarray]] = {"init": {}, "start": {}}
    for key in data.files:
      which, name = key.split("/", 1)
      out[which][name] = data[key]
  return out


def _write_signs(path: epath.Path, init: Mapping[str, Any],
                 start: Mapping[str, Any]) -> None:
  arrays = {f"init/{k}": np.asarray(v) for k, v in init.items()}
  arrays.update({f"start/{k}": np.asarray(v) for k, v in start.items()})
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  paths.write_bytes_atomic(path, buf.getvalue())


def _matches(signs: Mapping[str, np.ndarray],
             current: Mapping[str, jax.Array]) -> bool:
  return (set(signs) == set(current) and
          all(signs[k].shape == current[k].shape for k in current))


class DynamicsMonitor:
  """Logs `weight_dynamics` every `every` steps of a phase under 'dynamics/'.

  Call `after_step(step, state, batch, teacher_variables)` after every train
  step. At steps that are multiples of `every` it runs the jitted dynamics
  step on that batch and writes the metrics; one step earlier it keeps the
  binary signs, so the flip ratio is between consecutive steps
  (docs/recipe.md#weight-dynamics).

  References, kept in `<phase_dir>/dynamics_signs.npz` so a resumed phase
  uses the same ones: 'start' = the signs at the phase's first step;
  'init' = the signs at the run's initialisation, i.e. 'start' for a phase
  trained from scratch and the source phase's 'init' for a phase handed
  parameters (`init_from`), when that phase logged dynamics too (otherwise
  its start, with a warning).
  """

  def __init__(self, *, every: int, dynamics_step: Callable,
               signs_fn: Callable, writer: metric_writers.MetricWriter,
               init: Any, start: Any, signs: Any):
    self._every = every
    self._dynamics_step = dynamics_step
    self._signs_fn = signs_fn
    self._writer = writer
    self._init = init
    self._start = start
    self._previous = signs

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, phase_name: str,
             phase_index: int, workdir: str, *, model: nn.Module,
             teacher_model: Optional[nn.Module], state: Any, step: int,
             replicated: jax.sharding.Sharding,
             writer: metric_writers.MetricWriter
             ) -> Optional["DynamicsMonitor"]:
    """The monitor of phase `phase_name`, or None when off or nothing is binary.

    Args:
      config: the run's config (`config.dynamics`, phases, phase_order).
      phase_name: the phase being trained.
      phase_index: its position in `config.phase_order`.
      workdir: the run directory.
      model: the phase's model.
      teacher_model: its teacher, if it distils.
      state: the train state at `step` (before the loop).
      step: the step the loop starts from (0, or the resumed step).
      replicated: the sharding of replicated values.
      writer: where metrics go (TensorBoard + metrics.jsonl).
    """
    dyn_cfg = config.get("dynamics", dynamics.default_dynamics_config())
    if not dyn_cfg.every:
      return None
    if not dynamics.binary_kernels(state.params):
      logging.info("phase %s: no binary kernels, no dynamics", phase_name)
      return None
    phase_cfg = config.phases[phase_name]
    signs_fn = jax.jit(dynamics.binary_signs, out_shardings=replicated)
    current = signs_fn(state.params)
    own = epath.Path(workdir) / phase_name / SIGNS_FILE
    if own.exists():
      saved = _read_signs(own)
      init, start = saved["init"], saved["start"]
    else:
      start = current
      if step:
        print(f"{multihost.prefix()}[{phase_name}] dynamics: no "
              f"{SIGNS_FILE} from the phase start; C2I references are the "
              f"signs at step {step}", flush=True)
      init = _inherited_init(config, phase_name, phase_index, workdir,
                             current) or current
      if jax.process_index() == 0:
        _write_signs(own, jax.device_get(init), jax.device_get(start))
    init, start = (jax.device_put(dict(t), replicated) for t in (init, start))
    dynamics_step = jax.jit(
        dynamics.make_dynamics_step(model, phase_cfg.loss, teacher_model,
                                    dead_threshold=dyn_cfg.dead_threshold,
                                    per_layer=dyn_cfg.per_layer),
        out_shardings=replicated)
    return cls(every=dyn_cfg.every, dynamics_step=dynamics_step,
               signs_fn=signs_fn, writer=writer, init=init, start=start,
               signs=current)

  def after_step(self, step: int, state: Any, batch: dict,
                 teacher_variables: Any) -> None:
    """Logs the metrics at multiples of `every`; keeps signs one step before."""
    if step % self._every == 0:
      # Signs were kept at step - 1: at the loop's start or below.
      metrics = self._dynamics_step(state, batch, teacher_variables,
                                    self._previous, self._init, self._start)
      self._writer.write_scalars(step, {
          f"dynamics/{k}": v for k, v in jax.device_get(metrics).items()})
    if (step + 1) % self._every == 0:
      self._previous = self._signs_fn(state.params)


def _inherited_init(config: ml_collections.ConfigDict, phase_name: str,
                    phase_index: int, workdir: str,
                    current: Mapping[str, jax.Array]) -> Optional[dict]:
  """The 'init' signs of the phase this one takes its parameters from."""
  init_from = config.phases[phase_name].init_from
  if not init_from:
    return None
  if init_from == "previous":
    order = [n.strip() for n in str(config.phase_order).split(",")
             if n.strip()]
    source = epath.Path(workdir) / order[phase_index - 1]
  else:
    source = epath.Path(init_from)
    if source.name == "checkpoints":
      source = source.parent
  path = source / SIGNS_FILE
  if path.exists():
    init = _read_signs(path)["init"]
    if _matches(init, current):
      return init
  print(f"{multihost.prefix()}[{phase_name}] dynamics: {path} missing or not "
        "matching; C2I against the initialisation uses the phase start "
        "instead", flush=True)
  return None
