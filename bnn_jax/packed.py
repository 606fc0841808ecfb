"""1-bit packed binary networks: the file format and the XNOR-popcount forward.

A packed file holds a trained network whose binary convolutions keep only
their sign bits, 32 input channels to a uint32 word, and runs each of them
as XNOR-popcount over those words. `bnn_jax.export --format=packed` writes
it (from a checkpoint); `read` loads it, `PackedModel` runs it, and
`python -m bnn_jax.evaluate --config=FILE --packed=PATH` evaluates it.
docs/deploy.md describes the format for readers in other languages.

Bits. Channel c of a pixel (or of a kernel tap) is bit c % 32 of word c // 32
(least significant bit first); bit 1 means +1, bit 0 means -1. Bits past the
last channel are 0.

Binary convolution. For binarised inputs x_i in {-1, 0, +1} (0 only for zero
padding and, with sign(0) = 0, for exact-zero inputs) and weights
w_i in {-1, +1}, the sum over a k x k x C_in patch is

  sum_i x_i w_i = sum_{i valid} (a_i == b_i ? 1 : -1)
                = n_valid - 2 * popcount(valid & (a XOR b)),

with a, b the sign bits of x and w and `valid` the bit-plane of the nonzero
inputs (0 at padded positions, at bits past the last channel and, with
sign(0) = 0, at exact zeros). This is the same integer that the float
convolution of the +-1 values computes, whatever the padding and the channel
count. The layer's output is that integer times the per-output-channel scale
alpha_o = mean |W[..., o]| (1 for unscaled `sign` weights), as
`binary.scaled_sign_weights` computes in float.

Weights that were exactly zero in the checkpoint cannot be stored in one bit;
they are stored as +1 (bit 1), the deployable sign(0) convention, and the
header counts them per layer. A float model with sign(0) = 0 gives them 0, so
the packed network then equals the float model whose exact-zero weights are
+1 (`nudge_zero_weights` builds that model's variables).

Real-valued layers run as they are: the stem, shifts, RPReLU, pooling and the
classifier keep their float32 parameters. Each BatchNorm is folded into the
per-channel affine map its evaluation computes, y = x * m + o with
m = scale / sqrt(var + eps), o = bias - mean * m: the same arithmetic, so no
rounding changes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax import models
from bnn_jax.layers import BatchNorm, BinaryConv

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

Array = jax.Array


class PackedFormatError(ValueError):
  """A packed file is missing, corrupt, of another format or version."""


# ---------------------------------------------------------------------------
# Bits.
# ---------------------------------------------------------------------------
def num_words(channels: int) -> int:
  """Words per pixel: ceil(channels / 32)."""
  return -(-channels // WORD_BITS)


def pack_bits(bits: Any) -> Any:
  """uint32 words [..., ceil(C / 32)] of booleans [..., C], LSB first.

  Works on numpy arrays (export) and traced jax arrays (activations).
  """
  xp = np if isinstance(bits, np.ndarray) else jnp
  channels = bits.shape[-1]
  words = num_words(channels)
  bits = xp.asarray(bits).astype(xp.uint32)
  pad = [(0, 0)] * (bits.ndim - 1) + [(0, words * WORD_BITS - channels)]
  bits = xp.pad(bits, pad).reshape(bits.shape[:-1] + (words, WORD_BITS))
  weights = xp.left_shift(xp.uint32(1), xp.arange(WORD_BITS, dtype=xp.uint32))
  # Distinct powers of two: the sum is the bitwise OR, it cannot overflow.
  return xp.sum(bits * weights, axis=-1, dtype=xp.uint32)


def unpack_bits(words: Any, channels: int) -> np.ndarray:
  """Booleans [..., channels] of uint32 words [..., ceil(channels / 32)]."""
  words = np.asarray(words, np.uint32)
  shifts = np.arange(WORD_BITS, dtype=np.uint32)
  bits = (words[..., None] >> shifts) & np.uint32(1)
  return bits.reshape(words.shape[:-1] + (-1,))[..., :channels].astype(bool)


def binarize_activations(x: Array, zero_to: float) -> tuple[Array, Array]:
  """(sign words, valid words) of activations x [..., C] with sign(0) = zero_to.

  sign bit = 1 where sign(x) = +1 (x > 0, or x == 0 with zero_to = +1);
  valid bit = 1 where sign(x) != 0 (every x unless zero_to = 0 and x == 0).
  """
  positive = (x > 0) | ((x == 0) & (zero_to > 0))
  nonzero = (x != 0) | (zero_to != 0)
  return pack_bits(positive), pack_bits(nonzero)


def _patches(words: Array, k: int, strides: int, padding) -> Array:
  """[N, Ho, Wo, k * k * words] of [N, H, W, words], zero-padded (tap-major).

  Entry (a * k + b) * words + w is word w of input pixel
  (strides * i + a - top, strides * j + b - left), or 0 outside; `padding`
  is p (top = bottom = left = right = p) or ((top, bottom), (left, right)).
  """
  if k == 1 and padding == 0:
    return words[:, ::strides, ::strides, :]
  pads = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  xp = jnp.pad(words, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  out_h = (xp.shape[1] - k) // strides + 1
  out_w = (xp.shape[2] - k) // strides + 1
  return jnp.concatenate(
      [xp[:, a:a + strides * (out_h - 1) + 1:strides,
          b:b + strides * (out_w - 1) + 1:strides, :]
       for a in range(k) for b in range(k)], axis=-1)


def packed_conv(x: Array, weight_bits: Array, strides: int, padding,
                zero_to: float) -> Array:
  """int32 sum_i B(x)_i * w_i of a binary conv, computed by XNOR-popcount.

  Args:
    x: [N, H, W, C] real activations; B(x) = sign(x) with sign(0) = zero_to,
      zero padding applied after binarisation (padded inputs count 0).
    weight_bits: [k, k, ceil(C / 32), O] uint32 sign bits of the +-1 kernel.
    strides, padding: as the float convolution's (padding p or
      ((top, bottom), (left, right))).
    zero_to: sign(0) of the activations (+1, 0 or -1).

  Returns:
    [N, Ho, Wo, O] int32: n_valid - 2 * popcount(valid & (a XOR b)) summed
    over the patch, equal to the float conv of the +-1 (and 0) values.
  """
  k, _, words, out_channels = weight_bits.shape
  if words != num_words(x.shape[-1]):
    raise ValueError(f"weight bits have {words} words per tap; inputs of "
                     f"{x.shape[-1]} channels need {num_words(x.shape[-1])}")
  signs, valid = binarize_activations(x, zero_to)
  signs = _patches(signs, k, strides, padding)      # [N, Ho, Wo, K]
  valid = _patches(valid, k, strides, padding)
  w = weight_bits.reshape(k * k * words, out_channels).T  # [O, K]
  n_valid = jnp.sum(jax.lax.population_count(valid).astype(jnp.int32),
                    axis=-1, keepdims=True)
  differ = (signs[..., None, :] ^ w) & valid[..., None, :]  # [N, Ho, Wo, O, K]
  mismatches = jnp.sum(jax.lax.population_count(differ).astype(jnp.int32),
                       axis=-1)
  return n_valid - 2 * mismatches


# ---------------------------------------------------------------------------
# Packing a model's variables.
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One module call of the model: path, module, input and output shapes."""
  path: tuple[str, ...]
  module: nn.Module
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]


