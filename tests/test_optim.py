"""Tests of bnn_jax.optim: decay modes and groups, schedules, Bop, partition."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_jax import losses
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import train_step

BASE_LR = 1e-2
WD = 0.1  # large, so that the decay is visible in a few steps
# Leaves of the toy tree that the reference group decays.
DECAYED = {"stem_conv/kernel", "block_1/binary_3x3/kernel",
           "block_1/binary_pw/kernel", "block_1/move11/shift",
           "block_1/rprelu1/shift_in", "block_1/rprelu1/shift_out"}


def toy_params():
  """A miniature ReActNet parameter tree, every kind of leaf once."""
  shapes = {
      "stem_conv": {"kernel": (3, 3, 2, 3)},
      "stem_bn": {"scale": (3,), "bias": (3,)},
      "block_1": {
          "move11": {"shift": (3,)},
          "binary_3x3": {"kernel": (3, 3, 3, 3)},
          "bn1": {"scale": (3,), "bias": (3,)},
          "rprelu1": {"shift_in": (3,), "slope": (3,), "shift_out": (3,)},
          "binary_pw": {"kernel": (1, 1, 3, 3)},
      },
      "fc": {"kernel": (3, 2), "bias": (2,)},
  }
  leaves, treedef = jax.tree.flatten(shapes,
                                     is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def toy_grads(step):
  return jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(100 + step), p.shape),
      toy_params())


def names_and_leaves(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator="/"): leaf
          for p, leaf in flat}


def run(tx, num_steps=3):
  """Applies `num_steps` updates with toy_grads; returns the parameters."""
  params = toy_params()
  state = tx.init(params)
  for step in range(num_steps):
    updates, state = tx.update(toy_grads(step), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def adam_config(**overrides):
  cfg = dict(name="adam", learning_rate=BASE_LR, weight_decay=WD,
             schedule="linear_epoch")
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------------------
# Weight decay: coupled (reference) and decoupled (AdamW).


@pytest.mark.slow
def test_coupled_equals_torch_adam_with_l2():
  """3 steps of torch.optim.Adam(weight_decay=WD) semantics, by hand."""
  # One step per epoch: the lr changes every step, base * (1 - (t + 1) / 4).
  tx = optim.build_optimizer(adam_config(weight_decay_mode="coupled"),
                             steps_per_epoch=1, num_epochs=4)
  got, _ = run(tx)

  b1, b2, eps = 0.9, 0.999, 1e-8
  params = {n: np.asarray(v, np.float64)
            for n, v in names_and_leaves(toy_params()).items()}
  m = {n: np.zeros_like(v) for n, v in params.items()}
  v = {n: np.zeros_like(x) for n, x in params.items()}
  for step in range(3):
    lr = BASE_LR * (1 - (step + 1) / 4)
    grads = names_and_leaves(toy_grads(step))
    for n in params:
      g = np.asarray(grads[n], np.float64)
      if n in DECAYED:
        g = g + WD * params[n]  # torch: grad = grad.add(param, alpha=wd)
      m[n] = b1 * m[n] + (1 - b1) * g
      v[n] = b2 * v[n] + (1 - b2) * g * g
      t = step + 1
      denom = np.sqrt(v[n]) / np.sqrt(1 - b2**t) + eps
      params[n] = params[n] - lr / (1 - b1**t) * m[n] / denom
  for n, leaf in names_and_leaves(got).items():
    np.testing.assert_allclose(leaf, params[n], rtol=1e-5, atol=1e-7,
                               err_msg=n)


def test_coupled_decays_exactly_the_reference_leaves():
  with_wd, _ = run(optim.build_optimizer(
      adam_config(weight_decay_mode="coupled"), steps_per_epoch=1,
      num_epochs=4))
  no_wd, _ = run(optim.build_optimizer(
      adam_config(weight_decay_mode="coupled", weight_decay=0.0),
      steps_per_epoch=1, num_epochs=4))
  with_wd, no_wd = names_and_leaves(with_wd), names_and_leaves(no_wd)
  changed = {n for n in with_wd if not np.array_equal(with_wd[n], no_wd[n])}
  assert changed == DECAYED


def test_decoupled_equals_optax_adamw():
  cfg = adam_config(weight_decay_mode="decoupled")
  mask = optim.weight_decay_mask(toy_params(), cfg)
  assert {n for n, sel in names_and_leaves(mask).items() if sel} == DECAYED
  schedule = optim.build_schedule(cfg, steps_per_epoch=1, num_epochs=4)
  expected, _ = run(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                                weight_decay=WD, mask=mask))
  got, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, expected)
  coupled, _ = run(optim.build_optimizer(
      adam_config(weight_decay_mode="coupled"), steps_per_epoch=1,
      num_epochs=4))
  assert not np.allclose(coupled["stem_conv"]["kernel"],
                         got["stem_conv"]["kernel"], rtol=1e-6, atol=0)


def test_sgd_coupled_equals_torch_sgd_momentum():
  cfg = dict(name="sgd", learning_rate=BASE_LR, weight_decay=WD,
             weight_decay_mode="coupled", momentum=0.9, schedule="constant")
  got, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4))
  params = {n: np.asarray(v, np.float64)
            for n, v in names_and_leaves(toy_params()).items()}
  buf = {n: np.zeros_like(v) for n, v in params.items()}
  for step in range(3):
    grads = names_and_leaves(toy_grads(step))
    for n in params:
      g = np.asarray(grads[n], np.float64) + (WD * params[n]
                                              if n in DECAYED else 0.0)
      buf[n] = 0.9 * buf[n] + g
      params[n] = params[n] - BASE_LR * buf[n]
  for n, leaf in names_and_leaves(got).items():
    np.testing.assert_allclose(leaf, params[n], rtol=1e-5, atol=1e-7,
                               err_msg=n)


# ---------------------------------------------------------------------------
# The decay group on ReActNet-A.


@pytest.fixture(scope="module")
def reactnet_a_params():
  model = models.create("reactnet_a")
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return variables["params"]


def decayed_elements(params, mask):
  return sum(int(np.prod(p.shape)) for p, sel in
             zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if sel)


def test_reference_mask_on_reactnet_a(reactnet_a_params):
  params = reactnet_a_params
  mask = optim.weight_decay_mask(params, optim.default_optimizer_config())
  assert decayed_elements(params, mask) == 28_285_792
  assert sum(int(np.prod(p.shape))
             for p in jax.tree.leaves(params)) == 29_343_592
  leaves = names_and_leaves(params)
  selected = {n for n, sel in names_and_leaves(mask).items() if sel}
  for name, leaf in leaves.items():
    last = name.rsplit("/", 1)[-1]
    is_group = leaf.ndim == 4 or last in ("shift", "shift_in", "shift_out")
    assert (name in selected) == is_group, name
  assert "stem_conv/kernel" in selected
  assert "block_13/binary_pw/kernel" in selected
  assert "block_2/binary_pw_down2/kernel" in selected
  assert "block_5/move21/shift" in selected
  for excluded in ("fc/kernel", "fc/bias", "stem_bn/scale", "block_1/bn1/bias",
                   "block_1/rprelu2/slope"):
    assert excluded not in selected, excluded


def test_regex_override(reactnet_a_params):
  params = reactnet_a_params
  cfg = dict(decay_regexes=("fc/kernel", r"block_\d+/move11/shift"))
  mask = optim.weight_decay_mask(params, cfg)
  in_channels = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512,
                 1024)
  assert decayed_elements(params, mask) == 1024 * 1000 + sum(in_channels)
  with pytest.raises(ValueError, match="match no parameter"):
    optim.weight_decay_mask(params, dict(decay_regexes=("fc/kernal",)))


# ---------------------------------------------------------------------------
# Schedules.


def schedule_values(steps_per_epoch=5, num_epochs=8, **cfg):
  schedule = optim.build_schedule(
      dict(learning_rate=BASE_LR, **cfg), steps_per_epoch=steps_per_epoch,
      num_epochs=num_epochs)
  return np.array([schedule(t) for t in
                   range(steps_per_epoch * num_epochs + 2)])


def test_linear_epoch_schedule_matches_spec():
  lr = schedule_values(schedule="linear_epoch")  # S = 5, E = 8
  np.testing.assert_allclose(lr[0:5], BASE_LR * (1 - 1 / 8), rtol=1e-6)
  np.testing.assert_allclose(lr[5:10], BASE_LR * (1 - 2 / 8), rtol=1e-6)
  np.testing.assert_allclose(lr[30:35], BASE_LR * (1 - 7 / 8),
                             rtol=1e-6)
  np.testing.assert_array_equal(lr[35:], 0.0)  # epoch E - 1, and after
  for e in range(8):  # constant within each epoch
    assert len(set(lr[5 * e:5 * e + 5].tolist())) == 1


def test_linear_epoch_warmup():
  lr = schedule_values(schedule="linear_epoch", warmup_epochs=1.0)
  np.testing.assert_allclose(lr[:5], BASE_LR * np.arange(5) / 5, rtol=1e-6)
  # The decay then runs over the remaining 7 epochs.
  np.testing.assert_allclose(lr[5:10], BASE_LR * (1 - 1 / 7), rtol=1e-6)
  np.testing.assert_array_equal(lr[35:], 0.0)
  with pytest.raises(ValueError, match="whole number"):
    schedule_values(schedule="linear_epoch", warmup_epochs=0.5)


def test_cosine_linear_constant_and_warmup():
  lr = schedule_values(schedule="cosine")  # T = 40
  np.testing.assert_allclose([lr[0], lr[20], lr[40]], [BASE_LR, BASE_LR / 2, 0],
                             rtol=1e-6, atol=1e-12)
  lr = schedule_values(schedule="cosine", warmup_epochs=2.0)  # W = 10
  np.testing.assert_allclose([lr[0], lr[5], lr[10], lr[25], lr[40]],
                             [0, BASE_LR / 2, BASE_LR, BASE_LR / 2, 0],
                             rtol=1e-6, atol=1e-12)
  lr = schedule_values(schedule="linear")
  np.testing.assert_allclose([lr[0], lr[10], lr[40]],
                             [BASE_LR, BASE_LR * 0.75, 0], rtol=1e-6,
                             atol=1e-12)
  np.testing.assert_allclose(schedule_values(schedule="constant"), BASE_LR)


class _TinyNet(nn.Module):
  """Dense + BatchNorm: the smallest model with params and batch_stats."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(4)(x.reshape((x.shape[0], -1)))
    return nn.BatchNorm(use_running_average=not train)(x)


