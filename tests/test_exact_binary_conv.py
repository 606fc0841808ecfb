"""The exact narrow-operand formulations of a binary conv (`bnn_jax.exact_binary_conv`).

* For every binary conv of ReActNet-A (its shapes, strides and paddings as
  the model calls them, on 224x224, 96x96 and 32x32 inputs: maps 112 to 7,
  48 to 3 and 16 to 1, where taps that only read padding are dropped), every formulation's
  integer sums equal the float32 conv of the same +-1/0 operands bit for
  bit (the float32 conv of +-1 is exact: |S| <= 9,216 < 2^24).
* Sums at the fan-in limit (all products +1 but two): float16 needs the
  chunks, and the chunked sums are exact.
* The layer: in a bfloat16 model the forward equals the default conv's
  float32 sum (`layers.conv2d_float32_sum`) bit for bit, and the input and
  kernel gradients equal the default's bit for bit, in bfloat16 and float32.
* A whole bfloat16 model trains identically with each formulation.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import binary
from bnn_jax import exact_binary_conv
from bnn_jax import layers
from bnn_jax import models

IMPLS = sorted(exact_binary_conv.FORMULATIONS)


def binary_conv_calls(model, input_size):
  """(input shape, kernel shape, stride, padding) of every binary conv, batch 1, deduplicated."""
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, layers.BinaryConv)
        and module.binary_inputs and module.binary_weights):
      x = args[0]
      calls.append((tuple(x.shape),
                    (module.kernel_size, module.kernel_size, x.shape[-1],
                     module.features),
                    module.strides, module.resolved_padding(x.shape[1:3])))
    return next_fun(*args, **kwargs)

  example = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)
  return sorted(set(calls))


def _operands(x_shape, k_shape, seed):
  """+-1 inputs with some zeros (sign(0) = 0) and a sign(kernel) with some zeros."""
  kx, kw, kz = jax.random.split(jax.random.key(seed), 3)
  x = jnp.where(jax.random.uniform(kx, x_shape) < 0.5, -1.0, 1.0)
  x = jnp.where(jax.random.uniform(kz, x_shape) < 0.05, 0.0, x)
  s = jnp.sign(jax.random.normal(kw, k_shape))
  return x, s


def _reference(x, s, stride, pad):
  """The float32 conv of the +-1/0 operands: every partial sum an exact integer."""
  pads = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
  return jax.lax.conv_general_dilated(
      x, s, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def _check_sums(calls, impls):
  for i, (x_shape, k_shape, stride, pad) in enumerate(calls):
    x, s = _operands(x_shape, k_shape, seed=i)
    want = np.asarray(_reference(x, s, stride, pad))
    for impl in impls:
      got = jax.jit(exact_binary_conv.integer_sums, static_argnums=(2, 3, 4))(
          x, s, stride, pad, impl)
      assert got.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(got), want,
                                    err_msg=f"{impl} {x_shape} {k_shape}")


def test_reactnet_a_shapes_are_enumerated():
  model = models.create("reactnet_a")
  calls_224 = binary_conv_calls(model, 224)
  maps = sorted({c[0][1] for c in calls_224})
  assert maps == [7, 14, 28, 56, 112]
  fan_ins = {c[1][0] * c[1][1] * c[1][2] for c in calls_224}
  assert max(fan_ins) == 9 * 1024 and 9 * 512 in fan_ins
  assert sorted({c[0][1] for c in binary_conv_calls(model, 32)}) == [
      1, 2, 4, 8, 16]
  assert sorted({c[0][1] for c in binary_conv_calls(model, 96)}) == [
      3, 6, 12, 24, 48]


# One of each path: a lax conv with float16 chunks (fan-in 2,304), stride-2
# convs with the "same" padding of an even map and on an odd map, a 3x3 conv
# on a 2x2 map
# (trimmed taps, im2col), a 3x3 conv on a 1x1 map (a matmul) and a 1x1 conv.
FAST_CASES = [((1, 7, 7, 256), (3, 3, 256, 8), 1, 1),
              ((1, 8, 8, 16), (3, 3, 16, 8), 2, ((0, 1), (0, 1))),
              ((1, 7, 7, 16), (3, 3, 16, 8), 2, 1),
              ((2, 2, 2, 512), (3, 3, 512, 16), 1, 1),
              ((2, 1, 1, 1024), (3, 3, 1024, 8), 1, 1),
              ((1, 5, 5, 64), (1, 1, 64, 48), 1, 0)]


def test_each_conv_path_is_exact():
  _check_sums(FAST_CASES, IMPLS)


def test_int8_lax_conv_path_is_exact(monkeypatch):
  """The int8 formulation's lax conv (int32 result; what TPUs run), which the
  CPU otherwise replaces by im2col."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(exact_binary_conv.FORMULATIONS, "int8", dataclasses.replace(
      exact_binary_conv.FORMULATIONS["int8"], im2col="small"))
  _check_sums(FAST_CASES[:2], ["int8"])


