"""Layers against hand computation: BinaryConv, Shift, RSign, RPReLU, BatchNorm.

Every expected value is computed here with numpy / plain lax ops from the
formulas in docs/recipe.md (#architecture, #binarisation), never by
calling the layer under test a second way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import layers

EPS_BN = 1e-5


def _hand_sign(v, zero_to):
  return np.where(v > 0, 1.0, np.where(v < 0, -1.0, zero_to)).astype(np.float32)


def _conv_inputs(seed, k):
  """x (2, 7, 7, 3) with exact +-0.0; w (k, k, 3, 4) with 0, +-1 and |w| > 1."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
  x.reshape(-1)[::5] = 0.0
  x.reshape(-1)[1::11] = -0.0
  w = rng.normal(scale=0.8, size=(k, k, 3, 4)).astype(np.float32)
  flat = w.reshape(-1)
  flat[:4] = [1.0, -1.0, 0.0, 1.5]
  if k == 3:
    flat[-3:] = [-1.0, 1.0 + 1e-3, -1.0 - 1e-3]
  return x, w


def _hand_binary_conv(x, w, stride, zero_to):
  """conv(pad(sign(x), 0), alpha sign(w)); alpha = mean |w| per out channel."""
  k = w.shape[0]
  pad = (k - 1) // 2
  xb = np.pad(_hand_sign(x, zero_to), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  alpha = np.abs(w).mean(axis=(0, 1, 2))
  wb = alpha * _hand_sign(w, zero_to)
  y = jax.lax.conv_general_dilated(
      jnp.asarray(xb), jnp.asarray(wb), (stride, stride), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return xb, np.asarray(y)


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
@pytest.mark.parametrize("zero_to", [1.0, 0.0])
def test_binary_conv_forward_and_kernel_grad(k, stride, zero_to):
  x, w = _conv_inputs(seed=k * 10 + stride, k=k)
  conv = layers.BinaryConv(4, kernel_size=k, strides=stride,
                           input_binarizer="ste_sign",
                           kernel_binarizer="scaled_sign", zero_to=zero_to)
  xb, expected = _hand_binary_conv(x, w, stride, zero_to)

  y = np.asarray(conv.apply({"params": {"kernel": w}}, x))
  out = (7 + 2 * ((k - 1) // 2) - k) // stride + 1
  assert y.shape == (2, out, out, 4)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)

  # Kernel gradient of sum(y * g): the weight gradient of the binary conv,
  # sum_{n,oh,ow} xb[n, oh*s + i, ow*s + j, c] g[n, oh, ow, o], passed through
  # clamp's STE (1 on [-1, 1] inclusive), not scaled by alpha.
  g = np.random.default_rng(7).normal(size=y.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(
      conv.apply({"params": {"kernel": v}}, x) * g))(jnp.asarray(w))
  span = stride * (out - 1) + 1
  weight_grad = np.zeros_like(w)
  for i in range(k):
    for j in range(k):
      patch = xb[:, i:i + span:stride, j:j + span:stride, :]
      weight_grad[i, j] = np.einsum("nhwc,nhwo->co", patch, g)
  expected_grad = np.where(np.abs(w) <= 1.0, weight_grad, 0.0)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.asarray(grad)[np.abs(w) > 1.0] == 0.0)
  assert np.any(expected_grad[np.abs(w) == 1.0] != 0.0)


def test_binary_conv_real_weights_is_plain_conv():
  """Step 1: kernel_binarizer=None leaves the latent weights as they are."""
  x, w = _conv_inputs(seed=3, k=3)
  conv = layers.BinaryConv(4, kernel_size=3, input_binarizer="approx_sign",
                           kernel_binarizer=None)
  assert conv.binary_inputs and not conv.binary_weights
  xb = np.pad(_hand_sign(x, 1.0), ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = jax.lax.conv_general_dilated(
      xb, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv.apply({"params": {"kernel": w}}, x),
                             expected, rtol=1e-6, atol=1e-6)


def test_binary_conv_reference_init():
  conv = layers.BinaryConv(8, kernel_size=3)
  kernel = conv.init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))["params"][
      "kernel"]
  assert kernel.shape == (3, 3, 16, 8)
  assert float(kernel.min()) >= 0.0 and float(kernel.max()) < 1e-3


def test_shift():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
  b = rng.normal(size=(5,)).astype(np.float32)
  y = layers.Shift().apply({"params": {"shift": b}}, x)
  np.testing.assert_allclose(y, x + b[None, None, None, :], rtol=1e-6)
  init = layers.Shift().init(jax.random.key(0), x)["params"]["shift"]
  np.testing.assert_array_equal(init, np.zeros(5))


def test_rprelu_formula_and_init():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
  b1, a, b2 = (rng.normal(size=(6,)).astype(np.float32) for _ in range(3))
  x[0, 0, 0] = -b1  # z = x + b1 exactly 0
  y = layers.RPReLU().apply(
      {"params": {"shift_in": b1, "slope": a, "shift_out": b2}}, x)
  z = x + b1
  expected = np.maximum(z, 0) + a * np.minimum(z, 0) + b2
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  params = layers.RPReLU().init(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(params["slope"], np.full(6, 0.25))
  np.testing.assert_array_equal(params["shift_in"], np.zeros(6))
  np.testing.assert_array_equal(params["shift_out"], np.zeros(6))


@pytest.mark.parametrize("zero_to", [1.0, 0.0])
def test_rsign_is_binarizer_of_shifted_input(zero_to):
  """RSign(x) = approx_sign(x + b), z = x + b.

  d/db sum(g RSign(x)) = sum_{N,H,W} g * (2 + 2z on [-1, 0), 2 - 2z on [0, 1)).
  """
  rng = np.random.default_rng(2)
  x = rng.uniform(-1.5, 1.5, size=(3, 2, 2, 4)).astype(np.float32)
  b = rng.uniform(-0.5, 0.5, size=(4,)).astype(np.float32)
  x[0, 0, 0] = -b  # x + b exactly 0
  g = rng.normal(size=x.shape).astype(np.float32)
  rsign = layers.RSign(binarizer="approx_sign", zero_to=zero_to)

  def apply(shift):
    return rsign.apply({"params": {"move": {"shift": shift}}}, x)

  z = x + b
  np.testing.assert_array_equal(apply(b), _hand_sign(z, zero_to))
  grad = jax.grad(lambda s: jnp.sum(apply(s) * g))(jnp.asarray(b))
  dz = np.where((z >= -1) & (z < 0), 2 + 2 * z,
                np.where((z >= 0) & (z < 1), 2 - 2 * z, 0.0))
  np.testing.assert_allclose(grad, np.sum(g * dz, axis=(0, 1, 2)), rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------
# BatchNorm (torch conventions, optional per-group statistics).
# ---------------------------------------------------------------------------
def _bn_variables(c, rng):
  params = {"scale": rng.uniform(0.5, 2.0, size=(c,)).astype(np.float32),
            "bias": rng.normal(size=(c,)).astype(np.float32)}
  stats = {"mean": rng.normal(size=(c,)).astype(np.float32),
           "var": rng.uniform(0.5, 2.0, size=(c,)).astype(np.float32)}
  return {"params": params, "batch_stats": stats}


def _hand_bn_train(x, variables, group):
  """Per-group normalisation and torch's running-stat rule, by hand."""
  p, s = variables["params"], variables["batch_stats"]
  xg = x.reshape((-1, group) + x.shape[1:]).astype(np.float64)
  mean = xg.mean(axis=(1, 2, 3), keepdims=True)
  var = xg.var(axis=(1, 2, 3), keepdims=True)  # biased, for normalising
  y = (xg - mean) / np.sqrt(var + EPS_BN) * p["scale"] + p["bias"]
  n = group * x.shape[1] * x.shape[2]
  unbiased = xg.var(axis=(1, 2, 3), ddof=1)  # (groups, C)
  assert np.allclose(unbiased, var.reshape(unbiased.shape) * n / (n - 1))
  new_mean = 0.9 * s["mean"] + 0.1 * mean.reshape(-1, x.shape[-1]).mean(0)
  new_var = 0.9 * s["var"] + 0.1 * unbiased.mean(0)
  return y.reshape(x.shape), new_mean, new_var


@pytest.mark.parametrize("group_size", [None, 4, 2])
def test_batchnorm_train(group_size):
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(8, 3, 3, 5)) * 3 + 2).astype(np.float32)
  variables = _bn_variables(5, rng)
  bn = layers.BatchNorm(group_size=group_size)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  y_hand, mean_hand, var_hand = _hand_bn_train(x, variables, group_size or 8)
  np.testing.assert_allclose(y, y_hand, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], mean_hand,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], var_hand,
                             rtol=1e-5, atol=1e-6)
  # Normalised: per group and channel, (y - bias) / scale has mean 0, var ~1.
  z = (np.asarray(y) - variables["params"]["bias"]) / variables["params"][
      "scale"]
  zg = z.reshape((-1, group_size or 8) + z.shape[1:])
  np.testing.assert_allclose(zg.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
  np.testing.assert_allclose(zg.var(axis=(1, 2, 3)), 1.0, atol=1e-3)


def test_batchnorm_running_stats_two_steps_from_init():
  """torch: running = 0.9 running + 0.1 batch (unbiased var); init 0 and 1."""
  rng = np.random.default_rng(5)
  x1, x2 = (rng.normal(loc=1.0, scale=2.0, size=(4, 2, 2, 3)).astype(np.float32)
            for _ in range(2))
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(0), x1, train=True)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
  mean, var = np.zeros(3), np.ones(3)
  for x in (x1, x2):
    _, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], **updates}
    mean = 0.9 * mean + 0.1 * x.mean(axis=(0, 1, 2))
    var = 0.9 * var + 0.1 * x.reshape(-1, 3).var(axis=0, ddof=1)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(variables["batch_stats"]["var"], var, rtol=1e-5)


