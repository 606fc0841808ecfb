"""The mixed-precision policy (docs/performance.md) and the non-finite guards.

* shifts before a sign, BatchNorm (train and eval), logits and losses in
  float32; parameters, optimizer state and BatchNorm statistics float32
  after a bfloat16 step; a compute dtype per phase;
* no NaN from an infinite or huge upstream gradient: weight-0 loss terms,
  the KD loss's 0 * log 0, BatchNorm's backward, the finite check;
* the collapse scenario of the bfloat16 step-1 KD bug through the real
  train step, and bfloat16 evaluation of an imported reference network.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bnn_jax import layers
from bnn_jax import losses
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import train_step

BF16 = jnp.bfloat16
# Below half a bfloat16 ulp of 1 (ulp 2^-7): bf16(-(1 + 2^-10)) == -1.
SHIFT = -(1.0 + 2.0 ** -10)


def _bf16(x):
  return jnp.asarray(x, jnp.float32).astype(BF16)


def test_shift_below_half_a_bf16_ulp_decides_the_sign():
  """RSign(1 + b) with b = -(1 + 2^-10): x + b = -2^-10 < 0, so -1.

  Added in bfloat16, b rounds to -1, x + b = 0 and sign(0) = +1.
  """
  assert float(_bf16(SHIFT)) == -1.0
  x = _bf16(np.ones((1, 1, 1, 2)))
  variables = {"params": {"move": {"shift": jnp.asarray([SHIFT, 0.5])}}}
  for binarizer in ("approx_sign", "ste_sign"):
    y = layers.RSign(binarizer=binarizer).apply(variables, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32).reshape(-1),
                                  [-1.0, 1.0])


def test_rprelu_shift_below_half_a_bf16_ulp_picks_the_slope():
  """RPReLU(1) with b1 = -(1 + 2^-10), a = 0.25, b2 = 0: 0.25 * -2^-10."""
  x = _bf16(np.ones((1, 1, 1, 1)))
  variables = {"params": {"shift_in": jnp.asarray([SHIFT]),
                          "slope": jnp.asarray([0.25]),
                          "shift_out": jnp.asarray([0.0])}}
  y = layers.RPReLU().apply(variables, x)
  assert y.dtype == BF16
  assert float(y.reshape(())) == 0.25 * -(2.0 ** -10)


def test_batchnorm_eval_normalises_in_float32():
  """Mean 1003 between bf16 neighbours 1000 and 1008 (ulp 8): y = x - 1003.

  Folded in bfloat16 (x * s + (bias - mean * s)), 1003 rounds to 1000 or
  1008 and every output is off by 3 or 5.
  """
  x = _bf16(np.asarray([1000.0, 1008.0, 992.0]).reshape(3, 1, 1, 1))
  variables = {"params": {"scale": jnp.ones(1), "bias": jnp.zeros(1)},
               "batch_stats": {"mean": jnp.asarray([1003.0]),
                               "var": jnp.asarray([1.0 - 1e-5])}}
  y = layers.BatchNorm().apply(variables, x, train=False)
  assert y.dtype == BF16
  np.testing.assert_array_equal(np.asarray(y, np.float32).reshape(-1),
                                [-3.0, 5.0, -11.0])


def test_conv_spread_below_half_a_bf16_ulp_reaches_the_batchnorm():
  """conv 1x1 of (256, +-1) with kernel (1, 2^-9): 256 +- 2^-9, whose spread
  is below half a bf16 ulp of 256 (ulp 2). The BN after it sees the float32
  sum: y = +-2^-9 / sqrt(2^-18 + eps); rounded to bf16 first, the channel
  would be constant (var_B = 0) and y = 0."""
  x = np.stack([np.full(8, 256.0), np.resize([1.0, -1.0], 8)], -1)
  x = _bf16(x.reshape(8, 1, 1, 2))
  kernel = jnp.asarray([1.0, 2.0 ** -9]).reshape(1, 1, 2, 1)

  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = layers.BinaryConv(1, 1, input_binarizer=None, kernel_binarizer=None,
                            dtype=BF16)(x)
      assert y.dtype == jnp.float32
      return layers.BatchNorm(dtype=BF16)(y, train=True)

  variables = ConvBN().init(jax.random.key(0), x)
  variables["params"]["BinaryConv_0"]["kernel"] = kernel
  y, _ = ConvBN().apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == BF16
  want = np.resize([1.0, -1.0], 8) * 2.0 ** -9 / np.sqrt(2.0 ** -18 + 1e-5)
  np.testing.assert_allclose(np.asarray(y, np.float32).reshape(-1), want,
                             rtol=1e-2)


def test_batchnorm_train_backward_of_a_huge_cotangent_is_finite():
  """g ~ 1e30 into a training-mode BN (bf16 in and out): the input gradient
  is finite and equals the float32 one rounded to bf16."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
  g = (1e30 * rng.normal(size=x.shape)).astype(np.float32)
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(0), x, train=False)

  def grad_x(x, g):
    f = lambda v: bn.apply(variables, v, train=True, mutable=["batch_stats"])[0]
    return jax.vjp(f, x)[1](g)[0]

  want = np.asarray(grad_x(jnp.asarray(x), jnp.asarray(g)))
  got = grad_x(_bf16(x), _bf16(g))
  assert got.dtype == BF16
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05,
                             atol=0.05 * np.abs(want).max())


