"""AdamBNN's two steps on CIFAR-10 with ReActNet-A (stride-1 stem, 32x32 maps).

This is bnn_jax/configs/cifar10.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/cifar10.py working from a checkout.
"""

from bnn_jax.configs.cifar10 import *  # noqa: F401,F403
