"""`bnn_jax.evaluate` on the shared digits run (conftest `trained_digits`)."""

import json
import os
import re
import subprocess
import sys

import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import evaluate
from bnn_jax.training import evaluation

DIGITS_TEST_EXAMPLES = 360
from conftest import REPO


def test_evaluation_matches_the_training_evaluation(trained_digits):
  """The phase's own final top-1/top-5, over every example once; the
  checkpoint named as a workdir plus a phase."""
  config, workdir, results = trained_digits
  result = evaluation.evaluate_checkpoint(config, workdir, "teacher")
  assert result["checkpoint"] == os.path.join(workdir, "teacher")
  assert result["count"] == DIGITS_TEST_EXAMPLES
  assert (result["dataset"], result["split"]) == ("digits", "test")
  assert result["top1"] == pytest.approx(results["teacher"]["top1"], abs=1e-9)
  assert result["top5"] == pytest.approx(results["teacher"]["top5"], abs=1e-9)
  assert result["top1"] * DIGITS_TEST_EXAMPLES == pytest.approx(
      round(result["top1"] * DIGITS_TEST_EXAMPLES))
  assert result["top1"] <= result["top5"] <= 1.0
  assert result["loss"] > 0.0
  line = evaluate.format_line(result)
  assert line.startswith("teacher (resnet_small) on digits/test: top1 ")
  assert f"over {DIGITS_TEST_EXAMPLES} examples" in line


@pytest.mark.slow
def test_cli_is_quiet_and_matches_the_training_evaluation(trained_digits):
  """`python -m bnn_jax.evaluate --checkpoint=<workdir> --phase=step2`, as in
  README: one JSON line on stdout, no absl/orbax log lines on stderr."""
  config, workdir, results = trained_digits
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.evaluate", "--config=configs/digits.py",
       f"--config.dataset.data_dir={config.dataset.data_dir}",
       "--config.phases.step2.model.width_multiplier=0.25",
       f"--checkpoint={workdir}", "--phase=step2", "--json"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  # No absl log records of Python code (orbax's); TensorFlow's C++ start-up
  # lines are not the program's.
  assert not re.search(r"^[IWE]\d{4} .*\.py:\d+\]", proc.stderr, re.M), (
      proc.stderr)
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1, proc.stdout
  result = json.loads(lines[0])
  assert result["checkpoint"] == os.path.join(workdir, "step2")
  assert result["count"] == DIGITS_TEST_EXAMPLES
  assert result["top1"] == pytest.approx(results["step2"]["top1"], abs=1e-9)


def test_checkpoint_resolution(trained_digits, tmp_path):
  workdir = trained_digits.workdir
  step2 = os.path.join(workdir, "step2")
  assert checkpoint_lib.resolve_directory(workdir, "step2") == step2
  # A checkpoint directory is itself, whatever the phase.
  assert checkpoint_lib.resolve_directory(step2, "step2") == step2
  assert checkpoint_lib.resolve_directory(step2, "step1") == step2
  ckpts = os.path.join(step2, "checkpoints")
  assert checkpoint_lib.resolve_directory(ckpts, "step2") == ckpts
  missing = str(tmp_path / "nope")
  assert checkpoint_lib.resolve_directory(missing, "step2") == missing
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"is a workdir holding the phases \['step1', "
                     r"'step2', 'teacher'\]; pass --phase=<one of them> or "
                     r"--checkpoint=.*/<phase>"):
    checkpoint_lib.resolve_directory(workdir)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"\['step1', 'step2', 'teacher'\], not 'step3'"):
    checkpoint_lib.resolve_directory(workdir, "step3")


def test_wrong_model_for_the_checkpoint_is_named(trained_digits):
  config, workdir, _ = trained_digits
  # The default phase is the last of phase_order; step2 is a ReActNet.
  with pytest.raises(ValueError, match=r"missing: .*block_1/.*unexpected: "):
    evaluation.evaluate_checkpoint(config, os.path.join(workdir, "teacher"))
  with pytest.raises(ValueError, match=r"--phase='nope' is not a phase"):
    evaluation.evaluate_checkpoint(config, os.path.join(workdir, "teacher"), "nope")
