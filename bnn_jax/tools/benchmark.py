"""Benchmark one training step: compile time, step time, images/s, memory, MFU.

  python -m bnn_jax.benchmark --model=reactnet_a --batch=16 --input_size=224 \
      [--phase=step2] [--dtype=float32] [--teacher=resnet34] [--steps=10] \
      [--warmup=2] [--num_classes=1000] [--json]
  python -m bnn_jax.benchmark --inference [...]   (bnn_jax.benchmark_inference:
      the float forward against the 1-bit packed forward)

The step is `train_step.make_train_step` (forward, backward, optimizer
update, BatchNorm statistics), jitted with the state donated as in training, on
random images and labels already on the device (one fixed batch, or with
`--fresh_batches` a new one per step, generated on the device outside the
timed step):

* step1: binary activations, real weights, Adam with coupled L2 decay 5e-6;
  step2: binary activations and weights, Adam without decay
  (docs/recipe.md#the-two-steps).
* with `--teacher`: the teacher's eval-mode forward runs inside the step and
  the loss is KD only; without: cross-entropy.

Measured:

* compile: `jax.jit(step).lower(...)` and `.compile()` wall times (AOT).
* finiteness: every step's `finite` metric (loss, max |g|, max |W|); the
  run stops at the first non-finite step, reports it as
  `first_nonfinite_step` (JSON) and exits 1; `loss_per_step` and
  `grad_max_abs_per_step` list the loss and max |g| of every step run,
  warm-up included.
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

Opt-in performance levers (off by default, each its own flag so a
benchmark row measures one): `--binary_conv_operand_dtype=float8_e4m3fn|int8|
bfloat16` runs the forward of every binary conv on exact narrow operands
(`conv_kernels.binary_conv_low_precision`: same result, same backward);
`--binary_conv_impl=NAME` picks the formulation of the binary convs' forward
(`bnn_jax.exact_binary_conv`: exact narrow operands, e.g. float16 in fan-in
chunks of at most 2,048; same sums, same backward); `--bn_stats_method=
shifted_one_pass` computes the blocks' BatchNorm statistics in one pass over
x - K, K a sample per channel (`bnn_jax.batch_stats`);
`--bn_one_pass_stats` computes the blocks' BatchNorm variance as
mean(x^2) - mean(x)^2 (one pass over x); `--remat_blocks` recomputes each
block's elementwise ops in the backward pass from the saved conv outputs.
`--trace_dir=DIR` traces 3 more
steps with `jax.profiler` after the timed ones
(`benchmarks/trace_summary.py` summarises the trace).

Malloc: `--cpu_malloc=reuse` (the default, as in the ReActNet-A configs)
keeps XLA:CPU's step buffers mapped between steps (`bnn_jax.malloc_defaults`;
what it set is reported as `mallopt`); `--cpu_malloc=glibc` measures glibc's
defaults (the digits configs' setting). `minor_page_faults_per_step` shows
the difference.

Exit status: 0 done; 1 bad input (one-line error; `--debug` shows the
traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional

from absl import flags

from bnn_jax import cli
from bnn_jax import malloc_defaults

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The training benchmark's flags (`--inference` picks `benchmark_inference`)."""
  flags.DEFINE_bool("inference", False, "Benchmark the float and packed "
                    "forwards instead (bnn_jax.tools.benchmark_inference).")
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
  flags.DEFINE_bool("fresh_batches", False,
                    "Train every step on a new random batch generated on the "
                    "device (not one fixed batch); the batch generation is "
                    "not timed.")
  flags.DEFINE_enum("cpu_malloc", "reuse", list(malloc_defaults.MODES),
                    "On a CPU-only host: 'reuse' keeps XLA's step buffers "
                    "mapped between steps (bnn_jax.malloc_defaults), "
                    "'glibc' measures glibc's malloc defaults.")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
  # Opt-in performance levers (model attributes; default: off).
  flags.DEFINE_enum("binary_conv_operand_dtype", None,
                    ["float8_e4m3fn", "int8", "bfloat16"],
                    "Forward of the binary convs on exact narrow operands "
                    "(ReActNet-A step 2; conv_kernels.binary_conv_low_precision).")
  flags.DEFINE_bool("bn_one_pass_stats", False,
                    "BatchNorm variance as mean(x^2) - mean(x)^2 "
                    "(ReActNet-A blocks).")
  flags.DEFINE_string("binary_conv_impl", "",
                      "Formulation of the binary convs' forward "
                      "(bnn_jax.exact_binary_conv: auto, compute_dtype, int8, "
                      "float8_e4m3fn, float16_chunked, bfloat16, "
                      "bfloat16_im2col); '' = the model's default (auto).")
  flags.DEFINE_string("bn_stats_method", "",
                      "BatchNorm batch statistics of the ReActNet-A blocks "
                      "(bnn_jax.batch_stats: two_pass, one_pass, "
                      "shifted_one_pass); '' = the model's default.")
  flags.DEFINE_bool("remat_blocks", False,
                    "Recompute each block's elementwise ops in the backward "
                    "pass, keeping only the binary conv outputs "
                    "(ReActNet-A).")
  flags.DEFINE_string("trace_dir", "",
                      "After timing, trace 3 more steps with jax.profiler "
                      "into this directory (a Perfetto/Chrome trace).")
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


