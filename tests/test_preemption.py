"""Preemption agreed across processes: SIGTERM to ONE of two processes.

Two `bnn_jax.main` processes on localhost (jax.distributed, CPU, one device
each) train a shrunk digits teacher. SIGTERM goes to process 1 only, mid
phase: both processes stop at the same step, save the same checkpoint and
exit 143 within seconds; re-running the same command ends with the
parameters of an uninterrupted two-process run, bit for bit.
"""

import json
import os
import signal
import time

import pytest

from bnn_jax.datasets import digits
from bnn_jax.training import multihost
import multiprocess_util  # tests/ is on sys.path (rootdir conftest)

# 3 epochs of 16 steps (512 examples, batch 32); no periodic checkpoint
# inside the phase, so the resumed run starts from the preemption's.
_FLAGS = ("--config=configs/digits.py", "--config.phase_order=teacher",
          "--config.batch_size=32", "--config.eval_batch_size=120",
          "--config.dataset.train_split=train[:512]",
          "--config.dataset.eval_split=test[:120]",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
          "--config.phases.teacher.num_epochs=3")
_TOTAL_STEPS = 48


def _flags(workdir, data_dir):
  return [*_FLAGS, f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}"]


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(path)  # Once, before the processes read it.
  return path


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_then_resumes_bitwise(
    data_dir, tmp_path):
  # Uninterrupted.
  reference = multiprocess_util.start(
      _flags(tmp_path / "reference", data_dir), str(tmp_path / "reference"),
      processes=2)
  assert reference.wait(timeout=600) == [0, 0], reference.output(0)[-3000:]

  # SIGTERM to process 1 only, a few steps into the phase.
  workdir = tmp_path / "run"
  run = multiprocess_util.start(_flags(workdir, data_dir),
                                str(tmp_path / "run"), processes=2)
  run.wait_for(f"[teacher] step 12/{_TOTAL_STEPS} ", index=0)
  run.procs[1].send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  codes = run.wait(timeout=120)
  seconds = time.monotonic() - signalled
  assert codes == [143, 143], (run.output(0)[-2000:], run.output(1)[-2000:])
  # Within STOP_CHECK_EVERY_STEPS steps (about a second on an idle machine;
  # this bound leaves room for a loaded one).
  assert seconds < 180, f"stopped {seconds:.0f} s after the signal"
  for i in (0, 1):
    assert "Traceback" not in run.output(i), run.output(i)[-3000:]
  out0, out1 = run.output(0), run.output(1)
  assert "re-run the same command to resume" in out0
  assert "[teacher] step" not in out1  # One voice: process 0 reports.
  steps = sorted(int(d) for d in os.listdir(workdir / "teacher" /
                                            "checkpoints") if d.isdigit())
  # One checkpoint, at the first agreement point after the signal.
  assert len(steps) == 1 and 12 < steps[0] < _TOTAL_STEPS, steps
  assert steps[0] % multihost.STOP_CHECK_EVERY_STEPS == 0, steps
  assert f"stopped at step {steps[0]}/{_TOTAL_STEPS}" in out0

  # The same command again: continues and ends bitwise where the
  # uninterrupted run did.
  again = multiprocess_util.start(_flags(workdir, data_dir),
                                  str(tmp_path / "again"), processes=2)
  assert again.wait(timeout=600) == [0, 0], again.output(0)[-3000:]
  resumed, expected = _results(workdir), _results(tmp_path / "reference")
  assert resumed["teacher"]["steps"] == _TOTAL_STEPS
  assert (resumed["teacher"]["params_sha256"]
          == expected["teacher"]["params_sha256"])
