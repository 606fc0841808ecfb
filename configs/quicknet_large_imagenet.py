"""QuickNetLarge on ImageNet with Larq Zoo's recipe: 66.9% top-1 reported.

A checkout's path to bnn_jax/configs/quicknet_large_imagenet.py (its docstring has the command
and the expected result): --config=configs/quicknet_large_imagenet.py.
"""

from bnn_jax.configs.quicknet_large_imagenet import *  # noqa: F401,F403
