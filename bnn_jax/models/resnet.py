"""Real-valued ResNets (He et al. 2016), used as knowledge-distillation teachers.

torchvision layout (BasicBlock, v1: stride on the first 3x3 conv of a stage,
projection shortcut = 1x1 conv stride s -> BN), NHWC. Module names follow
torchvision's state dict (conv1, bn1, layer{i}_{j}/conv1, ..., downsample_conv,
downsample_bn, fc) so torchvision weights import by renaming.

`stem="imagenet"`: 7x7/2 conv -> BN -> ReLU -> maxpool 3x3/2 (224 inputs).
`stem="small"`: 3x3/1 conv -> BN -> ReLU, no maxpool (8x8 digits, 32x32 CIFAR).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bnn_jax.layers import BatchNorm, BinaryConv


def _conv(features, kernel_size, strides, name, dtype):
  """A real conv (no binarisers), kaiming-normal fan-out init as torchvision."""
  return BinaryConv(features, kernel_size=kernel_size, strides=strides,
                    input_binarizer=None, kernel_binarizer=None,
                    kernel_init=nn.initializers.variance_scaling(
                        2.0, "fan_out", "normal"),
                    dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + shortcut(x))."""
  features: int
  strides: int = 1
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out = _conv(self.features, 3, self.strides, "conv1", self.dtype)(x)
    out = nn.relu(BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                            name="bn1")(out, train))
    out = _conv(self.features, 3, 1, "conv2", self.dtype)(out)
    out = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                    name="bn2")(out, train)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.strides, "downsample_conv",
                       self.dtype)(x)
      shortcut = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                           name="downsample_bn")(shortcut, train)
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """ResNet with BasicBlocks; `stage_sizes` blocks per stage of `widths`."""
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = "imagenet"
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = _conv(self.widths[0], 7, 2, "conv1", self.dtype)(x)
    elif self.stem == "small":
      x = _conv(self.widths[0], 3, 1, "conv1", self.dtype)(x)
    else:
      raise ValueError(f"unknown stem {self.stem!r}; choose 'imagenet' or 'small'")
    x = nn.relu(BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                          name="bn1")(x, train))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(width, strides, bn_group_size=self.bn_group_size,
                       dtype=self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)
