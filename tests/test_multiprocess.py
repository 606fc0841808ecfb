"""Multi-process runs: a real 2-process run on localhost matches 1 process.

`launch/local.sh --processes=2 --devices_per_process=1` starts two
`python -m bnn_jax.main` processes joined by jax.distributed (gloo CPU
collectives), one device each. The same config runs in this process on a
2-device mesh. Both train a teacher, then a binary student (step 2: binary
weights and activations, distilled from the teacher) at a real learning
rate, on the same global batches. Each device computes the same partitioned
step on the same 32 examples in both runs, and every cross-device reduction
adds exactly two partial values (a + b == b + a in IEEE arithmetic), so the
reduction order matches: the final parameters, BatchNorm statistics and
training losses are required to be BITWISE equal (params_sha256), not
merely close. Evaluation over an odd-sized split (359 examples: 180 and 179
per process) counts every example once: equal top-1/top-5, and the loss
within 1e-6 relative (the processes place the examples in other batch rows,
so its sum runs in another order).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax.datasets import digits
from bnn_jax.training import multihost
from bnn_jax.training import phases
from bnn_jax.training import topology
from configs import digits as digits_config

from conftest import REPO

# Shared by both runs: 4 steps per phase of 64 examples (32 per device) and
# an odd-sized eval split. Step 2 starts from scratch (as `onestep` of
# configs/digits_adam_vs_sgd.py) and runs Adam at the recipe's 1.25e-3 with a
# constant schedule: the recipe's `linear_epoch` decay would give a 1-epoch
# phase lr 0 (its last epoch runs at 0), which never moves a binary weight.
_STEP2_LR = 1.25e-3
_OVERRIDES = {
    "phase_order": "teacher,step2",
    "batch_size": 64,
    "eval_batch_size": 64,
    "dataset.train_split": "train[:256]",
    "dataset.eval_split": "test[:359]",
    "log_every_steps": 1,
    "phases.teacher.num_epochs": 1,
    "phases.teacher.optimizer.name": "sgd",
    "phases.teacher.optimizer.learning_rate": 0.05,
    "phases.step2.num_epochs": 1,
    "phases.step2.init_from": "",
    "phases.step2.optimizer.learning_rate": _STEP2_LR,
    "phases.step2.optimizer.schedule": "constant",
    "phases.step2.model.width_multiplier": 0.25,
}
_TIMEOUT_S = 900  # generous: CI machines may be shared


# ---------------------------------------------------------------------------
# bnn_jax.training.multihost: when to initialise.
# ---------------------------------------------------------------------------
_SLURM = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]",
          "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
          "SLURM_STEP_NUM_TASKS": "16"}


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    (_SLURM, "slurm"),
    ({**_SLURM, "SLURM_STEP_NUM_TASKS": "1"}, None),  # One task.
    ({k: v for k, v in _SLURM.items() if k != "SLURM_STEP_NUM_TASKS"},
     None),  # The batch script's own shell, not an srun step.
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1",
      "OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
])
def test_cluster_from_environment(environ, expected):
  assert multihost.cluster_from_environment(environ) == expected


def test_initialize_does_nothing_for_one_process():
  assert multihost.initialize("auto", environ={}) is None
  assert multihost.initialize("off", environ=_SLURM) is None
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="off", coordinator_address="h:1"),
     "--distributed=off contradicts --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1"),
     "needs --num_processes --process_id as well"),
    (dict(num_processes=2, process_id=0), "needs --coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     r"--process_id=2 must be in 0..1"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0),
     "--num_processes=0 must be >= 1"),
    (dict(mode="sometimes"), "--distributed='sometimes'"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0,
          heartbeat_timeout_s=0),
     "--distributed_heartbeat_timeout=0 must be a whole number of seconds"),
])
def test_initialize_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    multihost.initialize(environ={}, **kwargs)
  assert not jax.distributed.is_initialized()


# ---------------------------------------------------------------------------
# bnn_jax.training.multihost: a lost process (the end-to-end runs: test_host_loss.py).
# ---------------------------------------------------------------------------
# What jaxlib 0.10.2 printed in the runs of test_host_loss.py.
_HEARTBEAT = ("Barrier result: 'INTERNAL: Barrier failed because: task is set "
              "to ERROR: UNAVAILABLE: Task 1 heartbeat timeout. This "
              "indicates that the remote task has failed")
_UNHEALTHY = ("Use error polling to propagate the following error to all "
              "tasks: UNAVAILABLE: The following tasks are unhealthy (stopped "
              "sending heartbeats):\n3\nThe tasks have crashed.")
_LEADER = ("absl::Status: UNAVAILABLE: Failed to send RPC to coordination "
           "service. Either the leader task was preempted/died/restarted "
           "unexpectedly or this task is experiencing network issues.")
_GLOO = ("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/"
         "pair.cc:538] Read error [127.0.0.1]:41906: Connection reset by peer")


@pytest.mark.parametrize("text,num_processes,index,expected", [
    (_HEARTBEAT, 4, 0, 1),
    (_UNHEALTHY, 4, 0, 3),
    (_LEADER, 4, 2, 0),
    (_GLOO, 2, 1, 0),  # Two processes: the other one.
    (_GLOO, 2, 0, 1),
    (_GLOO, 4, 0, None),  # Gloo names an address, not a process.
    (_GLOO, None, None, None),
])
def test_lost_process_is_read_from_the_error(text, num_processes, index,
                                             expected):
  assert multihost.is_peer_loss(text)
  assert multihost.lost_process(text, num_processes, index) == expected


def test_lost_line_names_the_process_and_the_fix():
  assert multihost.lost_line(1, 0) == (
      "error: lost process 1 (its host died, it was killed or it stopped "
      "answering); the last checkpoint is intact: re-run the same command "
      "to resume")
  assert multihost.lost_line(0, 3).startswith("[process 3] error: lost "
                                              "process 0 (")
  assert multihost.lost_line(None, 2).startswith("[process 2] error: lost "
                                                 "another process (")


def test_other_errors_are_no_peer_loss():
  assert not multihost.is_peer_loss("config.batch_size=30 must be a positive "
                                    "multiple of the device count 4")
  # Alone, even a peer-loss message passes through (nothing to stop).
  with pytest.raises(ValueError, match="Gloo"):
    with multihost.stopping_on_peer_loss():
      raise ValueError(_GLOO)


@pytest.mark.parametrize("argv,environ,expected", [
    (["--config=c.py", "--workdir=w"], {}, False),
    (["--coordinator_address=h:1", "--num_processes=2", "--process_id=0"],
     {}, True),
    (["--process_id", "1"], {}, True),
    (["--distributed=on"], {}, True),
    (["--distributed", "on"], {}, True),
    (["--config=c.py"], _SLURM, True),
    (["--distributed=off"], _SLURM, False),
    (["--nodistributed"], _SLURM, False),
    (["--process_id=0"], {multihost.SUPERVISOR_ENV: "child"}, False),
    (["--process_id=0"], {multihost.SUPERVISOR_ENV: "off"}, False),
])
def test_wants_supervisor(argv, environ, expected):
  assert multihost.wants_supervisor(["main.py", *argv], environ) is expected


# A child as JAX's fatal-error path leaves it: it names itself to the
# supervisor, logs, then aborts with a C++ stack and Python's fault dump.
_ABORTING_CHILD = f"""
import os, sys
print({multihost._ANNOUNCE!r} + "1 of 3", file=sys.stderr, flush=True)
print("a warning before", file=sys.stderr, flush=True)
print("stdout goes through", flush=True)
print("E1207 coordination_service_agent.cc:289] Polled an error", file=sys.stderr)
print({_LEADER!r}, file=sys.stderr)
print("*** Check failure stack trace: ***", file=sys.stderr)
print("Fatal Python error: Aborted", file=sys.stderr, flush=True)
os.abort()
"""


def _supervised(code, debug=False):
  script = ("import sys\nfrom bnn_jax.training import multihost\n"
            "sys.exit(multihost.supervise([sys.executable, '-c', sys.argv[1]],"
            f" debug={debug}))")
  return subprocess.run([sys.executable, "-c", script, code],
                        capture_output=True, text=True, timeout=60, cwd=REPO,
                        env={**os.environ, multihost.SUPERVISOR_ENV: ""})


def test_supervisor_turns_the_abort_into_one_line():
  result = _supervised(_ABORTING_CHILD)
  assert result.returncode == multihost.EXIT_HOST_LOST == 75
  assert result.stdout == "stdout goes through\n"
  assert result.stderr.splitlines() == [
      "a warning before", multihost.lost_line(0, 1)]
  # --debug shows everything, then the line.
  result = _supervised(_ABORTING_CHILD, debug=True)
  assert result.returncode == 75
  assert "Fatal Python error: Aborted" in result.stderr
  assert result.stderr.splitlines()[-1] == multihost.lost_line(0, 1)


@pytest.mark.parametrize("code,status,stderr", [
    ("import sys; print('error: bad', file=sys.stderr); sys.exit(1)", 1,
     "error: bad\n"),
    ("import os, sys; print('stopped: preempted', file=sys.stderr); "
     "sys.exit(143)", 143, "stopped: preempted\n"),
    # A coordination-service line, then a normal exit: shown after all.
    ("import sys; print('E1 coordination_service.cc] slow', "
     "file=sys.stderr); print('then this', file=sys.stderr)", 0,
     "E1 coordination_service.cc] slow\nthen this\n"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 137, ""),
])
def test_supervisor_passes_other_endings_through(code, status, stderr):
  result = _supervised(code)
  assert (result.returncode, result.stderr) == (status, stderr)


# ---------------------------------------------------------------------------
# The real two-process run.
# ---------------------------------------------------------------------------
def _config(data_dir):
  config = digits_config.get_config()
  config.update_from_flattened_dict(_OVERRIDES)
  config.dataset.data_dir = data_dir
  return config


def _metrics(workdir):
  """{(phase, step): every value logged at that step} from metrics.jsonl."""
  merged = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      merged.setdefault((record["phase"], record["step"]), {}).update(record)
  return merged


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
  """(one-process workdir, two-process workdir, two-process output)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(data_dir)  # Once, before the processes read it.
  one_dir = str(tmp_path_factory.mktemp("one_process"))
  two_dir = str(tmp_path_factory.mktemp("two_processes"))
  log_path = os.path.join(two_dir + "_log.txt")
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(JAX_DISABLE_MOST_OPTIMIZATIONS="1", TF_CPP_MIN_LOG_LEVEL="3")
  command = [os.path.join(REPO, "launch", "local.sh"), "--processes=2",
             "--devices_per_process=1", "--grace=5",
             f"--python={sys.executable}", "--",
             "--config=configs/digits.py", f"--workdir={two_dir}",
             f"--config.dataset.data_dir={data_dir}"]
  command += [f"--config.{k}={v}" for k, v in _OVERRIDES.items()]
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO, env=env, start_new_session=True)
    try:
      # Meanwhile, the reference: one process, 2 of this process's devices.
      start = time.monotonic()
      phases.run(_config(data_dir), one_dir,
                 mesh=topology.make_mesh(jax.devices()[:2]))
      process.wait(timeout=max(_TIMEOUT_S - (time.monotonic() - start), 1))
    finally:
      if process.poll() is None:  # Timed out or the reference failed.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
  with open(log_path) as f:
    output = f.read()
  assert process.returncode == 0, output[-3000:]
  return one_dir, two_dir, output


