"""bnn_jax.deploy.xnor_conv, the packed forward's binary conv, against float.

Expected values are float convolutions of +-1 (and 0) values
(`lax.conv_general_dilated`) or the float model itself; every code path of
the packed conv (row / single-tap reductions, int16 / int32 sums, uint32 /
uint8 words, the padding correction, skipped padding-only taps, the valid
plane of sign(0) = 0) must give the same integers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import models
from bnn_jax import packed
from bnn_jax.deploy import xnor_conv


def _sign(v, zero_to):
  return np.where(v > 0, 1.0, np.where(v < 0, -1.0, zero_to)).astype(
      np.float32)


def _case(seed, batch, hw, channels, out, k):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch,) + hw + (channels,)).astype(np.float32)
  x[rng.random(x.shape) < 0.25] = 0.0   # exact zeros: sign(0) matters
  w = rng.choice(np.float32([-1, 1]), size=(k, k, channels, out))
  bits = packed.pack_bits(w.transpose(0, 1, 3, 2) > 0).transpose(0, 1, 3, 2)
  return x, w, bits


def _float_conv(xb, w, stride, pads):
  return np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(xb), jnp.asarray(w), (stride, stride), pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC")))


# batch, map (H, W), C_in, C_out, k, stride, padding, sign(0):
# odd channel counts (partial words), maps smaller than the kernel (1x1,
# 1x2, 2x2: skipped padding-only taps, corrections on every pixel), stride
# 2, batch 1, Keras' asymmetric "same" padding, 1x1 convs, 256 channels.
CASES = [
    (1, (7, 6), 1, 4, 3, 1, 1, 1.0),
    (2, (7, 6), 3, 5, 3, 2, 1, -1.0),
    (1, (5, 5), 33, 7, 3, 1, 1, 1.0),
    (2, (6, 5), 33, 7, 3, 1, 1, 0.0),
    (1, (6, 6), 70, 9, 3, 2, 1, 1.0),
    (2, (6, 6), 70, 9, 3, 2, 1, 0.0),
    (1, (1, 1), 40, 5, 3, 1, 1, 1.0),
    (2, (1, 2), 40, 5, 3, 1, 1, 0.0),
    (1, (2, 2), 9, 5, 3, 2, 1, -1.0),
    (1, (2, 2), 65, 6, 3, 1, 1, 1.0),
    (2, (6, 5), 40, 5, 3, 2, ((0, 1), (0, 1)), 1.0),
    (1, (6, 5), 70, 6, 1, 2, 0, 1.0),
    (2, (4, 4), 32, 8, 1, 1, 0, 0.0),
    # 8 words per tap: a kernel row of 24 words is summed as 2 + 1 taps.
    (1, (3, 4), 250, 3, 3, 1, 1, 1.0),
    (2, (4, 3), 256, 3, 3, 2, 1, 0.0),
]


def _check(batch, hw, channels, out, k, stride, padding, zero_to,
           **options):
  x, w, bits = _case(channels * 7 + k + stride, batch, hw, channels, out, k)
  pads = (((padding, padding),) * 2 if isinstance(padding, int)
          else padding)
  got = np.asarray(xnor_conv.xnor_conv(jnp.asarray(x), jnp.asarray(bits),
                                       stride, padding, zero_to, **options))
  want = _float_conv(_sign(x, zero_to), w, stride, pads)
  assert got.dtype == np.int32 and got.shape == want.shape
  np.testing.assert_array_equal(got, want.astype(np.int32))


@pytest.mark.parametrize("batch,hw,channels,out,k,stride,padding,zero_to",
                         CASES)
def test_xnor_conv_is_the_float_conv_of_signs(batch, hw, channels, out, k,
                                              stride, padding, zero_to):
  _check(batch, hw, channels, out, k, stride, padding, zero_to)


# The other code paths (the levers of docs/deploy.md) on a 3x3 conv with a
# partial word, a stride-2 one with sign(0) = 0, and one on a 2x2 map.
@pytest.mark.parametrize("case", [CASES[3], CASES[5], CASES[9]])
@pytest.mark.parametrize("options", [
    {"taps_per_reduction": 1}, {"word_bits": 8},
    {"partial_dtype": jnp.int32}, {"materialise": False}])
def test_every_lever_gives_the_same_integers(case, options):
  _check(*case, **options)


def test_int32_sums_where_int16_could_overflow():
  # 2 * 9 taps * 1920 channels = 34560 > 2^15 - 1: the int32 path.
  x, w, bits = _case(5, 1, (3, 3), 1920, 3, 3)
  got = np.asarray(xnor_conv.xnor_conv(jnp.asarray(x), jnp.asarray(bits),
                                       1, 1, 1.0))
  want = _float_conv(_sign(x, 1.0), w, 1, ((1, 1), (1, 1)))
  np.testing.assert_array_equal(got, want.astype(np.int32))
  assert np.abs(want).max() > 100   # real sums, not a degenerate case


def test_all_ones_inputs_see_the_padding_as_zero():
  """Every input +1 and every weight +1: the sum at (i, j) is C times the
  number of taps inside the map (9 inside, 4 at a corner, 6 at an edge)."""
  channels = 33
  bits = packed.pack_bits(np.ones((3, 3, 2, channels), bool)
                          ).transpose(0, 1, 3, 2)
  got = np.asarray(xnor_conv.xnor_conv(jnp.ones((1, 4, 5, channels)),
                                       jnp.asarray(bits), 1, 1, 1.0))
  taps = np.array([[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6],
                   [4, 6, 6, 6, 4]])
  np.testing.assert_array_equal(got[0, :, :, 0], channels * taps)
  np.testing.assert_array_equal(got[0], np.repeat(got[0, :, :, :1], 2, -1))


def test_outside_marks_the_padded_taps():
  # 4 rows, 3 taps, stride 2, padding (1, 0): outputs 0 and 1 read rows
  # -1..1 and 1..3.
  np.testing.assert_array_equal(
      xnor_conv.outside(4, 3, 2, (1, 0)),
      [[True, False, False], [False, False, False]])
  np.testing.assert_array_equal(xnor_conv.outside(1, 3, 1, (1, 1)),
                                [[True, False, True]])


def test_uint8_words_regroup_the_file_words_byte_by_byte():
  bits = np.zeros((1, 1, 2, 1), np.uint32)
  bits[0, 0, :, 0] = [0x04030201, 0x000000FF]
  got = np.asarray(xnor_conv.regroup_weight_words(jnp.asarray(bits), 8))
  assert got.dtype == np.uint8
  assert got[0, 0, :, 0].tolist() == [1, 2, 3, 4, 255, 0, 0, 0]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 5])
def test_packed_model_gives_the_float_predictions(batch):
  """reactnet_small (sign(0) = +1) on 8x8 inputs: its maps shrink to 2x2,
  where 3x3 taps read padding on every pixel; the packed forward gives the
  float model's predictions, logits within float rounding."""
  shape = (8, 8, 1)
  model = models.create("reactnet_small", num_classes=10)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  rng = np.random.default_rng(3)
  variables = jax.tree.map(
      lambda a: rng.normal(size=a.shape).astype(np.float32), variables)
  variables["batch_stats"] = jax.tree.map(
      lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32),
      variables["batch_stats"])
  result = packed.pack_variables(model, variables, shape)
  packed_model = packed.PackedModel({"model": {
      "name": "reactnet_small", "num_classes": 10, "overrides": {}}})
  x = rng.normal(size=(batch,) + shape).astype(np.float32)
  got = np.asarray(jax.jit(packed_model.apply)(result.variables, x))
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, x))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
