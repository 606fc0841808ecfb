"""Larq Zoo models in bnn_jax: parameter counts and MACs equal Larq's, layer for layer.

Expected values are `larq.models.summary` of the Larq Zoo 2.4.0 models
(224x224x3, 1000 classes), read off in the Larq environment by
`tests/larq_zoo_reference.py summary` into
tests/testdata/larq_zoo_summaries.json; the totals are also written here
literally. Shapes only (`jax.eval_shape`): no compute.

Counting conventions that differ (docs/models.md):
* Larq counts a BatchNorm as 2C (moving mean and variance, into which it
  folds scale and bias); bnn_jax's summary counts its 2C trainable scale and
  bias. A BatchNorm without scale and bias (QuickNet's stem) has 2C in
  Larq and no parameters in bnn_jax (only its 2C batch statistics).
* QuickNet's blur kernels are non-trainable Keras weights (9C each, and
  their depthwise MACs are Larq 32-bit MACs); in bnn_jax they are constants.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import models
from bnn_jax import summary

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata",
                        "larq_zoo_summaries.json")
with open(TESTDATA) as f:
  LARQ = json.load(f)

# larq.models.summary totals: (params, 1-bit params, 1-bit MACs, 32-bit MACs).
LARQ_TOTALS = {
    "quicknet_small": (12_655_688, 11_980_800, 1_156_055_040, 15_941_120),
    "quicknet": (13_234_088, 12_533_760, 1_849_688_064, 29_651_712),
    "quicknet_large": (23_342_248, 22_634_496, 3_699_376_128, 29_651_712),
    "birealnet18": (11_689_512, 10_985_472, 1_676_279_808, 137_793_536),
    "binary_resnet_e18": (11_689_640, 10_985_472, 1_676_279_808, 137_793_536),
    "real_to_binary_net": (11_986_920, 10_985_472, 1_676_279_808, 138_087_936),
}
QUICKNETS = ("quicknet_small", "quicknet", "quicknet_large")
ZOO = tuple(LARQ_TOTALS)


def _is_fixed(row):
  """A Larq row with no bnn_jax parameter: a blur kernel or an unscaled BN."""
  return row["class"] == "DepthwiseConv2D" or (
      row["class"] == "BatchNormalization"
      and not {"gamma", "beta"} & set(row["weights"]))


def _abstract_variables(model, size=224):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


@pytest.mark.parametrize("name", ZOO)
def test_testdata_holds_larq_totals(name):
  larq = LARQ[name]
  assert (larq["params"], larq["binary_params"], larq["binary_macs"],
          larq["real_macs"]) == LARQ_TOTALS[name]


def _number(name):
  """Keras' per-class layer counter: 'conv2d' 0, 'conv2d_7' 7 (creation order)."""
  head, _, tail = name.rpartition("_")
  return int(tail) if tail.isdigit() and head else 0


def _keras_class(layer, name):
  """The Keras class of a bnn_jax summary row of model `name`: QuickNet
  builds every conv as a Larq Quant* layer (QuantDepthwiseConv2D in its
  stem), the ResNets their real ones as Keras Conv2D and Dense."""
  kind = layer.kind.split()[0]
  if name.startswith("quicknet"):
    if layer.path == "stem_depthwise":
      return "QuantDepthwiseConv2D"
    return {"BinaryConv": "QuantConv2D", "Conv": "QuantConv2D",
            "BatchNorm": "BatchNormalization", "Dense": "QuantDense"}[kind]
  return {"BinaryConv": "QuantConv2D", "Conv": "Conv2D",
          "BatchNorm": "BatchNormalization", "Dense": "Dense",
          "PReLU": "PReLU"}[kind]


