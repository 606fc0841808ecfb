"""Per-layer profile of the binary convs: float conv vs packed variants.

  python -m benchmarks.packed_profile \
      [--cases=reactnet_a:224,reactnet_a_cifar:32] [--batches=1,64] \
      [--rounds=3] [--variants=float,old,taps1,rows,u8,concat,int8]

For every distinct binary conv of the model (input shape, kernel, stride,
output channels; with how many times the model calls it), each variant is
jitted on random inputs and run in interleaved rounds (float, variant, ...,
float, ...); reported per layer: median seconds per call of each, the
median per-round ratio variant / float, XLA's temp bytes, and the model's
sums (time x calls) per variant. Every variant's integers are checked
against the float conv of the +-1 values first.

Variants (each one input-to-int32-sum, binarisation included):
  float   sign(x) -> conv_kernels.conv2d_nhwc (float32, +-1 kernel): the float
          forward's conv (padding-only taps trimmed, im2col on small maps)
  old     the packed conv before issue 25 (benchmarks.packed_levers:
          patches concatenated, broadcast XOR reduced over all k*k words)
  taps1   bnn_jax.deploy.xnor_conv, uint32 words, one reduction per tap
  rows    xnor_conv with its defaults: one reduction per kernel row, rows of
          17-32 words as 16-word groups (the profile in docs/deploy.md ran
          before that split, with plain rows)
  u8      rows with uint8 words
  concat  uint32 words, the k * k taps concatenated into [.., k*k, Wd] and
          one reduction over both axes
  patches as concat, the patches materialised first (optimization_barrier)
          so that the reduction reads a plain [.., k*k, Wd] array
  int8    sign(x) as int8 -> conv_kernels.conv2d_nhwc, int32 accumulation (exact; not
          1-bit: 8 bits per weight and activation)
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bnn_jax import conv_kernels
from bnn_jax import models
from bnn_jax import packed
from bnn_jax.deploy import xnor_conv as xc

from benchmarks.packed_levers import old_packed_conv

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("cases", "reactnet_a:224,reactnet_a_cifar:32", "")
  flags.DEFINE_string("batches", "1,64", "")
  flags.DEFINE_integer("rounds", 3, "")
  flags.DEFINE_string("variants", "float,old,taps1,rows,u8,concat,int8", "")
  flags.DEFINE_string("out", "", "JSON lines file (appended).")


def conv_float(x, w, s, pad):
  """What the float forward's BinaryConv runs (`conv_kernels.conv2d_nhwc`)."""
  xb = jnp.where(x >= 0, 1.0, -1.0)
  return conv_kernels.conv2d_nhwc(xb, w, s, pad)


def conv_int8(x, w, s, pad):
  xb = jnp.where(x >= 0, 1, -1).astype(jnp.int8)
  return conv_kernels.conv2d_nhwc(xb, w.astype(jnp.int8), s, pad,
                            preferred_element_type=jnp.int32)


def conv_concat(x, bits, s, pad, barrier=False):
  k, _, wd, o = bits.shape
  words = jnp.pad(xc.pack(x >= 0, 32), ((0, 0), (pad, pad), (pad, pad),
                                         (0, 0)))
  ho = xc.output_size(x.shape[1], k, s, (pad, pad))
  wo = xc.output_size(x.shape[2], k, s, (pad, pad))
  patches = jnp.stack([xc._tap(words, a, b, s, ho, wo)
                       for a in range(k) for b in range(k)], axis=-2)
  if barrier:  # materialise the patches (9/32 of a float map) first
    patches = jax.lax.optimization_barrier(patches)
  wt = bits.reshape(k * k, wd, o).transpose(2, 0, 1)      # [O, k*k, Wd]
  differ = patches[..., None, :, :] ^ wt
  mism = jnp.sum(jax.lax.population_count(differ).astype(jnp.int32),
                 axis=(-2, -1))
  y = k * k * x.shape[-1] - 2 * mism
  rows = xc.outside(x.shape[1], k, s, (pad, pad))
  cols = xc.outside(x.shape[2], k, s, (pad, pad))
  return y + xc._padding_correction(bits, x.shape[-1], rows, cols,
                                    list(range(k)), list(range(k)))


