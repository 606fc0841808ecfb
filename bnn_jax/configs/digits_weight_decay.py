"""Step-1 weight decay against flip-flops and C2I (docs/analysis.md (b)).

  python -m bnn_jax.main --config configs/digits_weight_decay.py:1e-5 \
      --workdir=/tmp/weight_decay/wd1e-5_s0 --config.seed=0

Options after the colon, comma-separated:
  <number>   step-1 weight decay (default 5e-6, AdamBNN's; ReActNet used
             1e-5): torch Adam's coupled L2 on the reference group (conv
             kernels and learnable shifts), as configs/digits.py.
  cifar10    CIFAR-10 (configs/cifar10.py) instead of digits.

Step 2 is unchanged (Adam, no weight decay). The dynamics of step 1 (flip
ratio, C2I against the initialisation, every 40 steps), those of step 2
(C2I against the step-1 signs it starts from) and the accuracies are what
docs/analysis.md compares.

Expected on digits (seed 0): mean step-1 flip ratio 1.80e-3 at weight decay
0, 1.83e-3 at 5e-6, 1.95e-3 at 1e-3, 3.52e-3 at 1e-2; step-2 C2I against
its start 0.768 at 0, 0.758 at 1e-3, 0.717 at 1e-2.
"""

from bnn_jax.configs import analysis_base


def _is_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def get_config(arg: str = "5e-6"):
  parts = [o.strip() for o in (arg or "").split(",") if o.strip()]
  decays = [float(o) for o in parts if _is_number(o)]
  if len(decays) > 1:
    raise ValueError(f"give one weight decay, not {decays}")
  options = analysis_base.parse_options(
      ",".join(o for o in parts if not _is_number(o)), set(analysis_base.DATASETS))
  config = analysis_base.analysis_config(options)
  config.phases.step1.optimizer.weight_decay = decays[0] if decays else 5e-6
  return config
