"""Preemption safety: SIGKILL or SIGTERM mid-phase, re-run, bitwise-equal result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AFTER_CHECKPOINT = 5  # step1's first checkpoint step


def _command(workdir: str, data_dir: str) -> list[str]:
  """A two-phase digits run: teacher 2 epochs, step1 3 epochs (11 steps each)."""
  return [
      sys.executable, "-m", "bnn_jax.main", "--config=configs/digits.py",
      f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
      "--config.phase_order=teacher,step1", "--config.batch_size=128",
      "--config.eval_batch_size=120", "--config.checkpoint_every_steps=5",
      "--config.log_every_steps=5", "--config.phases.teacher.num_epochs=2",
      "--config.phases.step1.num_epochs=3",
      "--config.phases.step1.model.width_multiplier=0.25",
  ]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)  # one device, as a plain user run
  return env


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  subprocess.run(_command(workdir, data_dir), cwd=REPO, env=_env(), check=True,
                 capture_output=True, timeout=300)
  return _results(workdir)


def _start_and_signal(workdir: str, data_dir: str, sig: int):
  """Starts a run; sends `sig` once step1 has written its first checkpoint."""
  proc = subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  marker = os.path.join(workdir, "step1", "checkpoints",
                        str(KILL_AFTER_CHECKPOINT))
  deadline = time.time() + 300
  try:
    while not os.path.isdir(marker):
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      assert time.time() < deadline, "no step1 checkpoint within 300 s"
      time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return proc.returncode, stdout, stderr


def test_sigkill_mid_phase_then_resume_is_bitwise_identical(
    uninterrupted, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  code, _, _ = _start_and_signal(workdir, data_dir, signal.SIGKILL)
  assert code == -signal.SIGKILL
  assert "step1" not in _results(workdir)  # killed mid-phase
  # Resumed with the other malloc mode: an operational field (the workdir
  # is accepted), applied before JAX starts, and the same bits.
  done = subprocess.run(
      _command(workdir, data_dir) + ["--config.cpu_malloc=reuse"], cwd=REPO,
      env=_env(), check=True, capture_output=True, text=True, timeout=300)
  if sys.platform.startswith("linux"):
    assert ("cpu_malloc=reuse: M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD"
            in done.stdout.splitlines())
  resumed = _results(workdir)
  for phase in ("teacher", "step1"):
    assert resumed[phase]["params_sha256"] == (
        uninterrupted[phase]["params_sha256"])
    assert resumed[phase]["steps"] == uninterrupted[phase]["steps"]
    assert resumed[phase]["best_top1"] == uninterrupted[phase]["best_top1"]


def test_sigterm_saves_exits_cleanly_and_resumes(uninterrupted, data_dir,
                                                 tmp_path):
  workdir = str(tmp_path / "run")
  code, _, stderr = _start_and_signal(workdir, data_dir, signal.SIGTERM)
  assert code == 143, stderr[-2000:]
  assert "Traceback" not in stderr
  assert "re-run the same command to resume" in stderr
  steps = sorted(int(d) for d in os.listdir(
      os.path.join(workdir, "step1", "checkpoints")) if d.isdigit())
  # A checkpoint was written at the step where it stopped (not only the
  # periodic one at step 5), unless it stopped exactly there.
  assert steps[-1] >= KILL_AFTER_CHECKPOINT
  subprocess.run(_command(workdir, data_dir), cwd=REPO, env=_env(),
                 check=True, capture_output=True, timeout=300)
  resumed = _results(workdir)
  assert resumed["step1"]["params_sha256"] == (
      uninterrupted["step1"]["params_sha256"])