def make(variant, s, pad):
  if variant == "float":
    return lambda x, w, bits: conv_float(x, w, s, pad)
  if variant == "int8":
    return lambda x, w, bits: conv_int8(x, w, s, pad)
  if variant == "old":
    return lambda x, w, bits: old_packed_conv(x, bits, s, pad, 1.0)
  if variant == "taps1":
    return lambda x, w, bits: xc.xnor_conv(x, bits, s, pad, 1.0,
                                           taps_per_reduction=1)
  if variant == "rows":
    return lambda x, w, bits: xc.xnor_conv(x, bits, s, pad, 1.0)
  if variant == "u8":
    return lambda x, w, bits: xc.xnor_conv(x, bits, s, pad, 1.0, 8)
  if variant == "concat":
    return lambda x, w, bits: conv_concat(x, bits, s, pad)
  if variant == "patches":
    return lambda x, w, bits: conv_concat(x, bits, s, pad, barrier=True)
  raise ValueError(variant)


def layers_of(model_name, size):
  model = models.create(model_name, num_classes=1000)
  count = collections.Counter()
  for layer in packed.trace_layers(model, (size, size, 3)):
    m = layer.module
    if packed.is_packed_conv(m):
      pad = m.resolved_padding(layer.input_shape[1:3])
      count[(layer.input_shape[1:], m.kernel_size, m.strides, pad,
             m.features)] += 1
  return count


def profile_layer(key, batch, rounds, variants):
  (h, w_, c), k, s, pad, o = key
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, h, w_, c)).astype(np.float32)
  w = rng.choice(np.float32([-1, 1]), size=(k, k, c, o))
  bits = packed.pack_bits(w.transpose(0, 1, 3, 2) > 0).transpose(0, 1, 3, 2)
  x, w, bits = jax.device_put((x, w, bits))
  fns, temps = {}, {}
  want = None
  for v in variants:
    compiled = jax.jit(make(v, s, pad)).lower(x, w, bits).compile()
    temps[v] = int(compiled.memory_analysis().temp_size_in_bytes)
    got = np.asarray(compiled(x, w, bits)).astype(np.int64)
    if want is None:
      want = got
    elif not np.array_equal(got, want):
      raise AssertionError(f"{v} differs at {key}")
    fns[v] = lambda c=compiled: c(x, w, bits)
  calls = max(1, int(2e8 // (batch * h * w_ * c * k * k * o / 32 + 1)))
  calls = min(calls, 20)
  times = {v: [] for v in variants}
  for v in variants:  # warm-up
    jax.block_until_ready(fns[v]())
  for _ in range(rounds):
    for v in variants:
      start = time.perf_counter()
      for _ in range(calls):
        out = fns[v]()
      jax.block_until_ready(out)
      times[v].append((time.perf_counter() - start) / calls)
  ref = variants[0]
  return {"layer": f"{h}x{w_}x{c} k{k} s{s} -> {o}", "batch": batch,
          "seconds": {v: statistics.median(t) for v, t in times.items()},
          "ratio": {v: statistics.median([a / b for a, b in
                                           zip(t, times[ref])])
                    for v, t in times.items()},
          "temp_bytes": temps}


def main(argv):
  del argv
  variants = FLAGS.variants.split(",")
  for entry in FLAGS.cases.split(","):
    name, size = entry.split(":")
    layers = layers_of(name, int(size))
    for batch in (int(b) for b in FLAGS.batches.split(",")):
      total = collections.Counter()
      for key, n in layers.items():
        r = profile_layer(key, batch, FLAGS.rounds, variants)
        r.update(model=name, size=int(size), calls_in_model=n,
                 load=os.getloadavg()[0])
        for v in variants:
          total[v] += n * r["seconds"][v]
        print(f"{name}:{size} b{batch} {r['layer']:>26} x{n}: " + "  ".join(
            f"{v} {1e3 * r['seconds'][v]:8.2f}ms ({r['ratio'][v]:.2f}, "
            f"tmp {r['temp_bytes'][v] / 2**20:.1f}M)" for v in variants),
            flush=True)
        if FLAGS.out:
          with open(FLAGS.out, "a") as f:
            f.write(json.dumps(r) + "\n")
      print(f"{name}:{size} b{batch} SUM over convs: " + "  ".join(
          f"{v} {1e3 * total[v]:.1f}ms ({total[v] / total[variants[0]]:.2f})"
          for v in variants), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
