"""Starting `python -m bnn_jax.main` in subprocesses for end-to-end tests.

`start` runs one process or several joined by jax.distributed on localhost
(CPU, gloo), each with its own log file, so a test can wait for a line,
signal one process and read what each printed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence

from conftest import REPO


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def cpu_env(devices: int = 1, extra: Optional[Mapping[str, str]] = None
            ) -> dict:
  """The environment of a CPU run with `devices` fake devices, fast compiles."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Run:
  """The processes of one launch and their log files."""
  procs: list[subprocess.Popen]
  logs: list[str]

  def output(self, index: int) -> str:
    with open(self.logs[index]) as f:
      return f.read()

  def wait_for(self, text: str, index: int = 0,
               timeout: float = 600) -> None:
    """Waits until process `index` printed `text`; fails if any process ended."""
    deadline = time.monotonic() + timeout
    while text not in self.output(index):
      for i, p in enumerate(self.procs):
        assert p.poll() is None, (f"process {i} ended ({p.returncode}) before "
                                  f"{text!r}:\n{self.output(i)[-3000:]}")
      assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
      time.sleep(0.05)

  def wait(self, timeout: float) -> list[int]:
    """Exit codes of every process (all killed if one outlives `timeout`)."""
    deadline = time.monotonic() + timeout
    try:
      for p in self.procs:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      pass
    finally:
      self.kill()
    return [p.returncode for p in self.procs]

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait()


def start(flags: Sequence[str], log_prefix: str, processes: int = 1,
          devices_per_process: int = 1,
          env: Optional[Mapping[str, str]] = None) -> Run:
  """Starts `python -m bnn_jax.main FLAGS` as `processes` processes.

  Several processes get --coordinator_address/--num_processes/--process_id
  (a free localhost port); process i logs stdout and stderr to
  `<log_prefix>.<i>.log`.
  """
  port = free_port()
  procs, logs = [], []
  for i in range(processes):
    command = [sys.executable, "-m", "bnn_jax.main", *flags]
    if processes > 1:
      command += [f"--coordinator_address=127.0.0.1:{port}",
                  f"--num_processes={processes}", f"--process_id={i}"]
    log = f"{log_prefix}.{i}.log"
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
          env=cpu_env(devices_per_process, env)))
    logs.append(log)
  return Run(procs, logs)
