"""Inference benchmark: the float forward against the 1-bit packed forward.

  python -m bnn_jax.benchmark --inference \
      [--cases=reactnet_a:224,reactnet_a_cifar:32] [--batches=1,64] \
      [--rounds=5] [--gemm=64:14:512:512] [--json]

For each case (a model at an input size, random weights and BatchNorm
statistics, random normal inputs) and each batch size, two jitted forward
passes in eval mode compute the same function:

* float:  the model with its kernels pre-binarised (alpha * sign(W), so no
          per-call weight binarisation is timed) and its binary activations,
          every conv a float32 convolution (XLA's GEMM / conv kernels);
* packed: `bnn_jax.packed`: kernels as sign bits in uint32 words, each binary
          conv k * k shifted XNOR-popcount products that XLA generates
          (`bnn_jax.deploy.xnor_conv`, `lax.population_count`), BatchNorm
          folded.

They run in interleaved rounds (float, packed, float, packed, ...), so a
machine shared with other work slows both alike and the per-round ratio
packed / float stays meaningful when the absolute times do not. Reported per
case and batch: median seconds per call, images/s, the ratio, whether the
two give the same predictions (and the largest logit difference), compile
times, XLA's temp allocation (whether the popcount intermediates are
materialised), and the model's BOPs / FLOPs (`bnn_jax.summary`) against the
measured rates: binary ops/s = BOPs * batch / t for packed, MAC/s =
(BOPs + FLOPs) * batch / t for float. Weight memory: the float checkpoint's
params + BatchNorm statistics (float32) vs the packed variables.

`--gemm=N:HW:CIN:COUT` adds one 1x1 binary conv as a matrix product of
M = N * HW * HW rows, K = CIN, COUT columns: `packed.packed_conv` against
`jnp.dot` of +-1 float32 matrices, interleaved the same way, in MAC/s.

Needs only JAX and Flax (no TensorFlow), so it runs on accelerator hosts.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags

from bnn_jax import cli

FLAGS = flags.FLAGS
DEFAULT_CASES = "reactnet_a:224,reactnet_a_cifar:32"


def define_flags() -> None:
  """The inference benchmark's flags (`python -m bnn_jax.benchmark --inference`)."""
  flags.DEFINE_bool("inference", True, "This benchmark (the float and packed "
                    "forwards); set by `python -m bnn_jax.benchmark`.")
  flags.DEFINE_string("cases", DEFAULT_CASES,
                      "Comma-separated model:input_size pairs.")
  flags.DEFINE_string("batches", "1,64", "Comma-separated batch sizes.")
  flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
  flags.DEFINE_integer("calls_at_batch_1", 5,
                       "Calls per round at batch 1 (1 call at larger batches).")
  flags.DEFINE_integer("num_classes", 1000, "Classes of the classifier.")
  flags.DEFINE_integer("input_channels", 3, "Input channels.")
  flags.DEFINE_string("gemm", "64:14:512:512", "N:HW:CIN:COUT of the 1x1 "
                      "binary conv GEMM comparison ('' = none).")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")


def random_variables(model: Any, shape: tuple[int, ...], seed: int = 0) -> dict:
  """Normal(0, 1) parameters, BatchNorm variances in [0.5, 2)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
  variables["batch_stats"] = jax.tree.map(
      lambda a: rng.uniform(0.5, 2.0, a.shape).astype(np.float32),
      abstract["batch_stats"])
  return variables


def prebinarised(model: Any, variables: dict, shape: tuple[int, ...]
                 ) -> tuple[Any, dict]:
  """(model with real weights, variables with kernels alpha * sign(W)).

  The same function as `model` on `variables`, without binarising the
  weights inside every call (a deployed float model stores them so).
  """
  import jax
  import numpy as np

  from bnn_jax import binary
  from bnn_jax import packed

  params = jax.tree.map(np.array, variables["params"])
  for layer in packed.trace_layers(model, shape):
    module = layer.module
    if getattr(module, "binary_weights", False):
      node = params
      for name in layer.path:
        node = node[name]
      node["kernel"] = np.asarray(binary.get_weight_binarizer(
          module.kernel_binarizer, module.zero_to)(node["kernel"]))
  return model.clone(binary_weights=False), {**variables, "params": params}


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int,
                 calls: int) -> dict[str, list[float]]:
  """Seconds per call of each function, one entry per round, interleaved."""
  import jax

  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / calls)
  return times


def _compile(fn: Callable, *args) -> tuple[Any, float, int]:
  """(compiled, seconds to lower and compile, XLA temp bytes)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  temp = int(stats.temp_size_in_bytes) if stats is not None else -1
  return compiled, seconds, temp


