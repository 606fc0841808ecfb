"""Models: exact sizes, feature maps, step-1/2 hand-off, registry.

The exact sizes are those of docs/recipe.md#exact-sizes.

The 224x224 checks run under `jax.eval_shape` (shapes only, no compute); real
forward passes use 8x8 or 32x32 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import models
from bnn_jax.models.reactnet import REACTNET_A_CHANNELS

IMAGENET = (1, 224, 224, 3)
IMAGENET_MODELS = ("reactnet_a", "reactnet_18", "resnet18", "resnet34")
# Small-input models and the input size they are made for.
SMALL_MODELS = {"reactnet_a_cifar": 32, "reactnet_small": 8,
                "resnet18_cifar": 32, "resnet_small": 8}
# Larq Zoo models: tests/test_zoo_models.py.
ZOO_MODELS = ("quicknet_small", "quicknet", "quicknet_large", "birealnet18",
              "binary_resnet_e18", "real_to_binary_net")


def _abstract_variables(model, shape=IMAGENET, dtype=jnp.float32):
  x = jax.ShapeDtypeStruct(shape, dtype)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _spec(tree):
  """The tree's structure with (shape, dtype) leaves."""
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _feature_maps(model, shape):
  """{child module name: output shape} of `model` on `shape`, shapes only."""
  def run(x):
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=True,
                           mutable=["intermediates"])
    return state["intermediates"]
  inter = jax.eval_shape(run, jax.ShapeDtypeStruct(shape, jnp.float32))
  return {name: out["__call__"][0].shape for name, out in inter.items()
          if name != "__call__"}


def test_registry_is_complete():
  assert set(models.MODELS) == (set(IMAGENET_MODELS) | set(SMALL_MODELS)
                                | set(ZOO_MODELS))