def test_float16_needs_and_gets_its_chunks():
  """All products +1 but two per output: S = fan-in - 4 = 9,212 inside the
  map, not a float16 number (ulp 8 above 8,192); the chunked float16 sums
  are exact, one float16 conv over the whole fan-in is not."""
  x = jnp.ones((1, 5, 5, 1024))
  s = jnp.ones((3, 3, 1024, 4)).at[1, 1, :2, :].set(-1.0)
  want = np.asarray(_reference(x, s, 1, 1))
  assert want[0, 2, 2, 0] == 9 * 1024 - 4
  got = exact_binary_conv.integer_sums(x, s, 1, 1, "float16_chunked")
  np.testing.assert_array_equal(np.asarray(got), want)
  whole = jax.lax.conv_general_dilated(
      x.astype(jnp.float16), s.astype(jnp.float16), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float16).astype(jnp.float32)
  assert not np.array_equal(np.asarray(whole), want)
  assert [c.stop - c.start for c in exact_binary_conv._chunks(1024, 9, 2048)
          ] == [224, 224, 224, 224, 128]


@pytest.mark.slow
def test_every_reactnet_a_conv_on_32x32_is_exact():
  """Maps 16 to 1 (the im2col and trimmed-tap paths), every formulation."""
  _check_sums(binary_conv_calls(models.create("reactnet_a"), 32), IMPLS)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 96])
def test_every_reactnet_a_conv_on_224x224_is_exact(size):
  """Maps 112 to 7 (lax convs, chunked float16 on 256 to 1,024 channels);
  96x96 ends on the odd 3x3 map (im2col, every tap used)."""
  _check_sums(binary_conv_calls(models.create("reactnet_a"), size), IMPLS)


