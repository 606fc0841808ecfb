"""`python -m bnn_jax.benchmark` on a tiny model; its formulas; XLA defaults."""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from bnn_jax import xla_defaults
from bnn_jax.tools import benchmark

from conftest import REPO


@pytest.mark.slow
def test_benchmark_a_tiny_model():
  """One real AOT compile and timed steps: step 1 with a teacher (KD)."""
  r = benchmark.run_benchmark(
      "reactnet_small", batch=8, input_size=8, phase="step1",
      teacher_name="resnet_small", steps=3, warmup=1, num_classes=10,
      input_channels=1)
  assert (r["model"], r["teacher"], r["phase"], r["batch"]) == (
      "reactnet_small", "resnet_small", "step1", 8)
  assert r["device"].startswith("cpu") and r["mfu"] is None
  assert r["compile_s"] > 0 and r["lower_s"] > 0
  assert r["step_s_min"] <= r["step_s_median"]
  assert r["images_per_s"] == pytest.approx(8 / r["step_s_median"])
  assert r["peak_memory_bytes"] >= r["argument_bytes"] > 0
  assert r["model_flops_per_step"] > 0 and r["xla_flops_per_step"] > 0
  line = benchmark.format_line(r)
  assert line.startswith("reactnet_small step1 + teacher resnet_small batch 8 "
                         "8x8 float32 on cpu")
  json.dumps(r)  # the --json output


def test_model_flops_and_mfu_table():
  # 2 FLOPs per MAC; backward = 2 forward passes; the teacher runs forward only.
  assert benchmark.model_flops_per_step(10, 4, batch=3) == 2 * (30 + 4) * 3
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494e12
  assert benchmark.peak_flops("TPU v4", "float32") == 275e12
  assert benchmark.peak_flops("some new chip", "bfloat16") is None


def test_peak_memory_from_memory_analysis():
  stats = types.SimpleNamespace(
      argument_size_in_bytes=100, output_size_in_bytes=60,
      temp_size_in_bytes=30, alias_size_in_bytes=50)
  assert benchmark.peak_memory_bytes(stats) == 100 + 60 + 30 - 50


def test_xla_defaults_only_when_unset():
  environ = {}
  assert xla_defaults.apply(environ) == " ".join(xla_defaults.DEFAULT_XLA_FLAGS)
  assert environ["XLA_FLAGS"] == " ".join(xla_defaults.DEFAULT_XLA_FLAGS)
  environ = {"XLA_FLAGS": ""}
  assert xla_defaults.apply(environ) is None
  assert environ == {"XLA_FLAGS": ""}


# `python -m bnn_jax.benchmark ... --json`, then which host-side libraries it
# imported: GPU/TPU images often lack TensorFlow, and the step needs none.
_CLI_AND_IMPORTS = textwrap.dedent("""
    import json, runpy, sys
    sys.argv = ["bnn_jax.benchmark", "--model=reactnet_small", "--batch=8",
                "--input_size=8", "--steps=1", "--warmup=1",
                "--num_classes=10", "--input_channels=1",
                "--cpu_malloc=glibc", "--json"]
    try:
      runpy.run_module("bnn_jax.benchmark", run_name="__main__")
    except SystemExit as e:
      assert e.code == 0, e.code
    print(json.dumps(sorted(m for m in ("tensorflow", "tensorflow_datasets",
                                        "clu") if m in sys.modules)))
""")


@pytest.mark.slow
def test_cli_json_without_tensorflow():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-c", _CLI_AND_IMPORTS], cwd=REPO,
                       env=env, capture_output=True, text=True, check=True,
                       timeout=300)
  result_line, imported_line = out.stdout.strip().splitlines()[-2:]
  result = json.loads(result_line)
  assert (result["model"], result["batch"], result["steps"]) == (
      "reactnet_small", 8, 1)
  assert result["mallopt"] == []  # --cpu_malloc=glibc
  assert json.loads(imported_line) == []


@pytest.mark.slow
def test_fresh_batches_and_the_first_nonfinite_step(monkeypatch):
  """--fresh_batches trains on a new batch each step (the fixed-batch run's
  losses differ from step 2 on); a step whose `finite` metric is false stops
  the run with its number (counted from 1, warm-up included)."""
  kwargs = dict(model_name="reactnet_small", batch=8, input_size=8,
                phase="step1", teacher_name="resnet_small", steps=2, warmup=1,
                num_classes=10, input_channels=1)
  fixed = benchmark.run_benchmark(**kwargs)
  fresh = benchmark.run_benchmark(**kwargs, fresh_batches=True)
  for r in (fixed, fresh):
    assert r["finite"] and r["first_nonfinite_step"] is None
    assert len(r["loss_per_step"]) == len(r["grad_max_abs_per_step"]) == 3
  assert fresh["fresh_batches"] and not fixed["fresh_batches"]
  assert fresh["loss_per_step"][0] != fixed["loss_per_step"][0]

  from bnn_jax import train_step
  real = train_step.make_train_step

  def failing_from_step_2(*args):
    step = real(*args)

    def wrapped(state, batch, teacher_variables):
      state, metrics = step(state, batch, teacher_variables)
      return state, {**metrics, "finite": state.step < 2}

    return wrapped

  monkeypatch.setattr(train_step, "make_train_step", failing_from_step_2)
  with pytest.raises(benchmark.NonFiniteError,
                     match=r"^step 2 of 3 produced NaN/Inf") as info:
    benchmark.run_benchmark(**kwargs, fresh_batches=True)
  assert info.value.result["first_nonfinite_step"] == 2
  assert not info.value.result["finite"]
  assert len(info.value.result["loss_per_step"]) == 2
