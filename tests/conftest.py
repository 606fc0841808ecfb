"""Test setup: 8 fake CPU devices (set before jax is imported), quiet TF, fast compiles."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Compile time dominates the small shapes used in tests.
jax.config.update("jax_disable_most_optimizations", True)
