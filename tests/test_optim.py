"""Tests of bnn_jax.optim: decay modes and groups, schedules, Bop, partition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_jax import models
from bnn_jax import optim

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


def test_learning_rate_read_from_state_equals_schedule():
  cfg = dict(learning_rate=BASE_LR, schedule="linear_epoch", warmup_epochs=1.0)
  schedule = optim.build_schedule(cfg, steps_per_epoch=2, num_epochs=4)
  tx = optim.build_optimizer(cfg, steps_per_epoch=2, num_epochs=4)
  params = toy_params()
  state = tx.init(params)
  assert optim.learning_rate(state) == schedule(0)
  update = jax.jit(tx.update)
  for n in range(1, 8):
    _, state = update(toy_grads(0), state, params)
    # After n updates: the lr of the n-th update, schedule(n - 1).
    np.testing.assert_allclose(optim.learning_rate(state), schedule(n - 1),
                               rtol=1e-7)
  # Also when the optimizer sits inside another chain.
  wrapped = optax.chain(optax.clip(1.0), tx)
  assert optim.learning_rate(wrapped.init(params)) == schedule(0)
  with pytest.raises(ValueError, match="learning_rate"):
    optim.learning_rate(optax.adam(1e-3).init(params))


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


# ---------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize("cfg, message", [
    (dict(name="adamx"), "choose one of"),
    (dict(schedule="step"), "choose one of"),
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