@pytest.mark.slow
def test_two_processes_joined_with_one_device_each(two_runs):
  _, _, output = two_runs
  for i in (0, 1):
    assert (f"[process {i}] distributed: process {i} of 2 (from arguments), "
            "1 of 2 devices local") in output
  # One voice: only process 0 reports the results.
  assert "[process 0] results:" in output
  assert "[process 1] results:" not in output


@pytest.mark.slow
def test_two_processes_match_one_process(two_runs):
  one_dir, two_dir, _ = two_runs
  with open(os.path.join(one_dir, phases.RESULTS_FILE)) as f:
    one = json.load(f)
  with open(os.path.join(two_dir, phases.RESULTS_FILE)) as f:
    two = json.load(f)
  assert list(one) == list(two) == ["teacher", "step2"]
  for phase in one:
    assert one[phase]["steps"] == two[phase]["steps"] == 4
    for key in ("top1", "top5", "params_sha256"):
      assert one[phase][key] == two[phase][key], (phase, key)

  # The same global batches and the same arithmetic: the same losses,
  # gradient norms and learning rates, step by step, to the bit.
  one_metrics, two_metrics = _metrics(one_dir), _metrics(two_dir)
  assert set(one_metrics) == set(two_metrics)
  steps = [key for key in one_metrics if "train/loss" in one_metrics[key]]
  assert len(steps) == 8  # 4 steps x 2 phases, logged every step.
  for key in steps:
    for name in ("train/loss", "train/kd_loss", "train/grad_norm",
                 "train/lr"):
      if name in one_metrics[key]:
        assert two_metrics[key][name] == one_metrics[key][name], (key, name)
  # Step 2 trains its binary weights at the real learning rate throughout.
  for step in range(1, 5):
    np.testing.assert_allclose(one_metrics["step2", step]["train/lr"],
                               _STEP2_LR, rtol=1e-6)
    assert one_metrics["step2", step]["train/grad_norm"] > 0
  assert one_metrics["teacher", 4]["train/lr"] > 0

  final_one = {}  # The one-process run's final variables.
  for phase in one:
    one_vars, one_meta = checkpoint_lib.load_variables(
        os.path.join(one_dir, phase))
    two_vars, two_meta = checkpoint_lib.load_variables(
        os.path.join(two_dir, phase))
    jax.tree.map(np.testing.assert_array_equal, two_vars, one_vars)
    final_one[phase] = one_vars
    # Evaluation over the odd-sized split: every example exactly once.
    assert one_meta["last_eval"]["eval/count"] == 359
    assert two_meta["last_eval"]["eval/count"] == 359
    # Integer hit counts agree exactly; the loss sum is not bitwise: with two
    # processes each reads its own half of the split, so the examples sit
    # in other rows of the eval batches and are summed in another order.
    for key in ("eval/top1", "eval/top5"):
      assert two_meta["last_eval"][key] == one_meta["last_eval"][key]
    np.testing.assert_allclose(two_meta["last_eval"]["eval/loss"],
                               one_meta["last_eval"]["eval/loss"], rtol=1e-6)
  # The student's BatchNorm statistics moved from their init (var 1).
  moved = [float(np.abs(layer["var"] - 1).max()) for layer in
           jax.tree.leaves(final_one["step2"]["batch_stats"],
                           is_leaf=lambda x: isinstance(x, dict) and
                           "var" in x)]
  assert len(moved) > 10 and min(moved) > 0.1


@pytest.mark.slow
def test_checkpoints_of_two_processes_load_on_one_device(two_runs, tmp_path):
  """`load_variables` does not need the devices that wrote the checkpoint."""
  _, two_dir, _ = two_runs
  phase_dir = os.path.join(two_dir, "teacher")
  out = tmp_path / "params.npz"
  script = (
      "import sys, numpy as np, jax\n"
      "from bnn_jax import checkpoint\n"
      "assert jax.device_count() == 1\n"
      "variables, meta = checkpoint.load_variables(sys.argv[1])\n"
      "leaves = jax.tree_util.tree_flatten_with_path(variables)[0]\n"
      "np.savez(sys.argv[2], **{jax.tree_util.keystr(p): v "
      "for p, v in leaves})\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-c", script,
       phase_dir, str(out)], capture_output=True, text=True, timeout=120,
      cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  variables, _ = checkpoint_lib.load_variables(phase_dir)
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  with np.load(out) as loaded:
    assert len(loaded.files) == len(leaves)
    for path, value in leaves:
      np.testing.assert_array_equal(loaded[jax.tree_util.keystr(path)], value)
