"""Every shipped config loads, and the reproduction configs are exactly the
paper's recipe (docs/recipe.md#training-recipe)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import models
from bnn_jax import optim
from bnn_jax.configs import adambnn_imagenet
from bnn_jax.configs import reactnet_a_imagenet

CONFIGS = ("digits", "adambnn_imagenet", "reactnet_a_imagenet", "cifar10")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_every_phase(name):
  config = importlib.import_module(f"bnn_jax.configs.{name}").get_config()
  order = config.phase_order.split(",")
  assert order and all(p in config.phases for p in order)
  num_classes = {"digits": 10, "cifar10": 10}.get(name, 1000)
  for phase in order:
    cfg = config.phases[phase]
    model = models.from_config(config, cfg.model, num_classes)
    optim.build_optimizer(cfg.optimizer, steps_per_epoch=10,
                          num_epochs=max(cfg.num_epochs, 1))
    size = {"digits": 8, "cifar10": 32}.get(name, 224)
    shapes = jax.eval_shape(
        lambda m=model: m.init(jax.random.key(0),
                               jnp.zeros((1, size, size, 3)), train=False))
    assert shapes["params"]["fc"]["kernel"].shape[-1] == num_classes


def test_adambnn_imagenet_is_the_paper_recipe():
  config = adambnn_imagenet.get_config()
  assert config.dataset.name == "imagenet2012"
  assert config.batch_size == 256
  assert config.phase_order == "teacher,step1,step2"
  assert config.phases.teacher.model.name == "resnet34"
  assert config.phases.teacher.num_epochs == 0
  for name, wd, binary_weights in (("step1", 5e-6, False),
                                   ("step2", 0.0, True)):
    phase = config.phases[name]
    assert phase.model.name == "reactnet_a"
    assert phase.model.binary_weights is binary_weights
    assert phase.model.binary_activations is True
    assert phase.model.activation_binarizer == "approx_sign"
    assert phase.model.kernel_binarizer == "scaled_sign"
    assert phase.num_epochs == 256
    opt = phase.optimizer
    assert (opt.name, opt.learning_rate, opt.b1, opt.b2, opt.eps) == (
        "adam", 1.25e-3, 0.9, 0.999, 1e-8)
    assert (opt.weight_decay, opt.weight_decay_mode) == (wd, "coupled")
    assert opt.schedule == "linear_epoch" and opt.warmup_epochs == 0
    assert (phase.loss.kd_weight, phase.loss.ce_weight,
            phase.loss.temperature) == (1.0, 0.0, 1.0)
    assert phase.teacher == "teacher"
  assert config.phases.step1.init_from == ""
  assert config.phases.step2.init_from == "previous"
  # The reference lr: epoch e of 256 at 1.25e-3 * (1 - (e + 1) / 256).
  schedule = optim.build_schedule(config.phases.step1.optimizer,
                                  steps_per_epoch=5005, num_epochs=256)
  np.testing.assert_allclose(
      [schedule(0), schedule(5004), schedule(5005), schedule(255 * 5005)],
      [1.25e-3 * 255 / 256, 1.25e-3 * 255 / 256, 1.25e-3 * 254 / 256, 0.0],
      rtol=1e-6)


def test_reactnet_recipe_differs_only_where_the_recipe_says():
  adambnn = adambnn_imagenet.get_config()
  reactnet = reactnet_a_imagenet.get_config()
  assert reactnet.phases.step1.optimizer.weight_decay == 1e-5
  assert reactnet.phases.step1.optimizer.learning_rate == 5e-4
  a, r = adambnn.to_dict(), reactnet.to_dict()
  for step in ("step1", "step2"):
    for key in ("learning_rate", "weight_decay"):
      del a["phases"][step]["optimizer"][key]
      del r["phases"][step]["optimizer"][key]
  assert a == r
