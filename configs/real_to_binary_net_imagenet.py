"""Real-to-Binary Net on ImageNet with Larq Zoo's recipe: 65.01% top-1 reported.

A checkout's path to bnn_jax/configs/real_to_binary_net_imagenet.py (its docstring has the command
and the expected result): --config=configs/real_to_binary_net_imagenet.py.
"""

from bnn_jax.configs.real_to_binary_net_imagenet import *  # noqa: F401,F403