def _tiny_step(tx, **kwargs):
  """Four jitted train steps of _TinyNet under `tx`; the metrics of each."""
  model = _TinyNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
  batch = {"image": x, "label": jnp.arange(8) % 4}
  variables = model.init(jax.random.PRNGKey(1), x)
  state = train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=tx.init(variables["params"]))
  loss_cfg = losses.default_loss_config()
  loss_cfg.kd_weight, loss_cfg.ce_weight = 0.0, 1.0
  step_fn = jax.jit(train_step.make_train_step(model, tx, loss_cfg, None,
                                               **kwargs))
  out = []
  for _ in range(4):
    state, metrics = step_fn(state, batch, {})
    out.append(jax.device_get(metrics))
  return out


def test_logged_lr_is_the_schedule_for_any_chain():
  cfg = dict(name="optax.lion", learning_rate=BASE_LR, schedule="linear_epoch")
  schedule = optim.build_schedule(cfg, steps_per_epoch=1, num_epochs=4)
  tx = optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4)
  metrics = _tiny_step(tx, learning_rate=schedule)
  # Update n runs at schedule(n) = BASE_LR * (1 - (n + 1) / 4).
  np.testing.assert_allclose([m["train/lr"] for m in metrics],
                             [BASE_LR * 3 / 4, BASE_LR / 2, BASE_LR / 4, 0.0],
                             rtol=1e-6, atol=1e-12)
  assert all(np.isfinite(m["train/loss"]) for m in metrics)
  # A plain optax chain: a constant rate, or no rate when none is given.
  plain = _tiny_step(optax.adam(1e-3), learning_rate=1e-3)
  np.testing.assert_allclose([m["train/lr"] for m in plain], 1e-3)
  assert "train/lr" not in _tiny_step(optax.adam(1e-3))[0]
  # A chain that keeps its rate in the state (inject_hyperparams).
  injected = optax.inject_hyperparams(optax.adam)(learning_rate=schedule)
  np.testing.assert_allclose([m["train/lr"] for m in _tiny_step(injected)],
                             [schedule(n) for n in range(4)], rtol=1e-6)
  with pytest.raises(ValueError, match="learning_rate"):
    optim.learning_rate(optax.adam(1e-3).init(toy_params()))


