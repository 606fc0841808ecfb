"""Data parallelism: results do not depend on the device or process count.

* The input pipeline's global batches are the same for 1, 2 or 4 processes
  (simulated) when the train split fits the shuffle buffer; per-host shards
  split the data otherwise.
* One train step on 8 devices equals the same step on 1 device (loss,
  gradients, updated parameters and BatchNorm statistics within 1e-5), with
  global and with per-group BatchNorm statistics.
* Evaluation over an odd-sized split on 8 devices counts every example once
  and equals the unsharded computation.
"""

import collections
import functools
import itertools
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bnn_jax import layers
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import train_step
from bnn_jax.training import input_pipeline
from bnn_jax.training import topology

_TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")
_MOCK_EXAMPLES = 10


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def _batches_of_processes(monkeypatch, make_iterator, count, steps):
  """Per step, the batches of `count` simulated processes, concatenated."""
  per_process = []
  for index in range(count):
    _as_process(monkeypatch, index, count)
    per_process.append(_take(make_iterator(), steps))
  _as_process(monkeypatch, 0, 1)
  return [{k: np.concatenate([b[k] for b in step]) for k in step[0]}
          for step in zip(*per_process)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------
# Global batches and the process count.
# ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("start_step", [0, 21])
def test_digits_global_batches_do_not_depend_on_the_process_count(
    digits_cfg, monkeypatch, count, start_step):
  """Augmented digits (a per-batch recipe) across an epoch boundary."""
  make = functools.partial(input_pipeline.train_iterator, digits_cfg,
                           global_batch_size=64, seed=3,
                           start_step=start_step)
  reference = _take(make(), 3)
  _assert_same_batches(
      _batches_of_processes(monkeypatch, make, count, 3), reference)


@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES, data_dir=_TESTDATA,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize("name,overrides", [
    # Per-example recipe (fused JPEG decode + random crop); the mocked split
    # fits the default buffer, so it is shared in global order.
    ("imagenet2012", {"image_size": 16}),
    ("cifar10", {}),  # Per-batch recipe with flips.
])
def test_mocked_global_batches_do_not_depend_on_the_process_count(
    monkeypatch, name, overrides):
  cfg = input_pipeline.default_dataset_config(name)
  cfg.update(overrides)
  make = functools.partial(input_pipeline.train_iterator, cfg,
                           global_batch_size=4, seed=1)
  reference = _take(make(), 5)  # Two and a half epochs.
  _assert_same_batches(_batches_of_processes(monkeypatch, make, 2, 5),
                       reference)


def test_per_host_shards_split_the_train_data(digits_cfg, monkeypatch):
  """A buffer smaller than the split: each process shuffles its own shard."""
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.augment = False
  cfg.shuffle_buffer_size = 100
  def records(batches):
    return collections.Counter(
        image.tobytes() + label.tobytes() for b in batches
        for image, label in zip(b["image"], b["label"]))
  seen = []
  for index in range(2):
    _as_process(monkeypatch, index, 2)
    epoch = _take(input_pipeline.train_iterator(
        cfg, global_batch_size=64, seed=0), 22)
    assert epoch[0]["image"].shape == (32, 8, 8, 1)
    seen.append(records(epoch))
    _as_process(monkeypatch, 0, 1)
    shard = tfds.even_splits("train", n=2, drop_remainder=True)[index]
    split = input_pipeline.eval_iterator(cfg, global_batch_size=2000,
                                         split=shard)
    assert not seen[-1] - records(  # Only examples of its own shard.
        [{k: v[b["mask"]] for k, v in b.items()} for b in split])
  assert sum(seen[0].values()) == sum(seen[1].values()) == 22 * 32
  assert not seen[0] & seen[1]  # Disjoint shards.


class _FakeSharding:
  """Stands for a sharding whose local devices hold the given row blocks."""

  def __init__(self, blocks):
    self._blocks = blocks

  def addressable_devices_indices_map(self, shape):
    del shape
    return {i: (slice(a, b),) for i, (a, b) in enumerate(self._blocks)}


def test_process_slot_follows_the_sharding(monkeypatch):
  mesh = topology.make_mesh()
  sharding = NamedSharding(mesh, P("data"))
  assert input_pipeline._process_slot(16, sharding) == (0, 1)
  _as_process(monkeypatch, 0, 2)
  # This process's devices hold rows 8..15: it feeds the second block.
  assert input_pipeline._process_slot(
      16, _FakeSharding([(8, 12), (12, 16)])) == (1, 2)
  with pytest.raises(ValueError, match="not one block of 8"):
    input_pipeline._process_slot(16, _FakeSharding([(0, 4), (8, 12)]))
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    input_pipeline._process_slot(15, None)


def test_make_mesh_orders_devices_by_process():
  class Device:
    def __init__(self, process_index, id_):
      self.process_index, self.id = process_index, id_
  devices = [Device(p, i) for i, p in enumerate([1, 0, 1, 0])]
  mesh = topology.make_mesh(devices)
  assert [(d.process_index, d.id) for d in mesh.devices] == [
      (0, 1), (0, 3), (1, 0), (1, 2)]
  assert mesh.axis_names == ("data",)


# ---------------------------------------------------------------------------
# One train step: 8 devices vs 1 device.
# ---------------------------------------------------------------------------
_BATCH = 32  # 4 examples per device on 8 devices.


def _step_outputs(model, tx, loss_cfg, state, batch, devices):
  """Loss, gradients and the next state of one step on a `data` mesh.

  One jitted function holds both the gradient and `train_step.make_train_step`
  (one compilation per mesh).
  """
  mesh = topology.make_mesh(devices)
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  loss_fn = train_step.make_loss_fn(model, loss_cfg)
  step_fn = train_step.make_train_step(model, tx, loss_cfg, None)

  def step(state, batch):
    (loss, (batch_stats, _, _)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state.batch_stats, batch, None)
    new_state, metrics = step_fn(state, batch, {})
    return {"loss": loss, "grads": grads, "batch_stats": batch_stats,
            "state": new_state, "metrics": metrics}

  step = jax.jit(step, in_shardings=(replicated, data),
                 out_shardings=replicated)
  return jax.device_get(step(jax.device_put(state, replicated),
                             jax.device_put(batch, data)))


@pytest.mark.parametrize("bn_group_size,optimizer", [(None, "adam"),
                                                     (4, "sgd")])
@pytest.mark.slow
def test_eight_devices_match_one_device(bn_group_size, optimizer):
  """Global and per-group (4 = the per-device batch) BatchNorm statistics."""
  assert jax.device_count() == 8
  # ReActNet-A's stem and 2 blocks (strides 1 and 2), at quarter width.
  model = models.create("reactnet_small", num_classes=10,
                        channels=(32, 64, 128), width_multiplier=0.25,
                        bn_group_size=bn_group_size)
  opt_cfg = optim.default_optimizer_config()
  opt_cfg.name = optimizer
  opt_cfg.schedule = "constant"
  opt_cfg.weight_decay = 5e-6
  opt_cfg.weight_decay_mode = "coupled"
  tx = optim.build_optimizer(opt_cfg, steps_per_epoch=10, num_epochs=1)
  loss_cfg = ml_collections.ConfigDict(dict(kd_weight=0.0, ce_weight=1.0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(_BATCH, 8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 10, _BATCH).astype(np.int32)}
  variables = model.init(jax.random.key(0), batch["image"][:1], train=False)
  # Spread the latent weights (init is uniform[0, 1e-3)) so signs vary.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape),
      variables["params"])
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(params))

  one = _step_outputs(model, tx, loss_cfg, state, batch, jax.devices()[:1])
  eight = _step_outputs(model, tx, loss_cfg, state, batch, jax.devices())
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
  close(eight["loss"], one["loss"])
  assert float(one["loss"]) > 0.5
  jax.tree.map(close, eight["grads"], one["grads"])
  jax.tree.map(close, eight["batch_stats"], one["batch_stats"])
  jax.tree.map(close, eight["state"].batch_stats, one["state"].batch_stats)
  for key in ("train/loss", "train/top1", "train/grad_norm"):
    close(eight["metrics"][key], one["metrics"][key])
  if optimizer == "sgd":  # The update is linear in the gradient.
    jax.tree.map(close, eight["state"].params, one["state"].params)
  else:
    # Adam's first update is lr * g / (|g| + eps): where |g| is within its
    # rounding noise of 0, the reduction order decides the update, whatever
    # the sharding. Elsewhere the updated parameters agree to 1e-5.
    def close_where_resolved(a, b, grad):
      resolved = np.abs(grad) > 1e-5
      close(a[resolved], b[resolved])
      assert np.all(np.abs(a - b) <= 2 * opt_cfg.learning_rate + 1e-6)
      return resolved.sum(), resolved.size
    counts = jax.tree.leaves(jax.tree.map(
        close_where_resolved, eight["state"].params, one["state"].params,
        one["grads"]))
    assert sum(counts[::2]) > 0.9 * sum(counts[1::2])
  # The step moved the parameters.
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)),
                       one["state"].params, jax.device_get(params))
  assert max(jax.tree.leaves(moved)) > 1e-4


