"""`bnn_jax.export` end to end: a digits run, an imported reference ReActNet-A.

The packed file must give exactly the float model's predictions: on the
digits test split (top-1 over all 360 examples, through both evaluate
paths) and on a reference PyTorch ReActNet-A imported with sign(0) = 0.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import export
from bnn_jax import models
from bnn_jax import packed
from bnn_jax.training import evaluation
from bnn_jax.training import phases
from configs import digits as digits_config

from conftest import REPO


def test_only_binary_phases_are_exported():
  step1 = models.create("reactnet_small", num_classes=10, binary_weights=False)
  with pytest.raises(ValueError, match=r"phase 'step1' has real-valued "
                     r"weights .*--phase=step2"):
    export.check_exportable(step1, "step1", (8, 8, 1))
  teacher = models.create("resnet_small", num_classes=10)
  with pytest.raises(ValueError, match=r"phase 'teacher' \(ResNet\) has no "
                     "binary convolution"):
    export.check_exportable(teacher, "teacher", (8, 8, 1))
  half = models.create("reactnet_small", num_classes=10, zero_to=0.5)
  with pytest.raises(ValueError, match=r"sign\(0\) = 0\.5"):
    export.check_exportable(half, "step2", (8, 8, 1))
  export.check_exportable(models.create("reactnet_small", num_classes=10),
                          "step2", (8, 8, 1))


@pytest.fixture(scope="module")
def digits_step2(tmp_path_factory):
  """A one-epoch fully binary digits run (cross-entropy, no teacher)."""
  config = digits_config.get_config()
  config.dataset.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.batch_size = 128
  config.phase_order = "step2"
  step2 = config.phases.step2
  step2.num_epochs, step2.teacher, step2.init_from = 1, "", ""
  step2.loss.kd_weight, step2.loss.ce_weight = 0.0, 1.0
  workdir = str(tmp_path_factory.mktemp("run"))
  phases.run(config, workdir)
  return config, os.path.join(workdir, "step2")


@pytest.mark.slow
def test_digits_packed_file_is_small_and_evaluates_as_the_float_model(
    digits_step2, tmp_path):
  config, checkpoint = digits_step2
  out = str(tmp_path / "digits.bnn.npz")
  summary = export.export_packed(config, checkpoint, out)
  assert summary["bytes"] == os.path.getsize(out)
  assert summary["compression"] >= 10.0      # float32 params / packed file
  assert summary["binary_convs"] == 13 and summary["zero_weights"] == 0
  header, _ = packed.read(out)
  assert (header["model"]["name"], header["model"]["num_classes"]) == (
      "reactnet_small", 10)
  assert header["model"]["overrides"]["binary_weights"] is True
  assert header["sign_zero"]["activations"] == 1.0
  assert header["input"]["shape"] == [8, 8, 1]
  assert header["input"]["mean"] == [0.30543]

  want = evaluation.evaluate_checkpoint(config, checkpoint)
  got = evaluation.evaluate_packed(config, out)
  assert got["count"] == want["count"] == 360
  assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)

  # The command line: `evaluate --packed`, and an export never overwrites.
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.evaluate", "--config=configs/digits.py",
       f"--config.dataset.data_dir={config.dataset.data_dir}",
       f"--packed={out}", "--json"],
      capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["top1"] == (
      want["top1"])
  with pytest.raises(ValueError, match="exists; pass a new path"):
    export.export_packed(config, checkpoint, out)


@pytest.mark.slow
def test_recorded_sign_zero_is_honoured(digits_step2, tmp_path):
  """A checkpoint whose meta says sign(0) = 0 (an import from torch) is
  evaluated and exported with it, whatever the config says."""
  config, checkpoint = digits_step2
  variables, _ = checkpoint_lib.load_variables(checkpoint)
  torch_like = str(tmp_path / "imported")
  checkpoint_lib.save_variables(torch_like, variables, {
      "phase": "import_torch",
      "model": {"name": "reactnet_small", "zero_to": 0.0}})
  assert config.phases.step2.model.zero_to == 1.0
  loaded = evaluation.load_phase(config, torch_like, "step2")
  assert loaded["model"].zero_to == 0.0
  header, _, _ = export.build_packed(config, torch_like, "step2")
  assert header["sign_zero"]["activations"] == 0.0
  assert header["model"]["overrides"]["zero_to"] == 0.0


@pytest.mark.slow
def test_imported_reference_reactnet_a(tmp_path):
  """The reference PyTorch ReActNet-A (random weights, 40 of them exactly
  zero), saved by torch, imported, packed: the packed forward predicts what
  the float model predicts (its zero weights as +1, as the file stores
  them), at 32x32 to stay cheap."""
  torch = pytest.importorskip("torch")
  from bnn_jax import import_torch
  from bnn_jax.interop import torch_reference

  net = torch_reference.ReActNet(num_classes=10)
  gen = torch.Generator().manual_seed(0)
  zeros = 0
  with torch.no_grad():
    for name, tensor in net.state_dict().items():
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
      else:
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
      if ".binary_" in name and zeros < 40:
        tensor.view(-1)[:10] = 0.0
        zeros += 10
  source = str(tmp_path / "model_best.pth.tar")
  torch.save({"epoch": 1, "state_dict": {
      "module." + k: v for k, v in net.state_dict().items()}}, source)
  meta = import_torch.convert(source, "reactnet_a", str(tmp_path / "ckpt"))
  assert meta["model"]["zero_to"] == 0.0

  variables, meta = checkpoint_lib.load_variables(str(tmp_path / "ckpt"))
  model = models.create("reactnet_a", num_classes=10,
                        zero_to=meta["model"]["zero_to"])
  shape = (32, 32, 3)
  result = packed.pack_variables(model, variables, shape)
  assert result.zero_weights == zeros == 40
  path = str(tmp_path / "reactnet_a.bnn.npz")
  header = {"model": {"name": "reactnet_a", "num_classes": 10,
                      "overrides": {"zero_to": 0.0}}}
  size = packed.write(path, header, result.variables)
  assert size < packed.variables_bytes(variables["params"]) / 20
  packed_model, packed_vars = packed.load(path)

  x = np.random.default_rng(0).normal(size=(8,) + shape).astype(np.float32)
  got = np.asarray(jax.jit(packed_model.apply)(packed_vars, x))
  nudged = packed.nudge_zero_weights(model, variables, shape)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      nudged, x))
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  np.testing.assert_allclose(got, want, rtol=1e-3,
                             atol=1e-3 * np.abs(want).max())


LCE_PYTHON = os.environ.get("BNN_JAX_LCE_PYTHON", export.DEFAULT_LCE_PYTHON)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(LCE_PYTHON),
                    reason="no LCE environment (bash tools/make_lce_env.sh)")
def test_lce_tflite_predicts_as_the_packed_forward(digits_step2, tmp_path):
  config, checkpoint = digits_step2
  out = str(tmp_path / "digits.tflite")
  result = export.export_lce(config, checkpoint, out, lce_python=LCE_PYTHON,
                             check_examples=16)
  assert result["bytes"] == os.path.getsize(out)
  assert result["ops"] == ["LceBconv2d", "LceQuantize"]
  assert result["predictions_equal"] and result["examples"] == 16
  assert result["max_abs_logit_diff"] <= 1e-4 * result["max_abs_logit"]
