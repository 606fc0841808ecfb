"""`python -m bnn_jax.dynamics_benchmark`: what the weight-dynamics hook costs per step.

The code and its flags: `bnn_jax.tools.dynamics_benchmark`.
"""

from bnn_jax import cli
from bnn_jax.tools import dynamics_benchmark

if __name__ == "__main__":
  cli.run_command(dynamics_benchmark.main,
                  define_flags=dynamics_benchmark.define_flags, xla=False)
