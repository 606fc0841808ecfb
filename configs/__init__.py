"""Repository-root paths of the configs shipped in bnn_jax/configs.

`--config=configs/<name>.py` from a checkout loads the packaged config; code
imports `bnn_jax.configs.<name>` (no top-level `configs` package is
installed).
"""
