"""The XLA convolutions the binary and real-valued conv layers run (NHWC, HWIO).

* `conv2d_nhwc`           the plain conv, with two rewrites that XLA:CPU needs
                          and other backends tolerate: padding taps that only
                          ever read zeros are trimmed (`trim_padding_taps`),
                          and maps at most `SMALL_MAP_SIZE` run as im2col plus
                          one matmul (`conv2d_im2col`).
* `conv2d_float32_sum`    operands in the compute dtype, the sum in float32
                          (the precision policy of the binary convs), with
                          its own backward.
* `binary_conv_low_precision`  the opt-in narrow-operand forward of a binary
                          conv (its sums of +-1 products are integers); the
                          selectable exact formulations are
                          `bnn_jax.exact_binary_conv`.

docs/performance.md (the XLA:CPU table and the precision policy) has the
measurements behind each choice.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


# Maps at most this size (H and W) run a k x k conv (k > 1) as im2col + one
# matmul: XLA:CPU lowers convs whose map is smaller than the kernel to a naive
# loop (docs/performance.md, the XLA:CPU table, has the measurements).
SMALL_MAP_SIZE = 4

Padding = tuple[tuple[int, int], tuple[int, int]]


def _used_taps(size: int, k: int, strides: int, padding: int) -> tuple[int, int]:
  """[first, last + 1) of the kernel taps that read the map in some output.

  Output o reads input index o * strides + t - padding through tap t; a tap
  that reads the zero padding for every o multiplies zeros only.
  """
  out = (size + 2 * padding - k) // strides + 1
  used = [t for t in range(k)
          if any(0 <= o * strides + t - padding < size for o in range(out))]
  return (used[0], used[-1] + 1) if used else (0, k)


def trim_padding_taps(kernel: Array, map_hw: tuple[int, int], strides: int,
                      padding: int) -> tuple[Array, Padding]:
  """The kernel without the taps that only ever read padding, and its padding.

  A 3x3 conv (padding 1) on a 1x1 map reads the map through its centre tap
  only, and a stride-2 one on a 2x2 map through a 2x2 corner: the other taps
  multiply zeros, and their gradients are zeros. Slicing them off computes
  the same sum with k'^2 / k^2 of the work (ReActNet-A's 3x3 convs on the
  1x1 and 2x2 maps of 32x32 inputs); autodiff pads the gradient of the
  slice back with zeros. Per axis, taps [t0, t1) with padding
  lo = padding - t0 before the map and hi = (out - 1) * strides + (t1 - t0)
  - size - lo after it keep the output size `out`. Returns
  (kernel[a0:a1, b0:b1], ((a_lo, a_hi), (b_lo, b_hi))); the kernel as it is
  and symmetric `padding` when every tap is used or trimming would need a
  negative padding.
  """
  whole = ((padding, padding), (padding, padding))
  slices, pads = [], []
  for size, k in zip(map_hw, kernel.shape[:2]):
    t0, t1 = _used_taps(size, k, strides, padding)
    out = (size + 2 * padding - k) // strides + 1
    lo = padding - t0
    hi = (out - 1) * strides + (t1 - t0) - size - lo
    if lo < 0 or hi < 0:
      return kernel, whole
    slices.append(slice(t0, t1))
    pads.append((lo, hi))
  if all(t.stop - t.start == k for t, k in zip(slices, kernel.shape[:2])):
    return kernel, whole  # every tap used: the conv as written
  return kernel[slices[0], slices[1]], (pads[0], pads[1])


def conv2d_im2col(x: Array, kernel: Array, strides: int, padding: Padding,
                   preferred_element_type: Optional[Dtype] = None) -> Array:
  """conv(x, kernel) as kh*kw strided slices concatenated on channels, then one matmul.

  y[n, i, j, o] = sum_{a, b, c} xpad[n, s*i + a, s*j + b, c] * kernel[a, b, c, o]
  """
  kh, kw = kernel.shape[:2]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (xp.shape[1] - kh) // strides + 1
  out_w = (xp.shape[2] - kw) // strides + 1
  patches = jnp.concatenate(
      [xp[:, a:a + strides * (out_h - 1) + 1:strides,
          b:b + strides * (out_w - 1) + 1:strides, :]
       for a in range(kh) for b in range(kw)], axis=-1)
  return jnp.einsum("nhwc,co->nhwo", patches,
                    kernel.reshape(kh * kw * kernel.shape[2], kernel.shape[3]),
                    preferred_element_type=preferred_element_type)


def same_padding(size: int, k: int, strides: int) -> tuple[int, int]:
  """TensorFlow / Keras "same" padding of one axis: (before, after).

  total = max((ceil(size / strides) - 1) * strides + k - size, 0), the
  smaller half before: a 3x3/2 conv on an even map pads (0, 1).
  """
  out = -(-size // strides)
  total = max((out - 1) * strides + k - size, 0)
  return total // 2, total - total // 2


def conv2d_nhwc(x: Array, kernel: Array, strides: int,
                padding: Union[int, Padding],
                preferred_element_type: Optional[Dtype] = None) -> Array:
  """2-D convolution, NHWC input, HWIO kernel, zero padding `padding`.

  `padding` is p on every side, or ((top, bottom), (left, right)).
  Taps that only read padding are dropped first (`trim_padding_taps`, for
  an int padding).
  Small maps (H, W <= SMALL_MAP_SIZE, kernel > 1x1) use `conv2d_im2col`,
  everything else `lax.conv_general_dilated`; both compute the same sum.
  `preferred_element_type` is the output dtype (None: the operands').
  """
  small = (max(kernel.shape[:2]) > 1
           and max(x.shape[1], x.shape[2]) <= SMALL_MAP_SIZE)
  if isinstance(padding, int):
    kernel, pads = trim_padding_taps(kernel, x.shape[1:3], strides, padding)
  else:
    pads = tuple(tuple(p) for p in padding)
  if small:
    return conv2d_im2col(x, kernel, strides, pads, preferred_element_type)
  return jax.lax.conv_general_dilated(
      x, kernel,
      window_strides=(strides, strides),
      padding=pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_float32_sum(x: Array, kernel: Array, strides: int,
                       padding: int) -> Array:
  """`conv2d_nhwc` of low-precision operands, its sum returned in float32.

  forward:  the float32 accumulator of the conv, not rounded to the
            operands' dtype (a BatchNorm follows every conv: rounding to
            bfloat16 first would erase a spread below half an ulp of the
            channel's mean, and a channel whose spread vanishes has
            var_B = 0, which multiplies the gradient through the BN by
            scale / sqrt(eps) ~ 316 scale).
  backward: the cotangent is rounded to the operands' dtype and goes through
            the plain conv's VJP, so both backward convolutions run in that
            dtype, as they would without this function.
  """
  return conv2d_nhwc(x, kernel, strides, padding, jnp.float32)


def _conv2d_float32_sum_fwd(x, kernel, strides, padding):
  return conv2d_float32_sum(x, kernel, strides, padding), (x, kernel)


def conv2d_nhwc_vjp(strides: int, padding, residuals, g: Array):
  """(dx, dkernel) of `conv2d_nhwc` at residuals (x, kernel), with g cast to
  x's dtype: the backward every exact forward formulation shares (the
  precision policy keeps the binary convs' backward in the compute dtype)."""
  x, kernel = residuals
  _, vjp = jax.vjp(lambda a, b: conv2d_nhwc(a, b, strides, padding), x, kernel)
  return vjp(g.astype(x.dtype))


