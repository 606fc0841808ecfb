"""Bi-Real Net 18 on ImageNet with Larq Zoo's recipe: 57.47% top-1 reported.

A checkout's path to bnn_jax/configs/birealnet18_imagenet.py (its docstring has the command
and the expected result): --config=configs/birealnet18_imagenet.py.
"""

from bnn_jax.configs.birealnet18_imagenet import *  # noqa: F401,F403
