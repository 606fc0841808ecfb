"""Benchmark one training step: compile time, step time, images/s, memory, MFU.

  python -m bnn_jax.benchmark --model=reactnet_a --batch=16 --input_size=224 \
      [--phase=step2] [--dtype=float32] [--teacher=resnet34] [--steps=10] \
      [--warmup=2] [--num_classes=1000] [--json]

The step is `train_step.make_train_step` (forward, backward, optimizer
update, BatchNorm statistics), jitted with the state donated as in training, on
random images and labels already on the device:

* step1: binary activations, real weights, Adam with coupled L2 decay 5e-6;
  step2: binary activations and weights, Adam without decay (SPEC §3).
* with `--teacher`: the teacher's eval-mode forward runs inside the step and
  the loss is KD only; without: cross-entropy.

Measured:

* compile: `jax.jit(step).lower(...)` and `.compile()` wall times (AOT).
* step time: the median (and min, mean) of `--steps` steps after `--warmup`
  steps, each timed to `jax.block_until_ready`; images/s = batch / median.
  Also the process CPU time per step (all threads): on a shared machine it
  grows less than the wall time when other processes compete for the cores.
* memory: `compiled.memory_analysis()`: peak = argument + output + temp -
  alias bytes (XLA:CPU's own `peak_memory_in_bytes` is smaller than its temp
  allocation, so it is reported apart as `xla_peak_memory_bytes`).
* host: the process's peak resident memory (`ru_maxrss`; on CPU this is
  where the step's memory lives, next to the Python runtime and libraries).
* FLOPs per step: model FLOPs = 2 * 3 * MACs * batch for the student (the
  backward pass costs two forward passes) + 2 * MACs * batch for the teacher,
  MACs = BOPs + FLOPs of `bnn_jax.summary` (binary convs run as real
  matmuls on these devices); XLA's own count from `cost_analysis()`.
* MFU = model FLOPs / step time / peak FLOP/s of the device, on GPU and TPU
  only (a table of dense bf16 / fp32 peaks by device kind; None when the kind
  is not in it). CPUs have no meaningful peak here and are skipped.

XLA flags: unless `XLA_FLAGS` is already set, the defaults of
`bnn_jax.xla_defaults` are applied before JAX is imported (printed in the
result), so the benchmark measures what training runs.

Malloc: `--cpu_malloc=reuse` (the default, as in the ReActNet-A configs)
keeps XLA:CPU's step buffers mapped between steps (`bnn_jax.malloc_defaults`;
what it set is reported as `mallopt`); `--cpu_malloc=glibc` measures glibc's
defaults (the digits configs' setting). `minor_page_faults_per_step` shows
the difference.

Exit status: 0 done; 1 bad input (one-line error; `--debug` shows the
traceback).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Optional

from absl import app
from absl import flags

from bnn_jax import cli
from bnn_jax import malloc_defaults
from bnn_jax import xla_defaults

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("model", "reactnet_a", "Student model (bnn_jax.models).")
  flags.DEFINE_integer("batch", 16, "Global batch size.")
  flags.DEFINE_integer("input_size", 224, "Input height and width.")
  flags.DEFINE_enum("phase", "step2", ["step1", "step2"],
                    "step1: real weights + decay; step2: binary weights.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Computation dtype of the models.")
  flags.DEFINE_string("teacher", "",
                      "Teacher model for KD ('' = none, CE loss).")
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps before timing.")
  flags.DEFINE_integer("num_classes", 1000, "Classes of student and teacher.")
  flags.DEFINE_integer("input_channels", 3, "Input channels.")
  flags.DEFINE_enum("cpu_malloc", "reuse", list(malloc_defaults.MODES),
                    "On a CPU-only host: 'reuse' keeps XLA's step buffers "
                    "mapped between steps (bnn_jax.malloc_defaults), "
                    "'glibc' measures glibc's malloc defaults.")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")


# Dense peak FLOP/s by device kind substring: (bfloat16, float32). float32
# peaks are the TF32 tensor-core rates where XLA uses them by default.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6": (918e12, 918e12),
}


def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """Peak dense FLOP/s of one device of `device_kind`, None if unknown."""
  for kind, (bf16, fp32) in PEAK_FLOPS.items():
    if kind.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else fp32
  return None


def model_flops_per_step(student_macs: int, teacher_macs: int,
                         batch: int) -> int:
  """2 * (3 * student MACs + teacher MACs) * batch: forward + backward (2x)."""
  return 2 * (3 * student_macs + teacher_macs) * batch


def peak_memory_bytes(stats: Any) -> int:
  """argument + output + temp - alias bytes of a `memory_analysis()`.

  What the executable allocates while it runs: its inputs, its outputs less
  those written into donated inputs, and its scratch (temp) allocation.
  """
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def run_benchmark(model_name: str, batch: int, input_size: int,
                  phase: str = "step2", dtype: str = "float32",
                  teacher_name: str = "", steps: int = 10, warmup: int = 2,
                  num_classes: int = 1000, input_channels: int = 3) -> dict:
  """Compiles and times the training step; returns the measurements."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from bnn_jax import losses
  from bnn_jax import models
  from bnn_jax import optim
  from bnn_jax import summary
  from bnn_jax import train_step

  def create(name, **attributes):
    fields = models.model_fields(name)
    attributes = {k: v for k, v in attributes.items() if k in fields}
    return models.create(name, num_classes=num_classes, **attributes)

  shape = (input_size, input_size, input_channels)
  model = create(model_name, binary_weights=phase == "step2",
                 dtype=jnp.dtype(dtype))
  opt_cfg = optim.default_optimizer_config()
  opt_cfg.weight_decay = 5e-6 if phase == "step1" else 0.0
  opt_cfg.weight_decay_mode = "coupled"
  tx = optim.build_optimizer(opt_cfg, steps_per_epoch=1000, num_epochs=256)
  loss_cfg = losses.default_loss_config()
  teacher = None
  teacher_vars: Any = {}
  teacher_macs = 0
  if teacher_name:
    teacher = create(teacher_name, dtype=jnp.dtype(dtype))
    teacher_vars = jax.jit(lambda k: teacher.init(
        k, jnp.zeros((1,) + shape), train=False))(jax.random.key(1))
    t_summary = summary.summarize(teacher, shape)
    teacher_macs = t_summary.bops + t_summary.flops
  else:
    loss_cfg = ml_collections.ConfigDict(dict(loss_cfg, kd_weight=0.0,
                                              ce_weight=1.0))
  s_summary = summary.summarize(model, shape)

  def init_state(key):
    variables = model.init(key, jnp.zeros((1,) + shape), train=False)
    return train_step.TrainState(step=jnp.zeros((), jnp.int32),
                                 params=variables["params"],
                                 batch_stats=variables["batch_stats"],
                                 opt_state=tx.init(variables["params"]))

  state = jax.jit(init_state)(jax.random.key(0))
  k_img, k_lab = jax.random.split(jax.random.key(2))
  batch_data = {
      "image": jax.random.normal(k_img, (batch,) + shape, jnp.float32),
      "label": jax.random.randint(k_lab, (batch,), 0, num_classes, jnp.int32),
  }
  step_fn = jax.jit(train_step.make_train_step(model, tx, loss_cfg, teacher),
                    donate_argnums=(0,))

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch_data, teacher_vars)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  for _ in range(warmup):
    state, metrics = compiled(state, batch_data, teacher_vars)
  jax.block_until_ready((state, metrics))
  times = []
  cpu_start = time.process_time()
  faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_data, teacher_vars)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  cpu_per_step = (time.process_time() - cpu_start) / steps
  faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                     - faults_start) / steps
  if not bool(jax.device_get(metrics["finite"])):
    shown = {k: float(v) for k, v in jax.device_get(metrics).items()
             if k.startswith("train/")}
    raise RuntimeError(f"the benchmarked step produced NaN/Inf in the loss, "
                       f"the gradients or the parameters; last step's "
                       f"metrics: {shown}")

  median = statistics.median(times)
  device = jax.devices()[0]
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = model_flops_per_step(s_summary.bops + s_summary.flops, teacher_macs,
                               batch)
  peak = None if device.platform == "cpu" else peak_flops(device.device_kind,
                                                          dtype)
  return {
      "model": model_name, "phase": phase, "teacher": teacher_name or None,
      "batch": batch, "input_size": input_size, "dtype": dtype,
      "num_classes": num_classes,
      "device": f"{device.platform}:{device.device_kind}",
      "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "mallopt": list(malloc_defaults.applied),
      "lower_s": t1 - t0, "compile_s": t2 - t1,
      "step_s_median": median, "step_s_min": min(times),
      "step_s_mean": statistics.fmean(times), "step_s": times,
      "cpu_s_per_step": cpu_per_step,
      "minor_page_faults_per_step": faults_per_step, "steps": steps,
      "warmup": warmup, "images_per_s": batch / median,
      "peak_memory_bytes": peak_memory_bytes(stats),
      "xla_peak_memory_bytes": int(getattr(stats, "peak_memory_in_bytes", 0)),
      "temp_bytes": int(stats.temp_size_in_bytes),
      "argument_bytes": int(stats.argument_size_in_bytes),
      "model_flops_per_step": flops,
      "xla_flops_per_step": float(cost.get("flops", 0.0)) if cost else None,
      "mfu": None if peak is None else flops / median / peak,
      "max_rss_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        * 1024),
      "load_average": os.getloadavg()[0],
  }


