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


def test_text_lines_report_temp_memory_and_the_cpu():
  batch = {"batch": 1, "float_s": 0.5, "packed_s": 0.25,
           "float_images_per_s": 2.0, "packed_images_per_s": 4.0,
           "packed_over_float_median_ratio": 0.5, "predictions_equal": True,
           "packed_binary_ops_per_s": 1e9, "float_macs_per_s": 2e9,
           "xla_temp_bytes": {"float": 3 * 2**20, "packed": 2**20}}
  r = {"device": "cpu:cpu", "cpu_model": "AMD EPYC", "cpu_count": 2,
       "load_average_before": 1.0, "load_average_after": 2.0,
       "cases": [{"model": "m", "input_size": 8, "bops": 1e9, "flops": 0.0,
                  "weights_bytes": {"float": 2**20, "packed": 2**16},
                  "batches": [batch]}]}
  text = benchmark_inference.format_lines(r)
  assert text.splitlines()[0].startswith("inference on cpu:cpu AMD EPYC (2")
  assert "XLA temp float 3.0 MiB, packed 1.0 MiB" in text
