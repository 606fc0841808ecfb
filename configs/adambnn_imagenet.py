"""AdamBNN on ImageNet (Liu et al., ICML 2021), exactly the paper: 70.5% top-1.

A checkout's path to bnn_jax/configs/adambnn_imagenet.py, the config
that ships with the package (its docstring has the command and the expected
result): --config=configs/adambnn_imagenet.py keeps working.
"""

from bnn_jax.configs.adambnn_imagenet import *  # noqa: F401,F403
