"""Opt-in performance levers compute what the default paths compute.

* `layers.binary_conv_low_precision`: the forward of a binary conv on exact
  narrow operands (float8_e4m3fn, int8, bfloat16) equals `conv2d_nhwc` bit
  for bit in a bfloat16 model, and its backward is the default one.
* `BatchNorm(one_pass_stats=True)`: the same statistics up to float32
  rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import binary
from bnn_jax import layers
from bnn_jax import models

def _binary_operands(shape, kernel_shape, dtype, zero_to=1.0, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = binary.approx_sign(jax.random.normal(kx, shape), zero_to=zero_to)
  w = binary.scaled_sign_weights(
      jax.random.normal(kw, kernel_shape) * 0.3, zero_to=zero_to)
  return x.astype(dtype), w.astype(dtype)


# (input shape, kernel shape, stride, padding): a 3x3 conv (stride 1 and 2),
# a 3x3 conv on a small map (the im2col path), a 1x1 conv (a matmul).
CASES = [((2, 8, 8, 16), (3, 3, 16, 32), 1, 1),
         ((2, 8, 8, 16), (3, 3, 16, 16), 2, 1),
         ((2, 4, 4, 32), (3, 3, 32, 32), 1, 1),
         ((2, 6, 6, 64), (1, 1, 64, 48), 1, 0)]


@pytest.mark.parametrize("operand", [
    "float8_e4m3fn",
    pytest.param("int8", marks=pytest.mark.slow),
    pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.slow
def test_low_precision_binary_conv_is_exact_in_bfloat16(operand):
  for case in CASES:
    _check_exact(operand, *case)


def _check_exact(operand, shape, kshape, stride, pad):
  x, w = _binary_operands(shape, kshape, jnp.bfloat16, zero_to=0.0)
  default = jax.jit(lambda a, b: layers.conv2d_nhwc(a, b, stride, pad))
  low = jax.jit(lambda a, b: layers.binary_conv_low_precision(
      a, b, stride, pad, operand))
  y_default, y_low = default(x, w), low(x, w)
  assert y_low.dtype == y_default.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y_low, np.float32),
                                np.asarray(y_default, np.float32))
  # A float32 output is the exact sum (what a bf16 conv's float32
  # accumulator holds): equal to the float32 conv of the same values.
  exact = layers.conv2d_nhwc(x.astype(jnp.float32), w.astype(jnp.float32),
                             stride, pad)
  np.testing.assert_array_equal(
      layers.binary_conv_low_precision(x, w, stride, pad, operand,
                                       jnp.float32), exact)
  # The backward is the default conv's, gradient for gradient.
  g = jax.random.normal(jax.random.key(3), y_default.shape, jnp.bfloat16)
  _, vjp_default = jax.vjp(default, x, w)
  _, vjp_low = jax.vjp(low, x, w)
  for a, b in zip(vjp_low(g), vjp_default(g)):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))


def test_low_precision_binary_conv_float32_within_rounding():
  x, w = _binary_operands(*CASES[0][:2], jnp.float32)
  y_default = layers.conv2d_nhwc(x, w, 1, 1)
  y_low = layers.binary_conv_low_precision(x, w, 1, 1, "float8_e4m3fn")
  np.testing.assert_allclose(y_low, y_default, rtol=1e-6, atol=1e-5)


@pytest.mark.slow
def test_model_with_float8_operands_trains_identically():
  """reactnet_small, step 2: logits, loss, BN statistics and gradients.

  In float32 with every latent kernel entry +-0.5 (alpha = 0.5, so both
  paths sum exactly and XLA's excess-precision rewrites cannot tell them
  apart).
  """
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  labels = jnp.arange(4) % 10

  def make(**kw):
    return models.create("reactnet_small", num_classes=10,
                         width_multiplier=0.25, **kw)

  default, low = make(), make(binary_conv_operand_dtype="float8_e4m3fn")
  variables = default.init(jax.random.key(1), x[:1])
  noise = iter(jax.random.split(jax.random.key(2), 1000))

  def perturb(path, v):
    name = jax.tree_util.keystr(path)
    if "binary" in name and "kernel" in name:
      return 0.5 * jnp.where(jax.random.normal(next(noise), v.shape) > 0,
                             1.0, -1.0)
    return v + 0.01 * jax.random.normal(next(noise), v.shape)

  variables = jax.tree_util.tree_map_with_path(perturb, variables)

  def loss(params, model):
    logits, stats = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return ce, (logits, stats)

  (l0, (z0, s0)), g0 = jax.jit(jax.value_and_grad(
      lambda p: loss(p, default), has_aux=True))(variables["params"])
  (l1, (z1, s1)), g1 = jax.jit(jax.value_and_grad(
      lambda p: loss(p, low), has_aux=True))(variables["params"])
  np.testing.assert_array_equal(z1, z0)
  assert float(l1) == float(l0)
  for a, b in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s0, g0))):
    np.testing.assert_array_equal(a, b)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)) > 0


def test_unknown_operand_dtype_is_refused():
  conv = layers.BinaryConv(8, operand_dtype="float4")
  with pytest.raises(ValueError, match="unknown operand_dtype 'float4'"):
    conv.init(jax.random.key(0), jnp.ones((1, 4, 4, 8)))


def test_one_pass_batch_norm_statistics():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 5, 5, 6))
  g = jax.random.normal(jax.random.key(1), x.shape)
  outs = []
  for one_pass in (False, True):
    bn = layers.BatchNorm(one_pass_stats=one_pass)
    variables = bn.init(jax.random.key(2), x, train=False)

    def f(x, bn=bn, variables=variables):
      y, stats = bn.apply(variables, x, train=True, mutable=["batch_stats"])
      return jnp.vdot(y, g), (y, stats)

    (_, (y, stats)), dx = jax.value_and_grad(f, has_aux=True)(x)
    outs.append((y, stats, dx))
  for a, b in zip(jax.tree.leaves(outs[1]), jax.tree.leaves(outs[0])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_remat_blocks_same_loss_and_gradients():
  """reactnet_small, step 2, float32: remat recomputes the same values."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  labels = jnp.arange(4) % 10

  def make(**kw):
    return models.create("reactnet_small", num_classes=10,
                         width_multiplier=0.25, **kw)

  default, remat = make(), make(remat_blocks=True)
  variables = default.init(jax.random.key(1), x[:1])
  assert jax.tree.structure(remat.init(jax.random.key(1), x[:1])) == (
      jax.tree.structure(variables))
  variables = jax.tree.map(
      lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape),
      variables)

  def loss(params, model):
    logits, stats = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return ce, (logits, stats)

  (l0, (z0, s0)), g0 = jax.jit(jax.value_and_grad(
      lambda p: loss(p, default), has_aux=True))(variables["params"])
  (l1, (z1, s1)), g1 = jax.jit(jax.value_and_grad(
      lambda p: loss(p, remat), has_aux=True))(variables["params"])
  np.testing.assert_array_equal(z1, z0)
  assert float(l1) == float(l0)
  for a, b in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s0, g0))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)) > 0
