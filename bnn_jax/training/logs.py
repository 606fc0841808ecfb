"""Metric logging: TensorBoard event files plus one JSON-lines file per workdir.

Each phase writes TensorBoard events to `<workdir>/<phase>/` (one TensorBoard
run per phase) and appends records to `<workdir>/metrics.jsonl`:

  {"phase": "step2", "step": 120, "train/loss": 0.41, "train/lr": 0.0012, ...}

A resumed run appends again from its checkpoint, so a (phase, step) pair can
appear twice after a preemption; readers keep the last record of each pair.
Only process 0 writes.

A `gs://` workdir: TensorFlow's event writer and appends to a file do not go
through `etils.epath`, so both are written to a local staging directory and
copied to the workdir (whole files, through epath) at every `flush()` and at
`close()`; the training loop flushes at every checkpoint and evaluation. A
run killed between two flushes loses at most the records since the last
one, which the resumed run writes again.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers
from clu.metric_writers import interface
from etils import epath

from bnn_jax import paths
from bnn_jax.training import multihost

METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
  """Training cannot continue (NaN/Inf, bad configuration discovered late)."""


class JsonlWriter(interface.MetricWriter):
  """Appends scalar records {"phase", "step", name: value, ...} to a file."""

  def __init__(self, path: paths.PathLike, phase: str):
    self._path = epath.Path(path)
    self._phase = phase

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {"phase": self._phase, "step": int(step)}
    for name, value in scalars.items():
      value = float(np.asarray(value))
      record[name] = value if math.isfinite(value) else str(value)
    with self._path.open("a") as f:
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


class StagedWriter(metric_writers.MultiWriter):
  """Writes to a local staging directory, copies changed files to `target`.

  `flush()` and `close()` copy every staged file whose size changed since the
  last copy to the same relative path under `target` (any epath location);
  `close()` then deletes the staging directory.
  """

  def __init__(self, writers, staging: pathlib.Path, target: epath.Path,
               copied: Mapping[str, int] = ()):
    """`copied`: {relative path: size} of staged files already in `target`."""
    super().__init__(writers)
    self._staging = staging
    self._target = target
    self._copied = dict(copied)

  def flush(self) -> None:
    super().flush()
    # The staging directory is local by construction (pathlib, not epath).
    for local in sorted(p for p in self._staging.rglob("*") if p.is_file()):
      relative = local.relative_to(self._staging).as_posix()
      size = local.stat().st_size
      if self._copied.get(relative) == size:
        continue
      remote = self._target / relative
      remote.parent.mkdir(parents=True, exist_ok=True)
      remote.write_bytes(local.read_bytes())
      self._copied[relative] = size

  def close(self) -> None:
    self.flush()
    super().close()
    shutil.rmtree(self._staging, ignore_errors=True)


def create_writer(workdir: paths.PathLike,
                  phase: str) -> metric_writers.MetricWriter:
  """TensorBoard (in <workdir>/<phase>) + metrics.jsonl + absl logging.

  Processes other than 0 get a writer that only logs (absl). A `gs://`
  workdir gets a `StagedWriter` (see the module docstring).
  """
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True)
  workdir = paths.resolve(workdir)
  if paths.is_local(workdir):
    tensorboard = metric_writers.create_default_writer(
        str(workdir / phase), asynchronous=False)
    return metric_writers.MultiWriter(
        [tensorboard, JsonlWriter(workdir / METRICS_FILE, phase)])
  staging = pathlib.Path(tempfile.mkdtemp(prefix="bnn_jax_logs_"))
  copied = {}
  remote_metrics = workdir / METRICS_FILE
  if remote_metrics.exists():  # Appended to here, then copied back whole.
    content = remote_metrics.read_bytes()
    (staging / METRICS_FILE).write_bytes(content)
    copied[METRICS_FILE] = len(content)
  tensorboard = metric_writers.create_default_writer(
      str(staging / phase), asynchronous=False)
  return StagedWriter(
      [tensorboard, JsonlWriter(staging / METRICS_FILE, phase)],
      staging, workdir, copied=copied)


def _format_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else (
      f"{s // 60}m{s % 60:02d}s")


# ---------------------------------------------------------------------------
# Metrics and the NaN check.
# ---------------------------------------------------------------------------
class MetricLog:
  """The train metrics of the steps since the last flush.

  `add` keeps each step's (device) metrics without waiting for them;
  `flush` fetches them, raises `TrainingError` if a step's loss or
  gradients were not finite, writes their means (lr: the last step's) and
  prints a progress line on process 0.
  """

  def __init__(self, writer, *, phase_name: str, total_steps: int,
               steps_per_epoch: int, num_epochs: int, start_step: int,
               checkpoint_dir: Any):
    self._writer = writer
    self._phase_name = phase_name
    self._total_steps = total_steps
    self._steps_per_epoch = steps_per_epoch
    self._num_epochs = num_epochs
    self._start_step = start_step
    self._start_time = time.time()
    self._checkpoint_dir = checkpoint_dir
    self._pending: list[tuple[int, dict]] = []

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self) -> None:
    if not self._pending:
      return
    steps = [s for s, _ in self._pending]
    fetched = jax.device_get([m for _, m in self._pending])
    self._pending = []
    for s, m in zip(steps, fetched):
      if not bool(m["finite"]):
        raise TrainingError(
            f"phase {self._phase_name!r}: loss or gradients became NaN/Inf at "
            f"step {s}; the last good checkpoint in {self._checkpoint_dir} is "
            "left intact (lower the learning rate or check the data)")
    last_step = steps[-1]
    means = {k: float(np.mean([m[k] for m in fetched]))
             for k in fetched[0] if k != "finite"}
    for key in fetched[-1]:  # rates: the last step's, not a mean
      if key == "train/lr" or key.startswith("train/lr/"):
        means[key] = float(fetched[-1][key])
    group_rates = "".join(
        f" lr/{k[len('train/lr/'):]} {v:.3g}" for k, v in means.items()
        if k.startswith("train/lr/"))
    self._writer.write_scalars(last_step, means)
    elapsed = time.time() - self._start_time
    rate = (last_step - self._start_step) / max(elapsed, 1e-9)
    eta = (self._total_steps - last_step) / max(rate, 1e-9)
    multihost.report(
        f"[{self._phase_name}] step {last_step}/{self._total_steps} "
        f"epoch {math.ceil(last_step / self._steps_per_epoch)}/"
        f"{self._num_epochs} loss {means['train/loss']:.4f} "
        f"top1 {means['train/top1']:.3f} lr {means['train/lr']:.3g}"
        f"{group_rates} | "
        f"{rate:.1f} steps/s, ETA {_format_seconds(eta)}")