conv2d_float32_sum.defvjp(_conv2d_float32_sum_fwd, conv2d_nhwc_vjp)


# Exact low-precision operand dtypes of `binary_conv_low_precision`: +-1 and 0
# are exact in each, and the sums are accumulated in `_ACCUMULATOR[dtype]`.
BINARY_OPERAND_DTYPES: dict[str, Any] = {
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "int8": jnp.int8,
    "bfloat16": jnp.bfloat16,
}
_ACCUMULATOR = {"float8_e4m3fn": jnp.float32, "int8": jnp.int32,
                "bfloat16": jnp.float32}


def _integer_conv(xs: Array, ws: Array, strides: int, padding: int,
                  accumulator: Any) -> Array:
  """conv(xs, ws) of low-precision +-1/0 operands, summed in `accumulator`.

  Three formulations: a matmul for 1x1 stride-1 convs; im2col + one matmul
  (`conv2d_im2col`) for k x k convs on small maps (as `conv2d_nhwc`) and,
  on the CPU, for every k x k conv (XLA:CPU has no narrow-integer
  convolution kernel: `lax.conv_general_dilated` on int8 runs a naive loop,
  2.9 GFLOP/s against 840-990 GFLOP/s for the int8 matmul on AMX, in
  docs/performance.md); `lax.conv_general_dilated` otherwise. The matmuls
  accumulate in `accumulator`, the convolution in float32 (cuDNN's int8
  convolutions write float32, not int32); both sums are exact
  (|sum| <= k * k * C_in < 2^24).
  """
  k = ws.shape[0]
  if k == 1 and strides == 1 and padding == 0:
    return jnp.einsum("nhwc,co->nhwo", xs, ws[0, 0],
                      preferred_element_type=accumulator)
  if k > 1 and (max(xs.shape[1], xs.shape[2]) <= SMALL_MAP_SIZE
                or jax.default_backend() == "cpu"):
    ws, pads = trim_padding_taps(ws, xs.shape[1:3], strides, padding)
    return conv2d_im2col(xs, ws, strides, pads, accumulator)
  return jax.lax.conv_general_dilated(
      xs, ws, window_strides=(strides, strides),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32)


