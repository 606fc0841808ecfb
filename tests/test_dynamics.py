"""Weight-dynamics metrics on hand-made trees with known answers; the hook."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_jax import dynamics
from bnn_jax import layers
from bnn_jax import optim
from bnn_jax.tools import analyze


def _tree(k1, k2, stem=(0.0,), scale=(1.0,)):
  """Two binary kernels (4 and 2 weights), a real stem kernel and a BN scale."""
  return {
      "stem_conv": {"kernel": jnp.array(stem, jnp.float32)},
      "block_1": {
          "binary_3x3": {"kernel": jnp.array(k1, jnp.float32)},
          "bn1": {"scale": jnp.array(scale, jnp.float32)},
          "binary_pw": {"kernel": jnp.array(k2, jnp.float32)},
      },
  }


L1, L2 = "block_1/binary_3x3", "block_1/binary_pw"


def test_binary_kernels_selects_binary_convs_and_is_idempotent():
  tree = _tree([1, 2, 3, 4], [5, 6])
  kernels = dynamics.binary_kernels(tree)
  assert sorted(kernels) == [f"{L1}/kernel", f"{L2}/kernel"]
  assert dynamics.binary_kernels(kernels).keys() == kernels.keys()
  assert dynamics.layer_name(f"{L1}/kernel") == L1


def test_flip_ratio_counts_sign_changes_with_sign0_plus():
  before = _tree([0.5, -0.5, 0.0, 2.0], [1.0, -1.0], stem=(1.0,))
  # Layer 1: 0.5 -> -0.1 flips; -0.5 -> -3 stays; +0 -> -0.0 stays (both +1
  # as sign(0) = +1); 2 -> 1e-9 stays. Layer 2: both flip. The stem (not
  # binary) flipping and the BN scale changing do not count.
  after = _tree([-0.1, -3.0, -0.0, 1e-9], [-1.0, 0.0], stem=(-1.0,),
                scale=(5.0,))
  ff = dynamics.flip_ratio(before, after)
  assert ff == {L1: 0.25, L2: 1.0, dynamics.OVERALL: 0.5}  # (1 + 2) / 6
  # Signs snapshots stand for the trees.
  assert dynamics.flip_ratio(dynamics.binary_signs(before), after) == ff
  assert dynamics.flip_ratio(before, before)[dynamics.OVERALL] == 0.0


def test_c2i_is_one_minus_the_flips_from_the_reference():
  init = _tree([1.0, 1.0, 1.0, 1.0], [1.0, 1.0])
  now = _tree([1.0, -1.0, -1.0, -1.0], [0.5, 0.3])
  assert dynamics.c2i(now, init) == {L1: 0.25, L2: 1.0,
                                     dynamics.OVERALL: 0.5}  # 3 / 6 kept


def test_outside_window_is_exclusive_at_the_clip():
  params = _tree([1.0, -1.0, 1.5, -2.0], [0.0, 1.0000001], stem=(9.0,))
  assert dynamics.outside_window_fraction(params) == {
      L1: 0.5, L2: 0.5, dynamics.OVERALL: 0.5}  # |w| = 1 gets a gradient


def test_dead_fraction_is_relative_to_the_layer_mean():
  # Layer 1: mean |g| = (0 + 1e-4 + 1 + 3) / 4 ~ 1.0; threshold 1e-3 * that:
  # 0 and 1e-4 are dead. Layer 2: no gradient at all, so every weight is.
  grads = _tree([0.0, -1e-4, 1.0, -3.0], [0.0, 0.0])
  assert dynamics.dead_fraction(grads, 1e-3) == {
      L1: 0.5, L2: 1.0, dynamics.OVERALL: 4 / 6}
  assert dynamics.dead_fraction(grads, 0.3)[L1] == 0.5
  assert dynamics.dead_fraction(grads, 1.0)[L1] == 0.75  # 1 <= 1.000025
  assert dynamics.zero_grad_fraction(grads) == {
      L1: 0.25, L2: 1.0, dynamics.OVERALL: 0.5}


class _TwoConvs(nn.Module):
  """Two 1x1 binary convs on different inputs (8 and 4 binarised values)."""
  binarizer: str = "approx_sign"

  @nn.compact
  def __call__(self, a, b):
    conv = lambda name: layers.BinaryConv(  # noqa: E731
        1, kernel_size=1, input_binarizer=self.binarizer, name=name)
    return conv("binary_a")(a).sum() + conv("binary_b")(b).sum()


def _inputs():
  a = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.5, 0.99, 1.0, 2.0]).reshape(
      1, 2, 4, 1)
  b = jnp.array([0.999, 0.2, 3.0, 0.0]).reshape(1, 2, 2, 1)  # all >= 0
  return a, b


def test_saturated_fraction_from_the_forward_pass():
  model = _TwoConvs()
  a, b = _inputs()
  variables = model.init(jax.random.key(0), a, b)
  _, state = model.apply(variables, a, b, mutable=["intermediates"])
  # approx_sign passes no gradient at |x| >= 1: a has -1.5, -1, 1, 2 (4 of
  # 8); b has 3.0 (1 of 4). Overall 5 of 12.
  sat = dynamics.saturated_fraction(state["intermediates"])
  assert sat == {"binary_a": 0.5, "binary_b": 0.25,
                 dynamics.OVERALL: np.float32(5 / 12)}
  # b's one channel binarises to +1 everywhere (sign(0) = +1); a's does not.
  assert dynamics.constant_channel_fraction(state["intermediates"]) == {
      "binary_a": 0.0, "binary_b": 1.0, dynamics.OVERALL: 0.5}
  # ste_sign (clip 1, inclusive): only |x| > 1 saturates: -1.5, 2 and 3.
  model = _TwoConvs(binarizer="ste_sign")
  _, state = model.apply(variables, a, b, mutable=["intermediates"])
  assert dynamics.saturated_fraction(state["intermediates"])[
      dynamics.OVERALL] == 0.25


def test_saturation_is_only_computed_when_asked_and_params_are_unchanged():
  model = _TwoConvs()
  a, b = _inputs()
  variables = model.init(jax.random.key(0), a, b)
  assert set(variables) == {"params"}  # nothing sown at init
  y, state = model.apply(variables, a, b, mutable=["intermediates"])
  assert y == model.apply(variables, a, b)
  assert set(state) == {"intermediates"}
  with pytest.raises(ValueError, match="mutable"):
    dynamics.saturated_fraction({})


def _adam_state_after(grads, params, name="adam"):
  tx = optim.build_optimizer({"name": name}, steps_per_epoch=1, num_epochs=1)
  state = tx.init(params)
  _, state = tx.update(grads, state, params)
  return state


def test_adam_second_moment_for_dead_and_live_weights():
  params = _tree([0.1, 0.1, 0.1, 0.1], [0.1, 0.1])
  grads = _tree([0.0, -1e-4, 1.0, -3.0], [0.0, 0.0])
  nu = dynamics.adam_second_moment(_adam_state_after(grads, params))
  # After one update v = (1 - b2) g^2 = 1e-3 g^2.
  np.testing.assert_allclose(nu[f"{L1}/kernel"],
                             1e-3 * np.array([0.0, 1e-8, 1.0, 9.0]),
                             rtol=1e-6)
  stats = dynamics.second_moment_by_deadness(
      nu, dynamics.dead_mask(grads, 1e-3))
  # Dead: 0, 1e-4 (layer 1) and both of layer 2; live: 1 and -3.
  np.testing.assert_allclose(stats["adam_v_dead"], 1e-3 * 1e-8 / 4,
                             rtol=1e-6)
  np.testing.assert_allclose(stats["adam_v_live"], 1e-3 * (1 + 9) / 2,
                             rtol=1e-6)
  # LAMB has Adam's moments too; SGD has none; Bop keeps no v for the
  # binary kernels (they are the Bop partition).
  assert dynamics.adam_second_moment(
      _adam_state_after(grads, params, "lamb")) is not None
  assert dynamics.adam_second_moment(
      _adam_state_after(grads, params, "sgd")) is None
  assert dynamics.adam_second_moment(
      _adam_state_after(grads, params, "bop")) is None


def test_weight_dynamics_names_and_jit():
  params = _tree([0.5, -0.5, 0.0, 2.0], [1.0, -1.0])
  grads = _tree([0.0, -1e-4, 1.0, -3.0], [0.0, 0.0])
  opt_state = _adam_state_after(grads, params)
  init = _tree([1.0, 1.0, 1.0, 1.0], [1.0, 1.0])
  fn = jax.jit(lambda p, g, o, prev, i: dynamics.weight_dynamics(
      p, g, o, {}, previous=prev, init=i, start=prev))
  out = fn(params, grads, opt_state, dynamics.binary_signs(init),
           dynamics.binary_signs(init))
  assert set(out) == {
      f"{m}{suffix}" for m in ("flip_ratio", "c2i", "c2i_phase",
                               "outside_window", "dead_fraction",
                               "zero_grad_fraction")
      for suffix in ("", f"/{L1}", f"/{L2}")} | {"adam_v_dead",
                                                 "adam_v_live"}
  assert out["flip_ratio"] == 1 / 3  # -0.5 and -1 flipped from +
  assert out["c2i"] == 1 - out["flip_ratio"]
  assert out["outside_window"] == 1 / 6 and out["dead_fraction"] == 4 / 6
  overall = dynamics.weight_dynamics(params, grads, optax.EmptyState(), {},
                                     previous=None, init=init, start=init,
                                     per_layer=False)
  assert set(overall) == {"c2i", "c2i_phase", "outside_window",
                          "dead_fraction", "zero_grad_fraction"}


# ---------------------------------------------------------------------------
# The hook in a short training run, and `analyze` on its output.
# ---------------------------------------------------------------------------
@pytest.fixture
def dynamics_run(trained_digits):
  """The shared digits run's workdir (conftest): dynamics every 5 steps,
  11 steps per student phase, step2 handed over from step1."""
  return trained_digits.workdir


def test_training_logs_dynamics(dynamics_run):
  records = [json.loads(line) for line in
             open(os.path.join(dynamics_run, "metrics.jsonl"))]
  logged = [r for r in records if "dynamics/flip_ratio" in r]
  # 11 steps per phase, every 5 steps: steps 5 and 10 of each phase.
  assert [(r["phase"], r["step"]) for r in logged] == [
      ("step1", 5), ("step1", 10), ("step2", 5), ("step2", 10)]
  names = set().union(*logged)
  for metric in ("flip_ratio", "c2i", "c2i_phase", "dead_fraction",
                 "saturated_fraction", "constant_channel_fraction",
                 "outside_window", "zero_grad_fraction"):
    assert f"dynamics/{metric}" in names
    assert f"dynamics/{metric}/block_1/binary_3x3" in names
  assert {"dynamics/adam_v_dead", "dynamics/adam_v_live"} <= names
  for r in logged:
    for name, value in r.items():
      if name.startswith("dynamics/") and "adam_v" not in name:
        assert 0.0 <= value <= 1.0, (name, value)
  step1, step2 = logged[1], logged[3]
  # The initial weights are all positive and 10 Adam steps flip some.
  assert step1["dynamics/c2i"] == step1["dynamics/c2i_phase"] < 1.0
  # Step 2 inherits step 1's initialisation: C2I against it differs from
  # C2I against step 2's own start.
  assert step2["dynamics/c2i"] != step2["dynamics/c2i_phase"]
  signs = {p: np.load(os.path.join(dynamics_run, p, dynamics.SIGNS_FILE))
           for p in ("step1", "step2")}
  for key in signs["step1"].files:
    if key.startswith("init/"):
      np.testing.assert_array_equal(signs["step1"][key], signs["step2"][key])
      assert signs["step1"][key].all()  # U[0, 0.001) is all +1
  events = os.listdir(os.path.join(dynamics_run, "step2"))
  assert any(f.startswith("events.out.tfevents") for f in events)


def test_analyze_writes_plots_and_report(dynamics_run, tmp_path):
  out = str(tmp_path / "plots")
  analyze.main(["--workdir", dynamics_run, "--compare", dynamics_run,
                "--labels", "a", "b", "--out", out])
  files = sorted(os.listdir(out))
  assert files == sorted(["training.png", "dynamics.png", "report.md"] +
                         [f"layers_{m}.png" for m in analyze.LAYER_METRICS])
  for name in files:
    assert os.path.getsize(os.path.join(out, name)) > 1000
  report = open(os.path.join(out, "report.md")).read()
  assert "| a | step2 |" in report and "![dynamics.png](dynamics.png)" in report
  run = analyze.load_run(dynamics_run, phases=["step2"])
  assert run.phases == ["step2"]
  assert list(run.series["step2"]["dynamics/c2i"][0]) == [5, 10]


@pytest.mark.parametrize("dataset", ["", "cifar10"])
def test_experiment_configs(dataset):
  from configs import digits_adam_vs_sgd, digits_weight_decay  # noqa: PLC0415
  suffix = f",{dataset}" if dataset else ""
  sgd = digits_adam_vs_sgd.get_config("sgd" + suffix)
  assert sgd.dataset.name == (dataset or "digits")
  assert sgd.dynamics.every > 0
  assert (sgd.phases.step2.optimizer.name,
          sgd.phases.step2.optimizer.learning_rate) == ("sgd", 0.1)
  assert sgd.phases.step1.optimizer.name == "adam"
  adam = digits_adam_vs_sgd.get_config("adam,onestep" + suffix)
  assert adam.phase_order == "teacher,step2"
  assert adam.phases.step2.init_from == ""
  assert adam.phases.step2.optimizer.name == "adam"
  wd = digits_weight_decay.get_config("1e-4" + suffix)
  assert wd.phases.step1.optimizer.weight_decay == 1e-4
  assert wd.phases.step1.optimizer.weight_decay_mode == "coupled"
  assert wd.phases.step2.optimizer.weight_decay == 0.0
  with pytest.raises(ValueError, match="unknown config option"):
    digits_adam_vs_sgd.get_config("adamw")
