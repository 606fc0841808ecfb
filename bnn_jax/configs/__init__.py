"""The shipped experiment configs (ml_collections config files).

Each module has a `get_config()` (some take an option string,
`get_config('sgd,cifar10')`) and a docstring with the command that runs it
and the result to expect. They ship inside the package, so an installed
bnn_jax runs them without a checkout:

  python -m bnn_jax.main --config=$(python -m bnn_jax.configs digits) \
      --workdir=/tmp/bnn_digits

`python -m bnn_jax.configs` lists them with their paths. From a checkout,
`--config=configs/<name>.py` loads the same config (configs/ at the repository
root holds one-line files that import these). In Python:

  from bnn_jax.configs import digits
  config = digits.get_config()
"""

from __future__ import annotations

import os
import sys

# The runnable configs, by name (the module bnn_jax.configs.<name>);
# The modules named *_base are not configs: analysis_base is the shared base
# of the two analysis configs, larq_zoo_base that of the zoo configs.
NAMES = ("digits", "digits_adam_vs_sgd", "digits_weight_decay", "cifar10",
         "adambnn_imagenet", "reactnet_a_imagenet", "quicknet_digits",
         "quicknet_small_imagenet", "quicknet_imagenet",
         "quicknet_large_imagenet", "birealnet18_imagenet",
         "binary_resnet_e18_imagenet", "real_to_binary_net_imagenet")


def path(name: str) -> str:
  """The file of config `name`, for `--config=` (an option may follow ':').

  Raises:
    ValueError: an unknown name.
  """
  base, sep, option = name.partition(":")
  if base not in NAMES:
    raise ValueError(f"no shipped config {base!r}; choose one of {list(NAMES)}")
  return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      f"{base}.py") + sep + option


def main(argv: list[str]) -> int:
  """`python -m bnn_jax.configs [NAME[:OPTIONS]]`: one path, or all of them."""
  usage = ("usage: python -m bnn_jax.configs [NAME[:OPTIONS]]\n"
           "Prints the path of shipped config NAME (for --config=), or, "
           "without NAME, every shipped config with its path.")
  if len(argv) == 2 and argv[1] in ("-h", "--help", "help"):
    print(usage)
    return 0
  if len(argv) > 2 or (len(argv) == 2 and argv[1].startswith("-")):
    print(usage, file=sys.stderr)
    return 1
  if len(argv) == 2:
    try:
      print(path(argv[1]))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    return 0
  for name in NAMES:
    print(f"{name:22s} {path(name)}")
  return 0