# ---------------------------------------------------------------------------
# Any optax chain: dotted paths, the registry, decay around them.


def schedule_of(cfg, steps_per_epoch=1, num_epochs=4):
  return optim.build_schedule(cfg, steps_per_epoch=steps_per_epoch,
                              num_epochs=num_epochs)


def assert_trees_close(a, b, **tolerances):
  a, b = names_and_leaves(a), names_and_leaves(b)
  assert a.keys() == b.keys()
  for n in a:
    np.testing.assert_allclose(a[n], b[n], err_msg=n, **tolerances)


def test_dotted_optax_path_is_the_optax_chain_with_the_schedule():
  cfg = dict(name="optax.lion", kwargs={"b1": 0.8}, learning_rate=BASE_LR,
             schedule="linear_epoch")
  got, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4))
  # optax.lion's own weight decay (default 1e-3) is off: decay is the config's.
  want, _ = run(optax.lion(schedule_of(cfg), b1=0.8, weight_decay=0.0))
  assert_trees_close(got, want, rtol=0, atol=0)
  assert optim.resolve_config(cfg).kwargs.to_dict() == {"b1": 0.8,
                                                        "weight_decay": 0.0}


def test_decay_modes_around_an_optax_chain():
  mask = optim.reference_decay_mask
  cfg = dict(name="optax.lion", learning_rate=BASE_LR, weight_decay=WD,
             schedule="linear_epoch")
  schedule = schedule_of(cfg)
  # decoupled: u - eta_t * lambda * M * w, which is optax.lion's own decay.
  got, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4))
  want, _ = run(optax.lion(schedule, weight_decay=WD, mask=mask))
  assert_trees_close(got, want, rtol=1e-6, atol=1e-9)
  # coupled: lambda * M * w added to the gradient before the chain.
  cfg["weight_decay_mode"] = "coupled"
  got, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4))
  want, _ = run(optax.chain(optax.add_decayed_weights(WD, mask),
                            optax.lion(schedule, weight_decay=0.0)))
  assert_trees_close(got, want, rtol=0, atol=0)


