"""QuickNet, QuickNetSmall, QuickNetLarge (Larq Zoo `sota/quicknet.py`), NHWC.

Layer for layer the Larq Zoo 2.4.0 definition (Bannink et al. 2021, "Larq
Compute Engine"), in its call order (= the Keras layer order):

  stem (F = section_filters[0]):
    real conv 3x3/2 F/4 (SAME) -> BN -> ReLU
    -> real depthwise 3x3/2 (SAME) -> BN without scale and bias
    -> real conv 1x1 F -> BN                          (Keras BN: eps 1e-3)
  per section (blocks b, filters f), per block:
    if f != C: transition: ReLU -> MaxPool 2x2/1 (VALID)
               -> fixed blur depthwise 3x3/2 (SAME), kernel [1 2 1]^T [1 2 1] / 16
               -> real conv 1x1 f -> BN
    residual:  y = BN(ReLU(BinaryConv3x3(x))) + x, the binary conv's input
               and kernel binarised by `ste_sign` with clip 1.25
               (pseudo-gradient 1(|x| <= 1.25)), its padding +1 (Larq
               `pad_values=1.0`: the padded input is binarised to +1)
  head: ReLU -> global average pool -> Dense (with bias).
  Every BN after the stem: momentum 0.9, eps 1e-5.

SAME padding is TensorFlow's: total max((ceil(n / s) - 1) s + k - n, 0),
the smaller half before (224 -> 112 pads (0, 1)); flax's "SAME" is the same
rule. The +1 padding of the binary convs is a `jnp.pad` of the conv's input
with 1.0 before a BinaryConv with padding 0: sign(1) = +1 whatever the
binariser, so the packed export (padding 0 on the padded map) runs it as is.

Larq counts each BN as 2C parameters (moving mean and variance; scale and
bias are folded into them) and the blur kernels (non-trainable Keras
weights) as 9C each; here the blur kernel is a constant, not a parameter,
and the unscaled stem BN has no parameters (only batch statistics).
Larq's `WeightClip(1.25)` kernel constraint is a training rule (w <- clip(w,
-1.25, 1.25) after every step), not part of the model: the QuickNet recipe
configs apply it (`configs/quicknet_imagenet.py`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax.layers import BatchNorm, BinaryConv

# QuickNet's ste_sign clip, for activations and kernels.
QUICKNET_CLIP = 1.25
# Larq Zoo's section layouts.
QUICKNET_SMALL = dict(section_blocks=(4, 4, 4, 4),
                      section_filters=(32, 64, 256, 512))
QUICKNET = dict(section_blocks=(4, 4, 4, 4),
                section_filters=(64, 128, 256, 512))
QUICKNET_LARGE = dict(section_blocks=(6, 8, 12, 6),
                      section_filters=(64, 128, 256, 512))


def blur_kernel(channels: int) -> np.ndarray:
  """The anti-aliasing depthwise kernel (3, 3, 1, C): outer([1,2,1], [1,2,1]) / 16.

  Larq Zoo's `blurpool_initializer` for ksize 3 (Zhang 2019).
  """
  k = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
  return np.repeat(k[:, :, None, None], channels, axis=3).astype(np.float32)


def _real_conv(features: int, kernel_size: int, strides: int, name: str,
               dtype: Any, init, groups: int = 1) -> nn.Conv:
  return nn.Conv(features, (kernel_size, kernel_size),
                 strides=(strides, strides), padding="SAME", use_bias=False,
                 feature_group_count=groups, kernel_init=init, dtype=dtype,
                 name=name)


class QuickNetResidualBlock(nn.Module):
  """y = BN(ReLU(BinaryConv3x3(pad_+1(x)))) + x (module docstring)."""
  clip: float = QUICKNET_CLIP
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    clip = (("clip", self.clip),)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
    y = BinaryConv(
        x.shape[-1], kernel_size=3, padding=0,
        input_binarizer="ste_sign" if self.binary_activations else None,
        kernel_binarizer="ste_sign" if self.binary_weights else None,
        input_binarizer_kwargs=clip, kernel_binarizer_kwargs=clip,
        zero_to=self.zero_to, kernel_init=nn.initializers.glorot_normal(),
        dtype=self.dtype, name="binary_conv")(padded)
    y = nn.relu(y)
    y = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                  name="bn")(y, train)
    return y + x


class QuickNetTransition(nn.Module):
  """ReLU -> MaxPool 2x2/1 -> blur depthwise 3x3/2 -> real 1x1 conv -> BN."""
  features: int
  strides: int = 2
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    x = nn.relu(x)
    x = nn.max_pool(x, (self.strides, self.strides), strides=(1, 1),
                    padding="VALID")
    x = jax.lax.conv_general_dilated(
        x, jnp.asarray(blur_kernel(c), x.dtype),
        window_strides=(self.strides, self.strides), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    x = _real_conv(self.features, 1, 1, "conv", self.dtype,
                   nn.initializers.glorot_normal())(x)
    return BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                     name="bn")(x, train)


class QuickNet(nn.Module):
  """QuickNet: stem -> sections of residual binary blocks -> real Dense.

  Attributes:
    num_classes: classes of the Dense head.
    section_blocks: residual blocks per section (QuickNet (4, 4, 4, 4),
      QuickNetLarge (6, 8, 12, 6)).
    section_filters: channels per section (QuickNetSmall (32, 64, 256, 512),
      QuickNet and QuickNetLarge (64, 128, 256, 512)).
    clip: the ste_sign clip of activations and kernels (1.25).
    binary_weights / binary_activations: False for real kernels / inputs in
      the residual convs (same parameters).
    zero_to: sign(0) (+1, Larq's).
    bn_group_size: per-group ("ghost") BatchNorm statistics; None = global.
    dtype: computation dtype.
  """
  num_classes: int = 1000
  section_blocks: Sequence[int] = QUICKNET["section_blocks"]
  section_filters: Sequence[int] = QUICKNET["section_filters"]
  clip: float = QUICKNET_CLIP
  binary_weights: bool = True
  binary_activations: bool = True
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  def _bn(self, name, epsilon=1e-5, momentum=0.9, affine=True):
    return BatchNorm(momentum=momentum, epsilon=epsilon,
                     group_size=self.bn_group_size, dtype=self.dtype,
                     use_scale=affine, use_bias=affine, name=name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if len(self.section_blocks) != len(self.section_filters):
      raise ValueError(f"section_blocks {tuple(self.section_blocks)} and "
                       f"section_filters {tuple(self.section_filters)} differ "
                       "in length")
    filters = self.section_filters[0]
    if filters % 4:
      raise ValueError(f"QuickNet's stem needs section_filters[0] divisible "
                       f"by 4; got {filters}")
    x = x.astype(self.dtype)
    # Stem (Keras BatchNormalization defaults: momentum 0.99, eps 1e-3).
    x = _real_conv(filters // 4, 3, 2, "stem_conv", self.dtype,
                   nn.initializers.he_normal())(x)
    x = nn.relu(self._bn("stem_bn", 1e-3, 0.99)(x, train))
    x = _real_conv(filters // 4, 3, 2, "stem_depthwise", self.dtype,
                   nn.initializers.glorot_uniform(), groups=filters // 4)(x)
    x = self._bn("stem_depthwise_bn", 1e-3, 0.99, affine=False)(x, train)
    x = _real_conv(filters, 1, 1, "stem_pointwise", self.dtype,
                   nn.initializers.he_normal())(x)
    x = self._bn("stem_pointwise_bn", 1e-3, 0.99)(x, train)
    for section, (blocks, f) in enumerate(
        zip(self.section_blocks, self.section_filters)):
      for block in range(blocks):
        if f != x.shape[-1]:
          x = QuickNetTransition(f, bn_group_size=self.bn_group_size,
                                 dtype=self.dtype,
                                 name=f"section{section}_transition")(x, train)
        x = QuickNetResidualBlock(
            clip=self.clip, binary_weights=self.binary_weights,
            binary_activations=self.binary_activations, zero_to=self.zero_to,
            bn_group_size=self.bn_group_size, dtype=self.dtype,
            name=f"section{section}_block{block}")(x, train)
    x = jnp.mean(nn.relu(x).astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)
