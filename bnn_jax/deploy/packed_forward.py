"""The XNOR-popcount forward of a packed 1-bit network.

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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import models
from bnn_jax.deploy import xnor_conv
from bnn_jax.deploy.packed_format import PACKED, WORD_BITS, read
from bnn_jax.layers import BatchNorm, BinaryConv

Array = jax.Array


def pack_bits(bits: Any) -> Any:
  """uint32 words [..., ceil(C / 32)] of booleans [..., C], LSB first: the
  file's words (`xnor_conv.pack` at 32 bits; numpy or traced jax arrays)."""
  return xnor_conv.pack(bits, WORD_BITS)




def binarize_activations(x: Array, zero_to: float) -> tuple[Array, Array]:
  """(sign words, valid words) of activations x [..., C] with sign(0) = zero_to.

  sign bit = 1 where sign(x) = +1 (x > 0, or x == 0 with zero_to = +1);
  valid bit = 1 where sign(x) != 0 (every x unless zero_to = 0 and x == 0).
  """
  positive = (x > 0) | ((x == 0) & (zero_to > 0))
  nonzero = (x != 0) | (zero_to != 0)
  return pack_bits(positive), pack_bits(nonzero)


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
    [N, Ho, Wo, O] int32, equal to the float conv of the +-1 (and 0) values:
    k * k shifted popcount products summed in int32, the padding corrected
    exactly (`bnn_jax.deploy.xnor_conv`, which has the formulas).
  """
  return xnor_conv.xnor_conv(x, weight_bits, strides, padding, zero_to)


def is_packed_conv(module: nn.Module) -> bool:
  return (isinstance(module, BinaryConv) and module.binary_weights
          and module.binary_inputs)


def _packed_call(next_fun, args, kwargs, context):
  """Runs packed binary convs and folded BatchNorms; other calls as they are."""
  module = context.module
  if context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  if is_packed_conv(module):
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


def load(path: str) -> tuple["PackedModel", dict]:
  """(PackedModel, variables) of a packed file."""
  header, variables = read(path)
  return PackedModel(header), variables