def benchmark_case(model_name: str, input_size: int, batches: Sequence[int],
                   rounds: int, calls_at_batch_1: int = 5,
                   num_classes: int = 1000, input_channels: int = 3) -> dict:
  """Float vs packed forward of one model at one input size."""
  import jax
  import numpy as np

  from bnn_jax import models
  from bnn_jax import packed
  from bnn_jax import summary

  shape = (input_size, input_size, input_channels)
  model = models.create(model_name, num_classes=num_classes)
  variables = random_variables(model, shape)
  cost = summary.summarize(model, shape)
  float_model, float_vars = prebinarised(model, variables, shape)
  packed_vars = packed.pack_variables(model, variables, shape).variables
  packed_model = packed.PackedModel({"model": {
      "name": model_name, "num_classes": num_classes, "overrides": {}}})
  float_fn = jax.jit(lambda v, x: float_model.apply(v, x, train=False))
  packed_fn = jax.jit(packed_model.apply)
  float_vars, packed_vars = jax.device_put((float_vars, packed_vars))
  result = {
      "model": model_name, "input_size": input_size,
      "bops": cost.bops, "flops": cost.flops,
      "weights_bytes": {
          "float": packed.variables_bytes(variables),
          "packed": packed.variables_bytes(packed_vars)},
      "batches": []}
  for batch in batches:
    x = jax.device_put(np.random.default_rng(batch).normal(
        size=(batch,) + shape).astype(np.float32))
    f, f_compile, f_temp = _compile(float_fn, float_vars, x)
    p, p_compile, p_temp = _compile(packed_fn, packed_vars, x)
    want, got = np.asarray(f(float_vars, x)), np.asarray(p(packed_vars, x))
    calls = calls_at_batch_1 if batch == 1 else 1
    times = _interleaved({"float": lambda: f(float_vars, x),
                          "packed": lambda: p(packed_vars, x)},
                         rounds, calls)
    t_float = statistics.median(times["float"])
    t_packed = statistics.median(times["packed"])
    ratios = [a / b for a, b in zip(times["packed"], times["float"])]
    result["batches"].append({
        "batch": batch,
        "float_s": t_float, "packed_s": t_packed,
        "float_images_per_s": batch / t_float,
        "packed_images_per_s": batch / t_packed,
        "packed_over_float_median_ratio": statistics.median(ratios),
        "round_ratios": ratios,
        "predictions_equal": bool(np.array_equal(want.argmax(-1),
                                                 got.argmax(-1))),
        "max_abs_logit_diff": float(np.abs(want - got).max()),
        "max_abs_logit": float(np.abs(want).max()),
        "compile_s": {"float": f_compile, "packed": p_compile},
        "xla_temp_bytes": {"float": f_temp, "packed": p_temp},
        "packed_binary_ops_per_s": cost.bops * batch / t_packed,
        "float_macs_per_s": (cost.bops + cost.flops) * batch / t_float,
    })
  return result


