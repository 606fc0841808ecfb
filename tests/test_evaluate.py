"""`python -m bnn_jax.evaluate` on a tiny digits checkpoint trained here."""

import json
import os
import subprocess
import sys

import pytest

from bnn_jax import evaluate
from bnn_jax import phases
from configs import digits as digits_config

DIGITS_TEST_EXAMPLES = 360


def _teacher_only_config(data_dir):
  """The digits config, only its teacher phase, for one epoch."""
  config = digits_config.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size = 128
  config.eval_batch_size = 128
  config.checkpoint_every_steps = 100
  config.phase_order = "teacher"
  config.phases.teacher.num_epochs = 1
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _teacher_only_config(data_dir)
  results = phases.run(config, workdir)
  return config, workdir, results


def test_cli_matches_the_training_evaluation(trained):
  """The phase's own final top-1/top-5, over every example once."""
  config, workdir, results = trained
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.evaluate", "--config=configs/digits.py",
       f"--config.dataset.data_dir={config.dataset.data_dir}",
       f"--checkpoint={os.path.join(workdir, 'teacher')}", "--phase=teacher",
       "--json"],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
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


def test_wrong_model_for_the_checkpoint_is_named(trained):
  config, workdir, _ = trained
  # The default phase is the last of phase_order; step2 is a ReActNet.
  config = config.copy_and_resolve_references()
  config.phase_order = "teacher,step1,step2"
  with pytest.raises(ValueError, match=r"missing: .*block_1/.*unexpected: "):
    evaluate.run_evaluation(config, os.path.join(workdir, "teacher"))
  with pytest.raises(ValueError, match=r"--phase='nope' is not a phase"):
    evaluate.run_evaluation(config, os.path.join(workdir, "teacher"), "nope")
