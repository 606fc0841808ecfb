"""The BatchNorm-statistics error table of docs/performance.md, at mean 1e4 x std.

  python benchmarks/bn_stats_errors.py   (from the repository root)

The data and float64 references are tests/test_batch_stats.py's (imported from
there, so the table and the test see the same numbers); output:
benchmarks/results/cpu_2026-12-07_bn_stats_errors.txt.
"""
import sys; sys.path[:0] = [".", "tests"]
import numpy as np, jax.numpy as jnp
import test_batch_stats as t
from bnn_jax import batch_stats
x = t._large_mean(); mu64, var64 = t._reference(x)
x1 = t._large_mean(seed=1); g = np.random.default_rng(2).normal(size=x1.shape)
m1, v1 = t._reference(x1)
scale = np.linspace(0.5, 1.5, x1.shape[-1]); bias = np.linspace(-1.0, 1.0, x1.shape[-1])
inv = 1.0 / np.sqrt(v1 + 1e-5); xhat = (x1 - m1) * inv; y64 = xhat * scale + bias
dx64 = scale * inv * (g - g.mean(t.AXES, keepdims=True) - xhat * (g * xhat).mean(t.AXES, keepdims=True))
print("method | max rel error of var | max |y - y64| | max |dx - dx64|")
for m in batch_stats.METHODS:
  _, var, _ = batch_stats.centered(jnp.asarray(x), t.AXES, m)
  rel = float(np.max(np.abs(np.asarray(var, np.float64) - var64) / var64))
  y, _, dx = t._bn_train(jnp.asarray(x1), jnp.asarray(g, jnp.float32), stats_method=m)
  print(f"{m} | {rel:.2g} | {float(np.max(np.abs(y - y64))):.4g} | {float(np.max(np.abs(dx - dx64))):.4g}")
