"""ReActNet-A's own recipe (Liu et al., ECCV 2020) on ImageNet: 69.4% top-1.

A checkout's path to bnn_jax/configs/reactnet_a_imagenet.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/reactnet_a_imagenet.py keeps working.
"""

from bnn_jax.configs.reactnet_a_imagenet import *  # noqa: F401,F403
