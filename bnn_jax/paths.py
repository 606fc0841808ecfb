"""Paths: workdirs (local directories and `gs://` buckets) and pytree paths.

Every file a run reads or writes under its workdir (checkpoints through
orbax, config.json, results.json, metrics.jsonl, TensorBoard events,
dynamics_signs.npz) goes through `etils.epath` paths made here, so a
workdir may be a local directory or a Google Cloud Storage URI:

* local: `run/digits`, `/scratch/run` (made absolute: orbax needs that);
* `gs://bucket/run`: read and written through orbax/TensorStore (arrays) and
  `etils.epath` (every other file; gcsfs when `EPATH_USE_TF=false` or
  TensorFlow is absent, else TensorFlow's GCS file system).

Other schemes (`s3://`, `hdfs://`, `file://`, ...) are refused before
anything trains: this code runs and tests only the two above.

`tree_path` names a leaf of a parameter pytree ('block_1/conv/kernel'), the
one spelling used in error messages, optimizer labels and dynamics metrics.
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence, Union

from etils import epath

PathLike = Union[str, os.PathLike]
SUPPORTED_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: PathLike) -> str:
  """The URI scheme of `path` ('gs' for gs://b/x), '' for a local path."""
  match = _SCHEME.match(os.fspath(path))
  return match.group(1).lower() if match else ""


def is_local(path: PathLike) -> bool:
  return not scheme(path)


def resolve(path: PathLike, what: str = "--workdir") -> epath.Path:
  """`path` as an `epath.Path`: local paths absolute, `gs://` URIs as given.

  Raises:
    ValueError: a scheme other than gs:// (one line naming the fix).
  """
  text = os.fspath(path)
  kind = scheme(text)
  if not kind:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if kind not in SUPPORTED_SCHEMES:
    raise ValueError(
        f"{what}={text!r}: the {kind}:// scheme is not supported; use a local "
        "directory or gs://<bucket>/<dir>")
  if not text[len(kind) + 3:].strip("/"):
    raise ValueError(f"{what}={text!r} names no bucket; use "
                     "gs://<bucket>/<dir>")
  return epath.Path(text)


def write_bytes_atomic(path: epath.Path, data: bytes) -> None:
  """Writes `data` so that a reader never sees half of it.

  Locally via `<path>.tmp` and a rename; on GCS directly (an object appears
  whole when its upload completes, and a rename there is a copy).
  """
  if not is_local(path):
    path.write_bytes(data)
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text_atomic(path: epath.Path, text: str) -> None:
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(path, text.encode("utf-8"))


def tree_path(key_path: Sequence[Any]) -> str:
  """A pytree key path as 'a/b/0/c' (dict keys, indices and attributes)."""
  import jax  # pylint: disable=g-import-not-at-top  (paths is imported early)
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")
