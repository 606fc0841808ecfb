"""Thin wrapper over orbax's CheckpointManager.

Layout of a checkpoint directory (a phase's `<workdir>/<phase>/checkpoints`,
or the output of `bnn_jax.import_torch`):

  <dir>/<step>/state   the pytree {'step', 'params', 'batch_stats', 'opt_state'}
                       (an imported checkpoint has only params/batch_stats)
  <dir>/<step>/meta    JSON: phase name, model config, best accuracy, ...

`restore` restores into the shardings of an abstract target (so a resumed run
gets exactly the arrays it saved, placed where the jitted step wants them);
`load_variables` reads {'params', 'batch_stats'} from any such directory for
hand-off, `init_from`, teachers and evaluation.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, truncated or foreign."""


def _manager(directory: str, max_to_keep: Optional[int] = 2,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      # Synchronous saves: a checkpoint is complete when save() returns, so
      # SIGKILL right after a save never leaves a half-written latest step.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


class Checkpointer:
  """Saves and restores one phase's training state, keeping the last few."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._mngr = _manager(self.directory, max_to_keep=max_to_keep)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes `state` (a pytree of arrays) and `meta` (JSON) at `step`."""
    if step in self._mngr.all_steps():
      return
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                    force=True)
    self._mngr.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` into `abstract_state`'s structure and shardings."""
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for bad files.
      raise CheckpointError(
          f"cannot restore checkpoint {self.directory}/{step}: "
          f"{type(e).__name__}: {_first_line(e)}; delete that step directory "
          f"to fall back to an earlier one, or start a new --workdir") from e
    return restored.state, dict(restored.meta)

  def reached_preemption(self, step: int) -> bool:
    """True when the platform signalled preemption (multi-host agreement)."""
    return self._mngr.reached_preemption(step)

  def close(self) -> None:
    self._mngr.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else ""


def save_variables(directory: str, variables: dict, meta: dict,
                   step: int = 0) -> None:
  """Writes {'params', 'batch_stats'} as a checkpoint that `load_variables` reads."""
  mngr = _manager(directory, max_to_keep=None)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": variables["params"],
                                   "batch_stats": variables.get("batch_stats",
                                                                {})}),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _local_target(state_dir: str) -> Any:
  """The saved pytree's shapes and dtypes, on this process's first device.

  Restoring without a target recreates the saving run's shardings, which
  fails where those devices do not exist (a checkpoint written on 8 devices
  or several hosts, read by a 1-device or 1-host run).
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(state_dir).item_metadata
  finally:
    checkpointer.close()
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      metadata)


def resolve_directory(path: str, phase: Optional[str] = None) -> str:
  """The checkpoint directory that a command's `--checkpoint=path --phase=phase` names.

  `path` is either a run's workdir, and then the result is its phase
  directory `<path>/<phase>`, or already a checkpoint directory (a phase
  directory, its `checkpoints/` child, an import_torch output), returned as
  is. A workdir whose phase `phase` has no checkpoints is an error naming
  the phases it does hold.
  """
  path = os.path.abspath(path)
  if phase and os.path.isdir(os.path.join(path, phase, "checkpoints")):
    return os.path.join(path, phase)
  held = sorted(d for d in os.listdir(path)
                if os.path.isdir(os.path.join(path, d, "checkpoints"))
                ) if os.path.isdir(path) else []
  if held:
    raise CheckpointError(
        f"{path} is a workdir holding the phases {held}"
        + (f", not {phase!r}" if phase else "")
        + f"; pass --phase=<one of them> or --checkpoint={path}/<phase>")
  return path


def load_variables(directory: str, step: Optional[int] = None
                   ) -> tuple[dict, dict]:
  """Reads ({'params', 'batch_stats'}, meta) from a checkpoint directory.

  Accepts a phase's checkpoint directory, its phase directory (with a
  `checkpoints/` child) or an import output. Uses the latest step unless
  `step` is given. Arrays come back as host numpy arrays.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist; "
                          "pass a directory written by bnn_jax (training or "
                          "import_torch)")
  mngr = _manager(directory, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{directory} holds no bnn_jax checkpoint; pass a "
                          "directory written by bnn_jax (training or "
                          "import_torch)")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(
            _local_target(os.path.join(directory, str(step), "state"))),
        meta=ocp.args.JsonRestore()))
    state, meta = restored.state, dict(restored.meta)
    if not isinstance(state, dict) or "params" not in state:
      raise CheckpointError(f"{directory}/{step} holds no 'params'; it is not "
                            "a bnn_jax checkpoint")
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(
        f"cannot read checkpoint {directory}/{step}: {type(e).__name__}: "
        f"{_first_line(e)}; it may be truncated or not a bnn_jax "
        "checkpoint") from e
  finally:
    mngr.close()
  variables = {"params": state["params"],
               "batch_stats": state.get("batch_stats", {})}
  return jax.device_get(variables), meta
