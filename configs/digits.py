"""The embedded default: AdamBNN's two-step recipe, scaled down to 8x8 digits.

A checkout's path to bnn_jax/configs/digits.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/digits.py keeps working.
"""

from bnn_jax.configs.digits import *  # noqa: F401,F403
