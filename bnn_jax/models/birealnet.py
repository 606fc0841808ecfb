"""Bi-Real Net 18 (Liu et al., ECCV 2018) as Larq Zoo defines it, NHWC.

Layer for layer Larq Zoo 2.4.0's `literature/birealnet.py` (`BiRealNet`):

  stem:   real conv 7x7/2 64 (SAME) -> BN -> MaxPool 3x3/2 (SAME)
  blocks: 4 of 64, then 3 stages of (one block doubling the channels, 3
          blocks keeping them): 16 blocks, each
            y = BN(BinaryConv3x3_s(x)) + shortcut(x),
          s = 2 where the channels double; the conv's input binarised by
          `approx_sign` (pseudo-gradient 2 - 2|x| on |x| <= 1) and its
          kernel by `magnitude_aware_sign` (alpha_o sign(w), gradient
          alpha_o 1(|w| <= 1)); zero padding of the binarised input, SAME
          (asymmetric (0, 1) for stride 2 on an even map);
          shortcut = identity, or where the channels double
            AvgPool 2x2/2 (SAME) -> real conv 1x1 -> BN.
  head:   global average pool -> Dense (with bias).
  Every BN: Keras momentum 0.8, eps 1e-3. No activation anywhere but the
  signs: Larq Zoo's Bi-Real Net has no PReLU / ReLU.

Larq's `WeightClip(1.0)` kernel constraint (w <- clip(w, -1, 1) after each
step) is a training rule, applied by the recipe configs, not the model.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.layers import BatchNorm, BinaryConv


def real_conv(features: int, kernel_size: int, strides: int, name: str,
              dtype: Any, init=nn.initializers.glorot_normal()) -> nn.Conv:
  """A real conv without bias, Keras "same" padding (flax's "SAME")."""
  return nn.Conv(features, (kernel_size, kernel_size),
                 strides=(strides, strides), padding="SAME", use_bias=False,
                 kernel_init=init, dtype=dtype, name=name)


class BiRealBlock(nn.Module):
  """y = BN(BinaryConv3x3_s(x)) + shortcut(x) (module docstring)."""
  features: int
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  def _bn(self, name):
    return BatchNorm(momentum=0.8, epsilon=1e-3, group_size=self.bn_group_size,
                     dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    strides = 1 if c_in == self.features else 2
    shortcut = x
    if c_in != self.features:  # Larq Zoo creates the shortcut first
      shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME",
                             count_include_pad=False)
      shortcut = real_conv(self.features, 1, 1, "shortcut_conv",
                           self.dtype)(shortcut)
      shortcut = self._bn("shortcut_bn")(shortcut, train)
    y = BinaryConv(
        self.features, kernel_size=3, strides=strides, padding="SAME",
        input_binarizer="approx_sign" if self.binary_activations else None,
        kernel_binarizer=("magnitude_aware_sign" if self.binary_weights
                          else None),
        zero_to=self.zero_to, kernel_init=nn.initializers.glorot_normal(),
        dtype=self.dtype, name="binary_conv")(x)
    return self._bn("bn")(y, train) + shortcut


class BiRealNet(nn.Module):
  """Bi-Real Net 18 (Larq Zoo): stem -> 16 binary blocks -> Dense.

  Attributes:
    num_classes: classes of the Dense head.
    filters: the stem's channels (64); the stages have 1, 2, 4, 8 times it.
    binary_weights / binary_activations: False for real kernels / inputs in
      the 3x3 convs (same parameters).
    zero_to: sign(0) (+1, Larq's).
    bn_group_size: per-group ("ghost") BatchNorm statistics; None = global.
    dtype: computation dtype.
  """
  num_classes: int = 1000
  filters: int = 64
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = real_conv(self.filters, 7, 2, "stem_conv", self.dtype)(x)
    x = BatchNorm(momentum=0.8, epsilon=1e-3, group_size=self.bn_group_size,
                  dtype=self.dtype, name="stem_bn")(x, train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    widths = [self.filters] * 4
    for stage in range(1, 4):
      widths += [self.filters * 2 ** stage] * 4
    for i, features in enumerate(widths):
      x = BiRealBlock(features, binary_weights=self.binary_weights,
                      binary_activations=self.binary_activations,
                      zero_to=self.zero_to, bn_group_size=self.bn_group_size,
                      dtype=self.dtype, name=f"block{i}")(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)