def test_registered_chain_gets_schedule_kwargs_clipping_and_decay():
  def momentum_sgd(learning_rate, momentum=0.0):
    return optax.sgd(learning_rate, momentum=momentum)

  optim.register("test_momentum_sgd", momentum_sgd)
  assert "test_momentum_sgd" in optim.registered()
  cfg = dict(name="test_momentum_sgd", kwargs={"momentum": 0.9},
             learning_rate=BASE_LR, schedule="cosine", grad_clip_norm=1.0,
             weight_decay=WD, weight_decay_mode="coupled")
  got, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4))
  # The same as the built-in sgd with that config (torch semantics).
  sgd = dict(cfg, name="sgd", momentum=0.9)
  del sgd["kwargs"]
  want, _ = run(optim.build_optimizer(sgd, steps_per_epoch=1, num_epochs=4))
  assert_trees_close(got, want, rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="cannot be called"):
    optim.resolve_config(dict(cfg, kwargs={"nesterov": True}))
  with pytest.raises(ValueError, match="cannot register"):
    optim.register("adam", momentum_sgd)
  with pytest.raises(ValueError, match="cannot register"):
    optim.register("optax.mine", momentum_sgd)


def test_lr_mults_scale_the_final_update():
  cfg = adam_config(weight_decay_mode="coupled")
  base, _ = run(optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4),
                num_steps=1)
  got, _ = run(optim.build_optimizer(
      dict(cfg, lr_mults=(("fc/.*", 0.5), ("stem_.*", 0.0))),
      steps_per_epoch=1, num_epochs=4), num_steps=1)
  start = names_and_leaves(toy_params())
  base, got = names_and_leaves(base), names_and_leaves(got)
  for n in start:
    m = 0.5 if n.startswith("fc/") else 0.0 if n.startswith("stem_") else 1.0
    # float32 parameters near 1: the differences carry ~1e-7 rounding.
    np.testing.assert_allclose(got[n] - start[n], m * (base[n] - start[n]),
                               rtol=0, atol=3e-7, err_msg=n)
  tx = optim.build_optimizer(dict(cfg, lr_mults=(("nothing/.*", 2.0),)),
                             steps_per_epoch=1, num_epochs=4)
  with pytest.raises(ValueError, match="match no parameter"):
    tx.init(toy_params())


