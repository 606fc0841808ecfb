"""`python -m bnn_jax.benchmark`: one training step timed (compile, step, img/s,
memory, MFU); with `--inference`, the float forward against the 1-bit packed
forward.

  python -m bnn_jax.benchmark --model=reactnet_a --batch=16 --input_size=224
  python -m bnn_jax.benchmark --inference [--cases=reactnet_a:224] [--batches=1,64]

Also `from bnn_jax import benchmark` (`benchmark.model_flops_per_step`,
`benchmark.run_benchmark`, ...). The code and the flags:
`bnn_jax.tools.benchmark` and `bnn_jax.tools.benchmark_inference`.
"""

import sys

from bnn_jax import cli
from bnn_jax.tools import benchmark, benchmark_inference
from bnn_jax.tools.benchmark import (  # noqa: F401
    PEAK_FLOPS, BuiltStep, NonFiniteError, build_step, format_line,
    model_flops_per_step, peak_flops, peak_memory_bytes, run_benchmark,
    trace_steps)

if __name__ == "__main__":
  # --inference names the other benchmark, whose flags differ.
  chosen = (benchmark_inference if "--inference" in sys.argv[1:]
            else benchmark)
  cli.run_command(chosen.main, define_flags=chosen.define_flags)
