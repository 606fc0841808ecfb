"""Levers timed against each other step by step, in one process.

  python -m benchmarks.paired_steps --input_size=32 --batch=64 --pairs=20 \
      --variant=default: --variant=int8:binary_conv_operand_dtype=int8 \
      --variant=one_pass:bn_one_pass_stats=true [--out=rows.jsonl]

Each `--variant=NAME:KEY=VALUE,...` is `bnn_jax.benchmark`'s training step
(`benchmark.build_step`: ReActNet-A step 2 by default, random data, state
donated) with those student attributes (`true`/`false`, integers and
floats are converted, anything else stays a string; `NAME:` alone is the
default model). Keys that start with `xla_` are XLA options of that
variant's executable instead (`benchmark.build_step`'s `compiler_options`,
e.g. `sched:xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`):
flags compared within one process. All variants are compiled and warmed
up first, then each round runs one step of every variant in turn, `--pairs` rounds. A machine
whose speed drifts over minutes (a shared or throttled guest) slows the
steps of one round alike, so the per-round ratio first variant / variant
is the number to compare, its median over the rounds: more robust than
separate processes run one after the other.

`--reference` adds the PyTorch reference's step 2
(`bnn_jax.interop.torch_reference`, float32, NCHW; needs torch) as the
first variant, named `torch_reference`, alternated with the others in the
same process: the per-round ratios are then the same-run speed-ups of
docs/performance.md (bnn_jax / reference), taken step by step. Both share
the process's malloc settings (`--cpu_malloc`; `glibc` is the allocator
the reference has in a process of its own):

  python -m benchmarks.paired_steps --reference --input_size=32 --batch=64 \
      --pairs=20 --variant=bnn_jax:

Prints one line per variant (median step, images/s, median of the
per-round ratios against the first variant, min and max of those ratios,
the last loss) and, with `--out`, appends one JSON object per variant.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags

from bnn_jax import cli
from bnn_jax import malloc_defaults
from bnn_jax import xla_defaults

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("model", "reactnet_a", "Student model.")
  flags.DEFINE_enum("phase", "step2", ["step1", "step2"], "AdamBNN step.")
  flags.DEFINE_integer("batch", 64, "Global batch size.")
  flags.DEFINE_integer("input_size", 32, "Input height and width.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "Compute dtype.")
  flags.DEFINE_integer("num_classes", 1000, "Classes of the student.")
  flags.DEFINE_integer("input_channels", 3, "Input channels.")
  flags.DEFINE_integer("pairs", 20, "Rounds of one step per variant.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps per variant first.")
  flags.DEFINE_multi_string("variant", [],
                            "NAME:KEY=VALUE,... (at least two).")
  flags.DEFINE_enum("cpu_malloc", "reuse", list(malloc_defaults.MODES),
                    "malloc settings on the CPU (bnn_jax.malloc_defaults).")
  flags.DEFINE_string("out", "", "Append one JSON object per variant here.")
  flags.DEFINE_bool("reference", False,
                    "Also time the PyTorch reference's step 2, first.")


REFERENCE_NAME = "torch_reference"
XLA_OPTION_PREFIX = "xla_"


def model_attributes(overrides: dict) -> dict:
  """The overrides that are student attributes."""
  return {k: v for k, v in overrides.items()
          if not k.startswith(XLA_OPTION_PREFIX)}


def xla_options(overrides: dict) -> dict:
  """The overrides that are XLA options (`xla_...`) of the executable."""
  return {k: v for k, v in overrides.items()
          if k.startswith(XLA_OPTION_PREFIX)}


def reference_step(batch: int, input_size: int, num_classes: int):
  """(the PyTorch reference's step 2 as a callable, "torch VERSION"), or a one-line error."""
  if (FLAGS.model, FLAGS.phase, FLAGS.dtype, FLAGS.input_channels) != (
      "reactnet_a", "step2", "float32", 3):
    cli.fail("--reference times the reference's ReActNet-A step 2 in "
             "float32 on 3-channel inputs: drop --model/--phase/--dtype/"
             "--input_channels or --reference")
  try:
    from bnn_jax.interop import torch_reference
  except ImportError as e:
    cli.fail(f"--reference needs PyTorch ({e}); install it with "
             "pip install torch==2.13.0 (CPU) or drop --reference")
  return (torch_reference.build_train_step(batch, input_size, num_classes),
          f"torch {torch_reference.torch.__version__}")


def parse_value(text: str):
  """'true'/'false' -> bool, integers and floats -> numbers, else the text."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_variant(spec: str) -> tuple[str, dict]:
  """'NAME:KEY=VALUE,...' -> (NAME, {KEY: VALUE}); 'NAME:' has none."""
  name, sep, rest = spec.partition(":")
  if not name or not sep:
    raise ValueError(f"--variant={spec!r}: expected NAME:KEY=VALUE,... "
                     f"(NAME: alone for the defaults)")
  overrides = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"--variant={spec!r}: {item!r} is not KEY=VALUE")
    overrides[key] = parse_value(value)
  return name, overrides


def paired_times(steps: list, pairs: int) -> list[list[float]]:
  """times[v][r]: seconds of variant v's step in round r.

  `steps[v]` is a callable that runs one step of variant v to completion.
  """
  times = [[] for _ in steps]
  for _ in range(pairs):
    for v, step in enumerate(steps):
      start = time.perf_counter()
      step()
      times[v].append(time.perf_counter() - start)
  return times


def summarize(names: list[str], times: list[list[float]], batch: int
              ) -> list[dict]:
  """Per variant: median step, images/s and the per-round ratios against the first."""
  rows = []
  for name, t in zip(names, times):
    ratios = [a / b for a, b in zip(times[0], t)]
    median = statistics.median(t)
    rows.append({"variant": name, "step_s_median": median,
                 "images_per_s": batch / median, "step_s": t,
                 "speedup_vs_first_median": statistics.median(ratios),
                 "speedup_vs_first_min": min(ratios),
                 "speedup_vs_first_max": max(ratios)})
  return rows


def main(argv):
  del argv
  with cli.reporting_errors():
    variants = [parse_variant(v) for v in FLAGS.variant]
    if len(variants) < (1 if FLAGS.reference else 2):
      cli.fail("give at least two --variant=NAME:KEY=VALUE,... to compare "
               "(one with --reference)")
    malloc_defaults.apply(FLAGS.cpu_malloc)
    import jax
    from bnn_jax.tools import benchmark
    from bnn_jax import models

    fields = models.model_fields(FLAGS.model)
    for name, overrides in variants:
      unknown = sorted(set(model_attributes(overrides)) - set(fields))
      if unknown:
        cli.fail(f"--variant={name}: {FLAGS.model} has no attribute "
                 f"{', '.join(unknown)}; it has {', '.join(sorted(fields))}")

    for name, overrides in variants:  # bad XLA options fail before the model compiles
      if xla_options(overrides):
        try:
          jax.jit(lambda x: x + 1).lower(1.0).compile(xla_options(overrides))
        except jax.errors.JaxRuntimeError as e:
          if "While setting option" not in str(e):
            raise
          cli.fail(f"--variant={name}: {str(e).splitlines()[0]}")

    if FLAGS.reference:  # before compiling anything: a missing torch fails fast
      torch_step, framework = reference_step(FLAGS.batch, FLAGS.input_size,
                                             FLAGS.num_classes)
    runs = []
    for name, overrides in variants:
      try:
        built = benchmark.build_step(
            FLAGS.model, FLAGS.batch, FLAGS.input_size, phase=FLAGS.phase,
            dtype=FLAGS.dtype, num_classes=FLAGS.num_classes,
            input_channels=FLAGS.input_channels,
            model_overrides=model_attributes(overrides),
            compiler_options=xla_options(overrides))
      except jax.errors.JaxRuntimeError as e:
        if "While setting option" not in str(e):
          raise
        cli.fail(f"--variant={name}: {str(e).splitlines()[0]}")
      runs.append({"built": built, "state": built.state, "loss": None})

    def one_step(run):
      if "torch_step" in run:
        run["loss"] = run["torch_step"]()
        return
      built = run["built"]
      run["state"], metrics = built.compiled(run["state"], built.batch_data,
                                             built.teacher_vars)
      jax.block_until_ready((run["state"], metrics))
      run["loss"] = float(metrics["train/loss"])

    if FLAGS.reference:
      variants.insert(0, (REFERENCE_NAME, {}))
      runs.insert(0, {"torch_step": torch_step, "loss": None,
                      "framework": framework})
    for run in runs:
      for _ in range(FLAGS.warmup):
        one_step(run)
    times = paired_times([lambda r=run: one_step(r) for run in runs],
                         FLAGS.pairs)
    rows = summarize([name for name, _ in variants], times, FLAGS.batch)
    for row, run, (_, overrides) in zip(rows, runs, variants):
      row.update({"model_overrides": overrides, "last_loss": run["loss"],
                  "batch": FLAGS.batch, "input_size": FLAGS.input_size,
                  "phase": FLAGS.phase, "dtype": FLAGS.dtype,
                  "pairs": FLAGS.pairs,
                  "compile_s": (run["built"].compile_s if "built" in run
                                else None),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "device": str(jax.devices()[0].device_kind),
                  "framework": run.get("framework", f"jax {jax.__version__}")})
      print(f"{row['variant']:20s} step {1e3 * row['step_s_median']:8.1f} ms"
            f" | {row['images_per_s']:7.2f} img/s | vs {rows[0]['variant']}:"
            f" {row['speedup_vs_first_median']:.3f}x (median of"
            f" {FLAGS.pairs}; {row['speedup_vs_first_min']:.3f}-"
            f"{row['speedup_vs_first_max']:.3f}) | loss {run['loss']:.4f}",
            flush=True)
      if FLAGS.out:
        with open(FLAGS.out, "a") as f:
          f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  xla_defaults.apply()  # before JAX is imported
  define_flags()
  app.run(main)
