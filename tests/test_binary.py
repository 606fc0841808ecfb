"""Binarisers: forward values and pseudo-gradients against their closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import binary

# Points at the window edges, at +-0.0 and just inside/outside the window.
EPS = 1e-3
X = np.array([-2.0, -1.0 - EPS, -1.0, -1.0 + EPS, -0.5, -0.25, -0.0, 0.0,
              0.25, 0.5, 1.0 - EPS, 1.0, 1.0 + EPS, 2.0], np.float32)


def _grad(fn, x):
  return np.asarray(jax.grad(lambda v: jnp.sum(fn(v)))(jnp.asarray(x)))


def test_sign_zero_convention():
  x = jnp.array([-3.0, -0.0, 0.0, 2.0])
  np.testing.assert_array_equal(binary.sign(x), [-1, 1, 1, 1])
  np.testing.assert_array_equal(binary.sign(x, 0.0), [-1, 0, 0, 1])
  for fn in (binary.ste_sign, binary.approx_sign, binary.swish_sign):
    np.testing.assert_array_equal(fn(x), [-1, 1, 1, 1])
    np.testing.assert_array_equal(fn(x, zero_to=0.0), [-1, 0, 0, 1])
  np.testing.assert_array_equal(_grad(binary.sign, x), [0, 0, 0, 0])


def test_nan_passes_through():
  x = jnp.array([jnp.nan, 1.0])
  for fn in (binary.sign, binary.ste_sign, binary.approx_sign,
             binary.swish_sign, binary.sign_weights):
    assert np.isnan(fn(x)[0]) and fn(x)[1] == 1.0


def test_approx_sign_spec_values():
  x = [-1.5, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 1.5]
  np.testing.assert_allclose(_grad(binary.approx_sign, x),
                             [0, 0, 1, 1.5, 2, 1.5, 1, 0, 0])


def test_approx_sign_closed_form():
  expected = np.where((X >= -1) & (X < 0), 2 + 2 * X,
                      np.where((X >= 0) & (X < 1), 2 - 2 * X, 0.0))
  np.testing.assert_allclose(_grad(binary.approx_sign, X), expected, rtol=1e-6)
  # At -0.0 the [0, 1) branch applies: gradient 2.
  assert _grad(binary.approx_sign, np.array([-0.0], np.float32))[0] == 2.0


@pytest.mark.parametrize("clip", [1.0, 0.5, 2.0])
def test_ste_sign_inclusive_window(clip):
  expected = (np.abs(X) <= clip).astype(np.float32)
  np.testing.assert_array_equal(
      _grad(lambda v: binary.ste_sign(v, clip=clip), X), expected)


def test_ste_sign_unclipped():
  np.testing.assert_array_equal(
      _grad(lambda v: binary.ste_sign(v, clip=None), X), np.ones_like(X))


def test_swish_sign_closed_form():
  beta = 5.0
  bx = beta * X.astype(np.float64)
  expected = beta * (2 - bx * np.tanh(bx / 2)) / (1 + np.cosh(bx))
  np.testing.assert_allclose(_grad(binary.swish_sign, X), expected, rtol=1e-5,
                             atol=1e-6)
  assert _grad(binary.swish_sign, np.array([0.0], np.float32))[0] == beta


def test_scaled_sign_weights_forward_and_gradient():
  w = np.array([[[[-2.0, 0.3], [1.0, -1.0]], [[0.0, 1.0 + EPS], [-0.5, -1.0 - EPS]]]],
               np.float32)  # HWIO (1, 2, 2, 2)
  alpha = np.abs(w).mean(axis=(0, 1, 2), keepdims=True)
  for zero_to in (1.0, 0.0):
    s = np.where(w > 0, 1.0, np.where(w < 0, -1.0, zero_to))
    np.testing.assert_allclose(binary.scaled_sign_weights(w, zero_to),
                               alpha * s, rtol=1e-6)
  # Gradient of sum(c * B(w)) is c where -1 <= w <= 1 (inclusive), unscaled by alpha.
  c = np.arange(1, w.size + 1, dtype=np.float32).reshape(w.shape)
  g = jax.grad(lambda v: jnp.sum(c * binary.scaled_sign_weights(v)))(w)
  np.testing.assert_array_equal(g, np.where((w >= -1) & (w <= 1), c, 0.0))


def test_sign_weights_unscaled():
  w = jnp.array([[-0.2, 0.0], [3.0, 1.0]])
  np.testing.assert_array_equal(binary.sign_weights(w), [[-1, 1], [1, 1]])
  np.testing.assert_array_equal(
      jax.grad(lambda v: jnp.sum(binary.sign_weights(v)))(w), [[1, 1], [0, 1]])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(binary.ACTIVATION_BINARIZERS))
def test_jit_vmap_bfloat16(name):
  fn = binary.get_activation_binarizer(name)
  x = jnp.asarray(X).reshape(2, 7)
  g_eager = jax.vmap(jax.grad(lambda v: jnp.sum(fn(v))))(x)
  g_jit = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(fn(v)))))(x)
  np.testing.assert_array_equal(g_eager, g_jit)
  np.testing.assert_array_equal(g_eager.reshape(-1), _grad(fn, X))
  xb = x.astype(jnp.bfloat16)
  yb = jax.jit(fn)(xb)
  gb = jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32)))(xb)
  assert yb.dtype == jnp.bfloat16 and gb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(yb.astype(jnp.float32), fn(x))
  # bf16 gradients agree with float32 ones at the bf16-rounded inputs
  # (-1 - 1e-3 rounds to -1 in bf16, so compare at the rounded points).
  g_rounded = jax.grad(lambda v: jnp.sum(fn(v)))(xb.astype(jnp.float32))
  np.testing.assert_allclose(gb.astype(np.float32), g_rounded, rtol=2e-2,
                             atol=2e-2)


def test_weight_binarizer_bfloat16_and_vmap():
  w = jax.random.normal(jax.random.key(0), (4, 3, 3, 2, 5))
  out = jax.vmap(binary.scaled_sign_weights)(w.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32),
                             jax.vmap(binary.scaled_sign_weights)(w), rtol=1e-2)


def test_unknown_names():
  with pytest.raises(ValueError, match="approx_sign"):
    binary.get_activation_binarizer("aprox_sign")
  with pytest.raises(ValueError, match="scaled_sign"):
    binary.get_weight_binarizer("scaled")


# Inside-window test per binariser: the pseudo-gradient is nonzero exactly
# where this holds (approx_sign's 2 - 2|x| is 0 at x = -1, its window edge).
_WINDOWS = {
    "ste_sign": lambda x: np.abs(x) <= 1.0,
    "approx_sign": lambda x: (x > -1.0) & (x < 1.0),
    "sign_weights": lambda x: np.abs(x) <= 1.0,
    "scaled_sign_weights": lambda x: np.abs(x) <= 1.0,
}


def _binarizer(name):
  if name in ("sign_weights", "scaled_sign_weights"):
    return getattr(binary, name)
  return binary.get_activation_binarizer(name)


@pytest.mark.parametrize("name", sorted(_WINDOWS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_infinite_cotangent_is_zero_outside_the_window(name, dtype):
  """g = +inf: 0 outside the window (not inf * 0 = NaN), inf inside."""
  fn = _binarizer(name)
  x = jnp.asarray(X, dtype)
  _, vjp = jax.vjp(fn, x)
  (g,) = vjp(jnp.full(x.shape, jnp.inf, dtype))
  g = np.asarray(g.astype(jnp.float32))
  inside = _WINDOWS[name](np.asarray(x.astype(jnp.float32)))
  assert g.dtype == np.float32 and inside.any() and (~inside).any()
  np.testing.assert_array_equal(g[~inside], 0.0)
  np.testing.assert_array_equal(g[inside], np.inf)


@pytest.mark.parametrize("name", sorted(_WINDOWS))
def test_finite_cotangent_exact_inside_the_window(name):
  """g = 3: exactly 3 * the pseudo-gradient (the closed forms above)."""
  fn = _binarizer(name)
  _, vjp = jax.vjp(fn, jnp.asarray(X))
  (g,) = vjp(jnp.full(X.shape, 3.0, jnp.float32))
  np.testing.assert_array_equal(g, 3.0 * _grad(fn, X))
  expected = {"approx_sign": np.where(np.abs(X) < 1, 2 - 2 * np.abs(X), 0.0)
              }.get(name, _WINDOWS[name](X).astype(np.float32))
  np.testing.assert_allclose(g, 3.0 * expected, rtol=1e-6)


def test_swish_sign_underflowed_pseudo_gradient_is_zero_not_nan():
  """At |beta x| > ~89, cosh overflows and the pseudo-gradient is -0: g = inf gives 0."""
  x = jnp.asarray([-100.0, -0.25, 0.0, 0.25, 100.0])
  _, vjp = jax.vjp(binary.swish_sign, x)
  (g,) = vjp(jnp.full(x.shape, jnp.inf))
  np.testing.assert_array_equal(g, [0.0, np.inf, np.inf, np.inf, 0.0])
