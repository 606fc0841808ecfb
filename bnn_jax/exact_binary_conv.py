"""Exact forward of a binary conv on narrow operands: the selectable formulations.

A binary conv (binarised input, binarised kernel) computes

  y[..., o] = conv(x, kernel)[..., o] = alpha_o * S[..., o],
  S = conv(x, s),  s = sign(kernel) in {-1, 0, +1},  alpha_o = max |kernel[..., o]|,

with x in {-1, +1} (0 at the zero padding, and where sign(0) = 0). S is a
sum of at most fan-in = k * k * C_in products in {-1, 0, +1}: an integer
with |S| <= fan-in (ReActNet-A: 9 * 1024 = 9,216 in block 13's 3x3 conv,
4,608 in the 3x3 convs on 512 channels, 1,024 in its 1x1 convs). Every
formulation below computes S exactly and returns alpha_o * S in float32:

  "int8"             int8 operands; matmuls (1x1 convs, im2col) and
                     convolutions accumulate in int32, except convolutions
                     on a GPU, in float32 (XLA:GPU lowers int8 convs to
                     cuDNN with a float32 or int8 result only: jax#7637,
                     jax#14585); XLA:CPU has no int8 conv kernel, so on the
                     CPU every k x k conv is im2col + an int8 matmul
  "float8_e4m3fn"    float8_e4m3fn operands, float32 result
  "float16_chunked"  float16 operands and a float16 result, the fan-in split
                     into chunks of at most 2,048 (input channels
                     [c0, c0 + chunk), chunk * k * k <= 2,048): every partial
                     sum of a chunk is an integer of magnitude <= 2,048,
                     exact in float16 whatever the accumulator; the chunks'
                     results are added in float32 (exact: |S| < 2^24)
  "bfloat16"         bfloat16 operands, float32 result (what a bfloat16
                     model's default conv computes, with alpha applied after)
  "bfloat16_im2col"  bfloat16 operands, float32 result, every k x k conv as
                     im2col + one matmul (a GEMM with a float32 output, where
                     a conv with a wider output than its operands may be
                     rewritten to convs on widened operands)

The product alpha_o * S: both factors are exact in float32 and alpha_o has
at most 8 significant bits in a bfloat16 model, so the product is exact and
equals the float32 sum of a bfloat16 conv (`conv_kernels.conv2d_float32_sum`) bit
for bit; in a float32 model it is the exact sum rounded once (the float32
conv rounds its partial sums: the two may differ in the last bits).

The backward pass is the default one, gradient for gradient: the cotangent
in x's dtype through the VJP of `conv_kernels.conv2d_nhwc(x, kernel)`, i.e. both
backward convolutions in the compute dtype (the precision policy,
docs/performance.md).

ReActNet-A's `binary_conv_impl` attribute names one of `FORMULATIONS`,
"compute_dtype" (the conv in the compute dtype with a float32 sum below
float32: `conv_kernels.conv2d_float32_sum`) or "auto", which is
`DEFAULT_IMPL[jax.default_backend()]`; `conv_function(name)` is what its
`layers.BinaryConv`s then get as their `binary_conv`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from bnn_jax import conv_kernels

Array = jax.Array
Padding = conv_kernels.Padding

# float16 holds every integer of magnitude <= 2^11 exactly.
FLOAT16_EXACT_FAN_IN = 2048


@dataclasses.dataclass(frozen=True)
class Formulation:
  """How the integer sums S = conv(x, sign(kernel)) are computed.

  operand: dtype of x and sign(kernel) (+-1 and 0 are exact in each).
  matmul_result / conv_result: preferred_element_type of the matmuls
    (1x1 convs, im2col) and of `lax.conv_general_dilated`.
  max_fan_in: the fan-in of one chunk (None: the whole conv at once).
  im2col: "small" (k x k convs on maps <= conv_kernels.SMALL_MAP_SIZE, as
    `conv_kernels.conv2d_nhwc`), "cpu" (also every k x k conv on the CPU) or
    "always".
  """
  operand: Any
  matmul_result: Any
  conv_result: Any
  max_fan_in: Optional[int] = None
  im2col: str = "small"


FORMULATIONS: dict[str, Formulation] = {
    "int8": Formulation(jnp.int8, jnp.int32, jnp.int32, im2col="cpu"),
    "float8_e4m3fn": Formulation(jnp.float8_e4m3fn, jnp.float32, jnp.float32),
    "float16_chunked": Formulation(jnp.float16, jnp.float16, jnp.float16,
                                   max_fan_in=FLOAT16_EXACT_FAN_IN),
    "bfloat16": Formulation(jnp.bfloat16, jnp.float32, jnp.float32),
    "bfloat16_im2col": Formulation(jnp.bfloat16, jnp.float32, jnp.float32,
                                   im2col="always"),
}

# Today's conv: in the compute dtype, a float32 sum below float32.
COMPUTE_DTYPE = "compute_dtype"
AUTO = "auto"
IMPLS = (AUTO, COMPUTE_DTYPE) + tuple(FORMULATIONS)

# The formulation "auto" selects, per backend (docs/performance.md, the
# precision table): the conv in the compute dtype until a formulation is
# measured faster there. CPU: measured (no formulation is faster). GPU:
# to be measured (benchmarks/gpu_side_by_side.sh). TPU: on paper, the MXU
# runs bfloat16 operands with a float32 result natively.
DEFAULT_IMPL = {"cpu": COMPUTE_DTYPE, "gpu": COMPUTE_DTYPE,
                "tpu": COMPUTE_DTYPE}


def resolve(impl: str) -> str:
  """`impl` with "auto" replaced by this backend's default; ValueError if unknown."""
  if impl not in IMPLS:
    raise ValueError(f"unknown binary_conv_impl {impl!r}; choose one of "
                     f"{list(IMPLS)}")
  if impl == AUTO:
    return DEFAULT_IMPL.get(jax.default_backend(), COMPUTE_DTYPE)
  return impl


