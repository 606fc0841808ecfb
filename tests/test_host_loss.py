"""A host that dies: SIGKILL to one of two processes, then to the coordinator.

Two `bnn_jax.main` processes on localhost (jax.distributed, CPU, one device
each) train a shrunk digits teacher (16 steps, a checkpoint every 4). A
SIGKILL to process 1 mid phase is a host that dies without a word (kernel
panic, OOM kill, a reclaimed VM): process 0 must stop within the heartbeat
timeout plus a margin, with one line naming process 1 and exit status 75,
and no traceback, C++ stack or abort. The same command then resumes from
the last checkpoint; a SIGKILL to process 0 (the coordinator itself) in
that resumed run must stop process 1 the same way. A third run of the same
command resumes again and must end with the parameters of an uninterrupted
two-process run, bit for bit (results.json's params_sha256).
"""

import json
import os
import signal
import time

import pytest

from bnn_jax.training import multihost
import multiprocess_util  # tests/ is on sys.path (rootdir conftest)

_HEARTBEAT_TIMEOUT_S = 10
# Beyond the heartbeat timeout: the survivor's exit and a loaded machine
# (the collective that reaches a dead peer fails within a second here).
_MARGIN_S = 60
_TOTAL_STEPS = 16
_FLAGS = ("--config=configs/digits.py", "--config.phase_order=teacher",
          "--config.batch_size=32", "--config.eval_batch_size=120",
          "--config.dataset.train_split=train[:256]",
          "--config.dataset.eval_split=test[:120]",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=4",
          "--config.phases.teacher.num_epochs=2",
          f"--distributed_heartbeat_timeout={_HEARTBEAT_TIMEOUT_S}")


def _flags(workdir, data_dir):
  return [*_FLAGS, f"--workdir={workdir}",
          f"--config.dataset.data_dir={data_dir}"]


def _sha(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["teacher"]["steps"] == _TOTAL_STEPS
  return results["teacher"]["params_sha256"]


def _checkpoints(workdir):
  return sorted(int(d) for d in os.listdir(workdir / "teacher" /
                                           "checkpoints") if d.isdigit())


def _kill_mid_phase(workdir, data_dir, log, victim, at_step):
  """Starts two processes, SIGKILLs `victim` at `at_step`; the survivor's
  (exit status, seconds from the kill to its exit, output)."""
  run = multiprocess_util.start(_flags(workdir, data_dir), log, processes=2)
  try:
    run.wait_for(f"[teacher] step {at_step}/{_TOTAL_STEPS} ", index=0)
    run.procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = run.procs[1 - victim]
    survivor.wait(timeout=_HEARTBEAT_TIMEOUT_S + _MARGIN_S)
    seconds = time.monotonic() - killed
  finally:
    run.kill()
  return survivor.returncode, seconds, run.output(1 - victim)


@pytest.mark.slow
def test_sigkill_to_a_process_stops_the_other_then_resumes_bitwise(
    digits_data_dir, tmp_path):
  data_dir = digits_data_dir  # Built once, before the processes read it.
  reference = multiprocess_util.start(
      _flags(tmp_path / "reference", data_dir), str(tmp_path / "reference"),
      processes=2)
  assert reference.wait(timeout=600) == [0, 0], reference.output(0)[-3000:]

  workdir = tmp_path / "run"
  # Process 1 dies mid phase: process 0 stops with the line.
  code, seconds, out = _kill_mid_phase(workdir, data_dir,
                                       str(tmp_path / "kill1"), 1, 6)
  assert code == multihost.EXIT_HOST_LOST == 75, out[-3000:]
  assert seconds < _HEARTBEAT_TIMEOUT_S + _MARGIN_S
  lines = [l for l in out.splitlines() if "error:" in l]
  assert lines == [multihost.lost_line(1, 0)], out[-3000:]
  for noise in ("Traceback", "Fatal Python error", "Check failure",
                "Terminating process"):
    assert noise not in out, out[-3000:]
  assert _checkpoints(workdir) == [4]

  # Re-run; process 0, the coordinator, dies: process 1 stops with the line.
  code, seconds, out = _kill_mid_phase(workdir, data_dir,
                                       str(tmp_path / "kill0"), 0, 10)
  assert code == 75, out[-3000:]
  assert seconds < _HEARTBEAT_TIMEOUT_S + _MARGIN_S
  lines = [l for l in out.splitlines() if "error:" in l]
  assert lines == [multihost.lost_line(0, 1)], out[-3000:]
  for noise in ("Traceback", "Fatal Python error", "Check failure",
                "Terminating process"):
    assert noise not in out, out[-3000:]
  kill0_out0 = open(str(tmp_path / "kill0") + ".0.log").read()
  # It resumed from step 4 (the killed run's last checkpoint).
  assert "[teacher] step 5/16 " in kill0_out0
  assert "[teacher] step 4/16 " not in kill0_out0
  assert _checkpoints(workdir)[-1] == 8

  # The same command again: resumes from step 8, ends bitwise as the
  # uninterrupted run.
  again = multiprocess_util.start(_flags(workdir, data_dir),
                                  str(tmp_path / "again"), processes=2)
  assert again.wait(timeout=600) == [0, 0], again.output(0)[-3000:]
  assert "[teacher] step 9/16 " in again.output(0)
  assert "[teacher] step 8/16 " not in again.output(0)
  assert _sha(workdir) == _sha(tmp_path / "reference")
