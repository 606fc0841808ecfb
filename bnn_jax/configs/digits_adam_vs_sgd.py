"""Adam vs SGD on the binary network, with weight dynamics (docs/analysis.md).

  python -m bnn_jax.main --config configs/digits_adam_vs_sgd.py:sgd \
      --workdir=/tmp/adam_vs_sgd/sgd_s0 --config.seed=0
  python -m bnn_jax.analyze --workdir=/tmp/adam_vs_sgd/adam_s0 \
      --compare /tmp/adam_vs_sgd/sgd_s0 --out=/tmp/adam_vs_sgd/plots

Options after the colon, comma-separated:
  adam (default) | sgd   optimizer of the binary phase (step 2): Adam at the
                         reference lr 1.25e-3, or SGD with momentum 0.9
                         (torch semantics) at lr 0.1; both with the
                         per-epoch linear decay and no weight decay.
  onestep                train the fully binary network from scratch
                         (teacher -> step2, no step 1): binary weights
                         start at the reference init U[0, 0.001).
  cifar10                CIFAR-10 (configs/cifar10.py) instead of digits.

Everything else is the embedded default (configs/digits.py) with steps 1
and 2 shortened to 15 epochs and `config.dynamics.every = 40`. Step 1 is
always Adam (the reference). docs/analysis.md gives the commands that share
one teacher (and one step 1 per seed) between runs, and the results.

Expected on digits (2-core CPU, 1-2.5 min per run once the teacher exists;
3 seeds): step-2 top-1 Adam 0.983 +- 0.002, SGD 0.946 +- 0.005; dead binary
weights (mean over step 2) 0.09% with Adam, 2.2% with SGD. One step from
scratch (seed 0): Adam 0.953, SGD 0.406.
"""

from bnn_jax.configs import analysis_base

OPTIMIZERS = {
    "adam": dict(name="adam", learning_rate=1.25e-3),
    "sgd": dict(name="sgd", learning_rate=0.1, momentum=0.9),
}


def get_config(arg: str = "adam"):
  options = analysis_base.parse_options(arg, set(OPTIMIZERS) | {"onestep",
                                                           *analysis_base.DATASETS})
  chosen = [o for o in OPTIMIZERS if o in options]
  if len(chosen) > 1:
    raise ValueError(f"choose one optimizer, not {chosen}")
  config = analysis_base.analysis_config(options)
  config.phases.step2.optimizer.update(OPTIMIZERS[chosen[0] if chosen
                                                  else "adam"])
  if "onestep" in options:
    config.phase_order = "teacher,step2"
    config.phases.step2.init_from = ""
  return config
