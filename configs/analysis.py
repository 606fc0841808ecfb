"""Shared base of the analysis experiments (docs/analysis.md).

This is bnn_jax/configs/analysis.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/analysis.py working from a checkout.
"""

from bnn_jax.configs.analysis import *  # noqa: F401,F403
