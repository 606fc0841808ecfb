"""bnn_jax.malloc_defaults: when it applies, and that freed memory is reused."""

import subprocess
import sys
import textwrap

import pytest

from bnn_jax import malloc_defaults


def test_jax_platform_decides_before_import():
  assert malloc_defaults.jax_runs_on_cpu({"JAX_PLATFORMS": "cpu"})
  assert malloc_defaults.jax_runs_on_cpu({"JAX_PLATFORMS": "cpu,cuda"})
  assert not malloc_defaults.jax_runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
  assert not malloc_defaults.jax_runs_on_cpu({"JAX_PLATFORMS": "tpu"})
  assert not malloc_defaults.jax_runs_on_cpu({"JAX_PLATFORM_NAME": "gpu"})
  # This test machine has no accelerator plug-in: JAX will use the CPU.
  assert malloc_defaults.jax_runs_on_cpu({})


def test_user_malloc_settings_win():
  for environ in ({"MALLOC_ARENA_MAX": "0"}, {"MALLOC_MMAP_MAX_": "65536"},
                  {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}):
    assert malloc_defaults.user_configured_malloc(environ)
    assert malloc_defaults.apply({"JAX_PLATFORMS": "cpu", **environ}) == ()
  assert not malloc_defaults.user_configured_malloc(
      {"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"})
  assert malloc_defaults.apply({"JAX_PLATFORMS": "cuda"}) == ()


# Allocates, touches and frees 256 MiB with libc's malloc, then does it
# again and prints the minor page faults of the second round.
_SECOND_ROUND_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from bnn_jax import malloc_defaults
    applied = malloc_defaults.apply({"JAX_PLATFORMS": "cpu"}) if sys.argv[1] == "1" else ()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 256 << 20
    def touch_and_free():
      p = libc.malloc(size)
      ctypes.memset(p, 1, size)
      libc.free(p)
    touch_and_free()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch_and_free()
    print(",".join(applied) or "-", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
  def run(apply):
    out = subprocess.run([sys.executable, "-c", _SECOND_ROUND_FAULTS, apply],
                         capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)

  default_applied, default_faults = run("0")
  applied, faults = run("1")
  # glibc's defaults: a fresh mmap, faulted in page by page (65,536 pages
  # of 4 KiB; fewer if the kernel backs it with huge pages).
  assert default_applied == "-" and default_faults > 1000
  assert applied == "M_ARENA_MAX,M_MMAP_MAX,M_TRIM_THRESHOLD"
  assert faults < 100  # the first round's pages, kept in the heap
