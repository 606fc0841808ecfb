"""Parameter groups (optimizer.groups) and weight clip, against closed forms.

Two groups on a two-leaf tree: Adam on `binary_conv/kernel`, SGD with
momentum on the rest, each with its own warm-up + cosine schedule; the
updates are computed by hand (Adam's first step is -lr * sign(g) up to eps;
SGD's first step is -lr * g).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import optim

GROUPS = (("binary", optim.BINARY_KERNEL_REGEX,
           {"name": "adam", "learning_rate": 1e-2, "weight_clip": 1.25}),
          ("real", ".*", {"name": "sgd", "momentum": 0.9,
                          "learning_rate": 0.1}))
PARAMS = {"block0": {"binary_conv": {"kernel": jnp.array([1.24, -0.5, 0.3])},
                     "bn": {"scale": jnp.array([1.0, 2.0])}}}
GRADS = {"block0": {"binary_conv": {"kernel": jnp.array([-4.0, 0.5, -2.0])},
                    "bn": {"scale": jnp.array([0.5, -1.0])}}}


def _config(**fields):
  return {"schedule": "cosine", "warmup_epochs": 1.0, "groups": GROUPS,
          **fields}


def test_groups_labels_and_errors():
  labels = optim.group_labels(PARAMS, GROUPS)
  assert labels == {"block0": {"binary_conv": {"kernel": "binary"},
                               "bn": {"scale": "real"}}}
  with pytest.raises(ValueError, match="'block0/bn/scale' is in no optimizer "
                     "group"):
    optim.group_labels(PARAMS, GROUPS[:1])
  with pytest.raises(ValueError, match=r"groups \['binary'\] match no"):
    optim.group_labels({"fc": {"kernel": jnp.zeros(2)}}, GROUPS)
  with pytest.raises(ValueError, match=r"groups\['real'\]: .*momentum=1.5"):
    optim.resolve_config(_config(groups=(
        GROUPS[0], ("real", ".*", {"name": "sgd", "momentum": 1.5}))))
  with pytest.raises(ValueError, match="triples"):
    optim.resolve_config(_config(groups=(("a", ".*"),)))


def test_two_optimizers_two_schedules_and_the_clip():
  steps, epochs = 4, 3  # warm-up: 4 steps from 0, then cosine over 8
  cfg = _config()
  tx = optim.build_optimizer(cfg, steps_per_epoch=steps, num_epochs=epochs)
  state = tx.init(PARAMS)
  rates = optim.logged_learning_rate(cfg, steps_per_epoch=steps,
                                     num_epochs=epochs)
  assert set(rates) == {"binary", "real"}
  # Step 0 of the warm-up has rate 0; step 5 is 1 step into the cosine.
  cos = (1 + np.cos(np.pi * 1 / 8)) / 2
  np.testing.assert_allclose([rates["binary"](5), rates["real"](5)],
                             [1e-2 * cos, 0.1 * cos], rtol=1e-6)
  params = PARAMS
  for _ in range(5):  # steps 0-4: rates 0, 1/4, 2/4, 3/4, 1 of the peak
    updates, state = tx.update(GRADS, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  # SGD with momentum 0.9: v_t = 0.9 v + g, w -= lr_t v_t.
  g = np.array([0.5, -1.0])
  lrs = [0.1 * t / 4 for t in range(5)]
  v, w = np.zeros(2), np.array([1.0, 2.0])
  for lr in lrs:
    v = 0.9 * v + g
    w = w - lr * v
  np.testing.assert_allclose(params["block0"]["bn"]["scale"], w, rtol=1e-5)
  # Adam on a constant gradient: m_hat / sqrt(v_hat) = sign(g) every step,
  # then Larq's WeightClip(1.25): |w| <= 1.25.
  w = np.array([1.24, -0.5, 0.3])
  for lr in [1e-2 * t / 4 for t in range(5)]:
    w = np.clip(w - lr * np.sign([-4.0, 0.5, -2.0]), -1.25, 1.25)
  np.testing.assert_allclose(params["block0"]["binary_conv"]["kernel"], w,
                             rtol=1e-5)
  assert float(params["block0"]["binary_conv"]["kernel"][0]) == 1.25


def test_step_schedule_with_warmup():
  """Larq Zoo's R2BStepSchedule: warm-up 5 epochs, x0.3 at 40, 60, 70."""
  cfg = {"schedule": "step", "learning_rate": 2e-4, "warmup_epochs": 5.0,
         "step_epochs": (40, 60, 70), "step_factor": 0.3}
  s = optim.build_schedule(cfg, steps_per_epoch=10, num_epochs=75)
  got = [float(s(t)) for t in (0, 25, 50, 399, 400, 599, 600, 700, 749)]
  want = [0.0, 1e-4, 2e-4, 2e-4, 6e-5, 6e-5, 1.8e-5, 5.4e-6, 5.4e-6]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="needs step_epochs"):
    optim.resolve_config({"schedule": "step"})
