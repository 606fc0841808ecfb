"""QuickNetSmall on ImageNet with Larq Zoo's recipe: 59.4% top-1 reported.

A checkout's path to bnn_jax/configs/quicknet_small_imagenet.py (its docstring has the command
and the expected result): --config=configs/quicknet_small_imagenet.py.
"""

from bnn_jax.configs.quicknet_small_imagenet import *  # noqa: F401,F403
