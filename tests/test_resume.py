"""Preemption safety: SIGTERM, then SIGKILL mid-phase, re-run, bitwise-equal result.

The runs are `python -m bnn_jax.main` processes as users start them: one
device, XLA's default optimisation level (not the
`jax_disable_most_optimizations` that conftest sets for this process).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

from conftest import REPO
CHECKPOINT_EVERY = 5


def _command(workdir: str, data_dir: str) -> list[str]:
  """A two-phase digits run: teacher 2 epochs, step1 3 epochs (11 steps each)."""
  return [
      sys.executable, "-m", "bnn_jax.main", "--config=configs/digits.py",
      f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
      "--config.phase_order=teacher,step1", "--config.batch_size=128",
      "--config.eval_batch_size=120",
      f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
      "--config.log_every_steps=5", "--config.phases.teacher.num_epochs=2",
      "--config.phases.step1.num_epochs=3",
      "--config.phases.step1.model.width_multiplier=0.25",
  ]


def _env() -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_DISABLE_MOST_OPTIMIZATIONS")}
  # One device and XLA's default optimisations, as a plain user run.
  return dict(env, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _step1_checkpoints(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "step1", "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits_data_dir):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  subprocess.run(_command(workdir, digits_data_dir), cwd=REPO, env=_env(),
                 check=True, capture_output=True, timeout=600)
  return _results(workdir)


def _start_and_signal(workdir: str, data_dir: str, sig: int,
                      after_checkpoint: int):
  """Starts a run; sends `sig` once step1 has written checkpoint
  `after_checkpoint`."""
  proc = subprocess.Popen(_command(workdir, data_dir), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  marker = os.path.join(workdir, "step1", "checkpoints",
                        str(after_checkpoint))
  deadline = time.time() + 600
  try:
    while not os.path.isdir(marker):
      assert proc.poll() is None, proc.communicate()[1][-2000:]
      assert time.time() < deadline, (
          f"no step1 checkpoint {after_checkpoint} within 600 s")
      time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return proc.returncode, stdout, stderr


def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(
    uninterrupted, digits_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  # SIGTERM (a preemption notice): saves where it stopped, exits 143.
  code, _, stderr = _start_and_signal(workdir, digits_data_dir,
                                      signal.SIGTERM, CHECKPOINT_EVERY)
  assert code == 143, stderr[-2000:]
  assert "Traceback" not in stderr
  assert "re-run the same command to resume" in stderr
  stopped_at = _step1_checkpoints(workdir)[-1]
  # A checkpoint was written at the step where it stopped (not only the
  # periodic one), unless it stopped exactly there.
  assert stopped_at >= CHECKPOINT_EVERY
  # Resumed, then SIGKILL (power loss) after the next periodic checkpoint.
  killed_after = (stopped_at // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
  assert killed_after < 33, f"stopped at step {stopped_at} of 33, too late"
  code, _, _ = _start_and_signal(workdir, digits_data_dir, signal.SIGKILL,
                                 killed_after)
  assert code == -signal.SIGKILL
  assert "step1" not in _results(workdir)  # killed mid-phase
  # Resumed again with the other malloc mode: an operational field (the
  # workdir is accepted), applied before JAX starts, and the same bits.
  done = subprocess.run(
      _command(workdir, digits_data_dir) + ["--config.cpu_malloc=reuse"],
      cwd=REPO, env=_env(), check=True, capture_output=True, text=True,
      timeout=600)
  if sys.platform.startswith("linux"):
    assert ("cpu_malloc=reuse: M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD"
            in done.stdout.splitlines())
  resumed = _results(workdir)
  for phase in ("teacher", "step1"):
    assert resumed[phase]["params_sha256"] == (
        uninterrupted[phase]["params_sha256"])
    assert resumed[phase]["steps"] == uninterrupted[phase]["steps"]
    assert resumed[phase]["best_top1"] == uninterrupted[phase]["best_top1"]
