"""Interoperability with other frameworks' checkpoints.

* `torch_import`: the reference PyTorch checkpoints (AdamBNN / ReActNet-A,
  torchvision ResNet teachers) to bnn_jax variables and back.
"""
