"""Real-to-Binary Net on ImageNet (Larq Zoo 2.4.0 reports 65.01% top-1, 85.72% top-5).

The last two stages of Larq Zoo's TrainR2B as two phases (ban: binary
activations, real weights; bnn: binary weights, KD 0.8 from ban + CE),
75 epochs each at batch 256 (bnn_jax.configs.larq_zoo_base). Larq Zoo's
first two stages (real ResNet-18, r2b_fp with attention matching) are not
reproduced, so expect less than the reported accuracy.
The model is layer for layer Larq Zoo's (docs/models.md). Prepare the data as
in configs/adambnn_imagenet.py, then:
  python -m bnn_jax.main --config=configs/real_to_binary_net_imagenet.py \
      --config.dataset.data_dir=$DATA --workdir=$WORKDIR
Check the plan first with --dry_run. To start from Larq Zoo's released
weights instead, import them (python -m bnn_jax.import_larq --model=real_to_binary_net
--weights=FILE.h5 --out=DIR) and evaluate or fine-tune with init_from=DIR.
"""

from bnn_jax.configs import larq_zoo_base


def get_config():
  config = larq_zoo_base.imagenet_config(batch_size=256)
  config.phase_order = "ban,bnn"
  config.phases.ban, config.phases.bnn = (
      larq_zoo_base.real_to_binary_phases())
  return config
