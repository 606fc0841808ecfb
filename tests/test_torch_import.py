"""Importing reference PyTorch checkpoints and exporting them back.

The layout is that of docs/recipe.md#reference-pytorch-checkpoints.

The state dicts are built here from that layout and the reference / torchvision
module layouts (random values), never from the importer's own tables; the
expected location of every tensor is spelled out by hand.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import layers
from bnn_jax import models

from bnn_jax.interop import torch_import
from bnn_jax.models.reactnet import ReActNetABlock, reactnet_a_strides

REACTNET_A_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512,
                       512, 1024, 1024)
NUM_BATCHES = 12345  # every BN of a trained model counts the same steps


def _bn(sd, name, c, rng):
  sd[f"{name}.weight"] = rng.normal(size=c).astype(np.float32)
  sd[f"{name}.bias"] = rng.normal(size=c).astype(np.float32)
  sd[f"{name}.running_mean"] = rng.normal(size=c).astype(np.float32)
  sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
  sd[f"{name}.num_batches_tracked"] = np.asarray(NUM_BATCHES, np.int64)


def _w(rng, *shape):
  return rng.normal(size=shape).astype(np.float32)


def reactnet_state_dict(num_classes, channels=REACTNET_A_CHANNELS,
                        in_channels=3, seed=0):
  """The reference `reactnet` state dict (AdamBNN/ReActNet).

  See docs/recipe.md#architecture and #reference-pytorch-checkpoints.
  """
  rng = np.random.default_rng(seed)
  sd = {"feature.0.conv1.weight": _w(rng, channels[0], in_channels, 3, 3)}
  _bn(sd, "feature.0.bn1", channels[0], rng)
  for i in range(1, len(channels)):
    cin, cout, p = channels[i - 1], channels[i], f"feature.{i}"
    sd[f"{p}.move11.bias"] = _w(rng, 1, cin, 1, 1)
    sd[f"{p}.binary_3x3.weight"] = _w(rng, cin, cin, 3, 3)
    _bn(sd, f"{p}.bn1", cin, rng)
    sd[f"{p}.move12.bias"] = _w(rng, 1, cin, 1, 1)
    sd[f"{p}.prelu1.weight"] = _w(rng, cin)
    sd[f"{p}.move13.bias"] = _w(rng, 1, cin, 1, 1)
    sd[f"{p}.move21.bias"] = _w(rng, 1, cin, 1, 1)
    if cin == cout:
      sd[f"{p}.binary_pw.weight"] = _w(rng, cout, cin, 1, 1)
      _bn(sd, f"{p}.bn2", cout, rng)
    else:
      sd[f"{p}.binary_pw_down1.weight"] = _w(rng, cin, cin, 1, 1)
      sd[f"{p}.binary_pw_down2.weight"] = _w(rng, cin, cin, 1, 1)
      _bn(sd, f"{p}.bn2_1", cin, rng)
      _bn(sd, f"{p}.bn2_2", cin, rng)
    sd[f"{p}.move22.bias"] = _w(rng, 1, cout, 1, 1)
    sd[f"{p}.prelu2.weight"] = _w(rng, cout)
    sd[f"{p}.move23.bias"] = _w(rng, 1, cout, 1, 1)
  sd["fc.weight"] = _w(rng, num_classes, channels[-1])
  sd["fc.bias"] = _w(rng, num_classes)
  return sd


def resnet_state_dict(num_classes, layers=(2, 2, 2, 2), seed=1):
  """torchvision's `resnet18` / `resnet34` state dict (BasicBlock, v1)."""
  rng = np.random.default_rng(seed)
  sd = {"conv1.weight": _w(rng, 64, 3, 7, 7)}
  _bn(sd, "bn1", 64, rng)
  cin = 64
  for i, (blocks, c) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
    for j in range(blocks):
      p = f"layer{i}.{j}"
      sd[f"{p}.conv1.weight"] = _w(rng, c, cin, 3, 3)
      _bn(sd, f"{p}.bn1", c, rng)
      sd[f"{p}.conv2.weight"] = _w(rng, c, c, 3, 3)
      _bn(sd, f"{p}.bn2", c, rng)
      if j == 0 and i > 1:
        sd[f"{p}.downsample.0.weight"] = _w(rng, c, cin, 1, 1)
        _bn(sd, f"{p}.downsample.1", c, rng)
      cin = c
  sd["fc.weight"] = _w(rng, num_classes, 512)
  sd["fc.bias"] = _w(rng, num_classes)
  return sd