def trace_layers(model: nn.Module, input_shape: tuple[int, ...]
                 ) -> list[LayerInfo]:
  """BinaryConv and BatchNorm calls of `model` on one example (shapes only)."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__"
        and isinstance(context.module, (BinaryConv, BatchNorm))):
      calls.append(LayerInfo(tuple(context.module.path), context.module,
                             tuple(args[0].shape), tuple(out.shape)))
    return out

  example = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                   example)
  return calls


def _is_packed_conv(module: nn.Module) -> bool:
  return (isinstance(module, BinaryConv) and module.binary_weights
          and module.binary_inputs)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _get_or_empty(tree: dict, path: tuple[str, ...]) -> Any:
  """tree[path], or {} where some name of the path is absent."""
  for name in path:
    if name not in tree:
      return {}
    tree = tree[name]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _drop(tree: dict, path: tuple[str, ...]) -> None:
  """Removes tree[path] and the dicts it leaves empty."""
  parent = _get(tree, path[:-1]) if len(path) > 1 else tree
  del parent[path[-1]]
  if len(path) > 1 and not parent:
    _drop(tree, path[:-1])


def _padding_of(module: BinaryConv, input_shape: tuple[int, ...]):
  """The conv's padding for the header: p, or [[top, bottom], [left, right]]."""
  pad = module.resolved_padding(input_shape[1:3])
  return pad if isinstance(pad, int) else [list(p) for p in pad]


# Jitted once at module level so that each layer shape compiles once.
_mean_abs = jax.jit(lambda w: jnp.mean(jnp.abs(w), axis=(0, 1, 2)))


@functools.partial(jax.jit, static_argnums=(4,))
def _fold(scale, bias, mean, var, epsilon):
  m = jax.lax.rsqrt(var + epsilon) * scale
  return m, bias - mean * m


