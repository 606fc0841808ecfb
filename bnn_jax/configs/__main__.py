"""`python -m bnn_jax.configs [NAME]`: the path of a shipped config file."""

import sys

from bnn_jax import configs

sys.exit(configs.main(sys.argv))
