"""Packing a trained model's variables into the 1-bit format.

`pack_variables(model, variables, input_shape)` traces the model once,
keeps only the sign bits of every binary conv's weights (32 input channels
to a uint32 word, `packed_format`) with its per-output-channel scale
alpha_o = mean |W[..., o]| (1 for unscaled `sign` weights), and folds each
BatchNorm into the per-channel affine map its evaluation computes,

  y = x * m + o,  m = scale / sqrt(var + eps),  o = bias - mean * m

(the same arithmetic, so no rounding changes). Real-valued layers keep their
float32 parameters.

Weights that were exactly zero in the checkpoint cannot be stored in one bit;
they are stored as +1 (bit 1), the deployable sign(0) convention, and the
header counts them per layer. A float model with sign(0) = 0 gives them 0, so
the packed network then equals the float model whose exact-zero weights are
+1 (`nudge_zero_weights` builds that model's variables).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax.deploy.packed_format import PACKED, ZERO_WEIGHTS_TO, set_path
from bnn_jax.deploy.packed_forward import pack_bits, is_packed_conv
from bnn_jax.layers import BatchNorm, BinaryConv


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
      set_path(packed, layer.path, {"multiplier": m, "offset": o})
      if own:
        _drop(params, layer.path)
    elif isinstance(module, BinaryConv) and not module.binary_weights:
      k = module.kernel_size
      real.append({
          "path": "/".join(layer.path), "kernel_size": k,
          "strides": module.strides,
          "padding": _padding_of(module, layer.input_shape)})
    elif is_packed_conv(module):
      kernel = _get(params, layer.path)["kernel"]
      zeros = int(np.sum(kernel == 0))
      positive = (kernel > 0) | ((kernel == 0) & (ZERO_WEIGHTS_TO > 0))
      bits = pack_bits(positive.transpose(0, 1, 3, 2))  # [k, k, O, words]
      k = module.kernel_size
      set_path(packed, layer.path, {
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
    if is_packed_conv(layer.module):
      leaf = _get(params, layer.path)
      leaf["kernel"] = np.where(leaf["kernel"] == 0, tiny, leaf["kernel"]
                                ).astype(np.float32)
  return {**variables, "params": params}
