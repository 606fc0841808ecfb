"""The packed binary convolution as k * k shifted popcount products.

Activations are binarised and packed once, at the conv's input, into words
along the channel axis (bit c % B of word c // B, B = bits per word, LSB
first; bits past the last channel 0). Weights come as the packed file's
uint32 words [k, k, ceil(C / 32), O] (`bnn_jax.packed`), regrouped into the
same words. For tap t = (a, b) of the kernel and output pixel (i, j), the
input pixel is (s * i + a - top, s * j + b - left) of the zero-padded map.

sign(0) = +1 or -1 (one bit plane). Every input bit is +-1 except at the
padding, whose words are 0 (all -1 to the popcount). The sum over the
C channels of tap t is C - 2 * popcount(a_t XOR b_t) at an input pixel;
at a padded one that expression is C - 2 * popcount(b_t) = -S_t,o with
S_t,o = sum_c w_t,c,o, where the float conv counts 0. So

  y[n, i, j, o] = k * k * C - 2 * sum_t sum_words popcount(a_t XOR b_t)
                  + sum_{t padded at (i, j)} S_t,o,

the last term a batch-independent correction. Tap (a, b) is padded at
(i, j) when its row reads padding (r_a(i), static) or its column does
(c_b(j)), so

  correction[i, j, o] = sum_{a, b} select(r_a(i) OR c_b(j), S_ab,o, 0)

over the taps that read padding anywhere: selects on static masks, which
XLA fuses into the conv's elementwise epilogue (no [Ho, Wo, O] array is
written, nothing batch-independent is kept alive). Kernel rows (columns)
that read only padding at every output pixel (a 3x3 conv on a 1x1 map)
are left out of both sums, and k * k * C becomes (used taps) * C.

sign(0) = 0 (torch). An exact-zero input must count 0, so activations carry
a second plane v (1 where the input is nonzero; 0 at the padding too) and

  y = sum_t [popcount(v_t) - 2 * popcount(v_t AND (a_t XOR b_t))].

Both are the integer that the float conv of the +-1 (and 0) values
computes. The taps of one kernel row are concatenated on the word axis and
summed by one XLA reduction (per <= 32 words: above that XLA:CPU splits a
reduction into a materialised reduce-window; a row of 17 to 32 words as
16-word groups), XOR, AND and popcount fused into it. The partial sums are
int16 where 2 * k * k * C < 2^15 (ReActNet-A: always), so XLA writes half
the bytes, and int32 after their sum.
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax.deploy.packed_format import WORD_BITS, num_words

Array = jax.Array
Padding = Union[int, tuple[tuple[int, int], tuple[int, int]]]
def pack(bits: Array, word_bits: int = WORD_BITS) -> Array:
  """Words [..., ceil(C / word_bits)] of booleans [..., C], LSB first.

  word = sum_b bits[b] << b (distinct powers of two: the sum is the OR).
  numpy arrays (export) give numpy words, traced jax arrays jax words; at
  the default 32 bits these are the packed file's words.
  """
  xp = np if isinstance(bits, np.ndarray) else jnp
  dtype = np.dtype(f"uint{word_bits}")
  channels = bits.shape[-1]
  words = -(-channels // word_bits)
  bits = xp.asarray(bits).astype(dtype)
  pad = [(0, 0)] * (bits.ndim - 1) + [(0, words * word_bits - channels)]
  bits = xp.pad(bits, pad).reshape(bits.shape[:-1] + (words, word_bits))
  powers = xp.left_shift(xp.ones((), dtype), xp.arange(word_bits, dtype=dtype))
  return xp.sum(bits * powers, axis=-1, dtype=dtype)


def regroup_weight_words(weight_bits: Array, word_bits: int) -> Array:
  """uint32 file words [k, k, W32, O] as words of `word_bits` [k, k, Wd, O].

  32: as they are. 8: each uint32 split into its 4 bytes, low byte first
  (Wd = 4 * W32; the trailing bytes past the channels are 0). Bit c of the
  input channels stays bit c % word_bits of word c // word_bits.
  """
  if word_bits == WORD_BITS:
    return weight_bits
  if word_bits != 8:
    raise ValueError(f"word_bits {word_bits}: choose 32 or 8")
  k1, k2, w32, o = weight_bits.shape
  shifts = jnp.arange(0, 32, 8, dtype=jnp.uint32)
  parts = (weight_bits[:, :, :, None, :] >> shifts[:, None]) & jnp.uint32(255)
  return parts.astype(jnp.uint8).reshape(k1, k2, 4 * w32, o)


def _pads(padding: Padding) -> tuple[tuple[int, int], tuple[int, int]]:
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  return (tuple(padding[0]), tuple(padding[1]))


def output_size(size: int, k: int, strides: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // strides + 1


def outside(size: int, k: int, strides: int, pad: tuple[int, int]
            ) -> np.ndarray:
  """bool [out, k]: whether tap a of output position i reads padding."""
  out = output_size(size, k, strides, pad)
  index = strides * np.arange(out)[:, None] + np.arange(k)[None, :] - pad[0]
  return (index < 0) | (index >= size)


def _padding_correction(weight_bits: Array, channels: int, rows: np.ndarray,
                        cols: np.ndarray, used_a: list[int],
                        used_b: list[int]) -> Array | int:
  """int32 [Ho, Wo, O] sum over the padded used taps of S_ab,o (docstring).

  rows: r [Ho, k], cols: c [Wo, k] (`outside`); S_ab,o = 2 popcount(b_ab,o)
  - C. A sum of selects over static masks, which XLA fuses into the conv's
  epilogue; 0 when no used tap reads padding.
  """
  padded = [(a, b) for a in used_a for b in used_b
            if rows[:, a].any() or cols[:, b].any()]
  if not padded:
    return 0
  ones = jnp.sum(jax.lax.population_count(weight_bits).astype(jnp.int32),
                 axis=2)                               # [k, k, O]
  s = 2 * ones - channels
  correction = 0
  for a, b in padded:
    where = rows[:, a, None, None] | cols[None, :, b, None]  # [Ho, Wo, 1]
    correction = correction + jnp.where(where, s[a, b], 0)
  return correction


def _tap(words: Array, a: int, b: int, strides: int, ho: int, wo: int
         ) -> Array:
  """[N, Ho, Wo, Wd]: the padded word map seen by tap (a, b)."""
  return words[:, a:a + strides * (ho - 1) + 1:strides,
               b:b + strides * (wo - 1) + 1:strides, :]


# XLA:CPU rewrites a reduction over more elements than this into a
# materialised reduce-window; each popcount reduction stays at or below it.
MAX_REDUCED_WORDS = 32
# Reductions over this many words ran up to 5x slower on XLA:CPU than over
# 16 (docs/deploy.md); a kernel row of that length is split.
SLOW_WORDS = (17, 32)


def _popcount_product(x: Array, w: Array, v: Array | None = None,
                      dtype=jnp.int32) -> Array:
  """[N, Ho, Wo, O] sum_words popcount(x XOR w[:, o]) (AND v if given).

  x, v: [N, Ho, Wo, Wd]; w: [Wd, O]. One reduction per <= 32 words, XOR,
  AND and popcount fused into it, summed in `dtype` (exact while the count
  of bits, at most Wd * word bits, fits).
  """
  total = 0
  for start in range(0, x.shape[-1], MAX_REDUCED_WORDS):
    part = slice(start, start + MAX_REDUCED_WORDS)
    differ = x[..., None, part] ^ w[part].T          # [N, Ho, Wo, O, <=32]
    if v is not None:
      differ = differ & v[..., None, part]
    total = total + jnp.sum(jax.lax.population_count(differ).astype(dtype),
                            axis=-1, dtype=dtype)
  return total


def _grouped(words: Array, taps: list[tuple[int, int]], strides: int,
             ho: int, wo: int, materialise: bool) -> Array:
  """[N, Ho, Wo, len(taps) * Wd]: the taps' word maps side by side.

  One tap: its strided slice. Several: concatenated on the word axis and,
  with `materialise`, written out (`optimization_barrier`) so that the
  reduction reads a plain array rather than a fused concatenation.
  """
  parts = [_tap(words, a, b, strides, ho, wo) for a, b in taps]
  if len(parts) == 1:
    return parts[0]
  patch = jnp.concatenate(parts, axis=-1)
  return jax.lax.optimization_barrier(patch) if materialise else patch


def xnor_conv(x: Array, weight_bits: Array, strides: int, padding: Padding,
              zero_to: float, word_bits: int = 32,
              taps_per_reduction: int | None = None,
              materialise: bool = True, partial_dtype=None) -> Array:
  """int32 sum_i B(x)_i * w_i of a binary conv (see the module docstring).

  Args:
    x: [N, H, W, C] real activations; B(x) = sign(x), sign(0) = zero_to.
    weight_bits: [k, k, ceil(C / 32), O] uint32 sign bits (the file's).
    strides: spatial stride s.
    padding: p on every side or ((top, bottom), (left, right)); zeros,
      counted 0.
    zero_to: sign(0) of the activations (+1, 0 or -1).
    word_bits: 32 (uint32 words) or 8 (uint8).
    taps_per_reduction: taps whose words one reduction sums (in chunks of
      at most 32 words); None = one row of the kernel, or 16 // words taps
      where a row would have 17 to 32 words (measured fastest on XLA:CPU,
      docs/deploy.md).
    materialise: write the word maps of a group of taps out before its
      reduction (see `_grouped`).
    partial_dtype: dtype of the row sums; None = int16 where exact (below),
      else int32.

  Returns:
    [N, Ho, Wo, O] int32, equal to the float conv of the +-1 (and 0) values.
  """
  k, _, w32, _ = weight_bits.shape
  channels = x.shape[-1]
  if w32 != num_words(channels):
    raise ValueError(f"weight bits have {w32} words per tap; inputs of "
                     f"{channels} channels need {num_words(channels)}")
  words = -(-channels // word_bits)
  # [k, k, Wd, O]; the regrouped words past `words` hold no channel (0).
  w = regroup_weight_words(weight_bits, word_bits)[:, :, :words]
  pads = _pads(padding)
  ho = output_size(x.shape[1], k, strides, pads[0])
  wo = output_size(x.shape[2], k, strides, pads[1])
  spatial = ((0, 0), pads[0], pads[1], (0, 0))
  positive = (x > 0) | ((x == 0) & (zero_to > 0))
  signs = jnp.pad(pack(positive, word_bits), spatial)
  valid = (jnp.pad(pack(x != 0, word_bits), spatial) if zero_to == 0
           else None)
  rows = outside(x.shape[1], k, strides, pads[0])
  cols = outside(x.shape[2], k, strides, pads[1])
  # Kernel rows / columns that read only padding (a 3x3 conv on a 1x1 map)
  # are left out: they add 0 to the float conv's sum.
  used_a = [a for a in range(k) if not rows[:, a].all()]
  used_b = [b for b in range(k) if not cols[:, b].all()]
  used = [a * k + b for a in used_a for b in used_b]
  group = taps_per_reduction or len(used_b)
  if (taps_per_reduction is None
      and SLOW_WORDS[0] <= group * words <= SLOW_WORDS[1]):
    group = max(1, 16 // words)   # 256 channels: 2 taps (16 words), not 3
  # |2 * mismatches| <= 2 * (used taps) * C: int16 partial sums where that
  # fits (half the bytes of the partial maps XLA writes), int32 otherwise.
  acc = partial_dtype or (
      jnp.int16 if 2 * len(used) * w.shape[2] * word_bits < 2**15
      else jnp.int32)
  total = 0
  for start in range(0, len(used), group):
    taps = [divmod(t, k) for t in used[start:start + group]]
    xs = _grouped(signs, taps, strides, ho, wo, materialise)
    wg = jnp.concatenate([w[a, b] for a, b in taps], axis=0)  # [g * Wd, O]
    if valid is None:
      total = total + (len(taps) * channels
                       - 2 * _popcount_product(xs, wg, dtype=acc))
    else:
      vs = _grouped(valid, taps, strides, ho, wo, materialise)
      n_valid = jnp.sum(jax.lax.population_count(vs).astype(acc),
                        axis=-1, keepdims=True, dtype=acc)
      total = total + n_valid - 2 * _popcount_product(xs, wg, vs, acc)
  total = total.astype(jnp.int32)
  if valid is None:
    total = total + _padding_correction(weight_bits, channels, rows, cols,
                                        used_a, used_b)
  return total
