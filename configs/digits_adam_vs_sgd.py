"""Adam vs SGD on the binary network, with weight dynamics (docs/analysis.md).

This is bnn_jax/configs/digits_adam_vs_sgd.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/digits_adam_vs_sgd.py working from a checkout.
"""

from bnn_jax.configs.digits_adam_vs_sgd import *  # noqa: F401,F403