# ---------------------------------------------------------------------------
# Bop and the partition.


def test_bop_flips_where_momentum_exceeds_threshold_with_same_sign():
  tx = optim.bop(threshold=0.1, gamma=0.5)
  w = jnp.array([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
  g = jnp.array([1.0, -1.0, -1.0, 1.0, 0.1, -0.1])
  state = tx.init(w)
  updates, state = tx.update(g, state, w)
  # m = 0.5 * g: |m| > 0.1 for the first four; same sign for 0, 1, 4, 5.
  np.testing.assert_allclose(state.momentum, 0.5 * g)
  np.testing.assert_array_equal(updates, [-2.0, 2.0, 0, 0, 0, 0])
  w = optax.apply_updates(w, updates)
  np.testing.assert_array_equal(w, [-1.0, 1.0, 0.5, -0.5, 1.0, -1.0])
  # Zero gradient: m halves; the flipped weights now disagree with m.
  updates, state = tx.update(jnp.zeros(6), state, w)
  np.testing.assert_allclose(state.momentum, 0.25 * g)
  np.testing.assert_array_equal(updates, 0.0)
  # A gradient of the new sign flips the first weight back.
  updates, state = tx.update(jnp.array([-1.0, 0, 0, 0, 0, 0]), state, w)
  np.testing.assert_allclose(state.momentum[0], 0.125 - 0.5)
  np.testing.assert_array_equal(updates, [2.0, 0, 0, 0, 0, 0])


def test_bop_partition_applies_bop_to_binary_kernels_only():
  labels = names_and_leaves(optim.bop_labels(toy_params()))
  assert {n for n, lab in labels.items() if lab == "bop"} == {
      "block_1/binary_3x3/kernel", "block_1/binary_pw/kernel"}
  cfg = dict(name="bop", learning_rate=BASE_LR, bop_threshold=0.0,
             bop_gamma=1e-4, weight_decay=WD, weight_decay_mode="coupled",
             schedule="constant")
  params = toy_params()
  tx = optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4)
  updates, _ = tx.update(toy_grads(0), tx.init(params), params)
  adam = optim.build_optimizer(dict(cfg, name="adam"), steps_per_epoch=1,
                               num_epochs=4)
  adam_updates, _ = adam.update(toy_grads(0), adam.init(params), params)
  updates, adam_updates = (names_and_leaves(updates),
                           names_and_leaves(adam_updates))
  leaves, grads = names_and_leaves(params), names_and_leaves(toy_grads(0))
  for n, u in updates.items():
    if labels[n] == "bop":  # tau = 0: flip wherever sign(g) == sign(w)
      flip = np.sign(grads[n]) == np.sign(leaves[n])
      np.testing.assert_array_equal(u, np.where(flip, -2 * leaves[n], 0.0))
    else:
      np.testing.assert_array_equal(u, adam_updates[n], err_msg=n)
  with pytest.raises(ValueError, match="no binary kernel"):
    optim.bop_labels({"fc": {"kernel": jnp.ones((2, 2))}})


def test_bop_with_any_chain_for_the_rest():
  cfg = dict(name="bop", bop_rest="optax.lion", learning_rate=BASE_LR,
             bop_threshold=0.0, schedule="constant")
  params = toy_params()
  tx = optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=4)
  updates = names_and_leaves(tx.update(toy_grads(0), tx.init(params),
                                       params)[0])
  lion = optax.lion(BASE_LR, weight_decay=0.0)
  lion_updates = names_and_leaves(
      lion.update(toy_grads(0), lion.init(params), params)[0])
  labels = names_and_leaves(optim.bop_labels(params))
  leaves, grads = names_and_leaves(params), names_and_leaves(toy_grads(0))
  for n, u in updates.items():
    if labels[n] == "bop":
      flip = np.sign(grads[n]) == np.sign(leaves[n])
      np.testing.assert_array_equal(u, np.where(flip, -2 * leaves[n], 0.0))
    else:  # lion is elementwise: the partition changes nothing
      np.testing.assert_array_equal(u, lion_updates[n], err_msg=n)


