"""Default XLA flags of bnn_jax's entry points (set before JAX is imported).

`apply()` sets `XLA_FLAGS` to `DEFAULT_XLA_FLAGS` only when the variable is
not set at all: any value the user exports (even an empty one) wins, so
`XLA_FLAGS= python -m bnn_jax.benchmark ...` measures XLA's own defaults.

* `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`: XLA:CPU
  (jaxlib 0.10) hands every convolution to YNNPACK by default; without it
  they run on Eigen's convolution, which trains ReActNet-A's 3x3 convs
  (forward and both backward convolutions) faster on the AVX-512 CPUs
  measured in docs/performance.md (its XLA:CPU table has the numbers).
  The flag only concerns the CPU back-end; GPU and TPU runs ignore it.
  It names an experimental option of the pinned jaxlib: XLA refuses unknown
  flags, so a jaxlib upgrade must re-check it.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

DEFAULT_XLA_FLAGS: tuple[str, ...] = (
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)


def apply(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
  """Sets XLA_FLAGS to the defaults unless it is set; returns what it set."""
  if "XLA_FLAGS" in environ:
    return None
  environ["XLA_FLAGS"] = " ".join(DEFAULT_XLA_FLAGS)
  return environ["XLA_FLAGS"]
