"""`python -m bnn_jax.data_service`: start tf.data service servers for training input.

  python -m bnn_jax.data_service --port=5050 --workers=2 --host=localhost

What the service does and how the trainer reads it: `bnn_jax.training.data_service`.
"""

from __future__ import annotations

import socket
from typing import Any

from absl import flags

from bnn_jax import cli
from bnn_jax.training.data_service import (DataServiceError, parse_address,
                                           start_dispatcher, start_worker)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_enum("role", "all", ["all", "dispatcher", "worker"],
                    "all: a dispatcher on --port and --workers workers on the "
                    "next ports of this host; dispatcher or worker: one of "
                    "them, for several hosts.")
  flags.DEFINE_integer("port", 5050, "Port of the dispatcher (role all, "
                       "dispatcher) or of the worker (role worker).")
  flags.DEFINE_integer("workers", 1, "Role all: workers on ports port + 1, "
                       "port + 2, ...")
  flags.DEFINE_string("host", socket.gethostname(), "The name under which "
                      "the workers of this host are reachable from the "
                      "trainers (and listed in the dispatcher).")
  flags.DEFINE_list("worker_addresses", None, "Role dispatcher: every "
                    "worker's host:port, the order of the shards.")
  flags.DEFINE_string("dispatcher_address", None, "Role worker: the "
                      "dispatcher's host:port.")
  flags.DEFINE_string("work_dir", None, "Dispatcher: keep its state here "
                      "(fault-tolerant mode) so that a restarted dispatcher "
                      "resumes its jobs.")


def _fail(message: str) -> None:
  """Stops the command with a one-line error (exit status 1)."""
  cli.fail(message)


def _start_servers() -> tuple[list[Any], str]:
  """The servers the flags ask for, started, and a line that says what."""
  if not 0 < FLAGS.port < 65536:
    _fail(f"--port={FLAGS.port} is not a port")
  if FLAGS.role == "all":
    if FLAGS.workers < 1:
      _fail("--workers must be at least 1")
    ports = [FLAGS.port + 1 + i for i in range(FLAGS.workers)]
    servers = [start_dispatcher(
        FLAGS.port, [f"{FLAGS.host}:{p}" for p in ports], FLAGS.work_dir)]
    servers += [start_worker(p, f"localhost:{FLAGS.port}", FLAGS.host)
                for p in ports]
    return servers, (f"dispatcher on port {FLAGS.port}, {FLAGS.workers} "
                     f"worker(s) on {FLAGS.host}:{ports[0]}-{ports[-1]}")
  if FLAGS.role == "dispatcher":
    if not FLAGS.worker_addresses:
      _fail("--role=dispatcher needs --worker_addresses")
    for address in FLAGS.worker_addresses:
      try:
        parse_address(address)
      except DataServiceError:
        _fail(f"--worker_addresses: {address!r} is not host:port")
    return ([start_dispatcher(FLAGS.port, FLAGS.worker_addresses,
                              FLAGS.work_dir)],
            f"dispatcher on port {FLAGS.port} for workers "
            f"{','.join(FLAGS.worker_addresses)}")
  if not FLAGS.dispatcher_address:
    _fail("--role=worker needs --dispatcher_address")
  try:
    parse_address(FLAGS.dispatcher_address)
  except DataServiceError:
    _fail(f"--dispatcher_address={FLAGS.dispatcher_address!r} is not "
          "host:port")
  return ([start_worker(FLAGS.port, FLAGS.dispatcher_address, FLAGS.host)],
          f"worker {FLAGS.host}:{FLAGS.port}")


def main(argv) -> None:
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    servers, what = _start_servers()
  except (tf.errors.OpError, RuntimeError) as e:  # E.g. a port in use.
    _fail(f"cannot start the tf.data service ({FLAGS.role}, port "
          f"{FLAGS.port}): {' '.join(str(e).split())[:300]}")
  print(f"tf.data service: {what}; Ctrl-C stops it.", flush=True)
  servers[0].join()


if __name__ == "__main__":
  cli.run_command(main, define_flags=define_flags, xla=False)
