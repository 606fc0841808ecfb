"""ReActNet-A and ReActNet-18 (Liu et al., ECCV 2020), NHWC.

The architecture is in docs/recipe.md#architecture.

ReActNet-A follows MobileNet-V1's layout with full 3x3 binary convs (not
depthwise). One block, C_in -> C_out, stride s:

  out1 = BN(BinaryConv3x3_s(RSign(x))) + AvgPool2x2_if_s2(x)
  out1 = RPReLU(out1)
  out2 = BN(BinaryConv1x1(RSign(out1))) + out1                       (C_out == C_in)
  out2 = concat[BN_1(BinConv1x1_1(RSign(out1))) + out1,
                BN_2(BinConv1x1_2(RSign(out1))) + out1]              (C_out == 2 C_in)
  out  = RPReLU(out2)

Module names follow the reference state dict (move11, binary_3x3, bn1, ...)
so the torch importer is a plain rename. Binary: the inputs and weights of
the 13 3x3 and 18 1x1 convs; real: stem, BN, shifts, PReLU slopes, FC.

`binary_weights=False` gives AdamBNN step 1 (binary activations, real
weights) with identical parameter names and shapes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bnn_jax import exact_binary_conv
from bnn_jax.layers import BatchNorm, BinaryConv, RPReLU, Shift
from bnn_jax.layers import reference_kernel_init

# The name of the binary conv outputs that `remat_blocks` keeps.
CONV_OUTPUT_NAME = "binary_conv_output"

# Channels of the stem output and the 13 blocks (docs/recipe.md#reactnet-a).
REACTNET_A_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512,
                       512, 1024, 1024)


def reactnet_a_strides(channels: Sequence[int]) -> tuple[int, ...]:
  """Stride of block i: 2 when c[i-1] != c[i] and c[i] != 64, else 1."""
  return tuple(
      2 if (c_in != c_out and c_out != 64) else 1
      for c_in, c_out in zip(channels[:-1], channels[1:]))


def scaled_channels(channels: Sequence[int], multiplier: float) -> list[int]:
  """channels * multiplier, keeping every C_out in (C_in, 2 C_in).

  The stem width is rounded once and every entry scaled as a multiple of it
  (ReActNet-A's widths are all multiples of the stem's 32).
  """
  if multiplier == 1.0:
    return list(channels)
  base = max(1, int(round(channels[0] * multiplier)))
  if any(c % channels[0] for c in channels):
    raise ValueError(f"width_multiplier needs channels that are multiples of "
                     f"the first ({channels[0]}); got {list(channels)}")
  return [base * (c // channels[0]) for c in channels]


class ReActNetABlock(nn.Module):
  """One ReActNet-A block (see the module docstring)."""
  out_channels: int
  strides: int
  input_binarizer: Optional[str] = "approx_sign"
  kernel_binarizer: Optional[str] = "scaled_sign"
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  kernel_init: Callable[..., Any] = reference_kernel_init
  dtype: Any = jnp.float32
  binary_conv_operand_dtype: Optional[str] = None
  bn_one_pass_stats: Optional[bool] = None
  name_conv_outputs: bool = False
  binary_conv_impl: Optional[str] = None
  bn_stats_method: Optional[str] = None

  def _binary_conv_function(self):
    """The BinaryConvs' `binary_conv` for `binary_conv_impl` (None: their own
    conv). "auto" (or None) leaves `binary_conv_operand_dtype`, when set, in
    charge."""
    impl = self.binary_conv_impl or exact_binary_conv.AUTO
    if (self.binary_conv_operand_dtype is not None
        and impl == exact_binary_conv.AUTO):
      return None
    return exact_binary_conv.conv_function(impl)

  def _conv(self, features, kernel_size, strides, name):
    conv = BinaryConv(features, kernel_size=kernel_size, strides=strides,
                      input_binarizer=self.input_binarizer,
                      kernel_binarizer=self.kernel_binarizer,
                      zero_to=self.zero_to, kernel_init=self.kernel_init,
                      dtype=self.dtype,
                      operand_dtype=self.binary_conv_operand_dtype,
                      binary_conv=self._binary_conv_function(), name=name)
    if not self.name_conv_outputs:
      return conv
    # Marks the conv outputs as the values `remat_blocks` keeps.
    return lambda x: checkpoint_name(conv(x), CONV_OUTPUT_NAME)

  def _bn(self, name):
    return BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                     one_pass_stats=bool(self.bn_one_pass_stats),
                     stats_method=self.bn_stats_method or "two_pass",
                     name=name)

  @nn.compact
  def __call__(self, x, train: bool):
    c_in, c_out = x.shape[-1], self.out_channels
    # Step 1: RSign -> binary 3x3 conv (stride s) -> BN -> + shortcut.
    out1 = Shift(name="move11")(x)
    out1 = self._conv(c_in, 3, self.strides, "binary_3x3")(out1)
    out1 = self._bn("bn1")(out1, train)
    shortcut = x
    if self.strides == 2:
      shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2))
    out1 = out1 + shortcut
    # Step 2: RPReLU.
    out1 = RPReLU(name="rprelu1")(out1)
    # Step 3: RSign -> binary 1x1 conv(s) -> BN -> + out1.
    out2 = Shift(name="move21")(out1)
    if c_out == c_in:
      out2 = self._conv(c_in, 1, 1, "binary_pw")(out2)
      out2 = self._bn("bn2")(out2, train) + out1
    elif c_out == 2 * c_in:
      down1 = self._conv(c_in, 1, 1, "binary_pw_down1")(out2)
      down1 = self._bn("bn2_1")(down1, train) + out1
      down2 = self._conv(c_in, 1, 1, "binary_pw_down2")(out2)
      down2 = self._bn("bn2_2")(down2, train) + out1
      out2 = jnp.concatenate([down1, down2], axis=-1)
    else:
      raise ValueError(f"ReActNet-A block needs C_out in (C_in, 2 C_in); got "
                       f"{c_in} -> {c_out}")
    # Step 4: RPReLU.
    return RPReLU(name="rprelu2")(out2)


class ReActNetA(nn.Module):
  """ReActNet-A: real stem -> 13 binary blocks -> global pool -> real FC.

  Attributes:
    num_classes: classes of the FC head.
    channels: stem output channels followed by each block's output channels.
    stem_strides: 2 for ImageNet (224 -> 112); 1 for small inputs.
    width_multiplier: scales every entry of `channels` (strides follow the
      unscaled channels).
    binary_weights: False = AdamBNN step 1 (real weights, same parameters).
    binary_activations: False turns the input binariser off as well.
    activation_binarizer / kernel_binarizer: names in `bnn_jax.binary`.
    zero_to: sign(0) (+1 deployable; 0 reproduces torch.sign).
    bn_group_size: per-group ("ghost") BatchNorm statistics; None = global.
    binary_conv_operand_dtype: opt-in performance lever: the forward of
      every binary conv on exact narrow operands ("float8_e4m3fn", "int8",
      "bfloat16"; `conv_kernels.binary_conv_low_precision`); None = in `dtype`.
    bn_one_pass_stats: opt-in performance lever: the blocks' BatchNorm
      variance as mean(x^2) - mean(x)^2 (`layers.BatchNorm`); None = off.
    remat_blocks: opt-in performance lever: every block under `nn.remat`,
      keeping only its binary convs' outputs for the backward pass; the
      shifts, signs, BatchNorms and RPReLUs are recomputed there (fewer
      activations written to and read from memory; the same gradients).
      None = off.
    binary_conv_impl: the formulation of the binary convs' forward
      (`bnn_jax.exact_binary_conv`): "auto" (= None, the backend's default,
      `exact_binary_conv.DEFAULT_IMPL`), "compute_dtype" (the conv in
      `dtype`, a float32 sum below float32) or an exact narrow-operand
      formulation ("int8", "float8_e4m3fn", "float16_chunked", "bfloat16",
      "bfloat16_im2col"): the same sums, the same backward. Run-wide in a
      config: `config.model.binary_conv_impl`.
    bn_stats_method: the blocks' BatchNorm batch statistics
      (`bnn_jax.batch_stats`): "two_pass" (= None, the default),
      "one_pass" or "shifted_one_pass" (one pass, exact when mean >> std).
      Run-wide in a config: `config.model.bn_stats_method`.
  """
  num_classes: int = 1000
  channels: Sequence[int] = REACTNET_A_CHANNELS
  stem_strides: int = 2
  width_multiplier: float = 1.0
  binary_weights: bool = True
  binary_activations: bool = True
  activation_binarizer: str = "approx_sign"
  kernel_binarizer: str = "scaled_sign"
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32
  binary_conv_operand_dtype: Optional[str] = None
  bn_one_pass_stats: Optional[bool] = None
  remat_blocks: Optional[bool] = None
  binary_conv_impl: Optional[str] = None
  bn_stats_method: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    channels = scaled_channels(self.channels, self.width_multiplier)
    block = ReActNetABlock
    if self.remat_blocks:
      block = nn.remat(  # static_argnums counts self: (self, x, train)
          ReActNetABlock, static_argnums=(2,),
          policy=jax.checkpoint_policies.save_only_these_names(
              CONV_OUTPUT_NAME))
    x = x.astype(self.dtype)
    # Real-valued stem: conv 3x3 (stride stem_strides, pad 1) -> BN, no activation.
    x = BinaryConv(channels[0], kernel_size=3, strides=self.stem_strides,
                   input_binarizer=None, kernel_binarizer=None,
                   kernel_init=nn.initializers.kaiming_normal(),
                   dtype=self.dtype, name="stem_conv")(x)
    x = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                  name="stem_bn")(x, train)
    for i, (c_out, s) in enumerate(
        zip(channels[1:], reactnet_a_strides(self.channels)), start=1):
      x = block(
          out_channels=c_out, strides=s,
          input_binarizer=(self.activation_binarizer
                           if self.binary_activations else None),
          kernel_binarizer=(self.kernel_binarizer
                            if self.binary_weights else None),
          zero_to=self.zero_to, bn_group_size=self.bn_group_size,
          dtype=self.dtype,
          binary_conv_operand_dtype=self.binary_conv_operand_dtype,
          bn_one_pass_stats=self.bn_one_pass_stats,
          name_conv_outputs=bool(self.remat_blocks),
          binary_conv_impl=self.binary_conv_impl,
          bn_stats_method=self.bn_stats_method,
          name=f"block_{i}")(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


class ReActNet18Block(nn.Module):
  """Bi-Real style block: RSign -> binary 3x3 -> BN -> + shortcut -> RPReLU.

  Downsampling shortcut (stride 2 or channel change): AvgPool 2x2 -> real
  1x1 conv -> BN.
  """
  out_channels: int
  strides: int
  input_binarizer: Optional[str] = "approx_sign"
  kernel_binarizer: Optional[str] = "scaled_sign"
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out = Shift(name="move0")(x)
    out = BinaryConv(self.out_channels, kernel_size=3, strides=self.strides,
                     input_binarizer=self.input_binarizer,
                     kernel_binarizer=self.kernel_binarizer,
                     zero_to=self.zero_to, dtype=self.dtype,
                     name="binary_conv")(out)
    out = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                    name="bn1")(out, train)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.out_channels:
      if self.strides != 1:
        shortcut = nn.avg_pool(shortcut, (2, 2), strides=(2, 2))
      shortcut = BinaryConv(self.out_channels, kernel_size=1,
                            input_binarizer=None, kernel_binarizer=None,
                            kernel_init=nn.initializers.kaiming_normal(),
                            dtype=self.dtype, name="downsample_conv")(shortcut)
      shortcut = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                           name="downsample_bn")(shortcut, train)
    return RPReLU(name="rprelu")(out + shortcut)


class ReActNet18(nn.Module):
  """ReActNet-18: 7x7/2 stem + BN + maxpool 3x3/2, 4 stages x 4 binary blocks."""
  num_classes: int = 1000
  stage_channels: Sequence[int] = (64, 128, 256, 512)
  blocks_per_stage: int = 4
  binary_weights: bool = True
  binary_activations: bool = True
  activation_binarizer: str = "approx_sign"
  kernel_binarizer: str = "scaled_sign"
  zero_to: float = 1.0
  bn_group_size: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = BinaryConv(self.stage_channels[0], kernel_size=7, strides=2,
                   input_binarizer=None, kernel_binarizer=None,
                   kernel_init=nn.initializers.kaiming_normal(),
                   dtype=self.dtype, name="conv1")(x)
    x = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype,
                  name="bn1")(x, train)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, c in enumerate(self.stage_channels):
      for j in range(self.blocks_per_stage):
        x = ReActNet18Block(
            out_channels=c, strides=2 if (stage > 0 and j == 0) else 1,
            input_binarizer=(self.activation_binarizer
                             if self.binary_activations else None),
            kernel_binarizer=(self.kernel_binarizer
                              if self.binary_weights else None),
            zero_to=self.zero_to, bn_group_size=self.bn_group_size,
            dtype=self.dtype, name=f"layer{stage + 1}_{j}")(x, train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)
