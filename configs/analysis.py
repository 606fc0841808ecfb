"""Shared base of the analysis experiments (docs/analysis.md).

A checkout's path to bnn_jax/configs/analysis.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/analysis.py keeps working.
"""

from bnn_jax.configs.analysis import *  # noqa: F401,F403
