"""Thin wrapper over orbax's CheckpointManager.

Layout of a checkpoint directory (a phase's `<workdir>/<phase>/checkpoints`,
or the output of `bnn_jax.import_torch`):

  <dir>/<step>/state   the pytree {'step', 'params', 'batch_stats', 'opt_state'}
                       (an imported checkpoint has only params/batch_stats)
  <dir>/<step>/meta    JSON: phase name, model config, best accuracy, ...

`restore` restores into the shardings of an abstract target (so a resumed run
gets exactly the arrays it saved, placed where the jitted step wants them);
`load_variables` reads {'params', 'batch_stats'} from any such directory for
hand-off, `init_from`, teachers and evaluation. Directories may be local or
`gs://` (see `bnn_jax.paths`).
"""

from __future__ import annotations

import hashlib
import json
import logging as py_logging
import os
import re
import sys
import warnings
from typing import Any, Optional

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from bnn_jax import paths


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt, truncated or foreign."""


class StorageError(OSError):
  """Writing into the workdir failed: the disk is full, the file system
  became read-only, the bucket refuses writes. The message is one line that
  names what could not be written, why, and the last good checkpoint, which
  is left as it was (nothing is deleted)."""


def _manager(directory: epath.Path, max_to_keep: Optional[int] = 2,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      # Synchronous saves: a checkpoint is complete when save() returns, so
      # SIGKILL right after a save never leaves a half-written latest step.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=("state", "meta"))


class Checkpointer:
  """Saves and restores one phase's training state, keeping the last few."""

  def __init__(self, directory: paths.PathLike, max_to_keep: int = 2):
    self.directory = paths.resolve(directory, "checkpoint directory")
    self._mngr = _manager(self.directory, max_to_keep=max_to_keep)

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Writes `state` (a pytree of arrays) and `meta` (JSON) at `step`.

    Raises:
      StorageError: the write failed (orbax leaves the partial step in a
        `<step>.orbax-checkpoint-tmp` directory, which restores ignore);
        the steps saved before are untouched.
    """
    if step in self._mngr.all_steps():
      return
    # A write that fails in TensorStore leaves its other callbacks to find
    # orbax's event loop closed, each printing a traceback: silence those
    # before they start (they come before the save raises).
    _ignore_closed_event_loop()
    try:
      self._mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                      force=True)
      self._mngr.wait_until_finished()
    except Exception as e:  # orbax and TensorStore raise many types.
      raise self.storage_error(
          f"the checkpoint of step {step} to {self.directory}", e,
          failed_step=step) from e

  def storage_error(self, what: str, error: BaseException,
                    failed_step: Optional[int] = None) -> StorageError:
    """The one-line error for a failed write of `what` during this phase."""
    try:  # The listing may fail too (a bucket that refuses everything).
      kept = sorted(s for s in self._mngr.all_steps() if s != failed_step)
    except Exception:  # pylint: disable=broad-except
      kept = None
    last = ("the steps saved before are kept" if kept is None else
            f"nothing was deleted: the last good checkpoint is step "
            f"{kept[-1]} in {self.directory}" if kept else
            "no checkpoint of this phase was saved yet")
    return storage_error(what, error, last)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores step `step` into `abstract_state`'s structure and shardings."""
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for bad files.
      _ignore_closed_event_loop()
      raise corrupt_checkpoint_error(self.directory, step,
                                     self._mngr.all_steps(), e) from e
    return restored.state, dict(restored.meta)

  def reached_preemption(self, step: int) -> bool:
    """True when the platform signalled preemption (multi-host agreement)."""
    return self._mngr.reached_preemption(step)

  def close(self) -> None:
    self._mngr.close()


# ---------------------------------------------------------------------------
# Corrupt checkpoints: one readable line naming the step and the fallback.
# ---------------------------------------------------------------------------
# The small JSON files of a step directory (orbax's and ours), checked in
# this order when a restore fails without naming a file.
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding",
               "state/array_metadatas/*", "meta/metadata")
# TensorStore errors name what they read: 'Error reading "<array key>" in
# OCDBT database at local file "<path>": <reason> [tensorstore_spec...]'.
_TS_FILE = re.compile(r'file "([^"]+)": ')
_TS_KEY = re.compile(r'Error reading "([^"]+)" in OCDBT database')
# TensorStore's annotations after a message: " [http_response_code='403']",
# " [tensorstore_spec='{...}']", ...
_TS_ANNOTATION = re.compile(r" \[\w+=")


