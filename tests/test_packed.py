"""The 1-bit packed format and its XNOR-popcount forward against float convs.

Expected values are float convolutions of +-1 (and 0) values computed with
`lax.conv_general_dilated`, or the float model itself; the packed code is
never used to compute its own expectation.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import layers
from bnn_jax import models
from bnn_jax import packed


def _sign(v, zero_to):
  return np.where(v > 0, 1.0, np.where(v < 0, -1.0, zero_to)).astype(
      np.float32)


def _float_conv(xb, wb, stride, pad):
  return np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(xb), jnp.asarray(wb), (stride, stride),
      ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")))


def test_bit_order_is_little_endian_per_32_channels():
  bits = np.zeros((2, 40), bool)
  bits[0, [0, 5, 31, 32, 39]] = True
  bits[1, 33] = True
  words = packed.pack_bits(bits)
  assert words.dtype == np.uint32 and words.shape == (2, 2)
  assert words[0].tolist() == [1 + 2**5 + 2**31, 1 + 2**7]
  assert words[1].tolist() == [0, 2]
  np.testing.assert_array_equal(packed.unpack_bits(words, 40), bits)
  # The traced (jax) packing gives the same words.
  np.testing.assert_array_equal(np.asarray(packed.pack_bits(jnp.asarray(bits))),
                                words)


@pytest.mark.parametrize("zero_to", [1.0, 0.0, -1.0])
def test_activation_planes(zero_to):
  x = jnp.asarray([[2.0, -3.0, 0.0, -0.0, 1e-30]])
  signs, valid = packed.binarize_activations(x, zero_to)
  sign_bits = packed.unpack_bits(signs, 5)[0].tolist()
  valid_bits = packed.unpack_bits(valid, 5)[0].tolist()
  zero_sign = zero_to > 0
  assert sign_bits == [True, False, zero_sign, zero_sign, True]
  assert valid_bits == [True, True, zero_to != 0, zero_to != 0, True]


# Odd channel counts (1, 3, 33, 70: partial last words), one word exactly
# (32), strides 1 and 2, 1x1 and 3x3 with zero padding, the three sign(0)s.
@pytest.mark.parametrize("channels,out,k,stride,zero_to", [
    (1, 4, 3, 1, 0.0), (3, 5, 3, 2, 1.0), (32, 8, 1, 1, -1.0),
    (33, 7, 3, 1, 1.0), (33, 7, 3, 1, 0.0), (33, 7, 3, 1, -1.0),
    (70, 9, 3, 2, 0.0), (70, 6, 1, 2, 1.0)])
def test_packed_conv_is_the_float_conv_of_signs(channels, out, k, stride,
                                                zero_to):
  rng = np.random.default_rng(channels * 100 + k * 10 + stride)
  x = rng.normal(size=(2, 7, 6, channels)).astype(np.float32)
  x[rng.random(x.shape) < 0.25] = 0.0   # exact zeros, a quarter of inputs
  x.reshape(-1)[::13] = -0.0
  w = rng.choice(np.float32([-1, 1]), size=(k, k, channels, out))
  bits = packed.pack_bits(w.transpose(0, 1, 3, 2) > 0).transpose(0, 1, 3, 2)
  pad = (k - 1) // 2
  got = np.asarray(packed.packed_conv(jnp.asarray(x), jnp.asarray(bits),
                                      stride, pad, zero_to))
  want = _float_conv(_sign(x, zero_to), w, stride, pad)
  assert got.dtype == np.int32 and got.shape == want.shape
  np.testing.assert_array_equal(got, want.astype(np.int32))
  # The sums are integers of the patch's parity, so exact equality is exact.
  assert np.all(want == np.round(want))


def test_packed_conv_rejects_a_kernel_for_other_channels():
  bits = jnp.zeros((3, 3, 2, 4), jnp.uint32)   # 2 words: 33..64 channels
  with pytest.raises(ValueError, match="inputs of 32 channels need 1"):
    packed.packed_conv(jnp.zeros((1, 4, 4, 32)), bits, 1, 1, 1.0)


def _random_variables(model, shape, seed, zero_weights=0):
  """Random params and BN statistics; `zero_weights` binary weights set to 0."""
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  rng = np.random.default_rng(seed)
  noisy = jax.tree.map(
      lambda a: rng.normal(size=a.shape).astype(np.float32), variables)
  noisy["batch_stats"] = jax.tree.map(
      lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32),
      variables["batch_stats"])
  placed = 0
  for layer in packed.trace_layers(model, shape):
    if (isinstance(layer.module, layers.BinaryConv)
        and layer.module.binary_weights and placed < zero_weights):
      node = noisy["params"]
      for name in layer.path:
        node = node[name]
      flat = node["kernel"].reshape(-1)
      flat[::7][:3] = 0.0
      placed += 3
  return noisy


@pytest.fixture(scope="module")
def small_torch_convention():
  """reactnet_small with torch's sign(0) = 0, 30 exact-zero weights, packed."""
  shape = (8, 8, 1)
  model = models.create("reactnet_small", num_classes=10, zero_to=0.0)
  variables = _random_variables(model, shape, seed=0, zero_weights=30)
  return model, shape, variables, packed.pack_variables(model, variables,
                                                        shape)