# ---------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("cfg, message", [
    (dict(name="adamx"),
     r"optimizer.name='adamx'; choose one of \['adam', 'adamw', 'sgd', "
     r"'lamb', 'bop'\], a registered name .* or a dotted optax path"),
    (dict(name="optax.no_such_optimizer"), "dotted optax path"),
    (dict(name="optax.GradientTransformation"), "not an optax function"),
    (dict(name="bop", bop_rest="optax.nope"), "optimizer.bop_rest="),
    (dict(name="bop", bop_rest="bop"), "Bop trains binary kernels only"),
    (dict(name="adam", kwargs={"b1": 0.5}), "built-in 'adam' takes its own"),
    (dict(name="optax.lion", kwargs={"beta": 0.5}), "cannot be called as"),
    (dict(lr_mults="fc/.*"), "pairs"),
    (dict(lr_mults=(("fc/.*", -1.0),)), "pairs"),
    (dict(schedule="staircase"), "choose one of"),
    (dict(weight_decay_mode="l2"), "choose one of"),
    (dict(learning_rate=0.0), "> 0"),
    (dict(weight_decay=-1.0), ">= 0"),
    (dict(lr=1e-3), "unknown optimizer field"),
    (dict(name="adamw", weight_decay_mode="coupled"), "decoupled"),
    (dict(decay_regexes="fc/kernel"), "tuple of regexes"),
])
def test_bad_configs_raise(cfg, message):
  with pytest.raises(ValueError, match=message):
    optim.build_optimizer(cfg, steps_per_epoch=1, num_epochs=1)


def test_defaults_fill_missing_fields():
  cfg = optim.resolve_config(dict(name="sgd"))
  defaults = optim.default_optimizer_config()
  assert cfg.name == "sgd"
  assert cfg.weight_decay_mode == "decoupled" == defaults.weight_decay_mode
  assert cfg.decay_regexes is None and cfg.grad_clip_norm is None
