"""The launchers in launch/: usage, arguments, quoting, failure handling.

Cloud and cluster tools (gcloud, srun) and the interpreter are replaced by
small fakes on PATH that record what they were asked to run, so these tests
check the exact commands without a cluster. The real multi-process run is in
tests/test_multiprocess.py.
"""

import os
import signal
import stat
import subprocess
import time

import pytest

pytestmark = pytest.mark.slow

from conftest import REPO
_LAUNCH = os.path.join(REPO, "launch")
_SCRIPTS = ["local.sh", "gpu_node.sh", "tpu_pod.sh", "slurm.sbatch"]


def _write_executable(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return str(path)


def _run(args, env=None, timeout=30):
  return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.mark.parametrize("script", _SCRIPTS)
def test_scripts_parse_are_strict_and_print_usage(script):
  path = os.path.join(_LAUNCH, script)
  assert os.access(path, os.X_OK)
  assert _run(["bash", "-n", path]).returncode == 0
  with open(path) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  result = _run(["bash", path, "--help"])
  assert result.returncode == 0
  assert result.stdout.startswith("Usage")


@pytest.mark.parametrize("script,args,message", [
    ("local.sh", ["--processes=x", "--", "--config=c"], "expected a number"),
    ("local.sh", ["--bogus"], "unknown option --bogus"),
    ("local.sh", [], "no bnn_jax.main flags"),
    ("gpu_node.sh", ["--gpus=a,b", "--", "x"], "--gpus wants a list"),
    ("tpu_pod.sh", ["--tpu=t", "--", "x"], "--tpu and --zone are required"),
    ("tpu_pod.sh", ["--tpu=t", "--zone=z"], "no bnn_jax.main flags"),
    ("slurm.sbatch", ["--config=c"], "not inside a SLURM job"),
])
def test_bad_arguments_fail_with_one_clear_line(script, args, message):
  env = {k: "" for k in os.environ if k.startswith("SLURM_")}
  result = _run(["bash", os.path.join(_LAUNCH, script), *args], env=env)
  assert result.returncode == 2
  assert message in result.stderr.splitlines()[0]


# ---------------------------------------------------------------------------
# local.sh: several processes, failure handling, signal forwarding.
# ---------------------------------------------------------------------------
_FAKE_MAIN = """#!/usr/bin/env bash
# Stands for `python -m bnn_jax.main ...`: prints its arguments, then fails
# (process $FAIL_ID), or runs until SIGTERM (exit 143) or SIGKILL.
id=""
for a in "$@"; do case "$a" in --process_id=*) id="${a#*=}" ;; esac; done
echo "args: $*"
echo "platforms=$JAX_PLATFORMS flags=$XLA_FLAGS"
if [[ "${FAIL_ID:-}" == "$id" ]]; then echo "process $id fails"; exit 3; fi
if [[ -n "${IGNORE_TERM:-}" ]]; then trap '' TERM
else trap 'echo "process $id got TERM"; exit 143' TERM; fi
for _ in $(seq 600); do sleep 0.1; done
"""


@pytest.fixture
def fake_python(tmp_path):
  return _write_executable(tmp_path / "python", _FAKE_MAIN)


def _start_local(fake_python, args, env):
  return subprocess.Popen(
      [os.path.join(_LAUNCH, "local.sh"), f"--python={fake_python}",
       "--port=23456", *args, "--", "--config=configs/digits.py",
       "--workdir=/tmp/a b"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
      env={**os.environ, **env}, start_new_session=True)


def _finish(process, timeout=20):
  try:
    out, _ = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()
  return out


def test_local_starts_every_process_with_its_id(fake_python):
  process = _start_local(
      fake_python, ["--processes=3", "--grace=2"],
      {"FAIL_ID": "2",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/x"})
  start = time.monotonic()
  out = _finish(process)
  assert time.monotonic() - start < 15
  assert process.returncode == 3  # The failing process's status.
  for i in range(3):
    assert (f"[process {i}] args: -m bnn_jax.main "
            "--coordinator_address=127.0.0.1:23456 --num_processes=3 "
            f"--process_id={i} --config=configs/digits.py --workdir=/tmp/a b"
            ) in out
    assert (f"[process {i}] platforms=cpu flags=--xla_dump_to=/x "
            "--xla_force_host_platform_device_count=1") in out
  # The others were stopped when process 2 failed.
  assert "[process 0] process 0 got TERM" in out
  assert "[process 1] process 1 got TERM" in out


def test_local_kills_processes_that_ignore_sigterm(fake_python):
  process = _start_local(fake_python, ["--processes=2", "--grace=1",
                                       "--devices_per_process=2"],
                         {"FAIL_ID": "1", "IGNORE_TERM": "1"})
  out = _finish(process)
  assert process.returncode == 3
  assert "count=2" in out
  assert "killing 1 processes after 1s" in out


def test_local_forwards_sigterm(fake_python, tmp_path):
  process = _start_local(fake_python, ["--processes=2"], {})
  deadline = time.monotonic() + 15
  lines = []
  while sum("args:" in line for line in lines) < 2:
    assert time.monotonic() < deadline, lines
    lines.append(process.stdout.readline())
  process.send_signal(signal.SIGTERM)
  out = "".join(lines) + _finish(process)
  assert process.returncode == 143  # Checkpointed and stopped: resumable.
  assert "[process 0] process 0 got TERM" in out
  assert "[process 1] process 1 got TERM" in out


# ---------------------------------------------------------------------------
# gpu_node.sh, tpu_pod.sh, slurm.sbatch with fake tools.
# ---------------------------------------------------------------------------
_RECORDER = """#!/usr/bin/env bash
# Records its arguments (one per line) and its environment of interest.
if [[ "${1:-}" == "-c" ]]; then echo 4; exit "${FAKE_GPU_STATUS:-0}"; fi
{ printf '%s\\n' "$@"; echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}";
  echo "JAX_PLATFORMS=${JAX_PLATFORMS:-}"; } > "$RECORD"
"""


def test_gpu_node_runs_one_process_on_the_listed_gpus(tmp_path):
  recorder = _write_executable(tmp_path / "python", _RECORDER)
  record = tmp_path / "record"
  result = _run([os.path.join(_LAUNCH, "gpu_node.sh"), "--gpus=0,1",
                 f"--python={recorder}", "--", "--config=configs/digits.py",
                 "--workdir=/w"], env={"RECORD": str(record)})
  assert result.returncode == 0, result.stderr
  assert "4 GPUs" in result.stderr
  assert record.read_text().splitlines() == [
      "-m", "bnn_jax.main", "--distributed=off", "--config=configs/digits.py",
      "--workdir=/w", "CUDA_VISIBLE_DEVICES=0,1", "JAX_PLATFORMS=cuda"]
  result = _run([os.path.join(_LAUNCH, "gpu_node.sh"),
                 f"--python={recorder}", "--", "--workdir=/w"],
                env={"RECORD": str(record), "FAKE_GPU_STATUS": "1"})
  assert result.returncode == 2
  assert "sees no CUDA GPU" in result.stderr


_FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm {scp SRC TPU:DEST | ssh TPU} ... as one worker
# whose home is $FAKE_HOME.
echo "gcloud $*" >> "$FAKE_HOME/gcloud.log"
verb="$4"; shift 4
if [[ "$verb" == scp ]]; then cp "$1" "$FAKE_HOME/${2#*:}"; exit 0; fi
for a in "$@"; do
  case "$a" in --command=*) cd "$FAKE_HOME"; exec bash -c "${a#*=}" ;; esac
done
exit 9
"""


def test_tpu_pod_ships_the_checkout_and_runs_main_on_all_workers(tmp_path):
  bin_dir = tmp_path / "bin"
  home = tmp_path / "home"
  bin_dir.mkdir()
  (home / "bnn_jax" / ".venv" / "bin").mkdir(parents=True)
  _write_executable(bin_dir / "gcloud", _FAKE_GCLOUD)
  _write_executable(home / "bnn_jax" / ".venv" / "bin" / "python", _RECORDER)
  record = tmp_path / "record"
  result = _run(
      [os.path.join(_LAUNCH, "tpu_pod.sh"), "--tpu=pod", "--zone=z",
       "--project=p", "--", "--config=configs/adambnn_imagenet.py",
       "--workdir=/mnt/shared/run one", "--config.dataset.data_dir=gs://b/d"],
      env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_HOME": str(home),
           "RECORD": str(record)})
  assert result.returncode == 0, result.stderr
  # The working tree arrived (not .git), the existing venv was kept.
  assert (home / "bnn_jax" / "bnn_jax" / "main.py").is_file()
  assert (home / "bnn_jax" / "launch" / "tpu_pod.sh").is_file()
  assert not (home / "bnn_jax" / ".git").exists()
  assert not (home / "bnn_jax_checkout.tar.gz").exists()
  log = (home / "gcloud.log").read_text().splitlines()
  assert len(log) == 4  # scp, unpack, venv check, run
  for line in log:
    assert "--zone=z" in line and "--project=p" in line
    assert "--worker=all" in line
  assert "pip install" in log[2] and "[ -x .venv/bin/python ] ||" in log[2]
  assert "sys.version_info < (3, 11)" in log[2]
  assert record.read_text().splitlines()[:6] == [
      "-m", "bnn_jax.main", "--distributed=on",
      "--config=configs/adambnn_imagenet.py",
      "--workdir=/mnt/shared/run one", "--config.dataset.data_dir=gs://b/d"]


_SLURM_ENV = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2",
              "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "gpu:8",
              "SLURM_SUBMIT_DIR": REPO}


def test_slurm_starts_one_task_per_gpu(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_executable(bin_dir / "srun", _RECORDER)
  record = tmp_path / "record"
  env = {**_SLURM_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "RECORD": str(record), "PYTHON": "/venv/bin/python"}
  result = _run(["bash", os.path.join(_LAUNCH, "slurm.sbatch"),
                 "--config=configs/adambnn_imagenet.py", "--workdir=/s/r"],
                env=env)
  assert result.returncode == 0, result.stderr
  assert "2 nodes x 8 tasks" in result.stderr
  assert record.read_text().splitlines() == [
      "--kill-on-bad-exit=1", "--gpu-bind=none", "/venv/bin/python", "-m",
      "bnn_jax.main", "--config=configs/adambnn_imagenet.py",
      "--workdir=/s/r", "CUDA_VISIBLE_DEVICES=", "JAX_PLATFORMS=cuda"]
  result = _run(["bash", os.path.join(_LAUNCH, "slurm.sbatch"), "--x"],
                env={**env, "SLURM_NTASKS_PER_NODE": "1"})
  assert result.returncode == 2
  assert "pass --ntasks-per-node=8" in result.stderr
