"""QuickNet's recipe (Adam on binary kernels, SGD elsewhere) at digits scale.

A checkout's path to bnn_jax/configs/quicknet_digits.py (its docstring has
the command and the expected result): --config=configs/quicknet_digits.py.
"""

from bnn_jax.configs.quicknet_digits import *  # noqa: F401,F403
