"""Step-1 weight decay against flip-flops and C2I (docs/analysis.md (b)).

A checkout's path to bnn_jax/configs/digits_weight_decay.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/digits_weight_decay.py keeps working.
"""

from bnn_jax.configs.digits_weight_decay import *  # noqa: F401,F403
