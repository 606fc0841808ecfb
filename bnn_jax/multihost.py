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
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import numpy as np

MODES = ("auto", "on", "off")


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
               environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """Calls `jax.distributed.initialize` when the run has several processes.

  Args:
    mode: "auto", "on" or "off" (see the module docstring).
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: number of processes.
    process_id: this process's index, 0 .. num_processes - 1.
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
                             process_id=process_id)
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
  import sys  # pylint: disable=g-import-not-at-top
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return 0
  return jax.process_index()


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
