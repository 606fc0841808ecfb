"""Larq Zoo recipe configs: parameter groups, ImageNet dry runs, a digits run.

* The "binary" group of each recipe holds exactly the model's binary conv
  kernels (the layers with 1-bit weights in `bnn_jax.summary`).
* `--dry_run` of every Larq Zoo ImageNet config on 1 and 8 devices (slow).
* configs/quicknet_digits.py trains above chance with Adam on the binary
  kernels and SGD elsewhere, both rates logged at every record, and its
  packed export evaluates as the float model on the 360 test digits (slow).
"""

import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import export
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import summary
from bnn_jax.training import evaluation
from bnn_jax.training import phases
from test_dry_run import _dry_runs

ZOO_CONFIGS = {
    "quicknet_small_imagenet": ("quicknet_small", "12,652,504"),
    "quicknet_imagenet": ("quicknet", "13,230,024"),
    "quicknet_large_imagenet": ("quicknet_large", "23,338,184"),
    "birealnet18_imagenet": ("birealnet18", "11,689,512"),
    "binary_resnet_e18_imagenet": ("binary_resnet_e18", "11,689,640"),
    "real_to_binary_net_imagenet": ("real_to_binary_net", "11,986,920"),
}


def _config(name):
  return importlib.import_module(f"bnn_jax.configs.{name}").get_config()


@pytest.mark.parametrize("name", sorted(ZOO_CONFIGS))
def test_binary_group_is_the_binary_kernels(name):
  config = _config(name)
  phase = config.phases[config.phase_order.split(",")[-1]]
  model = models.create(ZOO_CONFIGS[name][0])
  params = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
  opt = optim.resolve_config(phase.optimizer)
  labels = optim.group_labels(params, opt.groups)
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  binary = sorted("/".join(k.key for k in path[:-1]) for path, label in flat
                  if label == "binary")
  s = summary.summarize(model, (224, 224, 3))
  assert binary == sorted(l.path for l in s.layers if l.binary_params)
  assert len(binary) == {"quicknet_small": 16, "quicknet": 16,
                         "quicknet_large": 32}.get(ZOO_CONFIGS[name][0], 16)
  clip = dict(opt.groups[0][2]).get("weight_clip")
  assert clip == (1.0 if "birealnet" in name or "real_to" in name else 1.25)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_zoo_configs_dry_run(devices, tmp_path):
  paths = [f"configs/{n}.py" for n in sorted(ZOO_CONFIGS)] + [
      "configs/quicknet_digits.py"]
  results = _dry_runs(devices, tmp_path, paths)
  for name, (model, params) in ZOO_CONFIGS.items():
    out = results[name]["out"]
    assert results[name]["code"] == 0, (name, results[name]["error"])
    assert f"1 process(es), {devices} cpu device(s)" in out
    assert f"{model}: {params} params" in out, out
    assert "dry run OK" in out
  quicknet = results["quicknet_imagenet"]["out"]
  assert (f"train batch: 2048 global = {2048 // devices} per device") in (
      quicknet)
  assert ("600 epochs x 625 steps = 375000 steps; group binary: adam lr 0 at "
          "step 1, peak 0.01 -> 0 at step 375000 (cosine); group real: sgd "
          "lr 0 at step 1, peak 0.1 -> 0 at step 375000 (cosine)") in quicknet
  r2b = results["real_to_binary_net_imagenet"]["out"]
  assert "[bnn]   teacher: ban; init_from: previous" in r2b
  assert results["quicknet_digits"]["code"] == 0


@pytest.mark.slow
def test_quicknet_recipe_trains_digits_with_both_optimizers(tmp_path):
  config = _config("quicknet_digits")
  config.dataset.data_dir = str(tmp_path / "tfds")
  workdir = str(tmp_path / "run")
  phases.run(config, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["train"]["top1"] > 0.5  # chance: 0.1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if "train/lr/binary" in r]
  assert len(train) == 16  # 176 steps, a record every 11
  # Both groups: the same warm-up + cosine shape, peaks 1e-2 and 0.1.
  binary = np.array([r["train/lr/binary"] for r in train])
  real = np.array([r["train/lr/real"] for r in train])
  np.testing.assert_allclose(real, 10 * binary, rtol=1e-5)
  steps = np.array([r["step"] for r in train])
  # Step s (1-based) ran update s - 1: warm-up over 22 steps, cosine over 154.
  t = steps - 1
  want = np.where(t < 22, 1e-2 * t / 22,
                  1e-2 * (1 + np.cos(np.pi * (t - 22) / 154)) / 2)
  np.testing.assert_allclose(binary, want, rtol=1e-4, atol=1e-9)

  # The packed 1-bit export of the trained QuickNet: the same evaluation.
  checkpoint = os.path.join(workdir, "train")
  out = str(tmp_path / "quicknet_digits.bnn.npz")
  exported = export.export_packed(config, checkpoint, out)
  assert exported["binary_convs"] == 4 and exported["zero_weights"] == 0
  want = evaluation.evaluate_checkpoint(config, checkpoint)
  got = evaluation.evaluate_packed(config, out)
  assert got["count"] == want["count"] == 360
  assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
