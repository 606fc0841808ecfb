"""`python -m benchmarks.paired_steps`: variants parsed, steps alternated, ratios per round."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import paired_steps

from conftest import REPO


def test_parse_variant():
  assert paired_steps.parse_variant("default:") == ("default", {})
  assert paired_steps.parse_variant(
      "both:binary_conv_operand_dtype=int8,bn_one_pass_stats=true,"
      "width_multiplier=0.5,stem_strides=1") == (
          "both", {"binary_conv_operand_dtype": "int8",
                   "bn_one_pass_stats": True, "width_multiplier": 0.5,
                   "stem_strides": 1})
  for bad in ("default", ":x=1", "a:remat_blocks", "a:=1"):
    with pytest.raises(ValueError, match="--variant="):
      paired_steps.parse_variant(bad)


def test_steps_alternate_and_ratios_are_per_round():
  calls = []
  times = paired_steps.paired_times(
      [lambda: calls.append("a"), lambda: calls.append("b")], pairs=3)
  assert calls == ["a", "b"] * 3
  assert [len(t) for t in times] == [3, 3]
  rows = paired_steps.summarize(
      ["a", "b"], [[1.0, 2.0, 4.0], [0.5, 2.5, 2.0]], batch=8)
  assert [r["variant"] for r in rows] == ["a", "b"]
  assert rows[0]["speedup_vs_first_median"] == 1.0
  # Round ratios a/b: 2.0, 0.8, 2.0 -> median 2.0 (the medians' ratio, 2/2, is 1).
  assert rows[1]["speedup_vs_first_median"] == 2.0
  assert (rows[1]["speedup_vs_first_min"], rows[1]["speedup_vs_first_max"]) == (
      0.8, 2.0)
  assert rows[1]["step_s_median"] == 2.0 and rows[1]["images_per_s"] == 4.0


def _run(*args, out=None):
  command = [sys.executable, "-m", "benchmarks.paired_steps",
             "--model=reactnet_small", "--batch=8", "--input_size=8",
             "--num_classes=10", "--input_channels=1", "--pairs=2",
             "--warmup=1", "--cpu_malloc=glibc", *args]
  if out:
    command.append(f"--out={out}")
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=600)


def test_unknown_attribute_is_one_line():
  run = _run("--variant=a:", "--variant=b:bn_one_pas_stats=true")
  assert run.returncode == 1
  lines = [l for l in run.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "has no attribute bn_one_pas_stats" in lines[0]


@pytest.mark.slow
def test_two_variants_of_a_tiny_model(tmp_path):
  out = tmp_path / "rows.jsonl"
  run = _run("--variant=default:", "--variant=one_pass:bn_one_pass_stats=true",
             out=out)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["variant"] for r in rows] == ["default", "one_pass"]
  assert rows[1]["model_overrides"] == {"bn_one_pass_stats": True}
  assert rows[0]["speedup_vs_first_median"] == 1.0
  assert all(len(r["step_s"]) == 2 and r["pairs"] == 2 for r in rows)
  assert all(r["last_loss"] > 0 for r in rows)
  assert "one_pass" in run.stdout and "vs default" in run.stdout


def test_reference_needs_reactnet_a_step2():
  run = _run("--reference", "--variant=a:")  # _run's model is reactnet_small
  assert run.returncode == 1
  lines = [l for l in run.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "--reference times the reference's" in lines[0]


def test_reference_without_torch_is_one_line(tmp_path):
  """Where torch cannot be imported, --reference stops before compiling."""
  hidden = tmp_path / "torch"
  hidden.mkdir()
  (hidden / "__init__.py").write_text(
      "raise ImportError('No module named torch (hidden by the test)')\n")
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.paired_steps", "--reference",
       "--batch=2", "--input_size=32", "--num_classes=10", "--pairs=1",
       "--variant=bnn_jax:"], cwd=REPO, capture_output=True, text=True,
      timeout=600, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
          filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))))
  assert run.returncode == 1
  lines = [l for l in run.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1, run.stderr[-2000:]
  assert "pip install torch==2.13.0" in lines[0]


@pytest.mark.slow
def test_reference_alternates_with_bnn_jax(tmp_path):
  """The reference first, then bnn_jax, each timed every round."""
  pytest.importorskip("torch")
  out = tmp_path / "rows.jsonl"
  run = subprocess.run(
      [sys.executable, "-m", "benchmarks.paired_steps", "--reference",
       "--batch=2", "--input_size=32", "--num_classes=10", "--pairs=2",
       "--warmup=1", "--cpu_malloc=glibc", "--variant=bnn_jax:",
       f"--out={out}"], cwd=REPO, capture_output=True, text=True,
      timeout=900)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["variant"] for r in rows] == ["torch_reference", "bnn_jax"]
  assert rows[0]["framework"].startswith("torch ")
  assert rows[1]["framework"].startswith("jax ")
  assert all(len(r["step_s"]) == 2 and r["last_loss"] > 0 for r in rows)


def test_xla_options_are_split_from_model_attributes():
  overrides = {"bn_one_pass_stats": True,
               "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  assert paired_steps.model_attributes(overrides) == {"bn_one_pass_stats": True}
  assert paired_steps.xla_options(overrides) == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def test_bad_xla_option_value_is_one_line():
  run = _run("--variant=a:", "--variant=b:xla_cpu_scheduler_type=FASTEST")
  assert run.returncode == 1
  lines = [l for l in run.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1, run.stderr[-2000:]
  assert "--variant=b:" in lines[0] and "xla_cpu_scheduler_type" in lines[0]


@pytest.mark.slow
def test_xla_option_variant_compiles_its_own_executable(tmp_path):
  out = tmp_path / "rows.jsonl"
  run = _run("--variant=default:",
             "--variant=memsched:xla_cpu_scheduler_type="
             "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", out=out)
  assert run.returncode == 0, run.stderr[-2000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert rows[1]["model_overrides"] == {
      "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  # Same model, same data: the scheduler does not change the arithmetic.
  assert rows[0]["last_loss"] == rows[1]["last_loss"]
