"""`python -m bnn_jax.benchmark_input`: images per second of the input pipeline.

The code and its flags: `bnn_jax.tools.benchmark_input`.
"""

from bnn_jax import cli
from bnn_jax.tools import benchmark_input

if __name__ == "__main__":
  cli.run_command(benchmark_input.main,
                  define_flags=benchmark_input.define_flags, xla=False)
