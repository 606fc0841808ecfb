"""`python -m bnn_jax.benchmark --inference` on a tiny model: it runs, the two
forwards agree, and it never imports TensorFlow (it must run on GPU hosts
without it)."""

import json
import os
import subprocess
import sys

import pytest

from bnn_jax.tools import benchmark_inference

from conftest import REPO


def test_parse_cases():
  cases = benchmark_inference.parse_cases("reactnet_a:224, reactnet_a_cifar:32")
  assert cases == [("reactnet_a", 224), ("reactnet_a_cifar", 32)]
  with pytest.raises(ValueError, match="'reactnet_a' is not model:input_size"):
    benchmark_inference.parse_cases("reactnet_a")


@pytest.mark.slow
def test_cli_float_vs_packed_on_a_tiny_model():
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.benchmark", "--inference",
       "--cases=reactnet_small:8", "--batches=1,3", "--rounds=1",
       "--calls_at_batch_1=1", "--num_classes=10", "--input_channels=1",
       "--gemm=1:4:64:32", "--json"],
      capture_output=True, text=True, timeout=600, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["tensorflow_imported"] is False
  (case,) = r["cases"]
  assert case["weights_bytes"]["float"] > 10 * case["weights_bytes"]["packed"]
  assert [b["batch"] for b in case["batches"]] == [1, 3]
  for b in case["batches"]:
    assert b["predictions_equal"]
    assert b["max_abs_logit_diff"] <= 1e-4 * b["max_abs_logit"]
    assert b["float_s"] > 0 and b["packed_s"] > 0
  assert case["bops"] > 0
  assert r["gemm"]["equal_results"] and r["gemm"]["macs"] == 16 * 64 * 32