def benchmark_gemm(n: int, hw: int, cin: int, cout: int, rounds: int) -> dict:
  """One 1x1 binary conv: XNOR-popcount vs a float32 matmul of +-1."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bnn_jax import packed

  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, hw, hw, cin)).astype(np.float32)
  w = rng.choice(np.float32([-1, 1]), size=(1, 1, cin, cout))
  bits = packed.pack_bits(w.transpose(0, 1, 3, 2) > 0).transpose(0, 1, 3, 2)
  xb = np.where(x >= 0, 1.0, -1.0).astype(np.float32).reshape(-1, cin)
  x, bits, xb, wm = jax.device_put((x, bits, xb, w.reshape(cin, cout)))
  popcount = jax.jit(lambda x, b: packed.packed_conv(x, b, 1, 0, 1.0))
  dot = jax.jit(lambda a, b: jnp.dot(a, b))
  p, p_compile, p_temp = _compile(popcount, x, bits)
  d, d_compile, d_temp = _compile(dot, xb, wm)
  same = np.array_equal(np.asarray(p(x, bits)).reshape(-1, cout),
                        np.asarray(d(xb, wm)).astype(np.int32))
  times = _interleaved({"float_dot": lambda: d(xb, wm),
                        "popcount": lambda: p(x, bits)}, rounds, 3)
  macs = n * hw * hw * cin * cout
  t_dot = statistics.median(times["float_dot"])
  t_pop = statistics.median(times["popcount"])
  return {"m": n * hw * hw, "k": cin, "n": cout, "macs": macs,
          "float_dot_s": t_dot, "popcount_s": t_pop,
          "float_dot_macs_per_s": macs / t_dot,
          "popcount_macs_per_s": macs / t_pop,
          "popcount_over_float_median_ratio": statistics.median(
              [a / b for a, b in zip(times["popcount"], times["float_dot"])]),
          "equal_results": bool(same),
          "compile_s": {"float_dot": d_compile, "popcount": p_compile},
          "xla_temp_bytes": {"float_dot": d_temp, "popcount": p_temp}}


def run(cases: Sequence[tuple[str, int]], batches: Sequence[int],
        rounds: int, calls_at_batch_1: int = 5, num_classes: int = 1000,
        input_channels: int = 3, gemm: str = "") -> dict:
  """Every case and the GEMM comparison; plus the machine it ran on."""
  import jax

  device = jax.devices()[0]
  result = {
      "device": f"{device.platform}:{device.device_kind}",
      "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_before": os.getloadavg()[0],
      "cases": [benchmark_case(m, s, batches, rounds, calls_at_batch_1,
                               num_classes, input_channels)
                for m, s in cases]}
  if gemm:
    n, hw, cin, cout = (int(v) for v in gemm.split(":"))
    result["gemm"] = benchmark_gemm(n, hw, cin, cout, rounds)
  result["load_average_after"] = os.getloadavg()[0]
  # This module must stay usable where TensorFlow is absent.
  result["tensorflow_imported"] = "tensorflow" in sys.modules
  return result


def cpu_model() -> str:
  """The host CPU's model name (/proc/cpuinfo), '' where it is not known."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def parse_cases(text: str) -> list[tuple[str, int]]:
  """'model:size,...' -> [(model, size), ...]; ValueError naming a bad entry."""
  cases = []
  for entry in filter(None, (e.strip() for e in text.split(","))):
    name, _, size = entry.partition(":")
    if not size.isdigit():
      raise ValueError(f"--cases entry {entry!r} is not model:input_size, "
                       "e.g. reactnet_a:224")
    cases.append((name, int(size)))
  return cases


def format_lines(r: dict) -> str:
  """Human-readable lines of a `run` result."""
  lines = [f"inference on {r['device']} {r.get('cpu_model', '')} "
           f"({r['cpu_count']} CPUs, load "
           f"{r['load_average_before']:.1f} -> {r['load_average_after']:.1f})"]
  for case in r["cases"]:
    w = case["weights_bytes"]
    lines.append(f"{case['model']} {case['input_size']}x{case['input_size']}:"
                 f" {case['bops'] / 1e9:.3f} GBOPs + {case['flops'] / 1e9:.3f}"
                 f" GFLOPs (MACs) per image; weights {w['float'] / 2**20:.1f} "
                 f"MiB float -> {w['packed'] / 2**20:.2f} MiB packed")
    for b in case["batches"]:
      lines.append(
          f"  batch {b['batch']}: float {1e3 * b['float_s']:.1f} ms "
          f"({b['float_images_per_s']:.1f} img/s), packed "
          f"{1e3 * b['packed_s']:.1f} ms ({b['packed_images_per_s']:.1f} "
          f"img/s), packed/float {b['packed_over_float_median_ratio']:.2f}; "
          f"same predictions {b['predictions_equal']}; packed "
          f"{b['packed_binary_ops_per_s'] / 1e9:.1f} GBOP/s, float "
          f"{b['float_macs_per_s'] / 1e9:.1f} GMAC/s; XLA temp float "
          f"{b['xla_temp_bytes']['float'] / 2**20:.1f} MiB, packed "
          f"{b['xla_temp_bytes']['packed'] / 2**20:.1f} MiB")
  if "gemm" in r:
    g = r["gemm"]
    lines.append(
        f"1x1 binary conv as GEMM {g['m']}x{g['k']}x{g['n']}: float dot "
        f"{g['float_dot_macs_per_s'] / 1e9:.1f} GMAC/s, popcount "
        f"{g['popcount_macs_per_s'] / 1e9:.1f} GMAC/s (ratio "
        f"{g['popcount_over_float_median_ratio']:.2f}), equal "
        f"{g['equal_results']}")
  return "\n".join(lines)


def main(argv):
  del argv
  with cli.reporting_errors(debug=False, errors=(ValueError,)):
    cases = parse_cases(FLAGS.cases)
    batches = [int(b) for b in FLAGS.batches.split(",") if b.strip()]
  result = run(cases, batches, FLAGS.rounds, FLAGS.calls_at_batch_1,
               FLAGS.num_classes, FLAGS.input_channels, FLAGS.gemm)
  print(json.dumps(result) if FLAGS.json else format_lines(result),
        flush=True)
