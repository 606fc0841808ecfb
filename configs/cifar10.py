"""AdamBNN's two steps on CIFAR-10 with ReActNet-A (stride-1 stem, 32x32 maps).

A checkout's path to bnn_jax/configs/cifar10.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/cifar10.py keeps working.
"""

from bnn_jax.configs.cifar10 import *  # noqa: F401,F403
