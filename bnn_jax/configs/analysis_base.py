"""Not a config: the shared base of the analysis experiment configs.

digits_adam_vs_sgd.py and digits_weight_decay.py build on it (docs/analysis.md).

`analysis_config(options)` is the embedded digits default (configs/digits.py:
teacher -> step 1 -> step 2) with steps 1 and 2 shortened from 40 to
`DIGITS_EPOCHS` epochs each (330 steps at batch 64), so that the whole study
fits in about 30 minutes of a shared 2-core CPU; or, with the option
`cifar10`, configs/cifar10.py unchanged (ResNet-18 teacher, ReActNet-A with a
stride-1 stem). Both log the weight dynamics every `DYNAMICS_EVERY` steps.
The experiment configs take a comma-separated option string after the file
name (`--config configs/digits_adam_vs_sgd.py:sgd,cifar10`).
"""

import ml_collections

from bnn_jax.configs import cifar10
from bnn_jax.configs import digits

# Dynamics every 40 steps: about 5% of the step time on a 2-core CPU
# (`python -m bnn_jax.dynamics_benchmark`, docs/analysis.md).
DYNAMICS_EVERY = 40
DIGITS_EPOCHS = 15
DATASETS = ("digits", "cifar10")


def parse_options(arg: str, allowed: set[str]) -> set[str]:
  """The comma-separated options of `arg`, each checked against `allowed`."""
  options = {o.strip() for o in (arg or "").split(",") if o.strip()}
  unknown = sorted(options - allowed)
  if unknown:
    raise ValueError(f"unknown config option(s) {unknown}; choose from "
                     f"{sorted(allowed)}")
  return options


def analysis_config(options: set[str]) -> ml_collections.ConfigDict:
  """The digits (or, with 'cifar10' in options, CIFAR-10) base run."""
  if "cifar10" in options:
    config = cifar10.get_config()
  else:
    config = digits.get_config()
    config.phases.step1.num_epochs = DIGITS_EPOCHS
    config.phases.step2.num_epochs = DIGITS_EPOCHS
  config.dynamics.every = DYNAMICS_EVERY
  return config
