"""AdamBNN on ImageNet (Liu et al., ICML 2021), exactly the paper: 70.5% top-1.

This is bnn_jax/configs/adambnn_imagenet.py, which ships with the package (its docstring
has the command and the expected result); this file keeps
--config=configs/adambnn_imagenet.py working from a checkout.
"""

from bnn_jax.configs.adambnn_imagenet import *  # noqa: F401,F403
