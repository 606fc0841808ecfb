"""Larq Zoo .h5 weights -> bnn_jax: strict matching, and the Keras model's logits.

The end-to-end tests run `tests/larq_zoo_reference.py save` in the Larq
environment (tools/make_lce_env.sh; `BNN_JAX_LCE_PYTHON`, default
/work/venvs/lce/bin/python): it builds the Larq Zoo model with
weights=None, random weights and BatchNorm statistics, saves them as .h5
and the eval-mode logits of fixed inputs as .npz. bnn_jax imports the .h5
and must give those logits (<= 1e-4 relative, the same argmax). They skip
where that environment is absent. The fast tests write small Keras-layout
.h5 files with h5py.
"""

import os
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import export
from bnn_jax import models

from bnn_jax.interop import larq_import
from bnn_jax.models import quicknet

from conftest import REPO
LCE_PYTHON = os.environ.get("BNN_JAX_LCE_PYTHON", export.DEFAULT_LCE_PYTHON)
REFERENCE = os.path.join(REPO, "tests", "larq_zoo_reference.py")
needs_larq = pytest.mark.skipif(
    not os.path.isfile(LCE_PYTHON),
    reason="no Larq environment (bash tools/make_lce_env.sh)")


def _write_keras_h5(path, layers):
  """What Keras 2 `save_weights` writes: root attr layer_names, per layer a
  group with attr weight_names 'layer/leaf:0' and a dataset per weight."""
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n, _ in layers]
    for name, weights in layers:
      group = f.create_group(name)
      names = [f"{name}/{leaf}:0" for leaf in weights]
      group.attrs["weight_names"] = [n.encode() for n in names]
      for full, value in zip(names, weights.values()):
        group.create_dataset(full, data=value)


def _stem_layers(c=8):
  """QuickNetSmall's first three Keras layers with weights, by hand."""
  rng = np.random.default_rng(0)
  return [
      ("quant_conv2d_7", {"kernel": rng.normal(size=(3, 3, 3, c))}),
      ("batch_normalization_7", {
          "gamma": rng.normal(size=c), "beta": rng.normal(size=c),
          "moving_mean": rng.normal(size=c),
          "moving_variance": rng.uniform(1, 2, size=c)}),
      ("quant_depthwise_conv2d_2", {
          "depthwise_kernel": np.arange(9 * c, dtype=np.float32).reshape(
              3, 3, c, 1)}),
  ]


def test_expected_layout_of_quicknet_small():
  layers = larq_import.expected_layers("quicknet_small")
  # 48 Keras layers with weights (tests/testdata/larq_zoo_summaries.json).
  assert len(layers) == 48
  assert [l.kind for l in layers[:7]] == [
      "conv", "batch_norm", "depthwise", "batch_norm", "conv", "batch_norm",
      "binary_conv"]
  assert [l.keras_name for l in layers[:3]] == [
      "quant_conv2d", "batch_normalization", "quant_depthwise_conv2d"]
  assert layers[3].weights == {  # the unscaled stem BN: statistics only
      "moving_mean": ("batch_stats", "mean", (8,)),
      "moving_variance": ("batch_stats", "var", (8,))}
  assert layers[2].weights == {
      "depthwise_kernel": ("params", "kernel", (3, 3, 8, 1))}
  blur = [l for l in layers if l.kind == "blur"]
  assert [l.constant.shape for l in blur] == [(3, 3, 32, 1), (3, 3, 64, 1),
                                              (3, 3, 256, 1)]
  np.testing.assert_array_equal(blur[0].constant[:, :, 0, 0],
                                np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]])
                                / 16)


def test_h5_is_read_in_file_order_and_matched_by_class_and_number(tmp_path):
  path = str(tmp_path / "w.h5")
  stem = _stem_layers()
  # Keras' topological order may differ from the creation order; the
  # numbers give the latter: batch_normalization_7 before _8.
  bn = dict(stem[1][1])
  stem_bn_8 = ("batch_normalization_8", {
      "moving_mean": np.zeros(8), "moving_variance": np.ones(8) * 3})
  _write_keras_h5(path, [stem[0], stem_bn_8, stem[2], stem[1],
                         ("activation", {})])
  found = larq_import.read_h5(path)
  assert [n for n, _ in found] == [  # no weightless layers
      "quant_conv2d_7", "batch_normalization_8", "quant_depthwise_conv2d_2",
      "batch_normalization_7"]
  with pytest.raises(larq_import.LarqWeightsMismatchError,
                     match="the file has 1 quant_conv2d layers, the model 21"):
    larq_import.from_layers(found, "quicknet_small")
  expected = larq_import.expected_layers("quicknet_small")[:4]
  pairs, problems = larq_import.match(expected, found)
  assert problems == []
  assert [(l.path, n) for l, n, _ in pairs] == [
      (("stem_conv",), "quant_conv2d_7"), (("stem_bn",), "batch_normalization_7"),
      (("stem_depthwise_bn",), "batch_normalization_8"),
      (("stem_depthwise",), "quant_depthwise_conv2d_2")]
  np.testing.assert_array_equal(pairs[1][2]["gamma"], np.float32(bn["gamma"]))


