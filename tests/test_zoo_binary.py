"""Larq Zoo's quantisers as bnn_jax binarisers, against their closed forms.

The closed forms are those of `larq/quantizers.py` (larq 0.13.3):
  SteSign(clip):          q = sign(x),            dq/dx = 1(|x| <= clip)
  ApproxSign:             q = sign(x),            dq/dx = 2 - 2|x| on |x| <= 1
  SwishSign(beta):        q = sign(x),  dq/dx = beta (2 - beta x tanh(beta x / 2))
                                                  / (1 + cosh(beta x))
  MagnitudeAwareSign(c):  q = alpha_o sign(w),    dq/dw = alpha_o 1(|w| <= c),
                          alpha_o = mean_{h,w,i} |w[h, w, i, o]|
Larq's sign is +1 at 0 (bnn_jax's default `zero_to=1.0`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import binary

X = np.array([-2.0, -1.3, -1.25, -1.2, -1.0, -0.5, -0.0, 0.0, 0.3, 1.0, 1.2,
              1.25, 1.3, 2.0], np.float32)


def _grad(fn, x):
  return np.asarray(jax.grad(lambda v: jnp.sum(fn(v)))(jnp.asarray(x)))


def test_ste_sign_clip_1_25_as_quicknet():
  """QuickNet's SteSign(clip_value=1.25), activations and kernels."""
  want_grad = (np.abs(X) <= 1.25).astype(np.float32)
  for fn in (lambda v: binary.ste_sign(v, clip=1.25),
             lambda v: binary.ste_sign_weights(v, clip=1.25)):
    np.testing.assert_array_equal(fn(X), np.where(X >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(_grad(fn, X), want_grad)
  weights = binary.get_weight_binarizer("ste_sign", clip=1.25)
  np.testing.assert_array_equal(_grad(weights, X), want_grad)


def test_approx_sign_is_larq_approx_sign():
  """Larq: dq/dx = (1 - |x|) * 2 where |x| <= 1, else 0."""
  want = np.where(np.abs(X) <= 1, 2 * (1 - np.abs(X)), 0.0)
  np.testing.assert_allclose(_grad(binary.approx_sign, X), want, atol=1e-6)


def test_swish_sign_is_larq_swish_sign():
  beta = 5.0
  bx = beta * X.astype(np.float64)
  want = beta * (2 - bx * np.tanh(bx / 2)) / (1 + np.cosh(bx))
  np.testing.assert_allclose(_grad(binary.swish_sign, X), want, rtol=1e-5,
                             atol=1e-7)


def test_magnitude_aware_sign_forward_and_scaled_gradient():
  w = np.array([[[[0.5, -2.0], [-0.25, 0.5]]], [[[1.0, 1.5], [-0.0, -0.5]]]],
               np.float32)  # (2, 1, 2, 2) HWIO
  alpha = np.abs(w).reshape(-1, 2).mean(0)  # [0.4375, 1.125]
  np.testing.assert_allclose(alpha, [0.4375, 1.125])
  np.testing.assert_allclose(binary.magnitude_aware_sign(w),
                             alpha * np.where(w >= 0, 1.0, -1.0))
  # The upstream gradient g = 1 + index, so the scale's role is visible.
  g = np.arange(w.size, dtype=np.float32).reshape(w.shape) + 1
  _, vjp = jax.vjp(binary.magnitude_aware_sign, jnp.asarray(w))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0],
                             g * alpha * (np.abs(w) <= 1.0), rtol=1e-6)
  _, vjp = jax.vjp(lambda v: binary.magnitude_aware_sign(v, clip=None),
                   jnp.asarray(w))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], g * alpha, rtol=1e-6)
  # scaled_sign has the same forward but an unscaled gradient.
  np.testing.assert_allclose(binary.scaled_sign_weights(w),
                             binary.magnitude_aware_sign(w))
  np.testing.assert_array_equal(_grad(binary.scaled_sign_weights, w),
                                (np.abs(w) <= 1.0).astype(np.float32))


def test_new_weight_binarizers_are_registered():
  assert {"ste_sign", "magnitude_aware_sign"} <= set(binary.WEIGHT_BINARIZERS)
  with pytest.raises(ValueError, match="magnitude_aware_sign"):
    binary.get_weight_binarizer("magnitude_aware")