def test_batchnorm_eval_uses_running_stats():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
  variables = _bn_variables(3, rng)
  p, s = variables["params"], variables["batch_stats"]
  bn = layers.BatchNorm()
  y = np.asarray(bn.apply(variables, x, train=False))
  expected = (x - s["mean"]) / np.sqrt(s["var"] + EPS_BN) * p["scale"] + p[
      "bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  # Independent of the rest of the batch.
  np.testing.assert_allclose(bn.apply(variables, x[:1], train=False), y[:1],
                             rtol=1e-6)


def test_batchnorm_group_equal_to_batch_is_global():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)
  variables = _bn_variables(2, rng)
  outs = [layers.BatchNorm(group_size=g).apply(
      variables, x, train=True, mutable=["batch_stats"]) for g in (None, 4)]
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  for name in ("mean", "var"):
    np.testing.assert_array_equal(outs[0][1]["batch_stats"][name],
                                  outs[1][1]["batch_stats"][name])


def test_batchnorm_group_must_divide_batch():
  x = jnp.zeros((6, 2, 2, 3))
  bn = layers.BatchNorm(group_size=4)
  variables = bn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match="does not divide"):
    bn.apply(variables, x, train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("strides", [1, 2])
def test_small_map_conv_equals_lax_conv(size, strides):
  """The im2col path for small maps computes exactly lax's convolution."""
  kx, kw = jax.random.split(jax.random.key(size * 10 + strides))
  x = jax.random.normal(kx, (2, size, size, 5))
  w = jax.random.normal(kw, (3, 3, 5, 7))
  got = layers.conv2d_nhwc(x, w, strides, 1)
  want = jax.lax.conv_general_dilated(
      x, w, (strides, strides), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (map, stride) -> the taps a 3x3 kernel with padding 1 keeps, as
# (rows, columns) slices, and the padding of the trimmed conv.
TRIM_CASES = [
    ((1, 1), 1, (slice(1, 2), slice(1, 2)), ((0, 0), (0, 0))),  # centre tap
    ((2, 2), 2, (slice(1, 3), slice(1, 3)), ((0, 0), (0, 0))),  # a 2x2 corner
    ((1, 4), 1, (slice(1, 2), slice(0, 3)), ((0, 0), (1, 1))),  # rows only
    ((3, 1), 2, (slice(0, 3), slice(1, 2)), ((1, 1), (0, 0))),  # columns only
    ((2, 2), 1, (slice(0, 3), slice(0, 3)), ((1, 1), (1, 1))),  # every tap
    ((5, 5), 2, (slice(0, 3), slice(0, 3)), ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("map_hw,strides,taps,want_pads", TRIM_CASES)
def test_trim_padding_taps(map_hw, strides, taps, want_pads):
  w = jnp.arange(3 * 3 * 2 * 4, dtype=jnp.float32).reshape(3, 3, 2, 4)
  trimmed, pads = layers.trim_padding_taps(w, map_hw, strides, 1)
  np.testing.assert_array_equal(trimmed, w[taps])
  assert pads == want_pads


@pytest.mark.parametrize("map_hw,strides,taps", [c[:3] for c in TRIM_CASES])
def test_trimmed_conv_gradients_equal_lax_conv(map_hw, strides, taps):
  """Dropping the padding-only taps: same output, same input gradient, and
  a kernel gradient that is exactly zero on the dropped taps."""
  kx, kw, kg = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (4,) + map_hw + (6,))
  w = jax.random.normal(kw, (3, 3, 6, 5))

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (strides, strides), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  got, vjp_got = jax.vjp(lambda a, b: layers.conv2d_nhwc(a, b, strides, 1),
                         x, w)
  want, vjp_want = jax.vjp(lax_conv, x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, want.shape)
  (gx, gw), (wx, ww) = vjp_got(g), vjp_want(g)
  np.testing.assert_allclose(gx, wx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, ww, rtol=1e-5, atol=1e-5)
  dropped = np.ones((3, 3), bool)
  dropped[taps] = False
  np.testing.assert_array_equal(np.asarray(gw)[dropped], 0.0)


def test_trim_keeps_a_conv_whose_taps_are_all_used():
  """A stride-2 conv on an even map never reads its last padding row, but
  every tap is used: it stays as written (padding (1, 1))."""
  w = jnp.ones((3, 3, 2, 2))
  trimmed, pads = layers.trim_padding_taps(w, (112, 112), 2, 1)
  assert trimmed is w and pads == ((1, 1), (1, 1))
