"""AdamBNN's two steps on CIFAR-10 with ReActNet-A (stride-1 stem, 32x32 maps).

Prepare the data once on a machine with internet:
  tfds build cifar10 --data_dir=$DATA     (then copy $DATA here)
Run:
  python -m bnn_jax.main --config=configs/cifar10.py \
      --config.dataset.data_dir=$DATA --workdir=$WORKDIR

Phases: a real-valued ResNet-18 (3x3 stem, no maxpool) teacher trained with
cross-entropy, then step 1 (binary activations, real weights, coupled weight
decay 5e-6) and step 2 (binary weights, weight decay 0), both KD-only from
the teacher, Adam at lr 1.25e-3 scaled linearly to batch 128, per-epoch linear
decay. Expected result: not measured on this project's machines (no CIFAR-10
copy and no accelerator here); record the one you get with the command.
"""

from bnn_jax import config_lib


def get_config():
  config = config_lib.base_config("cifar10")
  config.batch_size = 128
  config.eval_batch_size = 500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  # ReActNet-A's step buffers exceed glibc's 64 MiB heaps: on a CPU-only host
  # keep them mapped between steps (bnn_jax.malloc_defaults; no effect on
  # GPU/TPU).
  config.cpu_malloc = "reuse"
  config.phase_order = "teacher,step1,step2"

  teacher = config_lib.phase_config("resnet18_cifar", num_epochs=100)
  teacher.optimizer.name = "adamw"
  teacher.optimizer.learning_rate = 1e-3
  teacher.optimizer.weight_decay = 5e-4
  teacher.optimizer.schedule = "cosine"
  teacher.loss.kd_weight = 0.0
  teacher.loss.ce_weight = 1.0

  phases = {}
  for name, binary_weights, weight_decay in (("step1", False, 5e-6),
                                             ("step2", True, 0.0)):
    phase = config_lib.phase_config("reactnet_a_cifar", num_epochs=128,
                                    binary_weights=binary_weights)
    phase.teacher = "teacher"
    phase.optimizer.name = "adam"
    phase.optimizer.learning_rate = 1.25e-3 * 128 / 256
    phase.optimizer.weight_decay = weight_decay
    phase.optimizer.weight_decay_mode = "coupled"
    phase.optimizer.schedule = "linear_epoch"
    phases[name] = phase
  phases["step2"].init_from = "previous"

  config.phases.teacher = teacher
  config.phases.step1 = phases["step1"]
  config.phases.step2 = phases["step2"]
  return config
