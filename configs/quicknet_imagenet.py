"""QuickNet on ImageNet with Larq Zoo's recipe: 63.3% top-1 reported.

A checkout's path to bnn_jax/configs/quicknet_imagenet.py (its docstring has the command
and the expected result): --config=configs/quicknet_imagenet.py.
"""

from bnn_jax.configs.quicknet_imagenet import *  # noqa: F401,F403
