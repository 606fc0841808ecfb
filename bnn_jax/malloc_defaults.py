"""Default glibc malloc settings of bnn_jax's entry points on a CPU-only host.

XLA:CPU allocates each step's scratch (temp) buffer, hundreds of MB to GBs,
afresh on its worker threads. glibc gives every thread arena but the main
one 64 MiB heaps, so such a buffer is always a fresh `mmap`, returned with
`munmap` when freed: every training step then faults its scratch memory in
again, page by page, with the kernel zeroing each page: tens to hundreds of
thousands of minor page faults per ReActNet-A step, a noticeable share of
the step time (measured in docs/performance.md).

`apply("reuse")` keeps that memory in the process instead, with three
`mallopt` settings, so that each step reuses the previous step's pages (0
faults):

* `M_ARENA_MAX = 1`: every thread allocates from the main arena, whose heap
  grows without the 64 MiB limit;
* `M_MMAP_MAX = 0`: no allocation is served by `mmap`;
* `M_TRIM_THRESHOLD = -1`: freed memory at the top of the heap is kept, not
  returned to the kernel.

It makes ReActNet-A's steps and training loop faster (docs/performance.md
has the interleaved measurements). The costs: the process keeps its peak
heap (higher resident memory), and with one arena XLA's compiler threads
contend for the malloc lock (slower compiles). For small models, whose step
buffers fit glibc's 64 MiB heaps, that is all cost (the digits job is
slower). Hence a choice, `mode`:

* `"reuse"`: the settings above. Set by `config.cpu_malloc = "reuse"` in the
  ReActNet-A configs (configs/cifar10.py, the ImageNet ones), and the
  default of `bnn_jax.benchmark` (`--cpu_malloc`).
* `"glibc"`: glibc's defaults (the run-config default, `config_lib`).

When "reuse" applies: only on Linux with glibc (elsewhere `mallopt` is
missing or a no-op), only when JAX will run on the CPU (`JAX_PLATFORMS`
names cpu first, or no accelerator plug-in is installed: on GPU and TPU
hosts the step's memory is on the device), and only when the user has not
configured malloc through the environment (`MALLOC_ARENA_MAX`,
`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, or
`glibc.malloc.*` in `GLIBC_TUNABLES`): those always win.

It must run before JAX's backend starts its threads (before the first
`jax.devices()` or computation) and before any other thread allocates:
`M_ARENA_MAX` only limits arenas created afterwards. Importing JAX and
TensorFlow (as loading a config does) creates no arena yet; `arena_count()`
checks.
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

MODES = ("glibc", "reuse")

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


def _glibc():
  """The C library when it is glibc (has `mallopt`), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  except (OSError, AttributeError):
    return None
  return libc


def check_mode(mode: str) -> None:
  """ValueError naming the choices unless `mode` is one of `MODES`."""
  if mode not in MODES:
    raise ValueError(f"config.cpu_malloc={mode!r} is not a malloc mode; "
                     "use 'reuse' (keep XLA:CPU's step buffers mapped: "
                     "large models) or 'glibc' (glibc's defaults)")


def arena_count() -> int:
  """glibc's number of malloc arenas in this process (0 if not glibc)."""
  libc = _glibc()
  if libc is None:
    return 0
  libc.open_memstream.restype = ctypes.c_void_p
  libc.open_memstream.argtypes = (ctypes.POINTER(ctypes.c_char_p),
                                  ctypes.POINTER(ctypes.c_size_t))
  libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
  libc.fclose.argtypes = (ctypes.c_void_p,)
  libc.free.argtypes = (ctypes.c_void_p,)
  buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
  stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
  libc.malloc_info(0, stream)
  libc.fclose(stream)
  xml = ctypes.string_at(buffer, size.value).decode()
  libc.free(buffer)
  return xml.count("<heap nr=")


def apply(mode: str = "reuse",
          environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
  """Sets `DEFAULT_MALLOPT` for mode "reuse" when it applies.

  Returns the names it set (empty for "glibc", or where it does not apply).
  """
  global applied
  check_mode(mode)
  if (mode == "glibc" or user_configured_malloc(environ)
      or not jax_runs_on_cpu(environ)):
    return ()
  libc = _glibc()
  if libc is None:
    return ()
  applied = tuple(name for name, param, value in DEFAULT_MALLOPT
                  if libc.mallopt(param, value) == 1)
  return applied
