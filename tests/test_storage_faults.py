"""Storage faults mid-run: one line, exit 1, the last good checkpoint intact.

The real `bnn_jax.main` job (digits teacher, shrunk) writes its workdir on
a small tmpfs mounted for the test; after its first checkpoint the test
either fills the file system (a disk that fills during a save) or mounts a
read-only view over the workdir (a file system that turns read-only, as
after an I/O error). The job must end with exit status 1 and exactly one
line of its own (`error: could not write ...`) besides its progress lines,
name the last good checkpoint, and leave every finished step directory in
place and restorable. After the disk is freed, the same command resumes and
finishes. (The same fault from a bucket: tests/test_gcs_workdir.py.)

Mounting needs root (CAP_SYS_ADMIN); elsewhere the tests skip, saying so.
"""

import json
import os
import re
import subprocess
import time

import pytest

import multiprocess_util  # noqa: E402  (tests/ is on sys.path)

# teacher only: 20 epochs of 8 steps (512 examples, batch 64), a checkpoint
# every 4 steps.
TOTAL_STEPS = 160
_FLAGS = ("--config=configs/digits.py", "--config.phase_order=teacher",
          "--config.batch_size=64", "--config.eval_batch_size=120",
          "--config.dataset.train_split=train[:512]",
          "--config.dataset.eval_split=test[:120]",
          "--config.log_every_steps=4", "--config.checkpoint_every_steps=4",
          "--config.phases.teacher.num_epochs=20")
# bnn_jax's own progress lines (and the data set's one-time build line).
_OWN_LINE = re.compile(r"^(\[teacher\] |digits: built |results: )")


def _mount(*args: str) -> None:
  subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
  """A fresh 64 MiB tmpfs; unmounted (with anything mounted over it) after."""
  root = tmp_path / "fs"
  root.mkdir()
  try:
    _mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root))
  except (OSError, subprocess.CalledProcessError) as e:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {e}")
  yield root
  # The read-only view over the workdir, if the test mounted one; the tmpfs.
  subprocess.run(["umount", str(root / "workdir")], capture_output=True)
  subprocess.run(["umount", "-l", str(root)], check=True)


def _fill(path) -> None:
  """Writes zeros to `path` until its file system has not a byte left."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT)
  try:
    for size in (1 << 20, 4096, 1):
      try:
        while True:
          os.write(fd, b"\0" * size)
      except OSError:
        pass
  finally:
    os.close(fd)


def _steps(workdir) -> list[int]:
  """The finished checkpoint steps of the teacher phase (orbax names them by
  step; a step still being written has a '.orbax-checkpoint-tmp' suffix)."""
  directory = workdir / "teacher" / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _start(workdir, data_dir, log):
  return multiprocess_util.start(
      [*_FLAGS, f"--workdir={workdir}",
       f"--config.dataset.data_dir={data_dir}"], str(log))


def _wait_for_checkpoint(run, workdir, timeout=600):
  deadline = time.monotonic() + timeout
  while not _steps(workdir):
    assert run.procs[0].poll() is None, run.output(0)[-3000:]
    assert time.monotonic() < deadline, "no checkpoint was saved"
    time.sleep(0.05)
  return _steps(workdir)


def _one_error_line(output: str) -> str:
  """The only line that is not a progress line; asserts there is one."""
  others = [l for l in output.splitlines() if l and not _OWN_LINE.match(l)]
  assert len(others) == 1, "\n".join(others[:40])
  assert others[0].startswith("error: could not write "), others[0]
  return others[0]


def _assert_kept_and_restorable(workdir, before: list[int], line: str):
  from bnn_jax import checkpoint  # pylint: disable=g-import-not-at-top
  after = _steps(workdir)
  assert set(before) <= set(after), (before, after)  # nothing deleted
  last = max(after)
  assert (f"the last good checkpoint is step {last} in "
          f"{workdir / 'teacher' / 'checkpoints'}") in line, line
  assert "re-run the same command to resume" in line
  variables, meta = checkpoint.load_variables(
      str(workdir / "teacher" / "checkpoints"), step=last)
  assert meta["phase"] == "teacher"
  assert variables["params"]  # a whole, readable state


@pytest.mark.slow
def test_disk_full_during_a_save(small_fs, digits_data_dir, tmp_path):
  workdir = small_fs / "workdir"
  run = _start(workdir, digits_data_dir, tmp_path / "run")
  before = _wait_for_checkpoint(run, workdir)
  filler = small_fs / "filler"
  _fill(filler)
  assert run.wait(timeout=600) == [1], run.output(0)[-3000:]
  line = _one_error_line(run.output(0))
  assert "No space left on device" in line, line
  _assert_kept_and_restorable(workdir, before, line)

  # Space again: the same command resumes from that checkpoint and finishes.
  last = max(_steps(workdir))
  filler.unlink()
  again = _start(workdir, digits_data_dir, tmp_path / "again")
  assert again.wait(timeout=600) == [0], again.output(0)[-3000:]
  progress = [int(m) for m in re.findall(r"^\[teacher\] step (\d+)/",
                                         again.output(0), re.M)]
  assert progress and min(progress) > last  # resumed, not restarted
  results = json.loads((workdir / "results.json").read_text())
  assert results["teacher"]["steps"] == TOTAL_STEPS


@pytest.mark.slow
def test_workdir_turns_read_only(small_fs, digits_data_dir, tmp_path):
  workdir = small_fs / "workdir"
  run = _start(workdir, digits_data_dir, tmp_path / "run")
  before = _wait_for_checkpoint(run, workdir)
  # A read-only view mounted over the workdir: every new open for writing
  # fails with EROFS, as on a file system remounted read-only after an
  # I/O error (files already open stay writable underneath).
  _mount("--bind", "-o", "ro", str(workdir), str(workdir))
  assert run.wait(timeout=600) == [1], run.output(0)[-3000:]
  line = _one_error_line(run.output(0))
  assert "Read-only file system" in line, line
  _assert_kept_and_restorable(workdir, before, line)