def _reactnet_location(key):
  """(collection, bnn_jax path, torch -> bnn_jax) of a reference key."""
  parts = key.split(".")
  module, leaf = parts[:-1], parts[-1]
  if module[:2] == ["feature", "0"]:
    path = ["stem_conv" if module[2] == "conv1" else "stem_bn"]
  elif module[0] == "feature":
    name = module[2]
    rprelu = {"move12": ("rprelu1", "shift_in"), "prelu1": ("rprelu1", "slope"),
              "move13": ("rprelu1", "shift_out"),
              "move22": ("rprelu2", "shift_in"), "prelu2": ("rprelu2", "slope"),
              "move23": ("rprelu2", "shift_out")}
    if name in rprelu:
      return ("params", (f"block_{module[1]}",) + rprelu[name],
              lambda v: v.reshape(-1))
    path = [f"block_{module[1]}", name]
  else:
    path = module
  return _generic_location(path, leaf)


def _resnet_location(key):
  """(collection, bnn_jax path, torch -> bnn_jax) of a torchvision key."""
  parts = key.split(".")
  module, leaf = parts[:-1], parts[-1]
  path = []
  while module:
    head = module.pop(0)
    if head.startswith("layer"):
      path.append(f"{head}_{module.pop(0)}")
    elif head == "downsample":
      path.append({"0": "downsample_conv", "1": "downsample_bn"}[module.pop(0)])
    else:
      path.append(head)
  return _generic_location(path, leaf)


def _generic_location(path, leaf):
  is_bn = "bn" in path[-1]
  if leaf == "running_mean":
    return "batch_stats", tuple(path) + ("mean",), lambda v: v
  if leaf == "running_var":
    return "batch_stats", tuple(path) + ("var",), lambda v: v
  if path[-1].startswith("move"):
    return "params", tuple(path) + ("shift",), lambda v: v.reshape(-1)
  if leaf == "weight" and is_bn:
    return "params", tuple(path) + ("scale",), lambda v: v
  if leaf == "weight" and path[-1] == "fc":
    return "params", tuple(path) + ("kernel",), lambda v: v.T
  if leaf == "weight":  # conv: OIHW -> HWIO
    return ("params", tuple(path) + ("kernel",),
            lambda v: v.transpose(2, 3, 1, 0))
  if leaf == "weights":  # HardBinaryConv's flat (N, 1) weights
    return "params", tuple(path) + ("kernel",), None
  return "params", tuple(path) + (leaf,), lambda v: v


def _get(variables, collection, path):
  node = variables[collection]
  for name in path:
    node = node[name]
  return node


def _check_placement(variables, sd, locate, model, shape):
  """Every torch value sits where `locate` says; nothing else is there."""
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(shape, np.float32))
  checkpoint_lib.check_variables_match(abstract, variables, "imported")
  filled = 0
  for key, value in sd.items():
    if key.endswith("num_batches_tracked"):
      continue
    collection, path, to_flax = locate(key)
    got = _get(variables, collection, path)
    assert got.dtype == np.float32, key
    np.testing.assert_array_equal(got, to_flax(value), err_msg=key)
    filled += 1
  assert filled == len(jax.tree.leaves(variables))


