"""Starting JAX's multi-process runtime (`jax.distributed.initialize`).

A run over several processes (a Cloud TPU pod: one process per host; a GPU
cluster: one per GPU or per node; a localhost test: several CPU processes)
must call `jax.distributed.initialize()` in every process before JAX touches
a device. `initialize` decides whether to, from the entry point's flags:

* `mode="off"`: never (single-process runs).
* `mode="on"`: always. Arguments not given are detected by JAX from the
  environment: Cloud TPU VMs (the TPU metadata server, so the Cloud TPU pod
  launcher passes `--distributed=on`), SLURM (`srun`), Open MPI (`mpirun`),
  multi-host TPU on GKE.
* `mode="auto"` (default): when `coordinator_address`, `num_processes` or
  `process_id` is given (a manual launch, e.g. `launch/local.sh`), or when
  `cluster_from_environment` finds a launcher that started more than one
  process. A plain single-process run initialises nothing.

On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`)
unless `JAX_CPU_COLLECTIVES_IMPLEMENTATION` says otherwise.

Host loss. When a process dies without a word (SIGKILL, a kernel panic, a
reclaimed VM), every other process stops with ONE line on stderr,

  [process i] error: lost process K (...); ... re-run the same command to resume

and exit status EXIT_HOST_LOST (75), by one of two paths:

* a collective that reaches the dead process fails at once (gloo: "Connection
  reset by peer"); `stopping_on_peer_loss` turns that exception into the
  line and `os._exit`, skipping the exit-time `jax.distributed.shutdown`
  that would wait for the dead process until the heartbeat timeout and then
  abort.
* JAX's coordination service declares a process dead after
  `heartbeat_timeout_s` without heartbeats (or the coordinator, process 0,
  is gone) and terminates every other process from C++ (`LOG(FATAL)`, an
  abort with a C++ stack). Nothing in the process can catch that (jaxlib's
  `missed_heartbeat_callback` dies on a std::bad_cast in jaxlib 0.10.2), so
  `supervise` runs the training in a child process, holds back the child's
  stderr from the first coordination-service error on, and turns the abort
  into the line.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import traceback
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

MODES = ("auto", "on", "off")

# Seconds without a heartbeat after which JAX's coordination service declares
# a process dead (`--distributed_heartbeat_timeout`): JAX's own default. The
# heartbeats come from a C++ thread of every process, so long compiles and
# saves do not delay them; a stopped, swapping or cut-off host does.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100

# The exit status of a process that stopped because another one was lost
# (EX_TEMPFAIL: try again; here, re-run the same command to resume).
EXIT_HOST_LOST = 75


def _count(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, "1"))
  except ValueError:
    return 1


def cluster_from_environment(
    environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """The launcher that started this process among several, or None.

  * "slurm": a step started by `srun` with more than one task (the
    variables JAX's SLURM detection reads are all set, SLURM_STEP_NUM_TASKS
    > 1; a batch script's own shell has no SLURM_STEP_NUM_TASKS).
  * "ompi": `mpirun` of Open MPI 4 with more than one rank
    (OMPI_MCA_orte_hnp_uri, which JAX reads, and OMPI_COMM_WORLD_SIZE > 1).
  * "tpu": multi-host TPU on GKE (TPU_WORKER_HOSTNAMES lists several hosts).

  Cloud TPU VMs started with `gcloud ... ssh --worker=all` show no such
  variable (JAX asks the metadata server): pass `--distributed=on` there.
  """
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
           "SLURM_PROCID", "SLURM_LOCALID")
  if (all(v in environ for v in slurm)
      and _count(environ, "SLURM_STEP_NUM_TASKS") > 1):
    return "slurm"
  if ("OMPI_MCA_orte_hnp_uri" in environ
      and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1):
    return "ompi"
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu"
  return None


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """Calls `jax.distributed.initialize` when the run has several processes.

  Args:
    mode: "auto", "on" or "off" (see the module docstring).
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: number of processes.
    process_id: this process's index, 0 .. num_processes - 1.
    heartbeat_timeout_s: seconds without a heartbeat after which a process
      is declared dead and every other process stops (`jax.distributed`'s
      heartbeat_timeout_seconds; see "Host loss" below).
    environ: the environment to detect launchers in.

  Returns:
    None when nothing was initialised, else a line saying how.

  Raises:
    ValueError: contradictory or incomplete arguments (one line, naming the
      flag to fix).
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}; use one of {', '.join(MODES)}")
  explicit = {name: value for name, value in (
      ("coordinator_address", coordinator_address),
      ("num_processes", num_processes), ("process_id", process_id))
              if value is not None}
  if mode == "off":
    if explicit:
      raise ValueError(f"--distributed=off contradicts --{next(iter(explicit))}"
                       "; drop one of them")
    return None
  cluster = cluster_from_environment(environ)
  if mode == "auto" and not explicit and cluster is None:
    return None
  if explicit and cluster is None and mode == "auto":
    missing = [n for n in ("coordinator_address", "num_processes",
                           "process_id") if n not in explicit]
    if missing:
      raise ValueError(
          f"a manual multi-process launch needs --{' --'.join(missing)} as "
          "well (e.g. --coordinator_address=127.0.0.1:12355 "
          "--num_processes=2 --process_id=0 on one machine)")
  if not isinstance(heartbeat_timeout_s, int) or heartbeat_timeout_s < 1:
    raise ValueError(f"--distributed_heartbeat_timeout={heartbeat_timeout_s} "
                     "must be a whole number of seconds >= 1 (default "
                     f"{DEFAULT_HEARTBEAT_TIMEOUT_S})")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1")
  if (process_id is not None and num_processes is not None
      and not 0 <= process_id < num_processes):
    raise ValueError(f"--process_id={process_id} must be in 0.."
                     f"{num_processes - 1} (--num_processes={num_processes})")

  import jax  # pylint: disable=g-import-not-at-top  (after the checks)

  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in environ:
    # Collectives between CPU processes (localhost runs, tests).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  if environ.get(SUPERVISOR_ENV) == "child":  # Tells `supervise` who it is.
    print(f"{_ANNOUNCE}{jax.process_index()} of {jax.process_count()}",
          file=sys.stderr, flush=True)
  how = cluster or ("arguments" if explicit else "JAX's detection")
  return (f"process {jax.process_index()} of {jax.process_count()} "
          f"(from {how}), {jax.local_device_count()} of "
          f"{jax.device_count()} devices local")


