"""The packed 1-bit file: its constants, bits and reader/writer (numpy only).

One `.npz`: a JSON header under `header.json` (format "bnn_jax.packed",
format_version 1, the model, the input it expects, per-layer notes) and
every array under its path 'collection/module/.../name' (collection
'params': the real-valued layers; 'packed': binary conv sign bits and
scales, folded BatchNorm maps). docs/deploy.md gives the layout for readers
in other languages.

Bits. Channel c of a pixel (or of a kernel tap) is bit c % 32 of word c // 32
(least significant bit first); bit 1 means +1, bit 0 means -1. Bits past the
last channel are 0.

This module imports numpy and the standard library only: the LCE exporter
(`bnn_jax.deploy.export_lce`, run in Larq's TensorFlow 2.16 environment,
which has no JAX) reads packed files through it too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT = "bnn_jax.packed"
FORMAT_VERSION = 1
WORD_BITS = 32
HEADER_KEY = "header.json"
# The collection of the packed arrays (binary conv bits and scales, folded
# BatchNorm maps) next to 'params' (the real-valued layers).
PACKED = "packed"
# sign(0) values a binary network can use: +1 (deployable), 0 (torch.sign).
SIGN_ZERO_VALUES = (1.0, 0.0, -1.0)
ZERO_WEIGHTS_TO = 1.0


class PackedFormatError(ValueError):
  """A packed file is missing, corrupt, of another format or version."""


def num_words(channels: int) -> int:
  """Words per pixel: ceil(channels / 32)."""
  return -(-channels // WORD_BITS)


def unpack_bits(words: Any, channels: int) -> np.ndarray:
  """Booleans [..., channels] of uint32 words [..., ceil(channels / 32)]."""
  words = np.asarray(words, np.uint32)
  shifts = np.arange(WORD_BITS, dtype=np.uint32)
  bits = (words[..., None] >> shifts) & np.uint32(1)
  return bits.reshape(words.shape[:-1] + (-1,))[..., :channels].astype(bool)



def unpack_kernel(words: np.ndarray, in_channels: int) -> np.ndarray:
  """+-1 float32 HWIO kernel of [k, k, ceil(in_channels / 32), O] sign words."""
  bits = unpack_bits(np.moveaxis(np.asarray(words, np.uint32), -1, -2),
                     in_channels)  # [k, k, O, in_channels]
  return np.moveaxis(np.where(bits, 1.0, -1.0).astype(np.float32), -1, -2)


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  """tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def flatten(variables: dict) -> dict[str, np.ndarray]:
  """{'collection/module/.../name': array} of nested variables (sorted paths)."""
  flat = {}

  def visit(tree: Any, prefix: tuple[str, ...]) -> None:
    if isinstance(tree, dict) or hasattr(tree, "items"):
      for key in sorted(tree):
        visit(tree[key], prefix + (str(key),))
    else:
      flat["/".join(prefix)] = np.asarray(tree)

  visit(variables, ())
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """Nested variables of `flatten`'s output."""
  tree: dict = {}
  for key, value in flat.items():
    set_path(tree, tuple(key.split("/")), value)
  return tree


def write(path: str, header: dict, variables: dict) -> int:
  """Writes header (JSON) and variables as one .npz; returns its size in bytes.

  Written to `path + '.tmp'` and renamed, so a failure never leaves a
  truncated file under `path`.
  """
  arrays = flatten(variables)
  if HEADER_KEY in arrays:
    raise ValueError(f"variable name {HEADER_KEY!r} is reserved")
  header = {**header, "format": FORMAT, "format_version": FORMAT_VERSION}
  arrays[HEADER_KEY] = np.frombuffer(
      json.dumps(header, indent=1, sort_keys=True).encode(), np.uint8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)
  return os.path.getsize(path)




def read_flat(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(header, {'collection/module/.../name': array}) of a packed file;
  PackedFormatError if it is not one (missing, corrupt, other format or
  version)."""
  if not os.path.isfile(path):
    raise PackedFormatError(f"packed file {path} does not exist; write one "
                            "with python -m bnn_jax.export --format=packed")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except Exception as e:  # zipfile / numpy raise many types for bad files.
    raise PackedFormatError(f"cannot read {path} as a packed file: "
                            f"{type(e).__name__}: {e}") from e
  if HEADER_KEY not in flat:
    raise PackedFormatError(f"{path} has no {HEADER_KEY}; it is not a "
                            f"{FORMAT} file")
  try:
    header = json.loads(flat.pop(HEADER_KEY).tobytes().decode())
  except ValueError as e:
    raise PackedFormatError(f"{path}: corrupt {HEADER_KEY}: {e}") from e
  if header.get("format") != FORMAT:
    raise PackedFormatError(f"{path} is a {header.get('format')!r} file, not "
                            f"{FORMAT}")
  if header.get("format_version") != FORMAT_VERSION:
    raise PackedFormatError(
        f"{path} has format version {header.get('format_version')}; this "
        f"bnn_jax reads version {FORMAT_VERSION}: re-export it")
  return header, flat


def read(path: str) -> tuple[dict, dict]:
  """(header, nested variables) of a packed file; PackedFormatError if not one."""
  header, flat = read_flat(path)
  return header, unflatten(flat)


def variables_bytes(variables: Any) -> int:
  """Bytes of every array of nested variables."""
  return int(sum(a.nbytes for a in flatten(variables).values()))


def check_input_matches(header: dict, dataset: str,
                        image_shape: tuple[int, ...],
                        mean: tuple[float, ...], std: tuple[float, ...]
                        ) -> None:
  """ValueError when a config feeds other data than the file expects."""
  want = header["input"]
  got = {"dataset": dataset, "shape": [int(d) for d in image_shape],
         "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
  for key, value in got.items():
    if want[key] != value:
      raise ValueError(f"the packed file was exported for input {key} "
                       f"{want[key]}, the config gives {value}; evaluate it "
                       f"with the config it was exported from")