def _messages(e: BaseException) -> list[str]:
  """The messages of `e` and its causes, outermost first."""
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    out.append(str(e))
    e = e.__cause__ or e.__context__
  return out


def _bad_json_file(step_dir: str) -> Optional[str]:
  """The first of the step's JSON files that does not parse, relative to it."""
  root = epath.Path(step_dir)
  for pattern in _JSON_FILES:
    for path in sorted(root.glob(pattern)):
      try:
        json.loads(path.read_text())
      except (ValueError, OSError):
        return str(path.relative_to(root))
  return None


def _what_is_wrong(step_dir: str, error: BaseException) -> str:
  """A short description of why restoring `step_dir` failed."""
  messages = _messages(error)
  for text in reversed(messages):  # innermost first: the actual read
    files = list(_TS_FILE.finditer(text))
    if files:  # the last file named is the one whose read failed
      path = files[-1].group(1)
      reason = text[files[-1].end():].split(" [tensorstore_spec")[0]
      reason = " ".join(reason.split())
      key = _TS_KEY.findall(text)
      prefix = os.path.join(step_dir, "")
      where = (path[len(prefix):] if path.startswith(prefix) else path
               ).rstrip("/") or "."
      what = f"array {key[-1]} in {where}" if key else where
      return f"{what}: {reason[:160]}"
  bad = _bad_json_file(step_dir)
  if bad is not None:
    return f"{bad} is not valid JSON (truncated?)"
  text = messages[-1].split(" See full TensorStore details")[0]
  text = " ".join(text.split())
  return f"{type(error).__name__}: {text[:160]}"


def storage_error(what: str, error: BaseException, kept: str
                  ) -> StorageError:
  """`could not write <what> (<why>); <kept>; fix the storage ... resume`."""
  return StorageError(
      f"could not write {what} ({storage_failure(error)}); {kept}; fix the "
      "storage (free space, write permission) and re-run the same command "
      "to resume")


def storage_failure(error: BaseException) -> str:
  """Why a write failed, in at most about 200 characters of one line.

  The innermost message of the error chain, without TensorStore's spec
  and "See full TensorStore details" tail; an OSError keeps its errno text
  ("[Errno 28] No space left on device: '<path>'").
  """
  text = _messages(error)[-1]
  text = _TS_ANNOTATION.split(text)[0].split(" See full TensorStore details")[0]
  text = " ".join(text.split())
  return text if len(text) <= 200 else text[:197] + "..."


def _is_closed_loop_error(error: BaseException) -> bool:
  """asyncio's RuntimeError for a callback scheduled on a closed event loop."""
  return (isinstance(error, RuntimeError)
          and str(error) == "Event loop is closed")


def _is_failed_restore_leftover(unraisable) -> bool:
  """An unraisable report left behind by a failed orbax restore.

  Either a TensorStore callback that found orbax's event loop closed
  (RuntimeError "Event loop is closed"), or one of orbax's own read
  coroutines, finalized by the garbage collector with the read's error.
  """
  if _is_closed_loop_error(unraisable.exc_value):
    return True
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine's code
  return code is not None and (
      f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in code.co_filename)


