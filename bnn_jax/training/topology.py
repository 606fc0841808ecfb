"""How a run's batches split over devices and processes (any topology).

One `data` mesh axis holds every device of every process (`make_mesh`),
so with D devices on P processes:

* the training batch `config.batch_size` (B) is global and must be a
  multiple of D: every device gets B / D examples, every process B / P.
  Nothing rounds it, because B sets what is learned (with the learning
  rate); a B that does not split is refused with the fix named.
* the evaluation batch `config.eval_batch_size` may be any positive number:
  it is rounded up to the next multiple of D,
  `padded_eval_batch_size(E, D) = ceil(E / D) * D` (500 on 8 devices: 504,
  on 32: 512, on 256: 512). The extra rows carry further examples, and the
  batches that run out of examples are filled with masked filler examples
  (`input_pipeline.eval_iterator`), so every example is still counted once
  and the accuracy does not depend on D.
* `config.model.bn_group_size`, when set, must divide the per-device batch
  B / D (the groups then never straddle devices).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """The batches of a run on a given topology.

  Attributes:
    num_devices: D, all processes together.
    num_processes: P.
    batch_size: the global training batch B.
    per_device_batch: B / D.
    per_process_batch: B / P (what each host's input pipeline reads).
    eval_batch_size: the global evaluation batch, E rounded up to D.
    per_device_eval_batch: eval_batch_size / D.
  """
  num_devices: int
  num_processes: int
  batch_size: int
  per_device_batch: int
  per_process_batch: int
  eval_batch_size: int
  per_device_eval_batch: int


def padded_eval_batch_size(eval_batch_size: int, num_devices: int) -> int:
  """ceil(eval_batch_size / num_devices) * num_devices; ValueError if <= 0."""
  if not isinstance(eval_batch_size, int) or eval_batch_size <= 0:
    raise ValueError(f"config.eval_batch_size={eval_batch_size} must be a "
                     "positive integer; set --config.eval_batch_size=<n> (any "
                     "n >= 1: it is rounded up to the device count)")
  return math.ceil(eval_batch_size / num_devices) * num_devices


def batch_layout(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: int) -> BatchLayout:
  """Checks the config's batches against D devices on P processes.

  Raises:
    ValueError: D is not a multiple of P, B is not a positive multiple of D,
      E is not positive, or bn_group_size does not divide B / D; the message
      names the fix.
  """
  if num_devices < 1 or num_processes < 1 or num_devices % num_processes:
    raise ValueError(f"{num_devices} devices on {num_processes} processes: "
                     "every process must drive the same number of devices")
  batch = config.batch_size
  if not isinstance(batch, int) or batch <= 0 or batch % num_devices:
    nearest = max(num_devices, round(batch / num_devices) * num_devices
                  if isinstance(batch, int) else num_devices)
    raise ValueError(f"config.batch_size={batch} must be a positive multiple "
                     f"of the device count {num_devices}; set "
                     f"--config.batch_size=<multiple of {num_devices}> (e.g. "
                     f"{nearest}, scaling the learning rates with it) or run "
                     "on fewer devices")
  eval_batch = padded_eval_batch_size(config.eval_batch_size, num_devices)
  per_device = batch // num_devices
  group = config.model.bn_group_size
  if group is not None and (group <= 0 or per_device % group):
    raise ValueError(f"config.model.bn_group_size={group} must divide the "
                     f"per-device batch {per_device} (batch_size {batch} over "
                     f"{num_devices} devices)")
  return BatchLayout(num_devices=num_devices, num_processes=num_processes,
                     batch_size=batch, per_device_batch=per_device,
                     per_process_batch=batch // num_processes,
                     eval_batch_size=eval_batch,
                     per_device_eval_batch=eval_batch // num_devices)


def make_mesh(devices=None) -> Mesh:
  """A 1-D `data` mesh over all devices (every process's), ordered by process.

  Ordering by process gives each process one contiguous block of every
  batch sharded `P('data')`, the rows its input pipeline provides (see
  `input_pipeline.train_iterator`).
  """
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: d.process_index)  # stable
  return Mesh(np.asarray(devices), ("data",))
