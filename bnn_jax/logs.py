"""Metric logging: TensorBoard event files plus one JSON-lines file per workdir.

Each phase writes TensorBoard events to `<workdir>/<phase>/` (one TensorBoard
run per phase) and appends records to `<workdir>/metrics.jsonl`:

  {"phase": "step2", "step": 120, "train/loss": 0.41, "train/lr": 0.0012, ...}

A resumed run appends again from its checkpoint, so a (phase, step) pair can
appear twice after a preemption; readers keep the last record of each pair.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
  """Appends scalar records {"phase", "step", name: value, ...} to a file."""

  def __init__(self, path: str, phase: str):
    self._path = path
    self._phase = phase

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"phase": self._phase, "step": int(step)}
    for name, value in scalars.items():
      value = float(np.asarray(value))
      record[name] = value if math.isfinite(value) else str(value)
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, phase: str) -> metric_writers.MetricWriter:
  """TensorBoard (in <workdir>/<phase>) + metrics.jsonl + absl logging."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  tensorboard = metric_writers.create_default_writer(
      os.path.join(workdir, phase), asynchronous=False)
  return metric_writers.MultiWriter(
      [tensorboard, JsonlWriter(os.path.join(workdir, "metrics.jsonl"), phase)])