def _assert_same_state_dict(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    assert got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(scope="module")
def reactnet_sd():
  return reactnet_state_dict(num_classes=10)


@pytest.fixture(scope="module")
def reactnet_vars(reactnet_sd):
  return torch_import.load(reactnet_sd, "reactnet_a")


# The file-format variants use ReActNet-A at a quarter of the width (the same
# 298 keys, 1/16 of the values) to stay fast.
QUARTER = {"width_multiplier": 0.25}


@pytest.fixture(scope="module")
def quarter_sd():
  return reactnet_state_dict(num_classes=10,
                             channels=[c // 4 for c in REACTNET_A_CHANNELS])


@pytest.fixture(scope="module")
def quarter_vars(quarter_sd):
  return torch_import.load(quarter_sd, "reactnet_a", **QUARTER)


def test_reference_state_dict_has_298_keys():
  """298 keys in all, num_batches_tracked included (1000 classes).

  See docs/recipe.md#reference-pytorch-checkpoints.
  """
  sd = reactnet_state_dict(num_classes=1000)
  assert len(sd) == 298
  assert sum(k.endswith("num_batches_tracked") for k in sd) == 32
  assert sd["fc.weight"].shape == (1000, 1024)
  assert sum(v.size for k, v in sd.items() if "running" not in k
             and "num_batches" not in k) == 29_343_592  # exact-sizes


def test_reactnet_every_value_in_its_place(reactnet_sd, reactnet_vars):
  _check_placement(reactnet_vars, reactnet_sd, _reactnet_location,
                   models.create("reactnet_a", num_classes=10),
                   (1, 64, 64, 3))
  p, s = reactnet_vars["params"], reactnet_sd
  # Spot checks by index: HWIO kernel[a, b, i, o] = OIHW w[o, i, a, b].
  assert p["block_3"]["binary_3x3"]["kernel"][1, 2, 5, 7] == (
      s["feature.3.binary_3x3.weight"][7, 5, 1, 2])
  assert p["stem_conv"]["kernel"][0, 2, 1, 30] == (
      s["feature.0.conv1.weight"][30, 1, 0, 2])
  assert p["block_12"]["binary_pw_down2"]["kernel"][0, 0, 3, 9] == (
      s["feature.12.binary_pw_down2.weight"][9, 3, 0, 0])
  assert p["fc"]["kernel"][100, 3] == s["fc.weight"][3, 100]
  assert p["block_7"]["rprelu2"]["shift_out"][17] == (
      s["feature.7.move23.bias"][0, 17, 0, 0])
  assert p["block_7"]["rprelu1"]["slope"][17] == (
      s["feature.7.prelu1.weight"][17])
  assert reactnet_vars["batch_stats"]["block_1"]["bn2_2"]["var"][4] == (
      s["feature.1.bn2_2.running_var"][4])


def test_reactnet_round_trip_is_identical(reactnet_sd, reactnet_vars):
  back = torch_import.to_state_dict(reactnet_vars, "reactnet_a",
                                    num_batches_tracked=NUM_BATCHES)
  _assert_same_state_dict(back, reactnet_sd)
  prefixed = torch_import.to_state_dict(reactnet_vars, "reactnet_a",
                                        num_batches_tracked=NUM_BATCHES,
                                        prefix="module.")
  assert all(k.startswith("module.feature.") or k.startswith("module.fc.")
             for k in prefixed)


def test_data_parallel_wrapper_and_prefix(quarter_sd, quarter_vars):
  saved = {"epoch": 255, "best_top1_acc": 70.5, "optimizer": {"state": {}},
           "state_dict": {"module." + k: v for k, v in quarter_sd.items()}}
  variables = torch_import.load(saved, "reactnet_a", **QUARTER)
  jax.tree.map(np.testing.assert_array_equal, variables, quarter_vars)
  _, extras = torch_import.normalize_state_dict(saved)
  assert extras == {"epoch": 255, "best_top1_acc": 70.5}


def test_flat_hard_binary_conv_weights(quarter_sd, quarter_vars):
  """ReActNet step-2 files store binary convs as `weights` of shape (N, 1)."""
  flat = {}
  for key, value in quarter_sd.items():
    if ".binary_" in key:
      flat[key + "s"] = value.reshape(-1, 1)
    else:
      flat[key] = value
  assert flat["feature.13.binary_3x3.weights"].shape == (256 * 256 * 9, 1)
  variables = torch_import.load(flat, "reactnet_a", **QUARTER)
  jax.tree.map(np.testing.assert_array_equal, variables, quarter_vars)
  back = torch_import.to_state_dict(variables, "reactnet_a",
                                    num_batches_tracked=NUM_BATCHES,
                                    flat_binary_weights=True)
  _assert_same_state_dict(back, flat)


def test_num_batches_tracked_is_optional(quarter_sd, quarter_vars):
  sd = {k: v for k, v in quarter_sd.items()
        if not k.endswith("num_batches_tracked")}
  variables = torch_import.load(sd, "reactnet_a", **QUARTER)
  jax.tree.map(np.testing.assert_array_equal, variables, quarter_vars)


def test_mismatches_are_named(reactnet_sd):
  sd = dict(reactnet_sd)
  del sd["feature.5.bn1.running_var"]
  del sd["feature.9.binary_pw.weight"]
  sd["feature.14.move11.bias"] = np.zeros((1, 1024, 1, 1), np.float32)
  sd["feature.2.prelu2.weight"] = np.zeros(7, np.float32)
  with pytest.raises(torch_import.StateDictMismatchError) as info:
    torch_import.load(sd, "reactnet_a")
  e = info.value
  assert sorted(e.missing) == ["feature.5.bn1.running_var",
                               "feature.9.binary_pw.weight"]
  assert e.unexpected == ["feature.14.move11.bias"]
  assert e.mis_shaped == ["feature.2.prelu2.weight (7,) (model wants (128,))"]
  for name in ("feature.9.binary_pw.weight", "feature.5.bn1.running_var",
               "feature.14.move11.bias", "feature.2.prelu2.weight"):
    assert name in str(e)
  # A teacher's state dict for the student: every key is wrong, the message
  # names the first ten of each kind and the counts.
  with pytest.raises(torch_import.StateDictMismatchError,
                     match=r"missing \(264\): feature\.1\.binary_3x3\.weight, "
                     r".*, \.\.\.; unexpected \(120\): bn1\.bias, .*; "
                     r"mis-shaped \(1\): fc\.weight \(10, 512\) \(model wants "
                     r"\(10, 1024\)\)$"):
    torch_import.load(resnet_state_dict(10), "reactnet_a")
  with pytest.raises(ValueError, match="no torch layout is known for model "
                     "'reactnet_18'"):
    torch_import.load(reactnet_sd, "reactnet_18")


@pytest.mark.parametrize("name,layers,num_keys", [
    ("resnet18", (2, 2, 2, 2), 122), ("resnet34", (3, 4, 6, 3), 218)])
def test_torchvision_resnet_teacher(name, layers, num_keys):
  sd = resnet_state_dict(num_classes=1000, layers=layers)
  assert len(sd) == num_keys  # torchvision's resnet18 / resnet34 state dicts
  variables = torch_import.load(sd, name)
  _check_placement(variables, sd, _resnet_location, models.create(name),
                   (1, 64, 64, 3))
  assert variables["params"]["layer2_0"]["downsample_conv"]["kernel"][
      0, 0, 5, 6] == sd["layer2.0.downsample.0.weight"][6, 5, 0, 0]
  _assert_same_state_dict(
      torch_import.to_state_dict(variables, name,
                                 num_batches_tracked=NUM_BATCHES), sd)


def test_npz_file(tmp_path, quarter_sd, quarter_vars):
  path = str(tmp_path / "reactnet.npz")
  np.savez(path, **{"module." + k: v for k, v in quarter_sd.items()})
  variables = torch_import.load(path, "reactnet_a", **QUARTER)
  jax.tree.map(np.testing.assert_array_equal, variables, quarter_vars)
  other = tmp_path / "reactnet.bin"
  other.write_bytes(b"")
  with pytest.raises(ValueError, match=r"expected a \.pth, \.pth\.tar, \.pt "
                     r"or \.npz file"):
    torch_import.load(str(other), "reactnet_a", **QUARTER)


def test_pth_needs_torch_and_says_how(tmp_path, monkeypatch):
  path = tmp_path / "model_best.pth.tar"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
    torch_import.load(str(path), "reactnet_a")


def test_real_torch_save_file(tmp_path, quarter_sd, quarter_vars):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "model_best.pth.tar")
  torch.save({"epoch": 3, "best_top1_acc": 1.5,
              "state_dict": {"module." + k: torch.from_numpy(v)
                             for k, v in quarter_sd.items()}}, path)
  variables = torch_import.load(path, "reactnet_a", **QUARTER)
  jax.tree.map(np.testing.assert_array_equal, variables, quarter_vars)


@pytest.mark.slow
def test_import_cli_writes_a_checkpoint_init_from_accepts(tmp_path):
  """The CLI once, on a cheap model: reactnet_small for 1-channel digits."""
  sd = reactnet_state_dict(num_classes=10, channels=REACTNET_A_CHANNELS[:6],
                           in_channels=1)
  src, out = str(tmp_path / "small.npz"), str(tmp_path / "imported")
  np.savez(src, **sd)
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.import_torch", f"--checkpoint={src}",
       "--model=reactnet_small", f"--out={out}"],
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert f"imported {len(sd)} tensors" in proc.stdout
  variables, meta = checkpoint_lib.load_variables(out)
  assert meta["source"] == src and meta["num_classes"] == 10
  want = torch_import.load(sd, "reactnet_small")
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  # What init_from does with it: the strict check against the phase's model.
  model = models.create("reactnet_small", num_classes=10, binary_weights=True)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32))
  checkpoint_lib.check_variables_match(abstract, variables, "imported")
  # A second import into the same directory is refused, by name.
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.import_torch", f"--checkpoint={src}",
       "--model=reactnet_small", f"--out={out}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --out {out} is not empty; pass a new directory")


