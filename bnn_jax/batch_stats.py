"""BatchNorm batch statistics (mean and biased variance), in float32, three ways.

For x reduced over `axes` (n elements per statistic):

  "two_pass"          mu = mean(x);  var = mean((x - mu)^2)
                      (the default: exact up to rounding; the second
                      reduction needs mu first, so x is read twice)
  "one_pass"          mu = mean(x);  var = max(mean(x^2) - mu^2, 0)
                      (both reductions in one pass over x; catastrophic
                      cancellation when |mu| >> std: relative error of var
                      ~ 2^-24 mu^2 / var, e.g. all of it at mu = 1e4 std)
  "shifted_one_pass"  K = x at the first position of each statistic (per
                      channel, under stop_gradient), d = x - K;
                      m1 = mean(d), m2 = mean(d^2);
                      mu = K + m1;  var = max(m2 - m1^2, 0)
                      (one pass, and the cancellation is that of
                      (mu - K)^2 against var: K is a sample, within a few
                      std of mu, so the relative error is ~ 2^-24 z^2 with
                      z = (K - mu) / std; the variance is shift-invariant,
                      so the result does not depend on K otherwise)

`centered(x, axes, method)` returns (mu, var, x - mu); for "shifted_one_pass"
x - mu is computed as d - m1, which keeps the digits below an ulp of mu
(two-pass's x - mu rounds mu first).

The gradient through K is zero mathematically (mu and var do not depend on
the shift); the stop_gradient drops that path instead of computing 1 - 1.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

METHODS = ("two_pass", "one_pass", "shifted_one_pass")


def _first_position(x: Array, axes: Sequence[int]) -> Array:
  """x at index 0 of every axis in `axes` (kept as size-1 axes)."""
  index = tuple(slice(0, 1) if a in axes else slice(None)
                for a in range(x.ndim))
  return x[index]


def centered(x: Array, axes: Sequence[int], method: str
             ) -> tuple[Array, Array, Array]:
  """(mu, var, x - mu) of float32 x over `axes` (keepdims) by `method`."""
  axes = tuple(a % x.ndim for a in axes)
  # two_pass and one_pass return x - mu as its own expression (not the
  # variance's): the program, and so the backward's sums, of the BatchNorm
  # these were written in before, bit for bit.
  if method == "two_pass":
    mu = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=axes, keepdims=True)
    return mu, var, x - mu
  if method == "one_pass":
    mu = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=axes, keepdims=True)
                      - jnp.square(mu), 0.0)
    return mu, var, x - mu
  if method == "shifted_one_pass":
    shift = jax.lax.stop_gradient(_first_position(x, axes))
    d = x - shift
    m1 = jnp.mean(d, axis=axes, keepdims=True)
    m2 = jnp.mean(jnp.square(d), axis=axes, keepdims=True)
    var = jnp.maximum(m2 - jnp.square(m1), 0.0)
    return shift + m1, var, d - m1
  raise ValueError(f"unknown BatchNorm statistics method {method!r}; choose "
                   f"one of {list(METHODS)}")