class NonFiniteError(RuntimeError):
  """A benchmarked step produced NaN/Inf; `result` holds the measurements."""

  def __init__(self, message: str, result: dict):
    super().__init__(message)
    self.result = result


@dataclasses.dataclass
class BuiltStep:
  """A compiled training step and what it runs on (`build_step`)."""
  compiled: Any            # (state, batch, teacher_vars) -> (state, metrics)
  state: Any               # the initial TrainState
  batch_data: dict         # one random batch
  random_batch: Callable   # key -> a random batch of the same shape
  teacher_vars: Any
  student_macs: int        # bops + flops of the student (`bnn_jax.summary`)
  teacher_macs: int
  lower_s: float
  compile_s: float


def build_step(model_name: str, batch: int, input_size: int,
               phase: str = "step2", dtype: str = "float32",
               teacher_name: str = "", num_classes: int = 1000,
               input_channels: int = 3,
               model_overrides: Optional[dict] = None,
               compiler_options: Optional[dict] = None) -> BuiltStep:
  """Builds, lowers and compiles the training step `run_benchmark` times.

  `compiler_options` are XLA debug options for this executable only
  (`jax.stages.Lowered.compile`), e.g.
  {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}: the
  XLA_FLAGS of one process, per step function.

  The student in `phase` (step1: real weights, step2: binary), Adam as in
  the recipe (coupled weight decay 5e-6 in step 1, none in step 2), the
  combined loss (KD from `teacher_name`, else cross-entropy only), the state
  donated as in training, random inputs and labels.
  """
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
                 dtype=jnp.dtype(dtype), **(model_overrides or {}))
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

  state = jax.jit(lambda key: train_step.init_state(model, tx, key, shape))(
      jax.random.key(0))

  @jax.jit
  def random_batch(key):
    k_img, k_lab = jax.random.split(key)
    return {
        "image": jax.random.normal(k_img, (batch,) + shape, jnp.float32),
        "label": jax.random.randint(k_lab, (batch,), 0, num_classes,
                                    jnp.int32),
    }

  batch_data = random_batch(jax.random.key(2))

  step_fn = jax.jit(train_step.make_train_step(model, tx, loss_cfg, teacher),
                    donate_argnums=(0,))

  t0 = time.perf_counter()
  lowered = step_fn.lower(state, batch_data, teacher_vars)
  t1 = time.perf_counter()
  compiled = lowered.compile(compiler_options or None)
  t2 = time.perf_counter()
  return BuiltStep(compiled=compiled, state=state, batch_data=batch_data,
                   random_batch=random_batch, teacher_vars=teacher_vars,
                   student_macs=s_summary.bops + s_summary.flops,
                   teacher_macs=teacher_macs, lower_s=t1 - t0,
                   compile_s=t2 - t1)


@dataclasses.dataclass
class StepTimes:
  """What the warm-up and timed steps measured (`time_steps`)."""
  step_s: list            # wall seconds of each timed step
  cpu_s_per_step: float   # process CPU seconds per timed step
  minor_page_faults_per_step: float
  loss_per_step: list     # every step's, warm-up included
  grad_max_abs_per_step: list
  first_nonfinite_step: Optional[int] = None  # counted from 1
  nonfinite_metrics: Optional[dict] = None
  state: Any = None       # after the last step run