@pytest.mark.slow
def test_imported_model_computes_what_torch_computes(quarter_sd, quarter_vars):
  """With torch: the reference ReActNet-A in torch (`torch_reference`), loaded
  strictly with the same state dict, gives the imported model's stem, block
  and classifier outputs (eval mode, torch.sign, i.e. zero_to=0). Each part is
  fed torch's input to it: end to end, float rounding flips a few signs and
  the difference grows through 13 sign layers."""
  torch = pytest.importorskip("torch")
  from bnn_jax.interop import torch_reference

  channels = [c // 4 for c in REACTNET_A_CHANNELS]
  strides = reactnet_a_strides(REACTNET_A_CHANNELS)  # width scaling keeps them
  net = torch_reference.ReActNet(10, channels, strides=strides).eval()
  net.load_state_dict({k: torch.from_numpy(v) for k, v in quarter_sd.items()},
                      strict=True)
  p, s = quarter_vars["params"], quarter_vars["batch_stats"]
  x = torch.from_numpy(np.random.default_rng(3).normal(
      size=(2, 3, 64, 64)).astype(np.float32))
  with torch.no_grad():
    features = [x]
    for module in net.feature:
      features.append(module(features[-1]))
    logits = net(x).numpy()
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)

  def check(got, want, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max(), err_msg=what)

  stem = layers.BinaryConv(channels[0], 3, 2, input_binarizer=None,
                           kernel_binarizer=None).apply(
                               {"params": p["stem_conv"]}, nhwc(x))
  stem = layers.BatchNorm().apply(
      {"params": p["stem_bn"], "batch_stats": s["stem_bn"]}, stem, train=False)
  check(stem, nhwc(features[1]), "stem")
  for i, stride in enumerate(strides, start=1):
    got = ReActNetABlock(channels[i], stride, zero_to=0.0).apply(
        {"params": p[f"block_{i}"], "batch_stats": s[f"block_{i}"]},
        nhwc(features[i]), train=False)
    check(got, nhwc(features[i + 1]), f"block {i}")
  got = nn.Dense(10).apply({"params": p["fc"]},
                           nhwc(features[-1]).mean(axis=(1, 2)))
  check(got, logits, "fc")
