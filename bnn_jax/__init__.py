"""bnn_jax: binary neural networks in JAX/Flax (AdamBNN / ReActNet)."""

__version__ = "0.1.0"
