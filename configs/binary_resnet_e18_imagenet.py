"""BinaryResNetE18 on ImageNet with Larq Zoo's recipe: 58.32% top-1 reported.

A checkout's path to bnn_jax/configs/binary_resnet_e18_imagenet.py (its docstring has the command
and the expected result): --config=configs/binary_resnet_e18_imagenet.py.
"""

from bnn_jax.configs.binary_resnet_e18_imagenet import *  # noqa: F401,F403