def test_pack_variables_layout(small_torch_convention):
  model, shape, variables, result = small_torch_convention
  assert result.zero_weights == 30
  assert sum(c["zero_weights"] for c in result.binary_convs) == 30
  # 5 blocks: 3x3 + two 1x1 (doubling) or one 1x1 (same width).
  assert len(result.binary_convs) == 13
  conv = result.variables[packed.PACKED]["block_2"]["binary_3x3"]
  kernel = variables["params"]["block_2"]["binary_3x3"]["kernel"]
  assert conv["weight_bits"].shape == (3, 3, 2, 64)      # 64 channels, 2 words
  bits = packed.unpack_bits(conv["weight_bits"].transpose(0, 1, 3, 2), 64)
  np.testing.assert_array_equal(bits.transpose(0, 1, 3, 2), kernel >= 0)
  np.testing.assert_allclose(conv["scale"], np.abs(kernel).mean((0, 1, 2)),
                             rtol=1e-6)
  # BatchNorm folded: y = x * m + o, m = scale / sqrt(var + eps).
  bn = result.variables[packed.PACKED]["block_2"]["bn1"]
  p = variables["params"]["block_2"]["bn1"]
  s = variables["batch_stats"]["block_2"]["bn1"]
  m = p["scale"] / np.sqrt(s["var"] + 1e-5)
  np.testing.assert_allclose(bn["multiplier"], m, rtol=1e-6)
  np.testing.assert_allclose(bn["offset"], p["bias"] - s["mean"] * m,
                             rtol=1e-5, atol=1e-6)
  # Real layers stay, binary kernels and BN parameters leave 'params'.
  real = result.variables["params"]
  assert "binary_3x3" not in real["block_2"] and "bn1" not in real["block_2"]
  np.testing.assert_array_equal(real["stem_conv"]["kernel"],
                                variables["params"]["stem_conv"]["kernel"])
  np.testing.assert_array_equal(real["block_2"]["rprelu1"]["slope"],
                                variables["params"]["block_2"]["rprelu1"][
                                    "slope"])


@pytest.mark.slow
def test_packed_model_equals_the_float_model(small_torch_convention,
                                             tmp_path):
  """Whole network, sign(0) = 0, exact-zero weights stored as +1: the packed
  forward (through a written and re-read file) gives the float model's
  logits, on the float model whose zero weights are +1 as well."""
  model, shape, variables, result = small_torch_convention
  header = {"model": {"name": "reactnet_small", "num_classes": 10,
                      "overrides": {"zero_to": 0.0}}}
  path = str(tmp_path / "small.bnn.npz")
  size = packed.write(path, header, result.variables)
  assert size < packed.variables_bytes(variables["params"]) / 10
  packed_model, packed_vars = packed.load(path)
  x = np.random.default_rng(1).normal(size=(16,) + shape).astype(np.float32)
  x[:, :2] = 0.0  # a zero border, as digit images have
  got = np.asarray(jax.jit(packed_model.apply)(packed_vars, x))
  nudged = packed.nudge_zero_weights(model, variables, shape)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      nudged, x))
  np.testing.assert_allclose(got, want, rtol=1e-4,
                             atol=1e-4 * np.abs(want).max())
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  # The exact zeros matter: the sign(0) = 0 float model differs from both.
  plain = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, x))
  assert np.abs(plain - want).max() > 1e-3 * np.abs(want).max()


def test_read_refuses_what_is_not_a_packed_file(tmp_path):
  with pytest.raises(packed.PackedFormatError, match="does not exist"):
    packed.read(str(tmp_path / "absent.npz"))
  other = str(tmp_path / "other.npz")
  np.savez(other, a=np.zeros(3))
  with pytest.raises(packed.PackedFormatError, match="has no header.json"):
    packed.read(other)
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip")
  with pytest.raises(packed.PackedFormatError, match="cannot read"):
    packed.read(str(garbage))
  path = str(tmp_path / "v1.npz")
  packed.write(path, {"model": {}}, {"params": {"a": np.zeros(2)}})
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  header = json.loads(arrays["header.json"].tobytes())
  header["format_version"] = 99
  arrays["header.json"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
  np.savez(path, **arrays)
  with pytest.raises(packed.PackedFormatError,
                     match="format version 99; this bnn_jax reads version 1"):
    packed.read(path)
