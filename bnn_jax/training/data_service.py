"""tf.data service: the training input's preprocessing on other machines.

Start a dispatcher and its workers (one worker per machine uses all of that
machine's cores; the worker list is fixed when the dispatcher starts):

  # One host: a dispatcher on port 5050 and 2 workers on 5051, 5052.
  python -m bnn_jax.data_service --port=5050 --workers=2 --host=localhost

  # Several hosts: the dispatcher, told every worker's address ...
  python -m bnn_jax.data_service --role=dispatcher --port=5050 \\
      --worker_addresses=cpu-a:5051,cpu-b:5051
  # ... and on cpu-a (and likewise cpu-b) a worker that says it is cpu-a:5051.
  python -m bnn_jax.data_service --role=worker --port=5051 --host=cpu-a \\
      --dispatcher_address=dispatcher-host:5050

then train with `--config.dataset.data_service_address=dispatcher-host:5050`.
Workers need no bnn_jax code (they run the TensorFlow graph the trainer
sends), but they read the TFDS files at the trainer's `data_dir` path, so
that path must be on a file system they share (or GCS).

How the trainer reads (`distribute`): each training process numbers its
unaugmented batches by step and sends that tf.data graph to the service as
one job. Worker i of N keeps steps i, i + N, i + 2N, ... (`shard_by_step`,
on tf.data's static sharding) and augments only those; every worker reads
and shuffles the (still encoded) records of the whole stream, which costs
little next to decoding. The trainer reads the workers
in turn (coordinated reads, one consumer) and restores the step order by
the step numbers. So:

* Batches are exactly those of the local pipeline: the same pure function
  of (config, seed, process count), bit for bit, whatever the number of
  workers; resuming at step k builds a new job that starts at batch k.
* Every worker named in the dispatcher's list must run: a missing worker's
  steps never come (the trainer stops with an error once `MAX_PENDING`
  other batches came instead, or waits if nothing comes at all). A
  restarted worker replays its share of the job from the start; the
  trainer drops the batches it already has and waits until it catches up.
* Evaluation still runs in the training process.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from typing import Any, Iterator, Optional

# Before TensorFlow is imported: keep it quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

# The accelerators belong to JAX (and workers need none).
tf.config.set_visible_devices([], "GPU")

_service = tf.data.experimental.service

# Batches a trainer holds while it waits for the step that is due.
MAX_PENDING = 64
# How long the trainer waits for the dispatcher's port to answer.
CONNECT_TIMEOUT_S = 10.0

_ADDRESS = re.compile(r"^(?:grpc://)?([A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):"
                      r"([0-9]{1,5})$")


class DataServiceError(ValueError):
  """A bad or unreachable `config.dataset.data_service_address`."""


def parse_address(address: str) -> tuple[str, int]:
  """'host:port' or 'grpc://host:port' -> (host, port).

  Raises:
    DataServiceError: any other form.
  """
  match = _ADDRESS.match(address.strip()) if isinstance(address, str) else None
  if not match or not 0 < int(match.group(2)) < 65536:
    raise DataServiceError(
        f"config.dataset.data_service_address={address!r} is not host:port "
        "(e.g. localhost:5050 or grpc://dispatcher-host:5050)")
  return match.group(1).strip("[]"), int(match.group(2))


def check_reachable(address: str,
                    timeout_s: Optional[float] = None) -> str:
  """The dispatcher's 'grpc://host:port' once its port accepts connections.

  tf.data's own client retries an absent dispatcher for a long time; this
  check fails fast instead, after `timeout_s` (None: CONNECT_TIMEOUT_S).

  Raises:
    DataServiceError: the address is malformed or nothing listens there
      within `timeout_s`.
  """
  host, port = parse_address(address)
  timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection(
          (host, port), timeout=max(0.1, deadline - time.monotonic())):
        return f"grpc://{host}:{port}"
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DataServiceError(
            f"no tf.data service dispatcher answers at {host}:{port} "
            f"(config.dataset.data_service_address) within {timeout_s:g} s "
            f"({e.strerror or e}); start one with `python -m "
            f"bnn_jax.data_service --port={port} --workers=N` or fix the "
            "address") from None
      time.sleep(0.2)


def shard_by_step(numbered: tf.data.Dataset) -> tf.data.Dataset:
  """On the service's worker i of N: the elements whose step % N == i.

  The worker learns (i, N) from the first two elements, i and i + N, of an
  endless counter sharded with `shard(SHARD_HINT, SHARD_HINT)` (which the
  service replaces with `shard(N, i)`): a share may then be empty, which a
  hint on `numbered` itself does not allow.

  Args:
    numbered: (step int64 scalar, ...) elements.
  """
  slot = tf.data.Dataset.counter().shard(
      tf.data.experimental.SHARD_HINT,
      tf.data.experimental.SHARD_HINT).batch(2).take(1)
  return slot.flat_map(lambda first_two: numbered.filter(
      lambda step, *rest: tf.equal(
          step % (first_two[1] - first_two[0]), first_two[0])))


def distribute(numbered_batches: tf.data.Dataset, address: str, *,
               first_step: int,
               num_batches: Optional[int] = None) -> Iterator[Any]:
  """Runs `numbered_batches` on the service; yields its batches in step order.

  Args:
    numbered_batches: (step int64 scalar, batch) elements in increasing step
      order, step numbers consecutive, split among the workers by
      `shard_by_step` before the expensive work.
    address: the dispatcher, 'host:port' or 'grpc://host:port'.
    first_step: the step number of the first batch.
    num_batches: how many batches to yield (None: forever; the dataset must
      then be infinite).

  Yields:
    The batches as numpy structures, in step order.

  Raises:
    DataServiceError: the dispatcher does not answer.
    RuntimeError: more than MAX_PENDING later (or filler) batches arrived
      while one was missing (a worker in the dispatcher's list is not
      running).
  """
  target = check_reachable(address)
  if num_batches is not None:
    # Coordinated reads need every worker's share to be infinite: after its
    # steps a worker sends filler batches numbered -1, which are dropped.
    # (Not `repeat()`: a share may be empty, and a repeated epoch would be
    # shuffled anew.)
    filler = tf.data.Dataset.from_tensors(tf.nest.map_structure(
        lambda spec: tf.zeros(spec.shape, spec.dtype),
        numbered_batches.element_spec)).map(
            lambda step, batch: (step - 1, batch)).repeat()
    numbered_batches = numbered_batches.concatenate(filler)
  numbered_batches = numbered_batches.apply(
      tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))
  ds = numbered_batches.apply(_service.distribute(
      processing_mode=_service.ShardingPolicy.HINT, service=target,
      job_name=f"bnn_jax_train_{uuid.uuid4().hex}",
      consumer_index=0, num_consumers=1,  # Read the workers in turn.
      compression=None))  # Float pixels hardly compress; spare the CPUs.
  ds = ds.prefetch(tf.data.AUTOTUNE)
  pending: dict[int, Any] = {}
  due, yielded, fillers = first_step, 0, 0
  for step, batch in ds.as_numpy_iterator():
    step = int(step)
    if step >= due:
      pending[step] = batch
    elif step < 0:
      fillers += 1  # From a worker that has sent all its steps.
    # (0 <= step < due: a restarted worker's replay, dropped.)
    if due not in pending and max(len(pending), fillers) > MAX_PENDING:
      raise RuntimeError(
          f"the tf.data service at {address} sent {len(pending)} later and "
          f"{fillers} filler batches but not step {due}: is every worker in "
          "the dispatcher's --worker_addresses running?")
    while due in pending:
      yield pending.pop(due)
      due += 1
      yielded += 1
      fillers = 0
      if yielded == num_batches:
        return


def start_dispatcher(port: int, worker_addresses: list[str],
                     work_dir: Optional[str] = None) -> Any:
  """A dispatcher on `port` whose fixed worker list is `worker_addresses`."""
  return _service.DispatchServer(_service.DispatcherConfig(
      port=port, worker_addresses=list(worker_addresses), work_dir=work_dir,
      fault_tolerant_mode=bool(work_dir)))


def start_worker(port: int, dispatcher_address: str, host: str) -> Any:
  """A worker on `port` that registers as `host:port` with the dispatcher."""
  dispatcher_host, dispatcher_port = parse_address(dispatcher_address)
  return _service.WorkerServer(_service.WorkerConfig(
      dispatcher_address=f"{dispatcher_host}:{dispatcher_port}", port=port,
      worker_address=f"{host}:{port}"))
