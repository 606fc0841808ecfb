"""QuickNet's recipe at digits scale: a small QuickNet on 8x8 digits upsampled to 32x32.

  python -m bnn_jax.main --config=configs/quicknet_digits.py \
      --workdir=/tmp/bnn_quicknet_digits

The Larq Zoo QuickNet layout (stem /4, sections with +1-padded binary 3x3
convs, blur-pool transitions) with one block per section of 16-32-64-128
channels (`section_blocks=(1, 1, 1, 1)`, `section_filters=(16, 32, 64,
128)`), on the scikit-learn digits resized to 32x32 (maps 8/4/2/1), and
QuickNet's optimizer split (bnn_jax.configs.larq_zoo_base): Adam at
1e-2 on the binary kernels (clipped to +-1.25), SGD with momentum 0.9 at
0.1 on the rest, both cosine with a 1-epoch warm-up, 8 epochs, batch 64,
cross-entropy. Each log record holds both rates (train/lr/binary,
train/lr/real). Expected (2-core CPU, about a minute): test top-1 well
above chance (0.1); tests/test_zoo_configs.py checks > 0.5.
"""

from bnn_jax import config_lib
from bnn_jax.configs import larq_zoo_base


def get_config():
  config = config_lib.base_config("digits")
  config.dataset.image_size = 32
  config.batch_size = 64
  config.eval_batch_size = 120
  config.log_every_steps = 11
  config.checkpoint_every_steps = 200
  config.phase_order = "train"
  phase = larq_zoo_base.quicknet_phase(
      "quicknet", num_epochs=8, section_blocks=(1, 1, 1, 1),
      section_filters=(16, 32, 64, 128))
  phase.optimizer.warmup_epochs = 1.0
  config.phases.train = phase
  return config
