"""Adam vs SGD on the binary network, with weight dynamics (docs/analysis.md).

A checkout's path to bnn_jax/configs/digits_adam_vs_sgd.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/digits_adam_vs_sgd.py keeps working.
"""

from bnn_jax.configs.digits_adam_vs_sgd import *  # noqa: F401,F403