def _layer_operands(x_shape, k_shape, dtype, seed=0):
  """A binarised input and a binarised (alpha sign(W)) kernel in `dtype`."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = binary.approx_sign(jax.random.normal(kx, x_shape))
  w = binary.scaled_sign_weights(jax.random.normal(kw, k_shape) * 0.3)
  return x.astype(dtype), w.astype(dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_forward_and_gradients_equal_the_default(impl):
  for x_shape, k_shape, stride, pad in FAST_CASES[:3]:
    x, w = _layer_operands(x_shape, k_shape, jnp.bfloat16)
    default = jax.jit(lambda a, b: layers.conv2d_float32_sum(a, b, stride, pad))
    exact = jax.jit(lambda a, b: exact_binary_conv.binary_conv(
        a, b, stride, pad, impl, jnp.float32))
    y_default, y_exact = default(x, w), exact(x, w)
    assert y_exact.dtype == y_default.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y_exact), np.asarray(y_default))
    g = jax.random.normal(jax.random.key(3), y_default.shape)
    for a, b in zip(jax.vjp(exact, x, w)[1](g), jax.vjp(default, x, w)[1](g)):
      assert a.dtype == b.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(a, np.float32),
                                    np.asarray(b, np.float32))


def test_float32_gradients_equal_the_default_and_forward_rounds_once():
  x_shape, k_shape, stride, pad = FAST_CASES[0]
  x, w = _layer_operands(x_shape, k_shape, jnp.float32)
  default = jax.jit(lambda a, b: layers.conv2d_nhwc(a, b, stride, pad))
  for impl in IMPLS:
    exact = jax.jit(lambda a, b, impl=impl: exact_binary_conv.binary_conv(
        a, b, stride, pad, impl, jnp.float32))
    # The exact sum rounded once: within the float32 conv's rounding.
    np.testing.assert_allclose(exact(x, w), default(x, w), rtol=1e-6,
                               atol=1e-5)
    g = jax.random.normal(jax.random.key(3), exact(x, w).shape)
    for a, b in zip(jax.vjp(exact, x, w)[1](g), jax.vjp(default, x, w)[1](g)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_model_trains_identically(impl):
  """reactnet_small step 2 in bfloat16: logits, loss, BN statistics, gradients."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  labels = jnp.arange(4) % 10

  def make(**kw):
    return models.create("reactnet_small", num_classes=10,
                         width_multiplier=0.25, dtype=jnp.bfloat16, **kw)

  default, exact = make(binary_conv_impl="compute_dtype"), make(
      binary_conv_impl=impl)
  variables = default.init(jax.random.key(1), x[:1])
  variables = jax.tree.map(
      lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape),
      variables)

  def loss(params, model):
    logits, stats = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x,
        train=True, mutable=["batch_stats"])
    ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return ce, (logits, stats)

  outs = [jax.jit(jax.value_and_grad(lambda p, m=m: loss(p, m), has_aux=True))(
      variables["params"]) for m in (default, exact)]
  for a, b in zip(jax.tree.leaves(outs[1]), jax.tree.leaves(outs[0])):
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))
  grads = jax.tree.leaves(outs[0][1])
  assert max(float(jnp.max(jnp.abs(g))) for g in grads) > 0


def test_auto_is_the_backend_default_and_names_are_checked():
  assert exact_binary_conv.resolve("auto") == exact_binary_conv.DEFAULT_IMPL[
      jax.default_backend()]
  assert exact_binary_conv.resolve("int8") == "int8"
  assert exact_binary_conv.conv_function("compute_dtype") is None
  x = jnp.ones((1, 8, 8, 1))
  bad = models.create("reactnet_small", num_classes=10, width_multiplier=0.25,
                      binary_conv_impl="int4")
  with pytest.raises(ValueError, match="unknown binary_conv_impl 'int4'"):
    bad.init(jax.random.key(0), x)
  both = models.create("reactnet_small", num_classes=10, width_multiplier=0.25,
                       binary_conv_impl="int8",
                       binary_conv_operand_dtype="int8")
  with pytest.raises(ValueError, match="set one of them"):
    both.init(jax.random.key(0), x)
  # "auto" leaves the older operand_dtype lever in charge.
  auto = models.create("reactnet_small", num_classes=10, width_multiplier=0.25,
                       binary_conv_operand_dtype="int8")
  auto.init(jax.random.key(0), x)


def test_run_wide_config_fields_reach_reactnet_a_only():
  """`config.model.binary_conv_impl` / `bn_stats_method` (unset by default,
  so existing workdirs' configs are unchanged) reach every ReActNet-A phase
  and are skipped for the ResNet-34 teacher, which has no such attribute."""
  from bnn_jax.configs import reactnet_a_imagenet  # pylint: disable=g-import-not-at-top
  config = reactnet_a_imagenet.get_config()
  assert config.model.binary_conv_impl is None
  assert config.model.bn_stats_method is None
  assert models.from_config(config, config.phases.step2.model,
                            10).binary_conv_impl is None
  config.model.binary_conv_impl = "float16_chunked"
  config.model.bn_stats_method = "shifted_one_pass"
  for phase in ("step1", "step2"):
    model = models.from_config(config, config.phases[phase].model, 10)
    assert (model.binary_conv_impl, model.bn_stats_method) == (
        "float16_chunked", "shifted_one_pass")
  teacher = models.from_config(config, config.phases.teacher.model, 10)
  assert not hasattr(teacher, "binary_conv_impl")