def test_zero_weight_loss_term_is_not_computed_into_the_loss():
  """CE = inf at ce_weight 0 (and a 0 * log 0 in KD): L = KD = 0, dL = 0.

  Logits (1e38, -3e38): log_softmax = (0, -inf), so CE of label 1 is inf; the
  one-hot teacher gives class 1 probability exactly 0.
  """
  logits = jnp.asarray([[1e38, -3e38]], jnp.float32)
  teacher = jnp.asarray([[200.0, -200.0]], jnp.float32)
  labels = jnp.asarray([1])
  cfg = losses.default_loss_config()  # kd_weight 1, ce_weight 0

  def loss(s):
    return losses.combined_loss(cfg, s, labels, teacher_logits=teacher)

  (value, parts), grad = jax.value_and_grad(loss, has_aux=True)(logits)
  assert float(parts["ce_loss"]) == np.inf  # still reported
  assert float(value) == 0.0 and float(parts["kd_loss"]) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((1, 2)))


def test_tree_max_abs_has_no_overflow_or_underflow():
  """The finite check's statistic: max |x|, where the norm overflows (1e20)
  and underflows (1e-30), and NaN / Inf propagate."""
  tree = {"a": jnp.full((3,), 1e20), "b": jnp.zeros((0,)), "c": -2.0}
  assert float(train_step.tree_max_abs(tree)) == np.float32(1e20)
  assert not np.isfinite(float(jnp.sqrt(jnp.sum(jnp.square(tree["a"])))))
  assert float(train_step.tree_max_abs({"a": jnp.full((4,), 1e-30)})) > 0
  assert np.isnan(train_step.tree_max_abs({"a": jnp.asarray([1.0, jnp.nan]),
                                           "b": jnp.asarray([2.0])}))
  assert np.isposinf(train_step.tree_max_abs([jnp.asarray([-jnp.inf, 1.0])]))
  assert float(train_step.tree_max_abs({})) == 0.0


def test_tree_reductions_group_the_small_leaves():
  """grad_norm and the finite check reduce every big leaf on its own and all
  small leaves as one vector: the same values, one reduction per group."""
  big = train_step.SMALL_LEAF_SIZE + 7
  tree = {"kernel": jnp.linspace(-3.0, 2.0, big).reshape(big, 1),
          "bias": jnp.asarray([0.5, -4.5, 1.0]),
          "slope": jnp.full((5,), 0.25, jnp.bfloat16),
          "empty": jnp.zeros((0,)), "scalar": jnp.asarray(-1.5)}
  groups = train_step.reduction_groups(tree)
  assert [g.shape for g in groups] == [(big, 1), (3 + 5 + 1,)]
  assert all(g.dtype == jnp.float32 for g in groups)
  elements = np.concatenate([np.ravel(np.asarray(x, np.float32))
                             for x in jax.tree.leaves(tree)])
  assert float(train_step.tree_max_abs(tree)) == np.abs(elements).max() == 4.5
  np.testing.assert_allclose(float(train_step.tree_norm(tree)),
                             float(optax.tree.norm(tree)), rtol=1e-6)
  np.testing.assert_allclose(float(train_step.tree_norm(tree)),
                             np.sqrt(np.sum(elements.astype(np.float64) ** 2)),
                             rtol=1e-6)
  hlo = jax.jit(train_step.tree_norm).lower(tree).as_text()
  assert hlo.count("stablehlo.reduce") == 3  # 2 groups + the sum of their sums
  assert float(train_step.tree_norm({})) == 0.0


class OneHotTeacher(nn.Module):
  """A frozen near one-hot teacher: logits 50 for `label`, 0 elsewhere."""
  num_classes: int
  label: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return 50.0 * jax.nn.one_hot(jnp.full((x.shape[0],), self.label),
                                 self.num_classes)