def _binary_conv_low_precision_forward(x, kernel, strides, padding,
                                       operand_dtype, out_dtype):
  alpha = jnp.max(jnp.abs(kernel), axis=(0, 1, 2)).astype(jnp.float32)
  op = BINARY_OPERAND_DTYPES[operand_dtype]
  sums = _integer_conv(x.astype(op), jnp.sign(kernel).astype(op), strides,
                       padding, _ACCUMULATOR[operand_dtype])
  return (sums.astype(jnp.float32) * alpha).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def binary_conv_low_precision(x: Array, kernel: Array, strides: int,
                              padding: int, operand_dtype: str,
                              out_dtype: Optional[Dtype] = None) -> Array:
  """conv2d_nhwc(x, kernel) for binary operands, forward in a narrow dtype.

  Requires x in {-1, 0, +1} (a binarised input) and kernel = alpha_o *
  {-1, 0, +1} per output channel o (a binarised kernel, already in the
  computation dtype). Then

    conv(x, kernel)[..., o] = alpha_o * conv(x, sign(kernel))[..., o],
    alpha_o = max |kernel[..., o]|,

  and conv(x, sign(kernel)) is a sum of integers: its operands are exact in
  float8_e4m3fn, int8 or bfloat16 and the sum is exact in the float32 (int32
  for int8) accumulator. The result, returned in `out_dtype` (None: x's
  dtype), equals `conv2d_nhwc(x, kernel)` bit for bit in a bfloat16 model
  wherever that conv accumulates in float32 (XLA:CPU; cuDNN and cuBLAS on
  GPUs): every partial sum j * alpha_o (|j| < 2^14, alpha_o with 8
  significant bits) is exact in float32, so both round the same exact value
  once (or not at all, for a float32 `out_dtype`). In float32 it can differ
  from it in the last bits (there the reference sum rounds).

  The backward pass is that of `conv2d_nhwc(x, kernel)` with the cotangent
  in x's dtype, unchanged: the input and kernel gradients are convolutions
  of the incoming gradient in the computation dtype.
  """
  return _binary_conv_low_precision_forward(x, kernel, strides, padding,
                                            operand_dtype, out_dtype or x.dtype)


def _binary_conv_low_precision_fwd(x, kernel, strides, padding, operand_dtype,
                                   out_dtype):
  y = _binary_conv_low_precision_forward(x, kernel, strides, padding,
                                         operand_dtype, out_dtype or x.dtype)
  return y, (x, kernel)


def _binary_conv_low_precision_bwd(strides, padding, operand_dtype, out_dtype,
                                   res, g):
  del operand_dtype, out_dtype
  return conv2d_nhwc_vjp(strides, padding, res, g)


binary_conv_low_precision.defvjp(_binary_conv_low_precision_fwd,
                                 _binary_conv_low_precision_bwd)
