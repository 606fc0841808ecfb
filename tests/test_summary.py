"""Cost summary: exact numbers, per-layer rows, the --json CLI.

The numbers are those of docs/recipe.md#exact-sizes.
"""

import json
import math
import subprocess
import sys

import flax.linen as nn
import pytest

from bnn_jax import models
from bnn_jax import summary

IMAGENET = (224, 224, 3)
# ReActNet-A at 224x224, 1000 classes (docs/recipe.md#exact-sizes).
REACTNET_A = {
    "params": 29_343_592,
    "binary_params": 28_253_184,
    "real_params": 1_090_408,
    "bops": 4_816_896_000,
    "flops": 11_862_016,
    # 28,253,184 bits + 1,090,408 * 32 bits.
    "memory_bytes": 28_253_184 // 8 + 1_090_408 * 4,
}


@pytest.fixture(scope="module")
def reactnet_a():
  return summary.summarize(models.create("reactnet_a"), IMAGENET)


def _totals(s):
  return {k: getattr(s, k) for k in REACTNET_A}


def _assert_rows_sum_to_totals(s):
  for field in ("params", "binary_params", "real_params", "bops", "flops",
                "memory_bits"):
    assert sum(getattr(l, field) for l in s.layers) == getattr(s, field), field
  assert math.isclose(sum(l.ops for l in s.layers), s.ops, rel_tol=1e-12)


def test_reactnet_a_exact(reactnet_a):
  assert _totals(reactnet_a) == REACTNET_A
  assert reactnet_a.ops == 4_816_896_000 / 64 + 11_862_016 == 87_126_016
  rows = {l.path: l for l in reactnet_a.layers}
  assert rows["stem_conv"].flops == 10_838_016  # 112*112*32 * 3*3*3
  assert rows["fc"].flops == 1_024_000
  assert rows["fc"].real_params == 1_025_000  # kernel + bias
  # Block 2's 3x3 conv: 56*56*64 * 3*3*64 XNOR-popcounts, 36,864 1-bit weights.
  conv = rows["block_2/binary_3x3"]
  assert (conv.kind, conv.output_shape) == ("BinaryConv 3x3/2 W1A1",
                                            (56, 56, 64))
  assert (conv.bops, conv.flops) == (115_605_504, 0)
  assert (conv.binary_params, conv.real_params) == (36_864, 0)
  assert rows["block_2/bn1"].real_params == 128  # BN stats excluded
  _assert_rows_sum_to_totals(reactnet_a)


def test_every_mac_layer_follows_the_formula(reactnet_a):
  """BOPs of each binary conv = out_H * out_W * C_out * k * k * C_in."""
  convs = [l for l in reactnet_a.layers if l.kind.startswith("BinaryConv")]
  assert len(convs) == 1 + 31
  for l in convs[1:]:
    k = int(l.kind.split()[1][0])
    h, w, c_out = l.output_shape
    c_in = l.binary_params // (k * k * c_out)
    assert l.bops == h * w * c_out * k * k * c_in
    assert l.kind.endswith("W1A1") and l.flops == 0


def test_grouped_rows_sum_to_totals(reactnet_a):
  grouped = summary.summarize(models.create("reactnet_a"), IMAGENET, depth=1)
  assert [l.path for l in grouped.layers] == (
      ["stem_conv", "stem_bn"] + [f"block_{i}" for i in range(1, 14)] +
      ["fc"])
  assert grouped.layers[3].kind == "ReActNetABlock"
  assert grouped.layers[3].output_shape == (56, 56, 128)
  assert _totals(grouped) == _totals(reactnet_a)
  _assert_rows_sum_to_totals(grouped)


def test_reactnet_a_step1_has_no_binary_cost():
  s = summary.summarize(models.create("reactnet_a", binary_weights=False),
                        IMAGENET)
  assert (s.binary_params, s.bops) == (0, 0)
  assert s.params == REACTNET_A["params"]
  assert s.flops == REACTNET_A["bops"] + REACTNET_A["flops"]
  assert s.memory_bytes == 4 * REACTNET_A["params"]
  assert sum(l.kind.endswith("W32A1") for l in s.layers) == 31


def test_reactnet_18():
  s = summary.summarize(models.create("reactnet_18"), IMAGENET)
  assert s.params == 11_704_424
  # stem 7x7 118,013,952 + 3 real 1x1 shortcuts 3 * 6,422,528 + FC 512,000.
  assert s.flops == 137_793_536
  assert s.bops == 1_676_279_808
  assert s.binary_params == 10_985_472
  _assert_rows_sum_to_totals(s)


def test_real_teacher_counts_only_flops():
  s = summary.summarize(models.create("resnet18"), IMAGENET)
  assert (s.params, s.binary_params, s.bops) == (11_689_512, 0, 0)
  assert s.flops == 1_814_073_344  # torchvision ResNet-18: 1.81 GMACs


def test_generic_flax_layers():
  """nn.Conv (grouped) and nn.Dense on a feature map count as real MACs."""

  class Tiny(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(8, (3, 3), strides=2, feature_group_count=2, name="conv")(x)
      return nn.Dense(5, name="dense")(x)

  s = summary.summarize(Tiny(), (8, 8, 4))
  conv, dense = s.layers
  assert conv.kind == "Conv 3x3 W32A32" and conv.output_shape == (4, 4, 8)
  assert conv.flops == 4 * 4 * 8 * 3 * 3 * (4 // 2)
  assert conv.real_params == 3 * 3 * 2 * 8 + 8
  assert dense.flops == 4 * 4 * 8 * 5 and dense.output_shape == (4, 4, 5)
  assert s.bops == 0 and s.params == 152 + 45


def test_parameters_outside_call_are_rejected():

  class Projection(nn.Module):

    @nn.compact
    def project(self, x):
      return x @ self.param("w", nn.initializers.ones, (x.shape[-1], 2))

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      return Projection(name="proj").project(x)

  with pytest.raises(ValueError, match="proj"):
    summary.summarize(Model(), (3,))


def test_table(reactnet_a):
  table = reactnet_a.table()
  lines = table.splitlines()
  assert "block_13/binary_pw" in table
  assert lines[-1].endswith("OPs 8.71e7")
  assert "memory 7.89 MB" in lines[-1]
  total = lines[-2].split()
  assert total == ["total", "28,253,184", "1,090,408", "4,816,896,000",
                   "11,862,016"]
  # Aligned: header, rules, rows and totals all end in the same column.
  assert len({len(l) for l in lines[1:-1]}) == 1


@pytest.mark.slow
def test_cli_json():
  out = subprocess.run(
      [sys.executable, "-m", "bnn_jax.summary", "--model=reactnet_a",
       "--input_size=224", "--num_classes=1000", "--json"],
      check=True, capture_output=True, text=True, timeout=120).stdout
  result = json.loads(out)
  assert {k: result[k] for k in REACTNET_A} == REACTNET_A
  assert result["ops"] == 87_126_016
  assert sum(l["bops"] for l in result["layers"]) == REACTNET_A["bops"]
