"""Whole-network levers of the packed forward, same-run ratios against float.

  python -m benchmarks.packed_levers \
      [--cases=reactnet_a:224,reactnet_a_cifar:32]
      [--batches=1,64] [--rounds=3] [--levers=old,taps1,rows,int32,u8,fused]

For each case and batch: the float forward (`benchmark_inference`'s
pre-binarised model) and the packed forward (`packed.PackedModel`) with each
lever's binary conv, all jitted, checked for the float model's predictions,
then run in interleaved rounds (float, lever 1, lever 2, ..., float, ...).
Reported per lever: median seconds per call, the median per-round ratio
lever / float, XLA's temp bytes. JSON lines with --out.

Levers (the binary conv each packed forward uses):
  old     the packed conv before issue 25 (`old_packed_conv` below: sign and
          valid planes, 9 shifted word maps concatenated into patches, one
          broadcast XOR/AND/popcount reduced over all k*k words)
  taps1   xnor_conv with one tap per reduction (k*k int16 partial maps)
  rows    xnor_conv with one kernel row (3 taps) per reduction, int16 sums
  split   xnor_conv as shipped: rows, but a row of 17-32 words (256
          channels) as groups of 16 words (2 taps)
  hybrid  a row per reduction where a row has at most 16 words (C <= 160),
          else one tap (`hybrid_conv`)
  int32   the shipped conv (split) with int32 partial sums
  u8      the shipped conv with uint8 words
  fused   the shipped conv without materialising the concatenated row maps
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bnn_jax import models
from bnn_jax import packed
from bnn_jax.deploy import packed_forward
from bnn_jax.deploy import xnor_conv
from bnn_jax.tools import benchmark_inference

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("cases", "reactnet_a:224,reactnet_a_cifar:32", "")
  flags.DEFINE_string("batches", "1,64", "")
  flags.DEFINE_integer("rounds", 3, "")
  flags.DEFINE_string("levers",
                      "old,taps1,rows,split,hybrid,int32,u8,fused", "")
  flags.DEFINE_string("out", "", "JSON lines file (appended).")


def old_packed_conv(x, weight_bits, strides, padding, zero_to):
  """bnn_jax.packed.packed_conv as it was before issue 25 (the baseline)."""
  k, _, words, out_channels = weight_bits.shape
  positive = (x > 0) | ((x == 0) & (zero_to > 0))
  nonzero = (x != 0) | (zero_to != 0)
  signs, valid = packed.pack_bits(positive), packed.pack_bits(nonzero)

  def patches(m):
    if k == 1 and padding == 0:
      return m[:, ::strides, ::strides, :]
    pads = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    xp = jnp.pad(m, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    out_h = (xp.shape[1] - k) // strides + 1
    out_w = (xp.shape[2] - k) // strides + 1
    return jnp.concatenate(
        [xp[:, a:a + strides * (out_h - 1) + 1:strides,
            b:b + strides * (out_w - 1) + 1:strides, :]
         for a in range(k) for b in range(k)], axis=-1)

  signs, valid = patches(signs), patches(valid)
  w = weight_bits.reshape(k * k * words, out_channels).T
  n_valid = jnp.sum(jax.lax.population_count(valid).astype(jnp.int32),
                    axis=-1, keepdims=True)
  differ = (signs[..., None, :] ^ w) & valid[..., None, :]
  mismatches = jnp.sum(jax.lax.population_count(differ).astype(jnp.int32),
                       axis=-1)
  return n_valid - 2 * mismatches


def hybrid_conv(x, weight_bits, strides, padding, zero_to):
  """xnor_conv with a kernel row per reduction only where it has <= 16 words."""
  k, _, words, _ = weight_bits.shape
  return xnor_conv.xnor_conv(x, weight_bits, strides, padding, zero_to,
                             taps_per_reduction=k if k * words <= 16 else 1)


LEVERS = {
    "old": old_packed_conv,
    "taps1": functools.partial(xnor_conv.xnor_conv, taps_per_reduction=1),
    "rows": functools.partial(xnor_conv.xnor_conv, taps_per_reduction=3),
    "split": xnor_conv.xnor_conv,
    "hybrid": hybrid_conv,
    "int32": functools.partial(xnor_conv.xnor_conv,
                               partial_dtype=jnp.int32),
    "u8": functools.partial(xnor_conv.xnor_conv, word_bits=8),
    "fused": functools.partial(xnor_conv.xnor_conv, materialise=False),
}


@contextlib.contextmanager
def conv_of(lever):
  """packed_forward.packed_conv (what PackedModel calls) replaced by the
  lever's conv while tracing."""
  original = packed_forward.packed_conv
  packed_forward.packed_conv = LEVERS[lever]
  try:
    yield
  finally:
    packed_forward.packed_conv = original


def run_case(name, size, batch, levers, rounds):
  shape = (size, size, 3)
  model = models.create(name, num_classes=1000)
  variables = benchmark_inference.random_variables(model, shape)
  float_model, float_vars = benchmark_inference.prebinarised(
      model, variables, shape)
  packed_vars = packed.pack_variables(model, variables, shape).variables
  packed_model = packed.PackedModel({"model": {
      "name": name, "num_classes": 1000, "overrides": {}}})
  float_vars, packed_vars = jax.device_put((float_vars, packed_vars))
  x = jax.device_put(np.random.default_rng(batch).normal(
      size=(batch,) + shape).astype(np.float32))
  compiled = {"float": jax.jit(lambda v, x: float_model.apply(
      v, x, train=False)).lower(float_vars, x).compile()}
  args = {"float": float_vars}
  for lever in levers:
    with conv_of(lever):
      compiled[lever] = jax.jit(packed_model.apply).lower(
          packed_vars, x).compile()
    args[lever] = packed_vars
  want = np.asarray(compiled["float"](float_vars, x)).argmax(-1)
  same = {n: bool(np.array_equal(
      np.asarray(c(args[n], x)).argmax(-1), want))
      for n, c in compiled.items()}
  calls = 5 if batch == 1 else 1
  times = {n: [] for n in compiled}
  for _ in range(rounds):
    for n, c in compiled.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = c(args[n], x)
      jax.block_until_ready(out)
      times[n].append((time.perf_counter() - start) / calls)
  return {
      "model": name, "input_size": size, "batch": batch,
      "load": os.getloadavg()[0],
      "seconds": {n: statistics.median(t) for n, t in times.items()},
      "ratio": {n: statistics.median([a / b for a, b in
                                      zip(t, times["float"])])
                for n, t in times.items()},
      "temp_bytes": {n: int(c.memory_analysis().temp_size_in_bytes)
                     for n, c in compiled.items()},
      "same_predictions": same}


def main(argv):
  del argv
  levers = FLAGS.levers.split(",")
  for entry in FLAGS.cases.split(","):
    name, size = entry.split(":")
    for batch in (int(b) for b in FLAGS.batches.split(",")):
      r = run_case(name, int(size), batch, levers, FLAGS.rounds)
      print(f"{name}:{size} b{batch} load {r['load']:.1f}: " + "  ".join(
          f"{n} {1e3 * r['seconds'][n]:.1f}ms ({r['ratio'][n]:.2f}, temp "
          f"{r['temp_bytes'][n] / 2**20:.1f}M"
          f"{'' if r['same_predictions'][n] else ', DIFFERENT'})"
          for n in r["seconds"]), flush=True)
      if FLAGS.out:
        with open(FLAGS.out, "a") as f:
          f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
