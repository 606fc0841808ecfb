"""Not a config: Larq Zoo's training recipes (larq-zoo 2.4.0) as phases.

The shared base of the zoo configs (quicknet*_imagenet.py, birealnet18_,
binary_resnet_e18_ and real_to_binary_net_imagenet.py, quicknet_digits.py).

Each returns one phase trained from scratch with cross-entropy:

* `quicknet_phase`: `TrainQuickNet` (sota_experiments.py): 600 epochs at
  batch 2048; the binary kernels (Larq `Bop.is_binary_variable`) with Adam at
  1e-2, every other parameter with SGD, momentum 0.9, at 0.1; both cosine
  with a 5-epoch linear warm-up; the binary kernels clipped to +-1.25 after
  each step (the kernels' `WeightClip(1.25)`).
* `birealnet_phase`: `TrainBiRealNet` (basic_experiments.py): Adam 5e-3,
  linear decay to 0 over 300 epochs at batch 512, kernels clipped to +-1.
* `binary_resnet_e_phase`: `TrainBinaryResNetE18`: Adam 4e-3 (eps 1e-8),
  x0.3 at epochs 70, 90 and 110 of 120, batch 1024, kernels clipped to
  +-1.25.
* `real_to_binary_phases`: the last two of Larq Zoo's `TrainR2B` stages,
  as AdamBNN's two steps: "ban" (binary activations, real weights, Larq's
  r2b_ban) and "bnn" (binary weights from "ban", Larq's r2b_bnn), each 75
  epochs at batch 256, Adam with a 5-epoch warm-up and x0.3 at epochs 40,
  60, 70 (`R2BStepSchedule`), lr 1e-3 / 2e-4; the bnn step learns from the
  ban step's outputs (KD weight 0.8, cross-entropy 1.0, temperature 1). Larq
  Zoo's first two stages (a real ResNet-18 and r2b_fp with attention
  matching) are not reproduced: bnn_jax has no attention-matching loss.

The binary kernels' group is `BINARY_KERNEL_GROUP[model]`; every other
parameter is in the "real" group.
"""

from bnn_jax import config_lib
from bnn_jax import optim

# Regexes of the binary conv kernels, per model family.
BINARY_KERNELS = {
    "quicknet": optim.BINARY_KERNEL_REGEX,  # section*_block*/binary_conv
    "birealnet": optim.BINARY_KERNEL_REGEX,  # block*/binary_conv
    "real_to_binary": r"block_\d+[ab]/conv2d/kernel",
}


def _ce_only(phase):
  phase.loss.kd_weight = 0.0
  phase.loss.ce_weight = 1.0
  return phase


def quicknet_phase(model_name: str, num_epochs: int = 600, **model):
  """QuickNet's recipe (module docstring)."""
  phase = _ce_only(config_lib.phase_config(model_name, num_epochs, **model))
  phase.optimizer.schedule = "cosine"
  phase.optimizer.warmup_epochs = 5.0
  phase.optimizer.groups = (
      ("binary", BINARY_KERNELS["quicknet"],
       (("name", "adam"), ("learning_rate", 1e-2), ("weight_clip", 1.25))),
      ("real", ".*",
       (("name", "sgd"), ("momentum", 0.9), ("learning_rate", 0.1))))
  return phase


# Keras' Adam epsilon (tf.keras.optimizers.Adam's default).
KERAS_ADAM_EPS = 1e-7


def _adam_with_clip(phase, regex: str, learning_rate: float,
                    clip: float | None, eps: float = KERAS_ADAM_EPS):
  """Adam on everything; the binary kernels (`regex`) clipped to +-clip."""
  phase.optimizer.name = "adam"
  phase.optimizer.learning_rate = learning_rate
  phase.optimizer.eps = eps
  if clip is not None:
    phase.optimizer.groups = (("binary", regex, (("weight_clip", clip),)),
                              ("real", ".*", ()))
  return phase


def birealnet_phase(num_epochs: int = 300):
  """Bi-Real Net's recipe (module docstring)."""
  phase = _ce_only(config_lib.phase_config("birealnet18", num_epochs))
  phase.optimizer.schedule = "linear"
  return _adam_with_clip(phase, BINARY_KERNELS["birealnet"], 5e-3, 1.0)


def binary_resnet_e_phase(num_epochs: int = 120):
  """BinaryResNetE18's recipe (module docstring)."""
  phase = _ce_only(config_lib.phase_config("binary_resnet_e18", num_epochs))
  phase.optimizer.schedule = "step"
  phase.optimizer.step_epochs = (70.0, 90.0, 110.0)
  phase.optimizer.step_factor = 0.3
  return _adam_with_clip(phase, BINARY_KERNELS["birealnet"], 4e-3, 1.25,
                         eps=1e-8)


def real_to_binary_phases(num_epochs: int = 75):
  """(ban, bnn) phases of Real-to-Binary Net (module docstring)."""
  phases = []
  for binary_weights, lr in ((False, 1e-3), (True, 2e-4)):
    phase = config_lib.phase_config("real_to_binary_net", num_epochs,
                                    binary_weights=binary_weights)
    _adam_with_clip(phase, BINARY_KERNELS["real_to_binary"], lr,
                    1.0 if binary_weights else None)
    phase.optimizer.schedule = "step"
    phase.optimizer.warmup_epochs = 5.0
    phase.optimizer.step_epochs = (40.0, 60.0, 70.0)
    phase.optimizer.step_factor = 0.3
    if binary_weights:
      phase.teacher = "ban"
      phase.init_from = "previous"
      phase.loss.kd_weight = 0.8
      phase.loss.ce_weight = 1.0
    else:
      _ce_only(phase)
    phases.append(phase)
  return tuple(phases)


def imagenet_config(batch_size: int):
  """Run-level ImageNet settings shared by the Larq Zoo configs."""
  config = config_lib.base_config("imagenet2012")
  config.batch_size = batch_size
  config.eval_batch_size = 500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.cpu_malloc = "reuse"
  return config