def binary_weight_scale(kernel: np.ndarray, binarizer: str) -> np.ndarray:
  """alpha_o = mean |W[..., o]| for 'scaled_sign' and 'magnitude_aware_sign'
  (by jax), 1 for 'sign' and 'ste_sign'."""
  if binarizer in ("sign", "ste_sign"):
    return np.ones(kernel.shape[-1], np.float32)
  if binarizer not in ("scaled_sign", "magnitude_aware_sign"):
    raise ValueError(f"no packed form for kernel binarizer {binarizer!r}")
  return np.asarray(_mean_abs(kernel), np.float32)


def fold_batch_norm(module: BatchNorm, params: dict, stats: dict
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(m, o) of BatchNorm evaluation y = x * m + o, computed as BatchNorm does.

  m = rsqrt(var + eps) * scale, o = bias - mean * m.
  """
  c = stats["mean"].shape[-1]
  m, o = _fold(params.get("scale", np.ones(c, np.float32)),
               params.get("bias", np.zeros(c, np.float32)), stats["mean"],
               stats["var"], float(module.epsilon))
  return np.asarray(m, np.float32), np.asarray(o, np.float32)


@dataclasses.dataclass
class PackResult:
  """What `pack_variables` made: the variables and per-layer facts."""
  variables: dict          # {'params': real layers, 'packed': bits, BN maps}
  binary_convs: list[dict]  # per binary conv: path, shapes, zero weights
  real_convs: list[dict]    # per real-valued conv: path, kernel, stride, pad
  zero_weights: int        # exact-zero binary weights stored as +1


def pack_variables(model: nn.Module, variables: dict,
                   input_shape: tuple[int, ...]) -> PackResult:
  """Packs `model`'s binary conv kernels and folds its BatchNorms.

  Args:
    model: a model whose binary convs have binary inputs and weights.
    variables: its {'params', 'batch_stats'} (host arrays).
    input_shape: (H, W, C) of one example.

  Returns:
    A `PackResult` whose variables are {'params': every real-valued
    parameter, 'packed': {conv path: {'weight_bits', 'scale'}, BN path:
    {'multiplier', 'offset'}}}.
  """
  params = jax.tree.map(lambda a: np.asarray(a, np.float32),
                        jax.device_get(variables["params"]))
  stats = jax.device_get(variables.get("batch_stats", {}))
  packed: dict = {}
  convs, real, zero_total = [], [], 0
  for layer in trace_layers(model, input_shape):
    module = layer.module
    if isinstance(module, BatchNorm):
      own = _get_or_empty(params, layer.path)  # {} without scale and bias
      m, o = fold_batch_norm(module, own, _get(stats, layer.path))
      _set(packed, layer.path, {"multiplier": m, "offset": o})
      if own:
        _drop(params, layer.path)
    elif isinstance(module, BinaryConv) and not module.binary_weights:
      k = module.kernel_size
      real.append({
          "path": "/".join(layer.path), "kernel_size": k,
          "strides": module.strides,
          "padding": _padding_of(module, layer.input_shape)})
    elif _is_packed_conv(module):
      kernel = _get(params, layer.path)["kernel"]
      zeros = int(np.sum(kernel == 0))
      positive = (kernel > 0) | ((kernel == 0) & (ZERO_WEIGHTS_TO > 0))
      bits = pack_bits(positive.transpose(0, 1, 3, 2))  # [k, k, O, words]
      k = module.kernel_size
      _set(packed, layer.path, {
          "weight_bits": bits.transpose(0, 1, 3, 2),  # [k, k, words, O]
          "scale": binary_weight_scale(kernel, module.kernel_binarizer)})
      _drop(params, layer.path)
      convs.append({
          "path": "/".join(layer.path), "kernel_size": k,
          "strides": module.strides,
          "padding": _padding_of(module, layer.input_shape),
          "in_channels": int(kernel.shape[2]),
          "out_channels": int(kernel.shape[3]),
          "zero_weights": zeros})
      zero_total += zeros
  return PackResult({"params": params, PACKED: packed}, convs, real,
                    zero_total)


def nudge_zero_weights(model: nn.Module, variables: dict,
                       input_shape: tuple[int, ...]) -> dict:
  """`variables` with every exact-zero binary weight set to +tiny (float32).

  The float model then computes what the packed file stores (exact zeros
  as +1); alpha = mean |W| does not change (tiny = 1.2e-38 vanishes in the
  sum). For tests and for comparing a sign(0) = 0 checkpoint with its
  packed export.
  """
  params = jax.tree.map(np.array, jax.device_get(variables["params"]))
  tiny = np.finfo(np.float32).tiny
  for layer in trace_layers(model, input_shape):
    if _is_packed_conv(layer.module):
      leaf = _get(params, layer.path)
      leaf["kernel"] = np.where(leaf["kernel"] == 0, tiny, leaf["kernel"]
                                ).astype(np.float32)
  return {**variables, "params": params}


# ---------------------------------------------------------------------------
# The forward pass.
# ---------------------------------------------------------------------------
def _packed_call(next_fun, args, kwargs, context):
  """Runs packed binary convs and folded BatchNorms; other calls as they are."""
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if _is_packed_conv(module):
    x = args[0]
    bits = module.get_variable(PACKED, "weight_bits")
    scale = module.get_variable(PACKED, "scale")
    padding = module.resolved_padding(x.shape[1:3])
    count = packed_conv(x, bits, module.strides, padding, module.zero_to)
    return count.astype(jnp.float32) * scale
  if isinstance(module, BatchNorm):
    x = args[0]
    m = module.get_variable(PACKED, "multiplier")
    o = module.get_variable(PACKED, "offset")
    return x * m.astype(x.dtype) + o.astype(x.dtype)
  return next_fun(*args, **kwargs)


class PackedModel:
  """A model rebuilt from a packed file's header, run on its packed variables.

  `apply(variables, images, train=False)` has the signature of a flax
  model's, so `train_step.make_eval_step(PackedModel(...))` evaluates it:
  the model's own structure runs, with each binary conv replaced by
  `packed_conv` and each BatchNorm by its folded map.
  """

  def __init__(self, header: dict):
    self.header = header
    spec = header["model"]
    self.model = models.create(spec["name"], num_classes=spec["num_classes"],
                               **model_overrides(spec["overrides"]))

  def apply(self, variables: dict, images: Array, train: bool = False
            ) -> Array:
    if train:
      raise ValueError("a packed model has no training mode")
    with nn.intercept_methods(_packed_call):
      return self.model.apply(variables, images, train=False)


def model_overrides(overrides: dict) -> dict:
  """Header overrides as model attributes (JSON lists back to tuples)."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in overrides.items()}


# ---------------------------------------------------------------------------
# The file.
# ---------------------------------------------------------------------------
def flatten(variables: dict) -> dict[str, np.ndarray]:
  """{'collection/module/.../name': array} of nested variables."""
  flat = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    flat["/".join(str(k.key) for k in key_path)] = np.asarray(leaf)
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """Nested variables of `flatten`'s output."""
  tree: dict = {}
  for key, value in flat.items():
    _set(tree, tuple(key.split("/")), value)
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


def read(path: str) -> tuple[dict, dict]:
  """(header, variables) of a packed file; PackedFormatError if not one."""
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
  return header, unflatten(flat)


def load(path: str) -> tuple[PackedModel, dict]:
  """(PackedModel, variables) of a packed file."""
  header, variables = read(path)
  return PackedModel(header), variables


def variables_bytes(variables: Any) -> int:
  """Bytes of every array of a pytree."""
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(variables)))