# ---------------------------------------------------------------------------
# One voice, shared files, agreement: helpers for code that runs on every
# process.
# ---------------------------------------------------------------------------
def process_index() -> int:
  """This process's index; 0 before (or without) `jax.distributed`."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return 0
  return jax.process_index()


def process_count() -> int:
  """The number of processes; 1 before (or without) `jax.distributed`."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return 1
  return jax.process_count()


def report(message: str) -> None:
  """Prints progress or a result on process 0 only (one voice per run)."""
  if process_index() == 0:
    print(message, flush=True)


def prefix() -> str:
  """'' on process 0, '[process i] ' elsewhere: for warnings and errors."""
  index = process_index()
  return f"[process {index}] " if index else ""


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone).

  Used after process 0 writes a file the others read next (config.json,
  a renamed workdir).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on at least one.

  A collective: every process must call it at the same point of the
  program. Alone, returns `flag` without touching a device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.max(flags))


# ---------------------------------------------------------------------------
# Host loss: one line and EXIT_HOST_LOST instead of a hang or a C++ abort.
# ---------------------------------------------------------------------------
# "child" in the supervised training process; any value in a process stops
# `wants_supervisor` (BNN_JAX_SUPERVISOR=off runs without a supervisor).
SUPERVISOR_ENV = "BNN_JAX_SUPERVISOR"
_ANNOUNCE = "bnn_jax supervisor: process "  # + "<i> of <n>", child -> parent.
RERUN = "re-run the same command to resume"

# What a failed collective or the coordination service says when another
# process is gone (gloo on CPU; the coordination service on every platform).
_PEER_LOSS = ("Connection reset by peer", "Connection closed by peer",
              "Gloo", "heartbeat timeout", "stopped sending heartbeats",
              "coordination service", "leader task")
# The first line of JAX's fatal-error path in a process's stderr.
_FATAL_START = ("coordination_service", "Terminating process because the JAX "
                "distributed service")


def is_peer_loss(text: str) -> bool:
  """True when an error message says another process is gone."""
  return any(marker in text for marker in _PEER_LOSS)


def lost_process(text: str, num_processes: Optional[int] = None,
                 index: Optional[int] = None) -> Optional[int]:
  """The process an error text names as lost, or None when unknown.

  "Task K heartbeat timeout" and "... unhealthy (stopped sending
  heartbeats):\nK" name K; "the leader task" (the coordinator) is process
  0. Otherwise, with two processes the lost one is the other one.
  """
  match = (re.search(r"Task (\d+) heartbeat timeout", text) or
           re.search(r"stopped sending heartbeats\):\s*(\d+)\b", text))
  if match:
    return int(match.group(1))
  if "leader task" in text:
    return 0
  if num_processes == 2 and index in (0, 1):
    return 1 - index
  return None


def lost_line(lost: Optional[int], index: Optional[int]) -> str:
  """The one line a surviving process prints (prefixed unless process 0)."""
  who = f"process {lost}" if lost is not None else "another process"
  where = f"[process {index}] " if index else ""
  return (f"{where}error: lost {who} (its host died, it was killed or it "
          "stopped answering); the last checkpoint is intact: "
          f"{RERUN}")


