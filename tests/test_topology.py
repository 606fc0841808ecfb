"""Batches on any topology: shipped configs on 1..256 devices, padded evaluation."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from bnn_jax import train_step
from bnn_jax.training import input_pipeline
from bnn_jax.training import topology

# (devices, processes): one device, GPU nodes, two 1-GPU hosts, 4 nodes x 8
# GPUs (SLURM), 32 hosts x 8 devices.
_TOPOLOGIES = [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (32, 4), (256, 32)]
_CONFIGS = ("adambnn_imagenet", "reactnet_a_imagenet", "cifar10", "digits",
            "digits_adam_vs_sgd", "digits_weight_decay")
# Train batches that do not split over 256 devices (B < 256): refused with
# the fix named, never rounded (B sets what is learned).
_TOO_SMALL_FOR_256 = {"cifar10": 128, "digits": 64, "digits_adam_vs_sgd": 64,
                      "digits_weight_decay": 64}


@pytest.mark.parametrize("name", _CONFIGS)
@pytest.mark.parametrize("devices,processes", _TOPOLOGIES)
def test_shipped_configs_on_any_topology(name, devices, processes):
  config = importlib.import_module(f"configs.{name}").get_config()
  if devices == 256 and name in _TOO_SMALL_FOR_256:
    batch = _TOO_SMALL_FOR_256[name]
    with pytest.raises(ValueError, match=(
        rf"^config.batch_size={batch} must be a positive multiple of the "
        r"device count 256; set --config.batch_size=<multiple of 256> \(e.g. "
        r"256, scaling the learning rates with it\) or run on fewer devices$")):
      topology.batch_layout(config, devices, processes)
    return
  layout = topology.batch_layout(config, devices, processes)
  assert layout.per_device_batch * devices == config.batch_size
  assert layout.per_process_batch * processes == config.batch_size
  # The eval batch: the smallest multiple of the devices >= the config's.
  assert layout.eval_batch_size % devices == 0
  assert 0 <= layout.eval_batch_size - config.eval_batch_size < devices
  assert layout.per_device_eval_batch * devices == layout.eval_batch_size


def test_eval_batch_rounding():
  assert [topology.padded_eval_batch_size(500, d)
          for d in (1, 2, 4, 8, 32, 256)] == [500, 500, 500, 504, 512, 512]
  assert topology.padded_eval_batch_size(1, 8) == 8
  with pytest.raises(ValueError, match=r"eval_batch_size=0 must be a "
                     "positive integer"):
    topology.padded_eval_batch_size(0, 8)


class _Linear(nn.Module):
  """A fixed random linear classifier on the flattened 8x8 digits."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_eval_batch_not_a_multiple_of_the_devices(digits_cfg):
  """Batch 100 on 8 devices (-> 104) and on 1 device: the same counts."""
  assert jax.device_count() == 8
  model = _Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  totals = {}
  for devices in (8, 1):
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batches = list(input_pipeline.eval_iterator(
        digits_cfg, global_batch_size=100, sharding=sharding))
    assert [b["image"].shape[0] for b in batches] == (
        [104] * 4 if devices == 8 else [100] * 4)
    # Every example once: 360 unmasked rows, the rest masked fillers.
    assert sum(int(np.asarray(b["mask"]).sum()) for b in batches) == 360
    eval_step = jax.jit(train_step.make_eval_step(model))
    totals[devices] = train_step.evaluate(
        eval_step, jax.device_put(variables, NamedSharding(mesh, P())),
        batches)
  assert totals[8]["eval/count"] == totals[1]["eval/count"] == 360
  # Integer hit counts over the same 360 examples: equal, and not trivial.
  assert totals[8]["eval/top1"] == totals[1]["eval/top1"]
  assert totals[8]["eval/top5"] == totals[1]["eval/top5"]
  assert 0 < totals[1]["eval/top1"] < 1
  np.testing.assert_allclose(totals[8]["eval/loss"], totals[1]["eval/loss"],
                             rtol=1e-6)
