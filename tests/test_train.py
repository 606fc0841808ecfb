"""End-to-end training: the shared multi-phase digits run, hand-off, resume, logs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax.training import phases

# quarter width, checkpoints every 4 steps, logs every 5.


def test_results_json(trained_digits):
  _, workdir, results = trained_digits
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert list(on_disk) == ["teacher", "step1", "step2"]  # phase order
  assert on_disk == json.loads(json.dumps(results))
  # 1437 train examples // 128 = 11 steps per epoch.
  assert [on_disk[p]["steps"] for p in on_disk] == [22, 11, 11]
  for entry in on_disk.values():
    assert set(entry) >= {"top1", "best_top1", "steps", "seconds",
                          "params_sha256"}
    assert 0.0 <= entry["top1"] <= entry["best_top1"] <= 1.0
    assert len(entry["params_sha256"]) == 64
  # Two epochs of a real ResNet on the 360 test digits: 272 right (0.756)
  # here, far above chance (0.1); the count of right answers is whole.
  teacher_top1 = on_disk["teacher"]["top1"]
  assert teacher_top1 >= 0.7
  assert teacher_top1 * 360 == pytest.approx(round(teacher_top1 * 360))


def test_logs_and_checkpoints(trained_digits):
  _, workdir, _ = trained_digits
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  names = set().union(*records)
  assert {"phase", "step", "train/loss", "train/lr", "train/top1",
          "eval/top1", "eval/top5", "eval/loss"} <= names
  assert {r["phase"] for r in records} == {"teacher", "step1", "step2"}
  kd = [r for r in records if r["phase"] == "step1" and "train/kd_loss" in r]
  assert kd, "step1 distils from the teacher"
  for phase in ("teacher", "step1", "step2"):
    files = os.listdir(os.path.join(workdir, phase))
    assert any(f.startswith("events.out.tfevents") for f in files)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, phase,
                                                    "checkpoints"))
    assert ckpt.latest_step() == (22 if phase == "teacher" else 11)


def test_rerun_continues_without_retraining(trained_digits, tmp_path):
  config, workdir, results = trained_digits
  copy = str(tmp_path / "run")  # The suite-wide run is only read.
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "metrics.jsonl"), "rb") as f:
    logged = f.read()
  again = phases.run(config, copy)
  assert again == results
  # Nothing was trained again, so nothing new was logged.
  with open(os.path.join(copy, "metrics.jsonl"), "rb") as f:
    assert f.read() == logged


def test_step2_starts_from_step1_exactly(trained_digits, tmp_path):
  """A 0-epoch phase from a checkpoint keeps exactly those parameters."""
  config, workdir, results = trained_digits
  config = config.copy_and_resolve_references()
  config.phase_order = "step2"
  config.phases.step2.num_epochs = 0
  config.phases.step2.teacher = ""
  config.phases.step2.loss.kd_weight = 0.0
  config.phases.step2.loss.ce_weight = 1.0
  config.phases.step2.init_from = os.path.join(workdir, "step1")
  out = phases.run(config, str(tmp_path))
  assert out["step2"]["params_sha256"] == results["step1"]["params_sha256"]
  assert out["step2"]["steps"] == 0


def test_handoff_rejects_mismatched_variables(trained_digits, tmp_path):
  config, workdir, _ = trained_digits
  config = config.copy_and_resolve_references()
  config.phase_order = "step2"
  config.phases.step2.teacher = ""
  config.phases.step2.loss.kd_weight = 0.0
  config.phases.step2.loss.ce_weight = 1.0
  # The teacher's ResNet variables do not fit the ReActNet student.
  config.phases.step2.init_from = os.path.join(workdir, "teacher")
  with pytest.raises(ValueError, match=r"missing: .*block_1/.*unexpected: "):
    phases.run(config, str(tmp_path))


def test_check_variables_match_names_the_problem():
  expected = {"params": {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}}
  checkpoint_lib.check_variables_match(expected, {"params": {"a": np.ones((2, 3)),
                                                    "b": np.ones(4)}}, "x")
  with pytest.raises(ValueError, match=r"missing: params/b"):
    checkpoint_lib.check_variables_match(expected, {"params": {"a": np.ones((2, 3))}},
                                "x")
  with pytest.raises(ValueError,
                     match=r"mis-shaped: params/a \(3, 2\) \(model wants \(2, 3\)\)"):
    checkpoint_lib.check_variables_match(
        expected, {"params": {"a": np.ones((3, 2)), "b": np.ones(4)}}, "x")
  with pytest.raises(ValueError, match=r"unexpected: params/c"):
    checkpoint_lib.check_variables_match(
        expected, {"params": {"a": np.ones((2, 3)), "b": np.ones(4),
                              "c": np.ones(1)}}, "x")


def test_init_from_previous_needs_a_previous_phase(trained_digits, tmp_path):
  config = trained_digits.config.copy_and_resolve_references()
  config.phase_order = "step2"
  with pytest.raises(ValueError, match="init_from"):
    phases.run(config, str(tmp_path))


def test_params_sha256_is_order_independent_and_value_sensitive():
  a = {"x": np.arange(3, dtype=np.float32), "y": np.ones((2, 2), np.float32)}
  b = {"y": np.ones((2, 2), np.float32), "x": np.arange(3, dtype=np.float32)}
  assert checkpoint_lib.params_sha256(a) == checkpoint_lib.params_sha256(b)
  b["x"] = b["x"].copy()
  b["x"][0] = np.float32(1e-30)
  assert checkpoint_lib.params_sha256(a) != checkpoint_lib.params_sha256(b)


def _logged_losses(workdir, phase):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  return {r["step"]: r["train/loss"] for r in records
          if r["phase"] == phase and "train/loss" in r}


def test_default_optimisation_level_trains_as_the_suite(trained_digits,
                                                        tmp_path):
  """The suite compiles with XLA's optimisations off (conftest); users run
  them on. The teacher phase of the suite's run, compiled at the default
  level, logs the same losses (float rounding apart) and ends with the same
  test accuracy on the 360 real digits."""
  config, workdir, results = trained_digits
  config = config.copy_and_resolve_references()
  config.phase_order = "teacher"
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    optimised = phases.run(config, str(tmp_path / "optimised"))
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
  want = _logged_losses(workdir, "teacher")
  got = _logged_losses(str(tmp_path / "optimised"), "teacher")
  # Every log step (5), epoch end (11) and checkpoint (4) of 22 steps.
  assert sorted(got) == sorted(want) == [4, 5, 8, 10, 11, 12, 15, 16, 20, 22]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-3), step
  assert abs(optimised["teacher"]["top1"] - results["teacher"]["top1"]
             ) <= 2 / 360