def time_steps(built: BuiltStep, *, warmup: int, steps: int,
               fresh_batches: bool) -> StepTimes:
  """Runs `warmup` then `steps` timed steps, each waited for; stops at the
  first step whose `finite` metric is False."""
  import jax

  compiled, state = built.compiled, built.state

  def batch_for(step):  # step counts from 1
    if not fresh_batches:
      return built.batch_data
    return jax.block_until_ready(
        built.random_batch(jax.random.fold_in(jax.random.key(2), step)))

  out = StepTimes([], 0.0, 0.0, [], [])

  def check(step, metrics):
    metrics = jax.device_get(metrics)
    out.loss_per_step.append(float(metrics["train/loss"]))
    out.grad_max_abs_per_step.append(float(metrics["train/grad_max_abs"]))
    if not bool(metrics["finite"]):
      out.first_nonfinite_step = step
      out.nonfinite_metrics = {k: float(v) for k, v in metrics.items()
                               if k.startswith("train/")}
    return out.first_nonfinite_step is None

  for i in range(1, warmup + 1):
    state, metrics = compiled(state, batch_for(i), built.teacher_vars)
    if not check(i, metrics):
      break
  jax.block_until_ready(state)
  cpu_start = time.process_time()
  faults_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for i in range(warmup + 1, warmup + steps + 1):
    if out.first_nonfinite_step is not None:
      break
    data = batch_for(i)
    start = time.perf_counter()
    state, metrics = compiled(state, data, built.teacher_vars)
    jax.block_until_ready((state, metrics))
    out.step_s.append(time.perf_counter() - start)
    check(i, metrics)
  timed = max(len(out.step_s), 1)
  out.cpu_s_per_step = (time.process_time() - cpu_start) / timed
  out.minor_page_faults_per_step = (
      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_start
  ) / timed
  out.step_s = out.step_s or [float("nan")]
  out.state = state
  return out


def environment() -> dict:
  """Where a measurement ran: device, counts, versions, flags, load."""
  import jax

  device = jax.devices()[0]
  return {"device": f"{device.platform}:{device.device_kind}",
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "mallopt": list(malloc_defaults.applied),
          "load_average": os.getloadavg()[0]}


def compiled_costs(compiled: Any) -> dict:
  """XLA's memory and FLOP accounting of a compiled step."""
  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"peak_memory_bytes": peak_memory_bytes(stats),
          "xla_peak_memory_bytes": int(getattr(stats, "peak_memory_in_bytes",
                                               0)),
          "temp_bytes": int(stats.temp_size_in_bytes),
          "argument_bytes": int(stats.argument_size_in_bytes),
          "xla_flops_per_step": (float(cost.get("flops", 0.0)) if cost
                                 else None)}