def test_mismatches_are_named(tmp_path):
  path = str(tmp_path / "w.h5")
  stem = _stem_layers()
  stem[0] = ("quant_conv2d", {"kernel": np.zeros((3, 3, 3, 16))})
  stem[1] = ("dense_3", stem[1][1])
  _write_keras_h5(path, stem)
  with pytest.raises(larq_import.LarqWeightsMismatchError) as err:
    larq_import.load(path, "quicknet_small")
  assert err.value.problems == [
      "the file has 1 quant_conv2d layers, the model 21",
      "layer 'quant_conv2d' (for conv stem_conv): kernel has shape "
      "(3, 3, 3, 16), expected (3, 3, 3, 8)",
      "the file has 0 batch_normalization layers, the model 22",
      "the file has 0 depthwise_conv2d layers, the model 3",
      "the file has 0 quant_dense layers, the model 1",
      "unexpected dense layers in the file: ['dense_3']"]
  assert str(err.value).endswith(" ...")


def test_bad_files_and_names(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    larq_import.read_h5(str(tmp_path / "absent.h5"))
  text = tmp_path / "not.h5"
  text.write_text("hello")
  with pytest.raises(ValueError, match="cannot read .* as an HDF5"):
    larq_import.read_h5(str(text))
  with h5py.File(tmp_path / "plain.h5", "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(ValueError, match="save_weights"):
    larq_import.read_h5(str(tmp_path / "plain.h5"))
  with pytest.raises(ValueError, match=r"no Larq Zoo layout .*'reactnet_a'.*"
                     r"supported: \['binary_resnet_e18', 'birealnet18', "
                     r"'quicknet', 'quicknet_large', 'quicknet_small', "
                     r"'real_to_binary_net'\]"):
    larq_import.expected_layers("reactnet_a")


def _run(*args, timeout=300):
  return subprocess.run(list(args), capture_output=True, text=True,
                        timeout=timeout, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _larq_reference(tmp_path, name, seed, size=32):
  h5, npz = str(tmp_path / f"{name}.h5"), str(tmp_path / f"{name}.npz")
  proc = _run(LCE_PYTHON, REFERENCE, "save", name, f"--size={size}",
              "--classes=10", f"--seed={seed}", f"--h5={h5}", f"--npz={npz}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return h5, np.load(npz)


def _check_logits(got, want):
  """<= 1e-4 relative (to the largest logit), the same argmax; the
  differences between examples too (the logits share a large common part)."""
  got, want = np.asarray(got), np.asarray(want)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
  centred = lambda a: a - a.mean(0)
  np.testing.assert_allclose(centred(got), centred(want), rtol=1e-4,
                             atol=1e-4 * np.abs(centred(want)).max())


@pytest.mark.slow
@needs_larq
@pytest.mark.parametrize("name,seed,size", [
    ("quicknet_small", 0, 32), ("quicknet_large", 2, 32),
    ("birealnet18", 3, 64),  # stride-2 SAME: asymmetric (0, 1) zero padding
    ("binary_resnet_e18", 4, 64),  # the ImageNet stem (input >= 50)
    ("binary_resnet_e18", 5, 32),  # Larq's small-input stem
    ("real_to_binary_net", 6, 64)])  # layers matched by name
def test_imported_model_computes_the_larq_logits(tmp_path, name, seed, size):
  h5, ref = _larq_reference(tmp_path, name, seed, size)
  variables = larq_import.load(h5, name, input_size=size)
  model = models.create(name, num_classes=10)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, ref["images"])
  _check_logits(got, ref["logits"])


@pytest.mark.slow
@needs_larq
def test_import_cli_checkpoint_evaluates_as_keras(tmp_path):
  """QuickNet through the command line: the checkpoint passes init_from's
  strict check and computes the Keras logits; a file of another model and a
  wrong model name are one-line errors."""
  h5, ref = _larq_reference(tmp_path, "quicknet", 1)
  out = str(tmp_path / "imported")
  cli = [sys.executable, "-m", "bnn_jax.import_larq"]
  proc = _run(*cli, "--model=quicknet", f"--weights={h5}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  assert "imported 48 layers" in proc.stdout and "(10 classes)" in proc.stdout
  variables, meta = checkpoint_lib.load_variables(out)
  assert meta["model"] == {"name": "quicknet", "zero_to": 1.0}
  assert meta["source"] == h5 and meta["num_classes"] == 10
  model = models.create("quicknet", num_classes=10)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  checkpoint_lib.check_variables_match(abstract, variables, "imported")
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, ref["images"])
  _check_logits(got, ref["logits"])

  proc = _run(*cli, "--model=quicknet_small", f"--weights={h5}",
              f"--out={tmp_path / 'other'}")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the weights do not fit 'quicknet_small'")
  assert "(for conv stem_conv): kernel has shape (3, 3, 3, 16), expected " \
      "(3, 3, 3, 8)" in last
  proc = _run(*cli, "--model=quicknett", f"--weights={h5}",
              f"--out={tmp_path / 'x'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: unknown model 'quicknett' (did you mean 'quicknet'?)")