def test_group_statistics_are_per_group_of_examples():
  """bn_group_size=4 normalises each group of 4 rows on its own.

  Shuffling the groups' order permutes the output rows accordingly; mixing
  rows across groups changes them (with global statistics it does not).
  """
  x = np.random.default_rng(1).normal(size=(16, 2, 2, 3)).astype(np.float32)
  x += np.repeat(np.arange(4.0), 4)[:, None, None, None]  # Groups differ.
  by_group = np.concatenate([x[8:12], x[:4], x[12:], x[4:8]])
  mixed = x[np.r_[0:2, 4:6, 2:4, 6:16]]
  for group in (4, None):
    bn = layers.BatchNorm(group_size=group)
    variables = bn.init(jax.random.key(0), x, train=False)
    y = lambda v: np.asarray(bn.apply(variables, v, train=True,
                                      mutable=["batch_stats"])[0])
    np.testing.assert_allclose(
        y(by_group), np.concatenate([y(x)[8:12], y(x)[:4], y(x)[12:],
                                     y(x)[4:8]]), atol=1e-5)
    changed = not np.allclose(y(mixed), y(x)[np.r_[0:2, 4:6, 2:4, 6:16]],
                              atol=1e-4)
    assert changed == (group is not None)


# ---------------------------------------------------------------------------
# Evaluation on 8 devices over an odd-sized split.
# ---------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_on_eight_devices_counts_every_example_once(digits_cfg):
  model = models.create("reactnet_small", num_classes=10,
                        channels=(32, 64, 128), width_multiplier=0.25)
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1)),
                         train=False)
  split = "test[:359]"  # Odd: 359 = 5 full batches of 64 + 39.
  eval_step = train_step.make_eval_step(model)

  def run(devices):
    mesh = topology.make_mesh(devices)
    replicated = NamedSharding(mesh, P())
    sharding = NamedSharding(mesh, P("data"))
    step = jax.jit(eval_step, in_shardings=(replicated, sharding),
                   out_shardings=replicated)
    batches = input_pipeline.eval_iterator(
        digits_cfg, global_batch_size=64, sharding=sharding, split=split)
    return train_step.evaluate(step, jax.device_put(variables, replicated),
                          batches)

  eight = run(jax.devices())
  assert eight["eval/count"] == 359
  one = run(jax.devices()[:1])
  assert one["eval/count"] == 359
  assert eight["eval/top1"] == one["eval/top1"]
  assert eight["eval/top5"] == one["eval/top5"]
  np.testing.assert_allclose(eight["eval/loss"], one["eval/loss"], rtol=1e-5)
  # The unpadded split in one piece gives the same numbers.
  whole = next(input_pipeline.eval_iterator(digits_cfg, global_batch_size=359,
                                            split=split))
  assert whole["mask"].all()
  logits = np.asarray(model.apply(variables, whole["image"], train=False))
  labels = whole["label"]
  assert eight["eval/top1"] == np.mean(logits.argmax(-1) == labels)
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert eight["eval/top5"] == np.mean((top5 == labels[:, None]).any(-1))
  cross_entropy = (jax.nn.logsumexp(logits, -1)
                   - np.take_along_axis(logits, labels[:, None], -1)[:, 0])
  np.testing.assert_allclose(eight["eval/loss"], np.mean(cross_entropy),
                             rtol=1e-5)