@contextlib.contextmanager
def stopping_on_peer_loss(debug: bool = False) -> Iterator[None]:
  """Ends the process with `lost_line` and EXIT_HOST_LOST on a peer loss.

  An exception raised inside whose message `is_peer_loss`, in a run of
  several processes, prints the line (after the traceback if `debug`) and
  leaves through `os._exit`: a normal exit would wait in
  `jax.distributed.shutdown` for the dead process, then abort. Other
  exceptions pass through.
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (re-raised below)
    if process_count() < 2 or not is_peer_loss(str(e)):
      raise
    if debug:
      traceback.print_exc()
    index = process_index()
    print(lost_line(lost_process(str(e), process_count(), index), index),
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_HOST_LOST)  # pylint: disable=protected-access


def _flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of `--name=V` or `--name V` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def wants_supervisor(argv: Sequence[str],
                     environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `python -m bnn_jax.main argv` should run under `supervise`.

  Read from the command line itself, before absl parses it (parsing loads
  the config, i.e. TensorFlow and JAX, which the supervisor never needs):
  yes when the run will start `jax.distributed` (a manual launch's flags,
  `--distributed=on`, or a launcher `cluster_from_environment` finds),
  unless `--distributed=off` or SUPERVISOR_ENV is set. Flags given only in
  a --flagfile are not seen: such a run goes unsupervised (a C++ abort
  then shows as it is).
  """
  if environ.get(SUPERVISOR_ENV):
    return False
  mode = _flag_value(argv[1:], "distributed")
  if mode == "off" or "--nodistributed" in argv:
    return False
  manual = any(_flag_value(argv[1:], name) is not None for name in
               ("coordinator_address", "num_processes", "process_id"))
  return mode == "on" or manual or cluster_from_environment(environ) is not None


def _die_with_parent(parent: int) -> None:
  """In the child, before exec: SIGKILL when the supervisor dies (Linux)."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if os.getppid() != parent:  # The supervisor died before prctl.
    os._exit(1)  # pylint: disable=protected-access


def supervise(command: Sequence[str], debug: bool = False) -> int:
  """Runs `command` (`python -m bnn_jax.main ...`) in a child; its status.

  The child shares stdout and gets SIGTERM forwarded (SIGINT reaches it
  from the terminal); it dies with the supervisor (a host that dies takes
  both). Its stderr is relayed line by line until a line of JAX's
  fatal-error path (`_FATAL_START`); the rest is held back (shown as it
  comes with `debug`), except a line saying RERUN (the child's own
  `lost_line`, which may race the abort). A child that then dies of a
  signal (the abort) is reported with `lost_line`, naming the process the
  held text names, and EXIT_HOST_LOST is returned; a child that exits
  normally has its held lines shown and its status returned (128 + N for a
  death by signal N).
  """
  env = dict(os.environ, **{SUPERVISOR_ENV: "child"})
  parent = os.getpid()
  child = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
      list(command), env=env, stderr=subprocess.PIPE, preexec_fn=lambda: _die_with_parent(parent))
  signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  index = count = None
  held, said = [], False
  for raw in child.stderr:
    line = raw.decode(errors="replace")
    if line.startswith(_ANNOUNCE):
      index, count = (int(w) for w in line[len(_ANNOUNCE):].split(" of "))
      continue
    if RERUN in line:  # The child's own line: always shown.
      said = True
    elif held or any(marker in line for marker in _FATAL_START):
      held.append(line)
      if not debug:
        continue
    sys.stderr.write(line)
    sys.stderr.flush()
  code = child.wait()
  if code == EXIT_HOST_LOST or (code < 0 and held):
    if not said:
      print(lost_line(lost_process("".join(held), count, index), index),
            file=sys.stderr, flush=True)
    return EXIT_HOST_LOST
  if held and not debug:
    sys.stderr.write("".join(held))
  return code if code >= 0 else 128 - code


# With several processes, how often (in steps) they agree on whether to stop
# after a SIGTERM: one all-gather of one int per process (see StopAgreement
# and docs/scaling.md for its cost).
STOP_CHECK_EVERY_STEPS = 10


# ---------------------------------------------------------------------------
# Checkpoint and preemption.
# ---------------------------------------------------------------------------
class StopAgreement:
  """Decides, identically on every process, at which step the run stops.

  Inside `with StopAgreement(ckpt) as stop:`, SIGTERM sets a flag on the
  process that receives it; `stop.agreed(step)`, called by every process
  after every step, is True on all of them at the same step when

  * some process received SIGTERM: the processes compare flags every
    `every` steps (one all-gather of one int per process; every step, for
    free, in a single-process run), or
  * orbax reports the platform's preemption notice (`reached_preemption`,
    itself agreed across processes).

  A process acting on its own signal would enter the checkpoint's
  collectives while the others enter the next step's: a hang.
  """

  def __init__(self, ckpt,
               every: Optional[int] = None):
    self._ckpt = ckpt
    import jax  # pylint: disable=g-import-not-at-top
    self._every = every or (1 if jax.process_count() == 1
                            else STOP_CHECK_EVERY_STEPS)
    self._received = False
    self._previous = None

  def __enter__(self) -> "StopAgreement":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._received = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int) -> bool:
    platform = self._ckpt.reached_preemption(step)
    if step % self._every:
      return platform
    return any_process(self._received) or platform
