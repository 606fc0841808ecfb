"""Default glibc malloc settings of bnn_jax's entry points on a CPU-only host.

XLA:CPU allocates each step's scratch (temp) buffer, hundreds of MB to GBs,
afresh on its worker threads. glibc gives every thread arena but the main
one 64 MiB heaps, so such a buffer is always a fresh `mmap`, returned with
`munmap` when freed: every training step then faults its scratch memory in
again, page by page, with the kernel zeroing each page. Measured on the
2-vCPU development machines (ReActNet-A step 2, docs/performance.md):
79,000 minor page faults per 32x32 batch-64 step (316 MB) and 505,000 per
224x224 batch-16 step (2 GB), about a tenth of the step.

`apply()` keeps that memory in the process instead, with three `mallopt`
settings, so that each step reuses the previous step's pages (0 faults):

* `M_ARENA_MAX = 1`: every thread allocates from the main arena, whose heap
  grows without the 64 MiB limit;
* `M_MMAP_MAX = 0`: no allocation is served by `mmap`;
* `M_TRIM_THRESHOLD = -1`: freed memory at the top of the heap is kept, not
  returned to the kernel.

Measured: 32x32 batch 64: 252 -> 280-288 images/s; 224x224 batch 16:
7.2-7.5 -> 8.3 images/s. The cost is memory: the process keeps its peak
heap (resident memory 4.0 -> 5.6 GB at 224x224 batch 16).

When it applies: only on Linux with glibc (elsewhere `mallopt` is missing
or a no-op), only when JAX will run on the CPU (`JAX_PLATFORMS` names cpu
first, or no accelerator plug-in is installed: on GPU and TPU hosts the
step's memory is on the device, and one arena would serialise the
allocations of tf.data's many input threads), and only when the user has
not configured malloc through the environment (`MALLOC_ARENA_MAX`,
`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, or
`glibc.malloc.*` in `GLIBC_TUNABLES`). So `MALLOC_ARENA_MAX=0 python -m
bnn_jax.benchmark ...` measures glibc's defaults (0 = glibc's own arena
limit).

It must run before any thread is started (before JAX or TensorFlow is
imported): `M_ARENA_MAX` only limits arenas created afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys
from typing import Mapping

# mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (name, mallopt parameter, value) that `apply` sets, in this order.
DEFAULT_MALLOPT: tuple[tuple[str, int, int], ...] = (
    ("M_ARENA_MAX", M_ARENA_MAX, 1),
    ("M_MMAP_MAX", M_MMAP_MAX, 0),
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, -1),
)

USER_MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                         "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

# What the last `apply()` set in this process (reported by the benchmark).
applied: tuple[str, ...] = ()

# jax's accelerator plug-ins (GPU: jax_cuda*/rocm plug-ins, registered as
# `jax_plugins` entry points) and TPU's runtime library.
_TPU_MODULE = "libtpu"


def user_configured_malloc(environ: Mapping[str, str]) -> bool:
  """True when the environment already sets glibc malloc parameters."""
  if any(name in environ for name in USER_MALLOC_VARIABLES):
    return True
  return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def jax_runs_on_cpu(environ: Mapping[str, str]) -> bool:
  """Whether JAX will pick the CPU, decided before JAX is imported.

  `JAX_PLATFORMS` (or the older `JAX_PLATFORM_NAME`) decides when set: its
  first entry is the default backend. Otherwise JAX uses an accelerator when
  a plug-in for one is installed.
  """
  platforms = (environ.get("JAX_PLATFORMS")
               or environ.get("JAX_PLATFORM_NAME") or "")
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return importlib.util.find_spec(_TPU_MODULE) is None


def _glibc_mallopt():
  """glibc's `mallopt`, or None on other C libraries and systems."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def apply(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
  """Sets `DEFAULT_MALLOPT` when it applies; returns the names it set."""
  global applied
  if user_configured_malloc(environ) or not jax_runs_on_cpu(environ):
    return ()
  mallopt = _glibc_mallopt()
  if mallopt is None:
    return ()
  applied = tuple(name for name, param, value in DEFAULT_MALLOPT
                  if mallopt(param, value) == 1)
  return applied
