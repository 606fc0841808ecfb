"""bnn_jax.malloc_defaults: when it applies, and that freed memory is reused."""

import os
import subprocess
import sys
import textwrap

import pytest

from bnn_jax import malloc_defaults

from conftest import REPO


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
    assert malloc_defaults.apply("reuse",
                                 {"JAX_PLATFORMS": "cpu", **environ}) == ()
  assert not malloc_defaults.user_configured_malloc(
      {"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=1"})
  assert malloc_defaults.apply("reuse", {"JAX_PLATFORMS": "cuda"}) == ()
  assert malloc_defaults.apply("glibc", {"JAX_PLATFORMS": "cpu"}) == ()


def test_unknown_mode_names_the_choices():
  with pytest.raises(ValueError, match=r"config.cpu_malloc='reuse_all' is not "
                     r"a malloc mode; use 'reuse' .* or 'glibc'"):
    malloc_defaults.apply("reuse_all", {"JAX_PLATFORMS": "cpu"})


def test_config_defaults():
  from configs import cifar10, digits
  assert digits.get_config().cpu_malloc == "glibc"
  assert cifar10.get_config().cpu_malloc == "reuse"


# Allocates, touches and frees 256 MiB with libc's malloc, then does it
# again and prints the minor page faults of the second round.
_SECOND_ROUND_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from bnn_jax import malloc_defaults
    applied = malloc_defaults.apply(sys.argv[1], {"JAX_PLATFORMS": "cpu"})
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

  default_applied, default_faults = run("glibc")
  applied, faults = run("reuse")
  # glibc's defaults: a fresh mmap, faulted in page by page (65,536 pages
  # of 4 KiB; fewer if the kernel backs it with huge pages).
  assert default_applied == "-" and default_faults > 1000
  assert applied == "M_ARENA_MAX,M_MMAP_MAX,M_TRIM_THRESHOLD"
  assert faults < 100  # the first round's pages, kept in the heap


# What `bnn_jax.main` does: load a config (importing TensorFlow and JAX),
# apply the config's mode, then start JAX's backend and run a computation.
_ARENAS_AROUND_MAIN = textwrap.dedent("""
    import sys
    from bnn_jax import malloc_defaults
    from configs import cifar10
    config = cifar10.get_config()
    after_config = malloc_defaults.arena_count()
    config.cpu_malloc = sys.argv[1]
    malloc_defaults.apply(config.cpu_malloc, {"JAX_PLATFORMS": "cpu"})
    import jax, jax.numpy as jnp
    x = jnp.ones((256, 256))
    jax.jit(lambda x: (x @ x).sum())(x).block_until_ready()
    print(after_config, malloc_defaults.arena_count())
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_main_applies_the_mode_before_any_other_arena_exists():
  def arenas(mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", _ARENAS_AROUND_MAIN, mode],
                         capture_output=True, text=True, check=True, env=env,
                         cwd=REPO)
    return tuple(int(n) for n in out.stdout.split())

  # Loading a config creates no thread arena, so M_ARENA_MAX applied then
  # still holds every later thread (XLA's) to the main arena ...
  assert arenas("reuse") == (1, 1)
  # ... which glibc's defaults do not: XLA's threads get arenas of their own.
  after_config, after_run = arenas("glibc")
  assert after_config == 1 and after_run > 1
