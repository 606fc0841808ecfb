"""The embedded default: AdamBNN's two-step recipe, scaled down to 8x8 digits.

This is bnn_jax/configs/digits.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/digits.py working from a checkout.
"""

from bnn_jax.configs.digits import *  # noqa: F401,F403
