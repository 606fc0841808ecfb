"""A run is a list of phases: e.g. teacher -> step 1 -> step 2 (AdamBNN's two steps).

`config.phase_order` ("teacher,step1,step2") names entries of
`config.phases`; each phase has its own model, optimizer, schedule, loss and
epochs, and may

* start from the previous phase's final variables (`init_from="previous"`):
  *all* params and BatchNorm statistics move, and any missing, unexpected or
  mis-shaped variable is an error naming it. (ReActNet's own step 2 loaded
  non-strictly under renamed parameters and silently re-initialised every
  binary weight; this hand-off cannot.)
* start from a checkpoint directory (`init_from="/path"`), the same check
  applying: a phase can run alone this way;
* distil from an earlier phase's final model (`teacher="teacher"`).

Re-running the same command continues where it stopped: finished phases are
restored from their final checkpoint (not retrained), an interrupted one
resumes from its latest checkpoint. `<workdir>/results.json` holds
`{phase: {top1, top5, best_top1, steps, seconds, params_sha256}}` in phase
order, rewritten atomically after each phase.

The workdir may be local or `gs://` (`bnn_jax.paths`). With several
processes, process 0 alone writes the shared files (config.json,
results.json) and moves an old run aside; the others wait at a barrier
where they read what it wrote.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import losses
from bnn_jax import malloc_defaults
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import paths
from bnn_jax.training import input_pipeline
from bnn_jax.training import multihost
from bnn_jax.training import topology
from bnn_jax.config_lib import phase_names  # noqa: F401  (bnn_jax.phases.phase_names)
from bnn_jax.training import loop
from jax.sharding import Mesh
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
# Fields that change how a run is watched, not what it computes: a workdir
# may be continued with different values of these.
OPERATIONAL_FIELDS = ("log_every_steps", "eval_every_epochs",
                      "checkpoint_every_steps", "keep_checkpoints",
                      "phase_order", "dataset.data_dir", "dynamics",
                      "cpu_malloc", "dataset.data_service_address")


COMPUTE_DTYPES = ("float32", "bfloat16")


def _check_dtype(field: str, value: Any) -> None:
  """ValueError unless `value` names a compute dtype of COMPUTE_DTYPES."""
  try:
    name = jnp.dtype(value).name
  except TypeError:
    name = None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"{field}={value!r} is not a dtype; use 'float32' or "
                     "'bfloat16'")


def validate(config: ml_collections.ConfigDict,
             info: Optional[input_pipeline.DatasetInfo] = None,
             check_inputs: bool = True) -> None:
  """Checks the whole run's config before anything trains; ValueError names the fix.

  Catches what would otherwise fail hours in: batch sizes that do not split
  over the devices (`topology.batch_layout`), BN groups that do not divide
  the per-device batch, an unprepared data set, unknown model / optimizer /
  schedule / binariser names, bad values, a 0-epoch phase with nothing to
  load, a KD loss without a teacher, a teacher or `init_from` that is not
  available.

  Args:
    config: the run's config.
    info: the data set's sizes; None reads them from the prepared data set.
    check_inputs: also require what the run reads from outside the config
      (a checkpoint for every 0-epoch phase, existing `init_from`
      directories); `bnn_jax.training.dry_run` reports those instead.
  """
  names = phase_names(config)
  topology.batch_layout(config, jax.device_count(), jax.process_count())
  _check_dtype("config.model.dtype", config.model.dtype)
  malloc_defaults.check_mode(config.cpu_malloc)
  info = info or input_pipeline.get_info(config.dataset)
  input_pipeline.steps_per_epoch(info, config.batch_size)
  for index, name in enumerate(names):
    phase = config.phases[name]
    where = f"config.phases.{name}"
    if not isinstance(phase.num_epochs, int) or phase.num_epochs < 0:
      raise ValueError(f"{where}.num_epochs={phase.num_epochs} must be an "
                       "integer >= 0")
    if check_inputs and phase.num_epochs == 0 and not phase.init_from:
      raise ValueError(f"phase {name!r} trains 0 epochs and loads nothing; "
                       f"set --{where}.init_from=<checkpoint dir> (e.g. from "
                       "python -m bnn_jax.import_torch) or num_epochs > 0")
    if phase.init_from == "previous" and index == 0:
      raise ValueError(f"phase {name!r} has init_from='previous' but is the "
                       f"first phase run; set --{where}.init_from=<checkpoint "
                       "dir>")
    if check_inputs and phase.init_from not in ("", "previous") and (
        not paths.resolve(phase.init_from, f"--{where}.init_from").is_dir()):
      raise ValueError(f"{where}.init_from={phase.init_from!r} is not a "
                       "directory; pass a bnn_jax checkpoint directory")
    if phase.teacher and phase.teacher not in names[:index]:
      raise ValueError(f"phase {name!r} distils from {phase.teacher!r}, which "
                       f"is not an earlier phase of phase_order {names}")
    if phase.model.get("dtype") is not None:
      _check_dtype(f"{where}.model.dtype", phase.model.dtype)
    optim.resolve_config(phase.optimizer)
    optim.warn_if_no_training(phase.optimizer, phase.num_epochs, where)
    loss_cfg = losses.resolve_loss_config(phase.loss)
    if loss_cfg.kd_weight > 0 and not phase.teacher:
      raise ValueError(f"phase {name!r} has loss.kd_weight={loss_cfg.kd_weight}"
                       f" but no teacher; set --{where}.teacher=<earlier phase>"
                       f" or --{where}.loss.kd_weight=0")
    model = models.from_config(config, phase.model, info.num_classes)
    dummy = jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.float32)
    try:
      jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), dummy)
    except ValueError as e:
      raise ValueError(f"{where}.model: {e}") from e


def _config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields where two config dicts differ."""
  out = []
  for key in sorted(set(a) | set(b)):
    name = f"{prefix}{key}"
    if name in OPERATIONAL_FIELDS:
      continue
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _config_differences(va, vb, name + ".")
    elif va != vb:
      out.append(name)
  return out


