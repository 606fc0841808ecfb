"""ReActNet-A's own recipe (Liu et al., ECCV 2020) on ImageNet: 69.4% top-1.

This is bnn_jax/configs/reactnet_a_imagenet.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/reactnet_a_imagenet.py working from a checkout.
"""

from bnn_jax.configs.reactnet_a_imagenet import *  # noqa: F401,F403