def format_line(r: dict) -> str:
  """One human-readable line of a `run_benchmark` result."""
  mfu = "" if r["mfu"] is None else f" | MFU {100 * r['mfu']:.1f}%"
  teacher = f" + teacher {r['teacher']}" if r["teacher"] else ""
  return (f"{r['model']} {r['phase']}{teacher} batch {r['batch']} "
          f"{r['input_size']}x{r['input_size']} {r['dtype']} on {r['device']}:"
          f" compile {r['lower_s']:.1f}+{r['compile_s']:.1f} s | step "
          f"{1e3 * r['step_s_median']:.1f} ms (min "
          f"{1e3 * r['step_s_min']:.1f}, CPU {1e3 * r['cpu_s_per_step']:.0f})"
          f" | {r['images_per_s']:.1f} img/s | "
          f"peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB (process "
          f"RSS {r['max_rss_bytes'] / 2**20:.0f} MiB){mfu} | "
          f"load {r['load_average']:.2f}")


def main(argv):
  del argv
  with cli.reporting_errors(debug=FLAGS.debug):
    # Before JAX's backend starts its threads.
    malloc_defaults.apply(FLAGS.cpu_malloc)
    result = run_benchmark(
        FLAGS.model, FLAGS.batch, FLAGS.input_size, phase=FLAGS.phase,
        dtype=FLAGS.dtype, teacher_name=FLAGS.teacher, steps=FLAGS.steps,
        warmup=FLAGS.warmup, num_classes=FLAGS.num_classes,
        input_channels=FLAGS.input_channels)
  print(json.dumps(result) if FLAGS.json else format_line(result), flush=True)
  sys.exit(0)


if __name__ == "__main__":
  # Before TensorFlow / JAX are imported (lazily, in the functions above).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  xla_defaults.apply()
  define_flags()
  app.run(main)
