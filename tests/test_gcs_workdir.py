"""A gs:// workdir end to end, against a local GCS emulator.

The real `bnn_jax.main` job (digits, shrunk; TensorBoard on) runs with
`--workdir=gs://<bucket>/...` served by `gcp-storage-emulator` (through
tests/gcs_emulator.py, which adds a header TensorStore needs): orbax's
arrays go through TensorStore (`TENSORSTORE_GCS_HTTP_URL`), every other
file through etils.epath and gcsfs (`EPATH_USE_TF=false`,
`STORAGE_EMULATOR_HOST`). Killed with SIGKILL mid-phase and re-run, it ends
bitwise where an uninterrupted run does, and every file of the run
(config, results, metrics, TensorBoard events, checkpoints) is in the
bucket, none on the local disk. And when the bucket starts refusing writes
mid-run (the emulator's injected 403), the job stops with one line naming
the last good checkpoint, which stays in the bucket, readable.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcp_storage_emulator")
gcsfs_core = pytest.importorskip("gcsfs.core")

import multiprocess_util  # noqa: E402  (tests/ is on sys.path)

_BUCKET = "bnn-jax-test"
# While this file (in the emulator's directory) exists, the emulator
# refuses the writes whose URL contains its first line (tests/gcs_emulator.py).
_REFUSE_FLAG = "refuse_writes"
# teacher 1 epoch + step1 1 epoch, 8 steps each (512 examples, batch 64).
_FLAGS = ("--config=configs/digits.py", "--config.phase_order=teacher,step1",
          "--config.batch_size=64", "--config.eval_batch_size=120",
          "--config.dataset.train_split=train[:512]",
          "--config.dataset.eval_split=test[:120]",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=4",
          "--config.phases.teacher.num_epochs=1",
          "--config.phases.step1.num_epochs=1",
          "--config.phases.step1.model.width_multiplier=0.25")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """(port, refuse-writes flag path) of a fresh in-memory GCS emulator
  holding bucket _BUCKET."""
  port = multiprocess_util.free_port()
  emulator_dir = tmp_path_factory.mktemp("emulator")
  log = open(emulator_dir / "log.txt", "w")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__),
                                    "gcs_emulator.py"), "start",
       f"--port={port}", f"--default-bucket={_BUCKET}",
       "--no-store-on-disk"], stdout=log, stderr=subprocess.STDOUT,
      env=dict(os.environ, GCS_EMULATOR_REFUSE_WRITES_FLAG=str(
          emulator_dir / _REFUSE_FLAG)))
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, (
          "the GCS emulator did not start")
      time.sleep(0.2)
  yield port, emulator_dir / _REFUSE_FLAG
  proc.kill()
  proc.wait()
  log.close()


def _env(port):
  url = f"http://127.0.0.1:{port}"
  return {"TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x", "EPATH_USE_TF": "false",
          # gcsfs would otherwise ask the (absent) control API for the
          # bucket type first, for about 40 s per process.
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from bnn_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(path)
  return path


def _run(name, port, data_dir, log_prefix):
  return multiprocess_util.start(
      [*_FLAGS, f"--workdir=gs://{_BUCKET}/{name}",
       f"--config.dataset.data_dir={data_dir}"], log_prefix, env=_env(port))


@pytest.mark.slow
def test_gs_workdir_sigkill_and_rerun_is_bitwise(emulator, data_dir,
                                                 tmp_path):
  emulator, _ = emulator
  bucket = gcsfs_core.GCSFileSystem(
      endpoint_url=f"http://127.0.0.1:{emulator}", token="anon")

  def results(name):
    return json.loads(bucket.cat(f"{_BUCKET}/{name}/results.json"))

  reference = _run("reference", emulator, data_dir, str(tmp_path / "ref"))
  assert reference.wait(timeout=900) == [0], reference.output(0)[-3000:]

  run = _run("run", emulator, data_dir, str(tmp_path / "run"))
  run.wait_for("[step1] step 5/8 ", timeout=900)  # After step1's checkpoint 4.
  run.procs[0].send_signal(signal.SIGKILL)
  assert run.wait(timeout=60) == [-signal.SIGKILL]
  assert "step1" not in results("run")
  again = _run("run", emulator, data_dir, str(tmp_path / "again"))
  assert again.wait(timeout=900) == [0], again.output(0)[-3000:]
  assert f"results: gs://{_BUCKET}/run/results.json" in again.output(0)

  resumed, expected = results("run"), results("reference")
  for phase in ("teacher", "step1"):
    assert resumed[phase]["params_sha256"] == expected[phase]["params_sha256"]
    assert resumed[phase]["steps"] == expected[phase]["steps"] == 8

  files = bucket.find(f"{_BUCKET}/run")
  names = {f[len(f"{_BUCKET}/run/"):] for f in files}
  assert {"config.json", "results.json", "metrics.jsonl"} <= names
  for phase in ("teacher", "step1"):
    assert any(n.startswith(f"{phase}/events.out.tfevents") for n in names)
    assert any(n.startswith(f"{phase}/checkpoints/8/") for n in names)
  records = [json.loads(l) for l in
             bucket.cat(f"{_BUCKET}/run/metrics.jsonl").decode().splitlines()]
  assert {(r["phase"], r["step"]) for r in records if "train/loss" in r} == {
      (p, s) for p in ("teacher", "step1") for s in range(1, 9)}
  assert not os.path.exists(os.path.join(multiprocess_util.REPO, "gs:"))


@pytest.mark.slow
def test_bucket_refusing_writes_mid_run_is_one_line(emulator, data_dir,
                                                    tmp_path):
  port, refuse_flag = emulator
  checkpoints = f"gs://{_BUCKET}/refused/teacher/checkpoints"
  run = multiprocess_util.start(
      [*_FLAGS, "--config.phase_order=teacher",
       "--config.phases.teacher.num_epochs=3",
       f"--workdir=gs://{_BUCKET}/refused",
       f"--config.dataset.data_dir={data_dir}"], str(tmp_path / "run"),
      env=_env(port))
  run.wait_for("[teacher] step 5/24 ", timeout=900)  # After checkpoint 4.
  refuse_flag.write_text("/refused/teacher/checkpoints/")
  try:
    assert run.wait(timeout=600) == [1], run.output(0)[-3000:]
  finally:
    refuse_flag.unlink()
  assert os.path.exists(f"{refuse_flag}.refused")  # The fault was hit.
  own = re.compile(r"^(\[teacher\] |digits: built |results: )")
  # TensorStore's C++ logger names the test-only credential it uses.
  credential = re.compile(r"^I\d{4} .*google_auth_provider.cc")
  others = [l for l in run.output(0).splitlines()
            if l and not own.match(l) and not credential.match(l)]
  assert len(others) == 1, "\n".join(others[:40])
  line = others[0]
  assert line.startswith("error: could not write "), line
  assert "injected fault: this bucket refuses writes" in line, line
  # The step named (4 or later: the fault lands on the first write after the
  # flag) is whole and readable, read in a process with the bucket's env.
  named = re.search(r"the last good checkpoint is step (\d+) in (\S+); fix "
                    r"the storage", line)
  assert named and int(named.group(1)) >= 4 and named.group(2) == checkpoints
  read = subprocess.run(
      [sys.executable, "-c",
       "import sys; from bnn_jax import checkpoint; "
       "v, meta = checkpoint.load_variables(sys.argv[1], step=int(sys.argv[2]));"
       " print(meta['phase'], len(v['params']))", checkpoints,
       named.group(1)],
      capture_output=True, text=True, cwd=multiprocess_util.REPO,
      env=multiprocess_util.cpu_env(1, _env(port)), timeout=600)
  assert read.returncode == 0, read.stderr[-3000:]
  assert read.stdout.split()[0] == "teacher" and int(read.stdout.split()[1])