def claim_workdir(config: ml_collections.ConfigDict, workdir: paths.PathLike,
                  overwrite: bool = False) -> None:
  """Makes `workdir` this config's: refuses one that holds another config's run.

  With `overwrite`, the other run is moved aside to
  `<workdir>.replaced-<time>` (never deleted). Every process reads
  config.json and reaches the same decision; process 0 alone moves the old
  run and writes the new config.json, then all meet at a barrier.
  """
  workdir = paths.resolve(workdir)
  path = workdir / CONFIG_FILE
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  differences = []
  if path.exists():
    differences = _config_differences(json.loads(path.read_text()), current)
  if differences and not overwrite:
    shown = ", ".join(differences[:6]) + (
        f", ... ({len(differences)} in all)" if len(differences) > 6 else "")
    raise ValueError(
        f"{workdir} holds a run of a different config (differs in: "
        f"{shown}); use a new --workdir, or pass --overwrite to move the "
        "old run aside")
  multihost.barrier("bnn_jax: config.json read")
  if multihost.process_index() == 0:
    if differences:
      aside = workdir.parent / (
          f"{workdir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
      workdir.rename(aside)
      multihost.report(f"moved the previous run in {workdir} to {aside}")
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      paths.write_text_atomic(path, json.dumps(current, indent=2,
                                               sort_keys=True))
    except OSError as e:
      raise checkpoint_lib.storage_error(
          str(path), e, "nothing was deleted") from e
  multihost.barrier("bnn_jax: workdir claimed")


def _write_results(workdir: paths.PathLike, results: dict) -> None:
  if multihost.process_index() != 0:  # One writer: the workdir is shared.
    return
  path = paths.resolve(workdir) / RESULTS_FILE
  try:
    paths.write_text_atomic(path, json.dumps(results, indent=2))
  except OSError as e:
    raise checkpoint_lib.storage_error(
        str(path), e, "nothing was deleted: the finished phases keep their "
        "checkpoints and are not trained again") from e


def run(config: ml_collections.ConfigDict, workdir: paths.PathLike,
        mesh: Optional[Mesh] = None, overwrite: bool = False) -> dict:
  """Runs (or continues) every phase of `config.phase_order`; returns results.

  The config is validated first, and `workdir` must be new or hold a run of
  the same config (see `claim_workdir`).
  """
  names = phase_names(config)
  workdir = paths.resolve(workdir)  # A scheme that cannot work fails here.
  validate(config)
  claim_workdir(config, workdir, overwrite=overwrite)
  finished: dict[str, loop.PhaseResult] = {}
  results: dict[str, dict] = {}
  previous: Optional[loop.PhaseResult] = None
  for index, name in enumerate(names):
    phase_cfg = config.phases[name]

    # Where the phase starts: fresh, the previous phase, or a checkpoint.
    init_variables = None
    if phase_cfg.init_from == "previous":
      init_variables = previous.variables
    elif phase_cfg.init_from:
      init_variables, _ = checkpoint_lib.load_variables(phase_cfg.init_from)

    # Which frozen model it distils from.
    teacher = None
    if phase_cfg.teacher:
      t = finished[phase_cfg.teacher]
      teacher = (t.model, t.variables)

    result = loop.train_phase(config, name, index, workdir,
                               init_variables=init_variables,
                               teacher=teacher, mesh=mesh)
    finished[name] = previous = result
    results[name] = result.summary()
    _write_results(workdir, results)
    multihost.report(
        f"[{name}] done: top1 {result.top1:.4f} (best {result.best_top1:.4f})"
        f" top5 {result.top5:.4f}, {result.steps} steps, "
        f"{result.seconds:.1f} s, params sha256 {result.params_sha256[:12]}")
  return results