@pytest.mark.parametrize("name", ZOO)
def test_layers_match_larq_summary(name):
  """Per Keras class, the layers in creation order (Keras' layer number)
  have bnn_jax's rows' 1-bit and 32-bit parameters and MACs, in call order;
  RealToBinaryNet's named layers, those of the bnn_jax path of that name."""
  s = summary.summarize(models.create(name), (224, 224, 3))
  larq_rows = [r for r in LARQ[name]["layers"] if not _is_fixed(r)]
  counts = lambda l: (l.binary_params, l.real_params, l.bops, l.flops)
  larq_counts = lambda r: (r["binary_params"], r["real_params"],
                           r["binary_macs"], r["real_macs"])
  if name == "real_to_binary_net":  # Keras names its layers: compare by name
    keras = lambda path: "r2b_bnn_" + (
        "block_10_logits" if path == "fc" else path.replace("/", "_"))
    assert {keras(l.path): counts(l) for l in s.layers} == {
        r["name"]: larq_counts(r) for r in larq_rows}
  else:
    ours, theirs = {}, {}
    for layer in s.layers:
      ours.setdefault(_keras_class(layer, name), []).append(counts(layer))
    for row in sorted(larq_rows, key=lambda r: _number(r["name"])):
      theirs.setdefault(row["class"], []).append(larq_counts(row))
    assert ours == theirs
  params, binary_params, bops, flops = LARQ_TOTALS[name]
  assert s.binary_params == binary_params and s.bops == bops
  if not name.startswith("quicknet"):  # nothing fixed: every count equal
    assert (s.params, s.flops) == (params, flops)


@pytest.mark.parametrize("name", QUICKNETS)
def test_quicknet_counts_beyond_bnn_jax_parameters(name):
  """The rows Larq counts and bnn_jax does not: the stem's unscaled BN
  (2C batch statistics) and one 3x3 blur kernel per transition (9C)."""
  model = models.create(name)
  s = summary.summarize(model, (224, 224, 3))
  fixed = [r for r in LARQ[name]["layers"] if _is_fixed(r)]
  variables = _abstract_variables(model)
  stem_c = variables["batch_stats"]["stem_depthwise_bn"]["mean"].shape[0]
  blur_c = [variables["params"][t]["conv"]["kernel"].shape[2]
            for t in sorted(variables["params"]) if t.endswith("_transition")]
  assert [(r["class"], r["real_params"]) for r in fixed] == (
      [("BatchNormalization", 2 * stem_c)]
      + [("DepthwiseConv2D", 9 * c) for c in blur_c])
  params, _, _, flops = LARQ_TOTALS[name]
  assert s.params + 2 * stem_c + 9 * sum(blur_c) == params
  blur_macs = sum(r["real_macs"] for r in fixed)
  assert s.flops + blur_macs == flops


@pytest.mark.parametrize("name,params", [
    ("quicknet_small", 12_652_504), ("quicknet", 13_230_024),
    ("quicknet_large", 23_338_184)])
def test_quicknet_parameters(name, params):
  """bnn_jax params = Larq's 12,655,688 / 13,234,088 / 23,342,248 minus
  the blur kernels (9 x (32+64+256) / 9 x (64+128+256) / the same) and the
  unscaled stem BN's 2 x (8 / 16 / 16) statistics."""
  variables = _abstract_variables(models.create(name))
  assert sum(int(np.prod(p.shape)) for p in
             jax.tree.leaves(variables["params"])) == params
  assert {"12_652_504": 12_655_688 - 9 * 352 - 16,
          "13_230_024": 13_234_088 - 9 * 448 - 32,
          "23_338_184": 23_342_248 - 9 * 448 - 32}[f"{params:_}"] == params


def test_quicknet_feature_maps_and_padding():
  """TF SAME: 224 -> 112 -> 56; transitions 56 -> 55 (max pool) -> 28."""
  model = models.create("quicknet_small", num_classes=10)

  def run(x):
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=True,
                           mutable=["intermediates"])
    return state["intermediates"]
  inter = jax.eval_shape(run, jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                   jnp.float32))
  shape = lambda n: inter[n]["__call__"][0].shape
  assert shape("stem_conv") == (1, 112, 112, 8)
  assert shape("stem_depthwise") == (1, 56, 56, 8)
  assert shape("section0_block3") == (1, 56, 56, 32)
  assert shape("section1_transition") == (1, 28, 28, 64)
  assert shape("section3_block3") == (1, 7, 7, 512)
  assert shape("fc") == (1, 10)
