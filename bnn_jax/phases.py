"""A run's phases, as one import: `from bnn_jax import phases` (teacher ->
step 1 -> step 2, resume, results.json). The code: `bnn_jax.training.phases`."""

from bnn_jax.training.phases import (  # noqa: F401
    COMPUTE_DTYPES, CONFIG_FILE, OPERATIONAL_FIELDS, RESULTS_FILE,
    claim_workdir, phase_names, run, validate)