def _ignore_closed_event_loop() -> None:
  """Silences the reports at exit that follow a failed restore.

  When one read of a restore fails, orbax closes its asyncio event loop
  while TensorStore is still completing the step's other reads: their
  callbacks then find the loop closed (reported through sys.excepthook or
  as unraisable), and the unfinished read coroutines raise their own read
  errors when the garbage collector finalizes them ("Exception ignored in:
  <coroutine object ...>"), each with a whole traceback, when depends on
  the collector's timing. The one-line error already says what failed: only
  those reports (`_is_failed_restore_leftover`) are dropped, every other
  unraisable report goes to the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "ignores_closed_event_loop", False):
    return

  def hook(unraisable):
    if _is_failed_restore_leftover(unraisable):
      return
    previous(unraisable)

  hook.ignores_closed_event_loop = True
  sys.unraisablehook = hook
  # A TensorStore callback on its own thread prints its error through
  # sys.excepthook (PyErr_Print): the same closed loop, another route.
  previous_excepthook = sys.excepthook

  def excepthook(kind, value, traceback):
    if not _is_closed_loop_error(value):
      previous_excepthook(kind, value, traceback)

  sys.excepthook = excepthook
  # asyncio reports each failed task, when it is garbage-collected, as
  # "Task exception was never retrieved" with the TensorStore traceback,
  # and Python warns of each read coroutine the closed loop never ran.
  py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)


def corrupt_checkpoint_error(directory: str, step: int, all_steps,
                             error: BaseException) -> CheckpointError:
  """The one-line error for a step directory that cannot be restored.

  Names the step directory, the file (or array) that failed and why, and
  the fallback: delete the step directory, so that the run resumes from the
  previous step kept (or retrains the phase when there is none).
  """
  step_dir = os.path.join(directory, str(step))
  earlier = sorted(s for s in all_steps if s < step)
  fallback = (f"delete {step_dir} to fall back to step {earlier[-1]}"
              if earlier else
              f"no earlier step is kept: delete {step_dir} to start that "
              "phase afresh")
  return CheckpointError(
      f"checkpoint {step_dir} is corrupt or truncated "
      f"({_what_is_wrong(step_dir, error)}); {fallback}, or start a new "
      "--workdir")


def save_variables(directory: paths.PathLike, variables: dict, meta: dict,
                   step: int = 0) -> None:
  """Writes {'params', 'batch_stats'} as a checkpoint that `load_variables` reads."""
  mngr = _manager(paths.resolve(directory, "checkpoint directory"),
                  max_to_keep=None)
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": variables["params"],
                                   "batch_stats": variables.get("batch_stats",
                                                                {})}),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _local_target(state_dir: epath.Path) -> Any:
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


def resolve_directory(path: paths.PathLike, phase: Optional[str] = None
                      ) -> str:
  """The checkpoint directory that `--checkpoint=path --phase=phase` names.

  `path` is either a run's workdir, and then the result is its phase
  directory `<path>/<phase>`, or already a checkpoint directory (a phase
  directory, its `checkpoints/` child, an import_torch output), returned as
  is. A workdir whose phase `phase` has no checkpoints is an error naming
  the phases it does hold. Local and gs:// paths alike (`bnn_jax.paths`).
  """
  root = paths.resolve(path, "--checkpoint")
  if phase and (root / phase / "checkpoints").is_dir():
    return str(root / phase)
  held = sorted(d.name for d in root.iterdir()
                if (d / "checkpoints").is_dir()) if root.is_dir() else []
  if held:
    raise CheckpointError(
        f"{root} is a workdir holding the phases {held}"
        + (f", not {phase!r}" if phase else "")
        + f"; pass --phase=<one of them> or --checkpoint={root}/<phase>")
  return str(root)


def load_variables(directory: paths.PathLike, step: Optional[int] = None
                   ) -> tuple[dict, dict]:
  """Reads ({'params', 'batch_stats'}, meta) from a checkpoint directory.

  Accepts a phase's checkpoint directory, its phase directory (with a
  `checkpoints/` child) or an import output. Uses the latest step unless
  `step` is given. Arrays come back as host numpy arrays.
  """
  directory = paths.resolve(directory, "checkpoint directory")
  if (directory / "checkpoints").is_dir():
    directory = directory / "checkpoints"
  if not directory.is_dir():
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
            _local_target(directory / str(step) / "state")),
        meta=ocp.args.JsonRestore()))
    state, meta = restored.state, dict(restored.meta)
    if not isinstance(state, dict) or "params" not in state:
      raise CheckpointError(f"{directory}/{step} holds no 'params'; it is not "
                            "a bnn_jax checkpoint")
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types for bad files.
    _ignore_closed_event_loop()
    raise corrupt_checkpoint_error(directory, step, mngr.all_steps(),
                                   e) from e
  finally:
    mngr.close()
  variables = {"params": state["params"],
               "batch_stats": state.get("batch_stats", {})}
  return jax.device_get(variables), meta


# ---------------------------------------------------------------------------
# Variables: their fingerprint, and the check that they fit a model.
# ---------------------------------------------------------------------------
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
