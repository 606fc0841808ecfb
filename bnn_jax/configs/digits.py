"""The embedded default: AdamBNN's two-step recipe, scaled down to 8x8 digits.

  python -m bnn_jax.main --config=configs/digits.py --workdir=/tmp/bnn_digits

Data: scikit-learn's 8x8 digits as a local TFDS data set (built into the TFDS
data dir on first use; 1437 train / 360 test, stratified).

Phases (docs/recipe.md#training-recipe, scaled down):
  teacher  real-valued `resnet_small`, cross-entropy, AdamW + cosine.
  step1    `reactnet_small` with binary activations and real weights,
           KD-only loss from the teacher, Adam with coupled L2 weight decay
           5e-6 on the reference groups, per-epoch linear lr decay.
  step2    the same network with binary weights, every step-1 parameter and
           BN statistic handed over (strictly), weight decay 0.

Expected (2-core CPU, about 2-3 minutes): teacher top-1 >= 0.97, step-2
(fully binary) top-1 >= 0.93 on the test split; README records the numbers.
"""

from bnn_jax import config_lib


def get_config():
  config = config_lib.base_config("digits")
  config.batch_size = 64
  config.eval_batch_size = 128
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  config.phase_order = "teacher,step1,step2"

  teacher = config_lib.phase_config("resnet_small", num_epochs=30)
  teacher.optimizer.name = "adamw"
  teacher.optimizer.learning_rate = 3e-3
  teacher.optimizer.weight_decay = 1e-4
  teacher.optimizer.schedule = "cosine"
  teacher.loss.kd_weight = 0.0
  teacher.loss.ce_weight = 1.0

  step1 = config_lib.phase_config("reactnet_small", num_epochs=40,
                                  binary_weights=False)
  step1.teacher = "teacher"
  step1.optimizer.name = "adam"
  step1.optimizer.learning_rate = 1.25e-3
  step1.optimizer.weight_decay = 5e-6
  step1.optimizer.weight_decay_mode = "coupled"
  step1.optimizer.schedule = "linear_epoch"

  step2 = config_lib.phase_config("reactnet_small", num_epochs=40,
                                  binary_weights=True)
  step2.teacher = "teacher"
  step2.init_from = "previous"
  step2.optimizer.name = "adam"
  step2.optimizer.learning_rate = 1.25e-3
  step2.optimizer.weight_decay = 0.0
  step2.optimizer.weight_decay_mode = "coupled"
  step2.optimizer.schedule = "linear_epoch"

  config.phases.teacher = teacher
  config.phases.step1 = step1
  config.phases.step2 = step2
  return config
