"""Files written by the flat layout (before the zones) still load, evaluate and resume.

tests/testdata/previous_layout holds a digits workdir (one step-2 phase, 11
steps, width 0.125: its orbax checkpoint, results.json, config.json, logs)
and the packed file exported from it, both written at commit b647a61 by the
flat package, with the numbers they gave then (expected.json; make.py says
how they were made).
"""

import json
import os
import shutil

import pytest

from conftest import REPO, tiny_digits_config

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import packed
from bnn_jax import phases
from bnn_jax.training import evaluation

DATA = os.path.join(REPO, "tests", "testdata", "previous_layout")


def _config(data_dir):
  """The config make.py ran (tiny digits, step 2 alone, width 0.125)."""
  config = tiny_digits_config(data_dir)
  config.phase_order = "step2"
  step2 = config.phases.step2
  step2.init_from = ""
  step2.teacher = ""
  step2.model.width_multiplier = 0.125
  step2.num_epochs = 1
  step2.loss.kd_weight = 0.0
  step2.loss.ce_weight = 1.0
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 1
  return config


@pytest.fixture(scope="module")
def expected():
  with open(os.path.join(DATA, "expected.json")) as f:
    return json.load(f)


def test_previous_checkpoint_evaluates_as_it_did(digits_data_dir, expected,
                                                 tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(os.path.join(DATA, "workdir"), workdir)
  got = evaluation.evaluate_checkpoint(_config(digits_data_dir), str(workdir),
                                       "step2")
  got.pop("checkpoint")
  assert got == expected["evaluate"]
  variables, _ = checkpoint_lib.load_variables(
      checkpoint_lib.resolve_directory(str(workdir), "step2"))
  assert (checkpoint_lib.params_sha256(variables["params"])
          == expected["results"]["step2"]["params_sha256"])


def test_previous_packed_file_reads_and_evaluates_as_it_did(digits_data_dir,
                                                            expected):
  header, _ = packed.read(os.path.join(DATA, "step2.bnn"))
  assert header["format_version"] == packed.FORMAT_VERSION
  assert len(header["binary_convs"]) == expected["export"]["binary_convs"]
  assert os.path.getsize(os.path.join(DATA, "step2.bnn")
                         ) == expected["export"]["bytes"]
  got = evaluation.evaluate_packed(_config(digits_data_dir),
                                   os.path.join(DATA, "step2.bnn"))
  got.pop("checkpoint")
  assert got == expected["evaluate_packed"]
  # The packed forward gives the float checkpoint's predictions.
  assert got["top1"] == expected["evaluate"]["top1"]


def test_previous_workdir_is_continued_not_retrained(digits_data_dir, expected,
                                                     tmp_path):
  """Re-running the command on the old workdir restores the finished phase."""
  workdir = tmp_path / "workdir"
  shutil.copytree(os.path.join(DATA, "workdir"), workdir)
  results = phases.run(_config(digits_data_dir), str(workdir))
  assert results == expected["results"]
