"""Real-to-Binary Net (Martinez et al., ICLR 2020) as Larq Zoo defines it, NHWC.

Layer for layer Larq Zoo 2.4.0's `literature/real_to_bin_nets.py`
(`RealToBinaryNet` = `RealToBinNetBNNFactory`, the fully binary network):

  block_1: real conv 7x7/2 64 (SAME) -> BN -> PReLU -> MaxPool 3x3/2 (SAME)
  blocks 2-9, each two half blocks a, b (a doubles the channels, stride 2,
  in blocks 4, 6, 8); a half block on x (C_in -> C_out):
    shortcut = x, or AvgPool 2x2/2 (SAME) -> real conv 1x1 -> BN
    u        = BN(x)
    y        = BinaryConv3x3_s(u), input and kernel by `ste_sign`
               (clip 1: pseudo-gradient 1(|x| <= 1)), zero padding, SAME
    g        = sigmoid(W_e relu(W_r mean_hw(u)))   (W_r: C_in -> C_in / 8,
               W_e: C_in / 8 -> C_out, no biases: the data-dependent
               scaling of Section 4.3)
    out      = PReLU(y * g) + shortcut
  block_10: global average pool -> Dense (with bias).
  PReLU(z) = max(z, 0) + a_c min(z, 0), one slope per channel (Keras
  `PReLU(shared_axes=[1, 2])`, init 0). Every BN: momentum 0.99, eps 1e-3.

Module names are Larq Zoo's layer names without the `r2b_bnn_` prefix and
with '/' between a half block and its layers ("block_2a/conv2d" is Keras'
"r2b_bnn_block_2a_conv2d"; the head is bnn_jax's usual "fc", Keras'
"r2b_bnn_block_10_logits"), so the Larq importer matches them by name.
Larq's `WeightClip(1.0)` constraint is a training rule (recipe configs).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.layers import BatchNorm, BinaryConv

# Larq Zoo's layer-name prefix of RealToBinaryNet.
KERAS_PREFIX = "r2b_bnn_"
SCALING_REDUCTION = 8


class PReLU(nn.Module):
  """PReLU(z) = max(z, 0) + a * min(z, 0), per-channel slope a (`alpha`, init 0)."""

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.zeros, (x.shape[-1],),
                       jnp.float32)
    return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class RealToBinaryHalfBlock(nn.Module):
  """One half block (module docstring)."""
  features: int
  strides: int = 1
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  def _bn(self, name):
    return BatchNorm(momentum=0.99, epsilon=1e-3,
                     group_size=self.bn_group_size, dtype=self.dtype,
                     name=name)

  @nn.compact
  def __call__(self, x, train: bool):
    c_in = x.shape[-1]
    shortcut = x
    if c_in != self.features:
      shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME",
                             count_include_pad=False)
      shortcut = nn.Conv(self.features, (1, 1), use_bias=False,
                         kernel_init=nn.initializers.glorot_normal(),
                         dtype=self.dtype, name="shortcut_conv2d")(shortcut)
      shortcut = self._bn("shortcut_batch_norm")(shortcut, train)
    u = self._bn("batch_norm")(x, train)
    y = BinaryConv(
        self.features, kernel_size=3, strides=self.strides, padding="SAME",
        input_binarizer="ste_sign" if self.binary_activations else None,
        kernel_binarizer="ste_sign" if self.binary_weights else None,
        zero_to=self.zero_to, kernel_init=nn.initializers.glorot_normal(),
        dtype=self.dtype, name="conv2d")(u)
    z = jnp.mean(u.astype(jnp.float32), axis=(1, 2))
    z = nn.relu(nn.Dense(c_in // SCALING_REDUCTION, use_bias=False,
                         kernel_init=nn.initializers.he_normal(),
                         name="scaling_dense_reduce")(z))
    g = nn.sigmoid(nn.Dense(self.features, use_bias=False,
                            kernel_init=nn.initializers.he_normal(),
                            name="scaling_dense_expand")(z))
    y = y * g[:, None, None, :].astype(y.dtype)
    return PReLU(name="prelu")(y) + shortcut


class RealToBinaryNet(nn.Module):
  """Real-to-Binary Net (Larq Zoo's BNN variant): 16 binary half blocks.

  Attributes:
    num_classes: classes of the Dense head.
    binary_weights / binary_activations: False for real kernels / inputs in
      the 3x3 convs (Larq Zoo's r2b_ban / r2b_fp stages; same parameters).
    zero_to: sign(0) (+1, Larq's).
    bn_group_size: per-group ("ghost") BatchNorm statistics; None = global.
    dtype: computation dtype.
  """
  num_classes: int = 1000
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = nn.Conv(64, (7, 7), strides=(2, 2), padding="SAME", use_bias=False,
                kernel_init=nn.initializers.glorot_normal(), dtype=self.dtype,
                name="block_1_conv2d")(x)
    x = BatchNorm(momentum=0.99, epsilon=1e-3, group_size=self.bn_group_size,
                  dtype=self.dtype, name="block_1_batch_norm")(x, train)
    x = PReLU(name="block_1_prelu")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for block in range(2, 10):
      downsample = block % 2 == 0 and block > 3
      for half in "ab":
        double = downsample and half == "a"
        x = RealToBinaryHalfBlock(
            x.shape[-1] * (2 if double else 1), strides=2 if double else 1,
            binary_weights=self.binary_weights,
            binary_activations=self.binary_activations, zero_to=self.zero_to,
            bn_group_size=self.bn_group_size, dtype=self.dtype,
            name=f"block_{block}{half}")(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)  # Keras block_10_logits
