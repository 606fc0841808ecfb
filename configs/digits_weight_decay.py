"""Step-1 weight decay against flip-flops and C2I (docs/analysis.md (b)).

This is bnn_jax/configs/digits_weight_decay.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/digits_weight_decay.py working from a checkout.
"""

from bnn_jax.configs.digits_weight_decay import *  # noqa: F401,F403
