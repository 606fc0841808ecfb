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
"""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import train

RESULTS_FILE = "results.json"


def phase_names(config: ml_collections.ConfigDict) -> list[str]:
  """The phases to run, in order, validated against `config.phases`."""
  names = [n.strip() for n in str(config.phase_order).split(",") if n.strip()]
  if not names:
    raise ValueError("config.phase_order is empty; name at least one phase, "
                     f"e.g. --config.phase_order={','.join(config.phases)}")
  unknown = [n for n in names if n not in config.phases]
  if unknown:
    raise ValueError(f"config.phase_order names unknown phase(s) {unknown}; "
                     f"defined phases: {sorted(config.phases)}")
  return names


def _write_results(workdir: str, results: dict) -> None:
  path = os.path.join(workdir, RESULTS_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: Optional[train.Mesh] = None) -> dict:
  """Runs (or continues) every phase of `config.phase_order`; returns results."""
  names = phase_names(config)
  os.makedirs(workdir, exist_ok=True)
  finished: dict[str, train.PhaseResult] = {}
  results: dict[str, dict] = {}
  previous: Optional[train.PhaseResult] = None
  for index, name in enumerate(names):
    phase_cfg = config.phases[name]

    # Where the phase starts: fresh, the previous phase, or a checkpoint.
    init_variables = None
    if phase_cfg.init_from == "previous":
      if previous is None:
        raise ValueError(
            f"phase {name!r} has init_from='previous' but is the first phase "
            f"run; set --config.phases.{name}.init_from=<checkpoint dir>")
      init_variables = previous.variables
    elif phase_cfg.init_from:
      init_variables, _ = checkpoint_lib.load_variables(phase_cfg.init_from)

    # Which frozen model it distils from.
    teacher = None
    if phase_cfg.teacher:
      if phase_cfg.teacher not in finished:
        raise ValueError(
            f"phase {name!r} distils from {phase_cfg.teacher!r}, which is not "
            f"an earlier phase of phase_order {names}; put it first")
      t = finished[phase_cfg.teacher]
      teacher = (t.model, t.variables)

    result = train.train_phase(config, name, index, workdir,
                               init_variables=init_variables,
                               teacher=teacher, mesh=mesh)
    finished[name] = previous = result
    results[name] = result.summary()
    _write_results(workdir, results)
    print(f"[{name}] done: top1 {result.top1:.4f} (best {result.best_top1:.4f})"
          f" top5 {result.top5:.4f}, {result.steps} steps, "
          f"{result.seconds:.1f} s, params sha256 {result.params_sha256[:12]}",
          flush=True)
  return results
