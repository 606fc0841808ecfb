"""BatchNorm batch statistics (`bnn_jax.batch_stats`): two-pass, one-pass, shifted one-pass.

On channels whose mean is 1e4 times their spread the naive one-pass
variance mean(x^2) - mean(x)^2 loses every digit (float32 keeps 24 bits of
~1e8), while the shifted one-pass variance stays as exact as two passes;
the statistics, the normalised output and its input gradient are compared
with float64 references. On ordinary data all three agree with the default
(two passes) through `layers.BatchNorm`, running statistics and gradients
included, with and without ghost groups.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import batch_stats
from bnn_jax import layers

AXES = (0, 1, 2)


def _large_mean(seed=0, mean=1e4, std=1.0, shape=(16, 6, 6, 8)):
  rng = np.random.default_rng(seed)
  # Per-channel means around `mean`, spread `std`: mean / std = 1e4.
  centres = mean * (1.0 + 0.1 * rng.uniform(size=shape[-1]))
  return (centres + std * rng.normal(size=shape)).astype(np.float32)


def _reference(x):
  x = np.asarray(x, np.float64)
  mu = x.mean(AXES, keepdims=True)
  return mu, ((x - mu) ** 2).mean(AXES, keepdims=True)


def test_naive_one_pass_fails_and_shifted_one_pass_holds_at_mean_1e4_std():
  x = _large_mean()
  mu64, var64 = _reference(x)
  rel = {}
  for method in batch_stats.METHODS:
    mu, var, xc = batch_stats.centered(jnp.asarray(x), AXES, method)
    np.testing.assert_allclose(mu, mu64, rtol=1e-6)
    rel[method] = float(np.max(np.abs(np.asarray(var, np.float64) - var64)
                               / var64))
    if method != "one_pass":
      np.testing.assert_allclose(xc, x.astype(np.float64) - mu64,
                                 atol=1e-6 if method == "shifted_one_pass"
                                 else 5e-3)
  assert rel["one_pass"] > 0.5  # no digit left
  assert rel["two_pass"] < 1e-5
  assert rel["shifted_one_pass"] < 2e-6


def _bn_train(x, g, **kw):
  """Output, running statistics and input gradient of a training-mode BatchNorm."""
  bn = layers.BatchNorm(**kw)
  variables = bn.init(jax.random.key(0), x, train=False)
  variables = {"params": {"scale": jnp.linspace(0.5, 1.5, x.shape[-1]),
                          "bias": jnp.linspace(-1.0, 1.0, x.shape[-1])},
               "batch_stats": variables["batch_stats"]}

  def f(x):
    y, stats = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    return jnp.vdot(y, g), (y, stats["batch_stats"])

  (_, (y, stats)), dx = jax.jit(jax.value_and_grad(f, has_aux=True))(x)
  return y, stats, dx


def test_batch_norm_output_and_gradient_at_mean_1e4_std():
  """y and dL/dx against float64 (dx = s / sqrt(var + eps) (g - mean(g) -
  xhat mean(g xhat)))."""
  x = _large_mean(seed=1)
  g = np.random.default_rng(2).normal(size=x.shape)
  mu64, var64 = _reference(x)
  scale = np.linspace(0.5, 1.5, x.shape[-1])
  bias = np.linspace(-1.0, 1.0, x.shape[-1])
  inv = 1.0 / np.sqrt(var64 + 1e-5)
  xhat = (x - mu64) * inv
  y64 = xhat * scale + bias
  dx64 = scale * inv * (g - g.mean(AXES, keepdims=True)
                        - xhat * (g * xhat).mean(AXES, keepdims=True))
  errors = {}
  for method in batch_stats.METHODS:
    y, stats, dx = _bn_train(jnp.asarray(x), jnp.asarray(g, jnp.float32),
                             stats_method=method)
    errors[method] = (float(np.max(np.abs(y - y64))),
                      float(np.max(np.abs(dx - dx64))))
    np.testing.assert_allclose(stats["mean"], 0.1 * mu64.reshape(-1),
                               rtol=1e-6)
  assert errors["one_pass"][0] > 0.5  # the normalised output is wrong
  y_err, dx_err = errors["shifted_one_pass"]
  assert y_err < 2e-6 and dx_err < 2e-6
  # Two passes round the mean (ulp 2^-10 at 1e4) before x - mean.
  assert errors["two_pass"][0] < 5e-3


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("method", ["one_pass", "shifted_one_pass"])
def test_methods_agree_with_two_passes_on_ordinary_data(method, group_size):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6))
  g = jax.random.normal(jax.random.key(1), x.shape)
  want = _bn_train(x, g, group_size=group_size)
  got = _bn_train(x, g, group_size=group_size, stats_method=method)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_two_pass_is_the_batch_norm_formula_and_bad_methods_are_refused():
  """y = (x - mu) / sqrt(var + eps) * s + b, mu and var = mean((x - mu)^2)
  over N, H, W; running stats 0.9 * init + 0.1 * (mu, var * n / (n - 1))."""
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6))
  g = jax.random.normal(jax.random.key(1), x.shape)
  y, stats, _ = _bn_train(x, g, stats_method="two_pass")
  x64 = np.asarray(x, np.float64)
  mu = x64.mean(axis=(0, 1, 2))
  var = ((x64 - mu) ** 2).mean(axis=(0, 1, 2))
  scale, bias = np.linspace(0.5, 1.5, 6), np.linspace(-1.0, 1.0, 6)
  np.testing.assert_allclose(
      y, (x64 - mu) / np.sqrt(var + 1e-5) * scale + bias, rtol=1e-5,
      atol=1e-5)
  n = x64.size // 6
  np.testing.assert_allclose(stats["mean"], 0.1 * mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var * n / (n - 1),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="set one of them"):
    _bn_train(x, g, one_pass_stats=True, stats_method="shifted_one_pass")
  with pytest.raises(ValueError, match="unknown BatchNorm statistics"):
    _bn_train(x, g, stats_method="welford")