@pytest.mark.parametrize("name,params", [
    ("reactnet_a", 29_343_592), ("reactnet_18", 11_704_424),
    ("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_exact_parameter_counts(name, params):
  variables = _abstract_variables(models.create(name))
  assert _count(variables["params"]) == params


def test_reactnet_a_binary_convs():
  """13 binary 3x3 (C_in -> C_in) and 18 1x1 convs: 28,253,184 weights."""
  params = _abstract_variables(models.create("reactnet_a"))["params"]
  convs_3x3, convs_1x1 = [], []
  for i, c_in in enumerate(REACTNET_A_CHANNELS[:-1], start=1):
    block = params[f"block_{i}"]
    convs_3x3.append(block["binary_3x3"]["kernel"].shape)
    convs_1x1 += [block[n]["kernel"].shape for n in sorted(block)
                  if n.startswith("binary_pw")]
    assert block["binary_3x3"]["kernel"].shape == (3, 3, c_in, c_in)
  assert len(convs_3x3) == 13 and len(convs_1x1) == 18
  assert all(s[:2] == (1, 1) and s[2] == s[3] for s in convs_1x1)
  assert sum(int(np.prod(s)) for s in convs_3x3 + convs_1x1) == 28_253_184
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
  assert params["fc"]["kernel"].shape == (1024, 1000)


def test_reactnet_a_feature_maps_224():
  maps = _feature_maps(models.create("reactnet_a"), IMAGENET)
  sizes = [112] + [56] * 2 + [28] * 2 + [14] * 6 + [7] * 2
  assert maps["stem_conv"] == (1, 112, 112, 32)
  for i, (size, c) in enumerate(zip(sizes, REACTNET_A_CHANNELS[1:]), start=1):
    assert maps[f"block_{i}"] == (1, size, size, c), i
  assert maps["fc"] == (1, 1000)


def test_reactnet_18_feature_maps_224():
  maps = _feature_maps(models.create("reactnet_18"), IMAGENET)
  assert maps["conv1"] == (1, 112, 112, 64)
  for stage, (size, c) in enumerate(zip((56, 28, 14, 7), (64, 128, 256, 512)),
                                    start=1):
    for j in range(4):
      assert maps[f"layer{stage}_{j}"] == (1, size, size, c)


@pytest.mark.parametrize("name,size,sizes", [
    ("reactnet_a_cifar", 32, [32] + [16] * 2 + [8] * 2 + [4] * 6 + [2] * 2),
    ("reactnet_small", 8, [8, 4, 4, 2, 2])])
def test_small_reactnet_feature_maps(name, size, sizes):
  maps = _feature_maps(models.create(name, num_classes=10),
                       (1, size, size, 3))
  assert maps["stem_conv"][1:3] == (size, size)
  assert [maps[f"block_{i}"][1] for i in range(1, len(sizes) + 1)] == sizes


@pytest.mark.parametrize("name", ["reactnet_a", "reactnet_18"])
def test_step1_and_step2_have_identical_variables(name):
  """Same names, shapes, dtypes (params and batch_stats): a strict hand-off."""
  step1 = _abstract_variables(models.create(name, binary_weights=False))
  step2 = _abstract_variables(models.create(name))
  assert _spec(step1) == _spec(step2)


@pytest.mark.slow
def test_step2_runs_on_step1_variables():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  step1 = models.create("reactnet_small", num_classes=10, binary_weights=False)
  step2 = models.create("reactnet_small", num_classes=10)
  variables = jax.jit(step1.init)(jax.random.key(0), x)
  variables = jax.tree.map(  # spread the latent weights around 0
      lambda v: v - 5e-4 if v.ndim == 4 else v, variables)
  y1 = jax.jit(step1.apply)(variables, x)
  y2 = jax.jit(step2.apply)(variables, x)  # raises if a parameter is missing
  assert y1.shape == y2.shape == (2, 10)
  assert not np.allclose(y1, y2)  # step 2 binarises the weights


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_models_forward_shapes(name):
  model = models.create(name, num_classes=7)
  variables = _abstract_variables(model, (2, 224, 224, 3))
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                          variables, x)
  assert logits.shape == (2, 7)
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
      variables, x)
  assert logits.shape == (2, 7)
  assert _spec(updates["batch_stats"]) == _spec(variables["batch_stats"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_small_models_forward_train_and_eval(name):
  size = SMALL_MODELS[name]
  model = models.create(name, num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, size, size, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                           mutable=["batch_stats"]))
  logits, updates = train(variables, x)
  assert logits.shape == (4, 10)
  assert np.all(np.isfinite(logits))
  # Training moved every running mean away from its initial 0.
  for mean in jax.tree.leaves(
      jax.tree.map(lambda s: s["mean"], updates["batch_stats"],
                   is_leaf=lambda s: isinstance(s, dict) and "mean" in s)):
    assert np.any(np.asarray(mean) != 0.0)
  evaluated = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      {"params": variables["params"], **updates}, x)
  assert evaluated.shape == (4, 10)
  assert np.all(np.isfinite(evaluated))
  # Eval normalises with the running statistics, not the batch's.
  assert not np.allclose(evaluated, logits)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reactnet_small", "resnet_small"])
def test_bfloat16_forward(name):
  model = models.create(name, num_classes=10, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  logits, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=True))(variables, x)
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))
  conv, bn = (("stem_conv", "stem_bn") if name.startswith("reactnet")
              else ("conv1", "bn1"))
  # The conv's float32 sum goes to the BN, which returns the compute dtype.
  assert state["intermediates"][conv]["__call__"][0].dtype == jnp.float32
  assert state["intermediates"][bn]["__call__"][0].dtype == jnp.bfloat16


def test_create_rejects_unknown_names_and_attributes():
  with pytest.raises(ValueError, match="reactnet_18") as err:
    models.create("reactnet18")
  for name in models.MODELS:
    assert repr(name) in str(err.value)
  with pytest.raises(ValueError, match="binary_weights"):
    models.create("reactnet_a", binary_weight=False)
  with pytest.raises(ValueError, match="bn_group_size"):
    models.create("resnet18", binary_weights=False)
  model = models.create("reactnet_a", num_classes=10, binary_weights=False,
                        bn_group_size=32)
  assert (model.num_classes, model.binary_weights, model.bn_group_size) == (
      10, False, 32)