def _as_pairs(padding: Union[int, Padding]) -> Padding:
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return tuple(tuple(p) for p in padding)


def _chunks(c_in: int, taps: int, max_fan_in: Optional[int]) -> list[slice]:
  """Input-channel slices with len * taps <= max_fan_in (one slice if None).

  Chunks of floor(max_fan_in / taps) channels, rounded down to a multiple of
  8 when that is at least 16 (tensor-core friendly), the last one shorter.
  """
  if max_fan_in is None or c_in * taps <= max_fan_in:
    return [slice(0, c_in)]
  size = max_fan_in // taps
  if size >= 16:
    size -= size % 8
  if size < 1:
    raise ValueError(f"a {taps}-tap kernel exceeds the chunk fan-in "
                     f"{max_fan_in} with one channel")
  return [slice(c0, min(c0 + size, c_in)) for c0 in range(0, c_in, size)]


def integer_sums(xs: Array, ws: Array, strides: int,
                 padding: Union[int, Padding], impl: str) -> Array:
  """S = conv(xs, ws) in float32, exactly, for +-1/0 operands (NHWC, HWIO).

  xs and ws are converted to the formulation's operand dtype here; padding
  is p on every side or ((top, bottom), (left, right)). Taps that only read
  padding are dropped first (`conv_kernels.trim_padding_taps`, int padding).
  """
  f = FORMULATIONS[impl]
  xs, ws = xs.astype(f.operand), ws.astype(f.operand)
  if isinstance(padding, int):
    ws, pads = conv_kernels.trim_padding_taps(ws, xs.shape[1:3], strides, padding)
  else:
    pads = _as_pairs(padding)
  kh, kw = ws.shape[:2]
  total = None
  for c in _chunks(ws.shape[2], kh * kw, f.max_fan_in):
    x_c, w_c = xs[..., c], ws[:, :, c, :]
    if (kh, kw) == (1, 1) and strides == 1 and pads == ((0, 0), (0, 0)):
      part = jnp.einsum("nhwc,co->nhwo", x_c, w_c[0, 0],
                        preferred_element_type=f.matmul_result)
    elif (kh, kw) != (1, 1) and (
        f.im2col == "always"
        or max(xs.shape[1], xs.shape[2]) <= conv_kernels.SMALL_MAP_SIZE
        or (f.im2col == "cpu" and jax.default_backend() == "cpu")):
      part = conv_kernels.conv2d_im2col(
          x_c, w_c, strides, pads, f.matmul_result)
    else:
      result = f.conv_result
      if (jnp.issubdtype(f.operand, jnp.integer)
          and jax.default_backend() == "gpu"):
        result = jnp.float32  # cuDNN's int8 convs: a float32 (or int8) result
      part = jax.lax.conv_general_dilated(
          x_c, w_c, window_strides=(strides, strides), padding=pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          preferred_element_type=result)
    part = part.astype(jnp.float32)
    total = part if total is None else total + part
  return total


def _forward(x, kernel, strides, padding, impl, out_dtype):
  alpha = jnp.max(jnp.abs(kernel), axis=(0, 1, 2)).astype(jnp.float32)
  sums = integer_sums(x, jnp.sign(kernel), strides, padding, impl)
  return (sums * alpha).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def binary_conv(x: Array, kernel: Array, strides: int,
                padding: Union[int, Padding], impl: str,
                out_dtype: Any = jnp.float32) -> Array:
  """conv(x, kernel) of a binary x and a binarised kernel, exactly, by `impl`.

  forward:  alpha_o * S[..., o] (the module docstring), in `out_dtype`
            (float32 for the BatchNorm after a bfloat16 conv);
            requires x in {-1, 0, +1} and kernel = alpha_o * {-1, 0, +1}.
  backward: that of `conv_kernels.conv2d_nhwc(x, kernel)`, the cotangent rounded
            to x's dtype (as `conv_kernels.conv2d_float32_sum`'s).
  `impl` is a name in `FORMULATIONS`; padding an int or per-side pairs.
  """
  return _forward(x, kernel, strides, padding, impl, out_dtype)


def _binary_conv_fwd(x, kernel, strides, padding, impl, out_dtype):
  return _forward(x, kernel, strides, padding, impl, out_dtype), (x, kernel)


def _binary_conv_bwd(strides, padding, impl, out_dtype, residuals, g):
  del impl, out_dtype
  return conv_kernels.conv2d_nhwc_vjp(strides, padding, residuals, g)


binary_conv.defvjp(_binary_conv_fwd, _binary_conv_bwd)


def conv_function(impl: str) -> Optional[Callable[..., Array]]:
  """`layers.BinaryConv.binary_conv` for `impl` (after "auto" is resolved).

  None for "compute_dtype" (the BinaryConv's own conv); otherwise
  (x, kernel, strides, padding, out_dtype) -> `binary_conv` by `impl`.
  """
  impl = resolve(impl)
  if impl == COMPUTE_DTYPE:
    return None
  return functools.partial(_by_formulation, impl)


def _by_formulation(impl, x, kernel, strides, padding, out_dtype):
  return binary_conv(x, kernel, strides, padding, impl, out_dtype)