def _tiny_student(dtype, binary_weights=False):
  return models.create("reactnet_small", num_classes=10, channels=(32, 64, 128),
                       width_multiplier=0.25, binary_weights=binary_weights,
                       dtype=dtype)


def _state(model, tx, shape, bias=None):
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape),
                         train=False)
  params = variables["params"]
  if bias is not None:
    params = {**params, "fc": {**params["fc"], "bias": bias}}
  return train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=variables["batch_stats"],
                               opt_state=tx.init(params))


def _step1_optimizer():
  cfg = optim.default_optimizer_config()
  cfg.weight_decay, cfg.weight_decay_mode = 5e-6, "coupled"
  cfg.schedule = "constant"
  return optim.build_optimizer(cfg, steps_per_epoch=10, num_epochs=4)


@pytest.mark.slow
def test_bf16_step_keeps_params_optimizer_state_and_statistics_float32():
  model = _tiny_student(BF16)
  tx = _step1_optimizer()
  state = _state(model, tx, (8, 8, 1))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 16).astype(np.int32)}
  loss_cfg = ml_collections.ConfigDict(dict(kd_weight=0.0, ce_weight=1.0))
  step = jax.jit(train_step.make_train_step(model, tx, loss_cfg, None))
  new_state, metrics = step(state, batch, {})
  assert bool(metrics["finite"])
  floats = [x.dtype for x in jax.tree.leaves(
      (new_state.params, new_state.batch_stats, new_state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and set(floats) == {jnp.dtype(jnp.float32)}
  assert metrics["train/loss"].dtype == jnp.float32
  logits = model.apply(new_state.variables, batch["image"], train=False)
  assert logits.dtype == jnp.float32  # the classifier runs in float32
  # The activations between layers are bf16 (the BN rounds the conv's
  # float32 sum once).
  _, inter = model.apply(new_state.variables, batch["image"], train=False,
                         capture_intermediates=True, mutable=["intermediates"])
  assert inter["intermediates"]["stem_bn"]["__call__"][0].dtype == BF16


def test_collapse_onto_a_one_hot_teacher_stays_finite_in_bf16():
  """The bf16 step-1 KD bug's scenario through `make_train_step`: a student
  whose logits already match a near one-hot teacher (KD loss 0, CE of the
  random labels ~50, kept at weight 0 as in the recipe), 40 Adam steps on one
  fixed batch in bfloat16: every step finite, KD stays ~0."""
  model = _tiny_student(BF16)
  tx = _step1_optimizer()
  bias = jnp.zeros(10).at[3].set(50.0)
  state = _state(model, tx, (8, 8, 1), bias=bias)
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(32, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, 32).astype(np.int32)}
  teacher = OneHotTeacher(num_classes=10)
  step = jax.jit(train_step.make_train_step(
      model, tx, losses.default_loss_config(), teacher))
  kd = []
  for _ in range(40):
    state, metrics = step(state, batch, {})
    assert bool(metrics["finite"]), jax.device_get(metrics)
    kd.append(float(metrics["train/kd_loss"]))
    assert float(metrics["train/ce_loss"]) > 10
  assert max(kd) < 1e-12  # e^-50 terms: ~1e-19, not exactly 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def _digits_config():
  pytest.importorskip("tensorflow")  # the configs import the input pipeline
  from configs import digits as digits_config
  config = digits_config.get_config()
  config.dataset.data_dir = "/nonexistent"  # build_model reads no data
  return config


def test_phase_dtype_reaches_its_model_and_the_teacher_keeps_its_own():
  config = _digits_config()
  config.model.dtype = "bfloat16"
  config.phases.teacher.model.dtype = "float32"

  build = lambda name: models.from_config(config, config.phases[name].model, 10)
  assert build("teacher").dtype == jnp.float32
  assert build("step1").dtype == BF16  # unset: config.model.dtype
  config.model.dtype = "float32"
  config.phases.step2.model.dtype = "bfloat16"
  assert build("step1").dtype == jnp.float32
  assert build("step2").dtype == BF16
  assert build("teacher").dtype == jnp.float32


def test_bad_phase_dtype_is_refused(tmp_path):
  config = _digits_config()
  config.dataset.data_dir = str(tmp_path)
  config.phases.step1.model.dtype = "float33"
  from bnn_jax.training import phases
  with pytest.raises(ValueError, match=r"config.phases.step1.model.dtype="
                     r"'float33' is not a dtype; use 'float32' or 'bfloat16'"):
    phases.validate(config)


@pytest.mark.parametrize("name", ["adam", "adamw", "lamb", "bop"])
@pytest.mark.parametrize("eps", [0.0, -1e-8])
def test_adaptive_optimizer_eps_must_be_positive(name, eps):
  cfg = dict(name=name, eps=eps)
  if name == "adamw":
    cfg["weight_decay_mode"] = "decoupled"
  with pytest.raises(ValueError, match=rf"optimizer.eps={eps!r}; expected > 0 "
                     rf"for {name} \(default 1e-8\)"):
    optim.resolve_config(cfg)


def test_sgd_eps_zero_is_allowed():
  assert optim.resolve_config(dict(name="sgd", eps=0.0)).eps == 0.0


@pytest.mark.parametrize("epochs,warmup,warns", [
    (1, 0.0, True), (2, 1.0, True), (2, 0.0, False), (3, 1.0, False)])
def test_linear_epoch_over_one_epoch_warns(epochs, warmup, warns):
  cfg = dict(schedule="linear_epoch", warmup_epochs=warmup)
  if warns:
    with pytest.warns(UserWarning, match=r"config.phases.step1: schedule "
                      r"'linear_epoch' over 1 epoch trains at learning rate 0"):
      assert optim.warn_if_no_training(cfg, epochs, "config.phases.step1")
    # What it warns about: every step's learning rate is 0.
    lr = optim.build_schedule(cfg, steps_per_epoch=3, num_epochs=epochs)
    decay_steps = range(3 * int(warmup), 3 * epochs)
    assert [float(lr(t)) for t in decay_steps] == [0.0] * 3
  else:
    assert optim.warn_if_no_training(cfg, epochs) is None
  assert optim.warn_if_no_training(dict(schedule="linear"), 1) is None


@pytest.mark.slow
def test_bf16_eval_of_an_imported_reference_network_tracks_float32():
  """The reference ReActNet-A in torch (quarter width, random weights and
  shifts, BN statistics of 512 random inputs as a checkpoint's would be),
  imported and evaluated on 256 other inputs in bfloat16 and float32.

  A random binary network is chaotic: float32 itself changes ~11% of its
  top-1 predictions under a 1e-3 relative input perturbation, and ~15% when
  only its input is rounded to bfloat16, so the bfloat16 model cannot agree
  with float32 on 99% here (a trained network can: docs/performance.md).
  What the policy must guarantee: the bfloat16 computation adds little to
  the unavoidable input rounding (agreement within 5 points of it), and
  float32 matches torch on every prediction."""
  torch = pytest.importorskip("torch")
  from bnn_jax.interop import torch_import
  from bnn_jax.interop import torch_reference

  channels = [c // 4 for c in torch_reference.REACTNET_A_CHANNELS]
  strides = torch_reference.reference_strides(
      torch_reference.REACTNET_A_CHANNELS)
  torch.manual_seed(0)
  net = torch_reference.ReActNet(10, channels, strides=strides)
  state = {}
  for key, value in net.state_dict().items():
    state[key] = value if key.endswith("num_batches_tracked") else (
        torch.randn(value.shape))
  net.load_state_dict(state, strict=True)
  rng = np.random.default_rng(0)
  calibration = rng.normal(size=(512, 3, 32, 32)).astype(np.float32)
  x = rng.normal(size=(256, 32, 32, 3)).astype(np.float32)
  for module in net.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.reset_running_stats()
      module.momentum = None  # running stats = this batch's
  with torch.no_grad():
    net.train()(torch.from_numpy(calibration))
    torch_top1 = net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))
                            ).argmax(-1).numpy()
  variables = torch_import.load(
      {k: v.numpy() for k, v in net.state_dict().items()}, "reactnet_a",
      width_multiplier=0.25)

  def top1(dtype, images):
    model = models.create("reactnet_a", num_classes=10, width_multiplier=0.25,
                          zero_to=0.0, dtype=dtype)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                                 images)
    assert logits.dtype == jnp.float32
    return np.asarray(jnp.argmax(logits, -1))

  f32 = top1(jnp.float32, x)
  assert len(set(f32.tolist())) > 3  # not a constant predictor
  np.testing.assert_array_equal(f32, torch_top1)
  rounded_input = np.mean(top1(jnp.float32, np.asarray(
      jnp.asarray(x).astype(BF16).astype(jnp.float32))) == f32)
  bf16 = np.mean(top1(BF16, x) == f32)
  assert bf16 >= rounded_input - 0.05, (bf16, rounded_input)