# ---------------------------------------------------------------------------
# Evaluation over a data set (`python -m bnn_jax.evaluate --packed=PATH`).
# ---------------------------------------------------------------------------
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


def run_evaluation(config, path: str) -> dict:
  """Top-1, top-5 and CE of a packed file over the config's eval split.

  The same loop as `evaluate.run_evaluation` (every example once, the last
  batch padded and masked), with the packed forward as the model.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bnn_jax import input_pipeline
  from bnn_jax import preprocess
  from bnn_jax import train
  from bnn_jax import train_step

  packed_model, variables = load(path)
  info = input_pipeline.get_info(config.dataset)
  recipe = preprocess.get_recipe(config.dataset.name)
  check_input_matches(packed_model.header, config.dataset.name,
                      info.image_shape, recipe.mean, recipe.std)
  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  eval_step = jax.jit(train_step.make_eval_step(packed_model),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)
  batches = input_pipeline.eval_iterator(
      config.dataset, global_batch_size=config.eval_batch_size,
      sharding=batch_sharding)
  result = train_step.evaluate(
      eval_step, jax.device_put(variables, replicated), batches)
  header = packed_model.header
  return {"phase": header["source"]["phase"],
          "model": header["model"]["name"],
          "checkpoint": os.path.abspath(path), "format": "packed",
          "dataset": config.dataset.name,
          "split": config.dataset.eval_split,
          "top1": result["eval/top1"], "top5": result["eval/top5"],
          "loss": result["eval/loss"], "count": int(result["eval/count"])}
