"""Binary building blocks as Flax linen modules (NHWC).

* `Shift`       y = x + b, a learnable per-channel shift (init 0): ReActNet's
                "LearnableBias", the b of RSign and of RPReLU.
* `RSign`       y = binariser(x + b): ReActNet's shifted sign.
* `RPReLU`      y = PReLU(x + b1) + b2, PReLU(z) = max(z, 0) + a * min(z, 0),
                per-channel slope a (init 0.25).
* `BinaryConv`  y = conv(B_x(x), B_w(W)): optional input binariser B_x and
                kernel binariser B_w, chosen by name. With `kernel_binarizer=None`
                it is the real-weight conv of AdamBNN step 1, with the *same*
                parameter name (`kernel`) and shape, so step 2 loads step 1
                strictly.
* `BatchNorm`   torch-compatible batch normalisation, with optional per-group
                ("ghost") statistics to reproduce per-GPU statistics.

Inside the models the activation binariser of an RSign is the `input_binarizer`
of the BinaryConv that consumes it (RSign = `Shift` + the conv's input
binariser): the conv then knows its inputs are +-1, which the cost summary
uses to count binary operations. `RSign` is the same thing as one module for
code that binarises activations on their own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_jax import batch_stats
from bnn_jax import binary
# The conv kernels as layers.* too (their home: bnn_jax.conv_kernels).
from bnn_jax.conv_kernels import (  # noqa: F401
    BINARY_OPERAND_DTYPES, SMALL_MAP_SIZE, Padding, binary_conv_low_precision,
    conv2d_float32_sum, conv2d_nhwc, same_padding, trim_padding_taps)

Array = jax.Array
Dtype = Any


def reference_kernel_init(key, shape, dtype=jnp.float32):
  """The reference HardBinaryConv init: uniform[0, 0.001) (all positive)."""
  return jax.random.uniform(key, shape, dtype, 0.0, 1e-3)


def _float32(x: Array) -> Array:
  """x in at least float32 (bfloat16 and float16 are widened, float64 kept)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Shift(nn.Module):
  """y = x + b with a learnable per-channel (last axis) shift b, init 0.

  The sum is computed and returned in float32 whatever x's dtype: a shift
  precedes a sign (RSign), and in bfloat16 a shift smaller than half an ulp
  of x would vanish (x + b rounds back to x) although it decides the sign of
  x + b near zero. The binariser's +-1 output is exact in any dtype, so the
  conv after it still runs in the compute dtype.
  """

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b = self.param("shift", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return _float32(x) + b


class RSign(nn.Module):
  """RSign(x) = B(x + b): learnable per-channel shift b, then the binariser B.

  Attributes:
    binarizer: a name in `binary.ACTIVATION_BINARIZERS`.
    zero_to: the value of sign(0) (+1 deployable, 0 = torch.sign).
  """
  binarizer: str = "approx_sign"
  zero_to: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = Shift(name="move")(x)
    return binary.get_activation_binarizer(self.binarizer, self.zero_to)(x)


class RPReLU(nn.Module):
  """RPReLU(x) = PReLU(x + b1) + b2, PReLU(z) = max(z, 0) + a * min(z, 0).

  Per-channel b1 (`shift_in`, init 0), a (`slope`, init 0.25), b2
  (`shift_out`, init 0). Computed in float32 (b1 decides the sign of x + b1,
  which picks the slope; see `Shift`), returned in x's dtype.
  """
  slope_init: float = 0.25

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    shift_in = self.param("shift_in", nn.initializers.zeros, (c,), jnp.float32)
    slope = self.param("slope", nn.initializers.constant(self.slope_init), (c,),
                       jnp.float32)
    shift_out = self.param("shift_out", nn.initializers.zeros, (c,), jnp.float32)
    z = _float32(x) + shift_in
    z = jnp.where(z >= 0, z, slope * z)
    return (z + shift_out).astype(x.dtype)


# Name of the statistics BinaryConv sows into the 'intermediates' collection.
BINARIZER_STATS_KEY = "binarizer_stats"


def binarizer_input_stats(binarize: Callable[[Array], Array],
                          x: Array) -> dict[str, Array]:
  """Counts describing a binariser's inputs x (NHWC), int32.

  * saturated / inputs: inputs where the binariser's pseudo-gradient is
    exactly 0, i.e. outside the activation STE window (approx_sign:
    |x_i| >= 1; ste_sign: |x_i| > clip): no gradient flows back through them.
  * constant_channels / channels: channels whose binarised value is the same
    at every position of every example. A constant input adds the same
    amount to every output of a conv, which the BatchNorm after it removes,
    so the weights reading such a channel get (almost) no gradient.
  Under jit the counts are over the global (sharded) batch.
  """
  _, vjp = jax.vjp(binarize, x)
  (pseudo_grad,) = vjp(jnp.ones_like(x))
  xb = binarize(x).reshape(-1, x.shape[-1])
  constant = jnp.max(xb, axis=0) == jnp.min(xb, axis=0)
  return {"saturated": jnp.sum(pseudo_grad == 0, dtype=jnp.int32),
          "inputs": jnp.asarray(x.size, jnp.int32),
          "constant_channels": jnp.sum(constant, dtype=jnp.int32),
          "channels": jnp.asarray(x.shape[-1], jnp.int32)}


class BinaryConv(nn.Module):
  """y = conv(B_x(x), B_w(W)), zero padding applied to the binarised input.

  When the 'intermediates' collection is mutable (e.g.
  `model.apply(..., mutable=['intermediates'])`), a conv with an input
  binariser sows `binarizer_input_stats(B_x, x)` under `BINARIZER_STATS_KEY`:
  how many of its binariser's inputs lie outside the STE window and how
  many channels are constant (see `bnn_jax.dynamics.saturated_fraction`).
  Otherwise nothing is computed.

  Attributes:
    features: output channels.
    kernel_size: square kernel size k (kernel shape (k, k, C_in, features)).
    strides: spatial stride.
    padding: zero padding on each side; `None` means (k - 1) // 2; "SAME"
      is Keras' "same" (`same_padding`, asymmetric for even maps and
      stride 2), resolved from the input's size (`resolved_padding`).
    input_binarizer: name in `binary.ACTIVATION_BINARIZERS`, or None to use
      the input as it is.
    kernel_binarizer: name in `binary.WEIGHT_BINARIZERS` ("scaled_sign" =
      alpha * sign(W), the reference), or None for real weights (step 1).
    zero_to: sign(0) for both binarisers.
    input_binarizer_kwargs / kernel_binarizer_kwargs: extra arguments of the
      binarisers as (name, value) pairs, e.g. (("clip", 1.25),) for
      QuickNet's `ste_sign`; () = the binariser's defaults.
    kernel_init: initializer of the latent kernel (reference: U[0, 0.001)).
    dtype: computation dtype of the conv's operands (parameters stay
      float32). Below float32 the output is the float32 sum
      (`conv2d_float32_sum`), for the BatchNorm after it.
    operand_dtype: None (default) computes the conv in `dtype`; a name in
      `BINARY_OPERAND_DTYPES` runs the forward conv of a binary input and
      binary kernel on exact narrow operands (`binary_conv_low_precision`:
      same result, same backward). Ignored unless both are binarised.
    binary_conv: None (default) computes the conv in `dtype` as above; a
      function (x, kernel, strides, padding, out_dtype) -> conv(x, kernel)
      runs the conv of a binary input and binary kernel instead, e.g. an
      exact narrow-operand formulation (`exact_binary_conv.conv_function`:
      the same sums, the same backward). Ignored unless both are binarised.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: Optional[Union[int, str]] = None
  input_binarizer: Optional[str] = "approx_sign"
  kernel_binarizer: Optional[str] = "scaled_sign"
  zero_to: float = 1.0
  input_binarizer_kwargs: tuple[tuple[str, Any], ...] = ()
  kernel_binarizer_kwargs: tuple[tuple[str, Any], ...] = ()
  kernel_init: Callable[..., Array] = reference_kernel_init
  dtype: Dtype = jnp.float32
  operand_dtype: Optional[str] = None
  binary_conv: Optional[Callable[..., Array]] = None

  @property
  def binary_inputs(self) -> bool:
    return self.input_binarizer is not None

  @property
  def binary_weights(self) -> bool:
    return self.kernel_binarizer is not None

  def resolved_padding(self, input_hw: Sequence[int]
                       ) -> Union[int, Padding]:
    """The padding on an input of spatial size `input_hw`: an int p (p on
    every side) or ((top, bottom), (left, right)) where they differ."""
    k = self.kernel_size
    if self.padding is None:
      return (k - 1) // 2
    if isinstance(self.padding, int):
      return self.padding
    if self.padding != "SAME":
      raise ValueError(f"BinaryConv padding {self.padding!r}: pass an int, "
                       "None or 'SAME'")
    pads = tuple(same_padding(int(n), k, self.strides) for n in input_hw)
    if len(set(pads)) == 1 and pads[0][0] == pads[0][1]:
      return pads[0][0]
    return pads

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init,
                        (k, k, x.shape[-1], self.features), jnp.float32)
    if self.kernel_binarizer is not None:
      kernel = binary.get_weight_binarizer(
          self.kernel_binarizer, self.zero_to,
          **dict(self.kernel_binarizer_kwargs))(kernel)
    if self.input_binarizer is not None:
      binarize = binary.get_activation_binarizer(
          self.input_binarizer, self.zero_to,
          **dict(self.input_binarizer_kwargs))
      if self.is_mutable_collection("intermediates"):
        self.sow("intermediates", BINARIZER_STATS_KEY,
                 binarizer_input_stats(binarize, x))
      x = binarize(x)
    pad = self.resolved_padding(x.shape[1:3])
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    float32_sum = jnp.dtype(self.dtype).itemsize < 4
    if (self.binary_conv is not None and self.binary_inputs
        and self.binary_weights):
      if self.operand_dtype is not None:
        raise ValueError(f"operand_dtype {self.operand_dtype!r} and a "
                         "binary_conv formulation: set one of them")
      return self.binary_conv(x, kernel, self.strides, pad,
                              jnp.float32 if float32_sum else self.dtype)
    if self.operand_dtype is not None:
      if self.operand_dtype not in BINARY_OPERAND_DTYPES:
        raise ValueError(f"unknown operand_dtype {self.operand_dtype!r}; "
                         f"choose one of {sorted(BINARY_OPERAND_DTYPES)}")
      if self.binary_inputs and self.binary_weights:
        if not isinstance(pad, int):
          raise ValueError("operand_dtype needs the same padding on every "
                           f"side; got {pad}")
        return binary_conv_low_precision(
            x, kernel, self.strides, pad, self.operand_dtype,
            jnp.float32 if float32_sum else self.dtype)
    if float32_sum:
      return conv2d_float32_sum(x, kernel, self.strides, pad)
    return conv2d_nhwc(x, kernel, self.strides, pad)


class BatchNorm(nn.Module):
  """Batch normalisation over N, H, W with torch's conventions.

  train:  y = (x - mu_B) / sqrt(var_B + eps) * scale + bias, with mu_B and the
          biased var_B over the batch (or over each group of `group_size`
          examples when set: "ghost" BN, what torch DataParallel computed on
          each GPU's sub-batch);
          running_mean <- momentum * running_mean + (1 - momentum) * mu_B,
          running_var  <- momentum * running_var + (1 - momentum) * var_B * n / (n - 1)
          (torch's unbiased running variance; with groups, mu_B and var_B are
          averaged over the groups; torch DataParallel kept only GPU 0's
          update, i.e. the first group's, a noisier estimate of the same).
  eval:   y = (x - running_mean) / sqrt(running_var + eps) * scale + bias.

  Parameter and statistic names follow flax: params {scale, bias},
  batch_stats {mean, var}. momentum 0.9 here is torch's momentum 0.1.
  Statistics and the normalisation (train and eval) are computed in float32
  whatever the input dtype; the output is rounded once to `dtype` (None:
  the input's dtype). The models give it their compute dtype and feed it the
  float32 conv sums (`conv2d_float32_sum`).
  Eval mode is not folded into a bfloat16 x * s + t: when the mean is large
  against the spread, the two large terms cancel and bfloat16 keeps none of
  the difference.

  `use_scale=False` / `use_bias=False` drop `scale` (as 1) / `bias` (as 0)
  from the parameters (Keras `BatchNormalization(scale=False,
  center=False)`, in QuickNet's stem).

  `one_pass_stats=True` computes var_B = mean(x^2) - mu_B^2 (clamped at 0),
  so both statistics come from one pass over x (two reductions XLA can fuse
  into one kernel) instead of mean((x - mu_B)^2), which needs mu_B first;
  flax's `use_fast_variance`. It loses precision when |mu_B| >> std(x)
  (relative error of var ~ 2^-24 mu_B^2 / var_B in float32).
  `stats_method` picks the statistics by name (`bnn_jax.batch_stats`):
  "two_pass" (the default), "one_pass" (= `one_pass_stats=True`) or
  "shifted_one_pass" (one pass over x - K, K the first position's value per
  channel: as exact as two passes when |mu_B| >> std(x)).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_size: Optional[int] = None
  scale_init: Callable[..., Array] = nn.initializers.ones
  dtype: Optional[Dtype] = None
  one_pass_stats: bool = False
  stats_method: str = "two_pass"
  use_scale: bool = True
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    out_dtype = x.dtype if self.dtype is None else self.dtype
    scale = (self.param("scale", self.scale_init, (c,), jnp.float32)
             if self.use_scale else jnp.ones((c,), jnp.float32))
    bias = (self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
            if self.use_bias else jnp.zeros((c,), jnp.float32))
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((c,), jnp.float32))
    if not train:
      mean, var = ra_mean.value, ra_var.value
      inv = jax.lax.rsqrt(var + self.epsilon) * scale
      return ((_float32(x) - mean) * inv + bias).astype(out_dtype)

    xf = x.astype(jnp.float32)
    batch = x.shape[0]
    group = batch if self.group_size is None else min(self.group_size, batch)
    if batch % group:
      raise ValueError(f"BatchNorm group_size {group} does not divide the "
                       f"batch {batch}")
    xg = xf.reshape((batch // group, group) + x.shape[1:])
    red = tuple(range(1, xg.ndim - 1))  # every axis of a group but channels
    method = self.stats_method
    if self.one_pass_stats:
      if method not in ("two_pass", "one_pass"):
        raise ValueError(f"one_pass_stats=True and stats_method {method!r}: "
                         "set one of them")
      method = "one_pass"
    mean, var, centered = batch_stats.centered(xg, red, method)
    y = centered * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    if not self.is_initializing():
      n = group * (xg.size // (xg.shape[0] * group * c))  # elements per stat
      unbias = n / max(n - 1, 1)
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(
          mean.reshape(-1, c), axis=0)
      ra_var.value = m * ra_var.value + (1 - m) * unbias * jnp.mean(
          var.reshape(-1, c), axis=0)
    return y.reshape(x.shape).astype(out_dtype)
