"""BinaryResNetE18 (Bethge et al. 2019, "Back to Simplicity") as Larq Zoo
defines it, NHWC.

Layer for layer Larq Zoo 2.4.0's `literature/resnet_e.py`
(`BinaryResNetE18`):

  stem (input >= 50 px): real conv 7x7/2 64 (SAME) -> BN -> ReLU
                         -> MaxPool 3x3/2 (SAME) -> BN
  stem (input < 50 px, Larq's small-input rule): real conv 3x3/1 64 (SAME)
  blocks: stages of (2, 2, 2, 2) x 2 = 4 blocks of 64, 128, 256, 512, each
            y = BN(BinaryConv3x3_s(x)) + shortcut(x),
          s = 2 for the first block of stages 2-4; input and kernel
          binarised by `ste_sign` with clip 1.25 (pseudo-gradient
          1(|x| <= 1.25)); zero padding of the binarised input, SAME;
          shortcut = identity, or where the channels change
            AvgPool 2x2/2 (VALID) -> real conv 1x1 -> BN.
  head:   ReLU -> global average pool -> Dense (with bias).
  Every BN: momentum 0.9, eps 1e-5.

Larq's `WeightClip(1.25)` kernel constraint is a training rule, applied by
the recipe configs, not the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.layers import BatchNorm, BinaryConv
from bnn_jax.models.birealnet import real_conv

# Larq's small-input rule: a 3x3/1 stem below this input height.
SMALL_INPUT = 50
CLIP = 1.25


class BinaryResNetEBlock(nn.Module):
  """y = BN(BinaryConv3x3_s(x)) + shortcut(x) (module docstring)."""
  features: int
  strides: int = 1
  clip: float = CLIP
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  def _bn(self, name):
    return BatchNorm(momentum=0.9, epsilon=1e-5, group_size=self.bn_group_size,
                     dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool):
    shortcut = x
    if x.shape[-1] != self.features:  # Larq Zoo creates the shortcut first
      shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      shortcut = real_conv(self.features, 1, 1, "shortcut_conv",
                           self.dtype)(shortcut)
      shortcut = self._bn("shortcut_bn")(shortcut, train)
    clip = (("clip", self.clip),)
    y = BinaryConv(
        self.features, kernel_size=3, strides=self.strides, padding="SAME",
        input_binarizer="ste_sign" if self.binary_activations else None,
        kernel_binarizer="ste_sign" if self.binary_weights else None,
        input_binarizer_kwargs=clip, kernel_binarizer_kwargs=clip,
        zero_to=self.zero_to, kernel_init=nn.initializers.glorot_normal(),
        dtype=self.dtype, name="binary_conv")(x)
    return self._bn("bn")(y, train) + shortcut


class BinaryResNetE(nn.Module):
  """BinaryResNetE (Larq Zoo): stem -> 2 x stage_sizes binary blocks -> Dense.

  Attributes:
    num_classes: classes of the Dense head.
    stage_sizes: ResNet blocks per stage ((2, 2, 2, 2) for 18 layers); each
      ResNet block is two binary blocks with their own shortcuts.
    widths: channels per stage.
    clip: the ste_sign clip of activations and kernels (1.25).
    binary_weights / binary_activations: False for real kernels / inputs.
    zero_to: sign(0) (+1, Larq's).
    bn_group_size: per-group ("ghost") BatchNorm statistics; None = global.
    dtype: computation dtype.
  """
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  clip: float = CLIP
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  def _bn(self, name):
    return BatchNorm(momentum=0.9, epsilon=1e-5, group_size=self.bn_group_size,
                     dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    small = x.shape[1] < SMALL_INPUT
    x = x.astype(self.dtype)
    if small:
      x = real_conv(self.widths[0], 3, 1, "stem_conv", self.dtype,
                    nn.initializers.he_normal())(x)
    else:
      x = real_conv(self.widths[0], 7, 2, "stem_conv", self.dtype,
                    nn.initializers.he_normal())(x)
      x = nn.relu(self._bn("stem_bn")(x, train))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      x = self._bn("stem_pool_bn")(x, train)
    i = 0
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes,
                                                self.widths)):
      for layer in range(2 * blocks):
        x = BinaryResNetEBlock(
            width, strides=1 if stage == 0 or layer != 0 else 2,
            clip=self.clip, binary_weights=self.binary_weights,
            binary_activations=self.binary_activations, zero_to=self.zero_to,
            bn_group_size=self.bn_group_size, dtype=self.dtype,
            name=f"block{i}")(x, train)
        i += 1
    x = jnp.mean(nn.relu(x).astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)