def run_benchmark(model_name: str, batch: int, input_size: int,
                  phase: str = "step2", dtype: str = "float32",
                  teacher_name: str = "", steps: int = 10, warmup: int = 2,
                  num_classes: int = 1000, input_channels: int = 3,
                  fresh_batches: bool = False,
                  model_overrides: Optional[dict] = None,
                  trace_dir: str = "") -> dict:
  """Compiles and times the training step; returns the measurements.

  Every step's `finite` metric (loss, max |gradient|, max |parameter|) is
  checked; the run stops at the first non-finite step (counted from 1 over
  warm-up and timed steps) and raises `NonFiniteError`, which carries the
  result with `first_nonfinite_step` and that step's metrics.

  `model_overrides` are extra attributes of the student (those it has; e.g.
  the opt-in levers `binary_conv_operand_dtype`, `bn_one_pass_stats`).
  With `trace_dir`, 3 more steps after the timed ones run under
  `jax.profiler.trace(trace_dir)` (result key `trace_error` if that fails).

  MFU = model FLOPs per step / median step time / the device's peak
  (`PEAK_FLOPS`; None on the CPU).
  """
  import jax

  built = build_step(model_name, batch, input_size, phase=phase, dtype=dtype,
                     teacher_name=teacher_name, num_classes=num_classes,
                     input_channels=input_channels,
                     model_overrides=model_overrides)
  measured = time_steps(built, warmup=warmup, steps=steps,
                        fresh_batches=fresh_batches)
  trace_error = trace_steps(trace_dir, built.compiled, measured.state,
                            built.batch_data, built.teacher_vars
                            ) if trace_dir else None
  times = measured.step_s
  median = statistics.median(times)
  device = jax.devices()[0]
  flops = model_flops_per_step(built.student_macs, built.teacher_macs, batch)
  peak = None if device.platform == "cpu" else peak_flops(device.device_kind,
                                                          dtype)
  result = {
      # What ran, and where.
      "model": model_name, "phase": phase, "teacher": teacher_name or None,
      "batch": batch, "input_size": input_size, "dtype": dtype,
      "num_classes": num_classes, **environment(),
      # Time.
      "lower_s": built.lower_s, "compile_s": built.compile_s,
      "step_s_median": median, "step_s_min": min(times),
      "step_s_mean": statistics.fmean(times), "step_s": times,
      "cpu_s_per_step": measured.cpu_s_per_step,
      "minor_page_faults_per_step": measured.minor_page_faults_per_step,
      "steps": steps, "warmup": warmup, "images_per_s": batch / median,
      # Memory and FLOPs.
      **compiled_costs(built.compiled),
      "model_flops_per_step": flops,
      "mfu": None if peak is None else flops / median / peak,
      "max_rss_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                        * 1024),
      # The steps' health, and the options.
      "fresh_batches": fresh_batches,
      "finite": measured.first_nonfinite_step is None,
      "first_nonfinite_step": measured.first_nonfinite_step,
      "loss_per_step": measured.loss_per_step,
      "grad_max_abs_per_step": measured.grad_max_abs_per_step,
      "model_overrides": dict(model_overrides or {}),
      "trace_dir": trace_dir or None, "trace_error": trace_error,
  }
  if measured.first_nonfinite_step is not None:
    raise NonFiniteError(
        f"step {measured.first_nonfinite_step} of {warmup + steps} produced "
        "NaN/Inf in the loss, the gradients or the parameters; its metrics: "
        f"{measured.nonfinite_metrics}", result)
  return result


def trace_steps(trace_dir: str, compiled: Any, state: Any, batch_data: Any,
                teacher_vars: Any, steps: int = 3) -> Optional[str]:
  """Runs `steps` more steps under `jax.profiler.trace`; the error or None.

  Asks for a Perfetto trace (`*.trace.json.gz`, Chrome-trace JSON) next to
  the XSpace protobuf where the installed JAX supports it. `state` is
  donated to the steps, so the caller must not use it afterwards.
  """
  import jax
  try:
    try:
      context = jax.profiler.trace(trace_dir, create_perfetto_trace=True)
    except TypeError:
      context = jax.profiler.trace(trace_dir)
    with context:
      for _ in range(steps):
        state, metrics = compiled(state, batch_data, teacher_vars)
      jax.block_until_ready((state, metrics))
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"[:500]
  return None


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


def model_overrides_from_flags() -> dict:
  """The student attributes set by the lever flags (only those given)."""
  overrides = {}
  if FLAGS.binary_conv_operand_dtype:
    overrides["binary_conv_operand_dtype"] = FLAGS.binary_conv_operand_dtype
  if FLAGS.bn_one_pass_stats:
    overrides["bn_one_pass_stats"] = True
  if FLAGS.remat_blocks:
    overrides["remat_blocks"] = True
  if FLAGS.binary_conv_impl:
    overrides["binary_conv_impl"] = FLAGS.binary_conv_impl
  if FLAGS.bn_stats_method:
    overrides["bn_stats_method"] = FLAGS.bn_stats_method
  return overrides


def main(argv):
  del argv
  with cli.reporting_errors(debug=FLAGS.debug):
    # Before JAX's backend starts its threads.
    malloc_defaults.apply(FLAGS.cpu_malloc)
    try:
      result = run_benchmark(
          FLAGS.model, FLAGS.batch, FLAGS.input_size, phase=FLAGS.phase,
          dtype=FLAGS.dtype, teacher_name=FLAGS.teacher, steps=FLAGS.steps,
          warmup=FLAGS.warmup, num_classes=FLAGS.num_classes,
          input_channels=FLAGS.input_channels,
          fresh_batches=FLAGS.fresh_batches,
          model_overrides=model_overrides_from_flags(),
          trace_dir=FLAGS.trace_dir)
    except NonFiniteError as e:
      if FLAGS.json:  # the measurements up to the first non-finite step
        print(json.dumps(e.result), flush=True)
      cli.fail(cli.one_line(e))
  print(json.dumps(result) if FLAGS.json else format_line(result), flush=True)
  sys.exit(0)
