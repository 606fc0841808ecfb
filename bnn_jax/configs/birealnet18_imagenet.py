"""Bi-Real Net 18 on ImageNet (Larq Zoo 2.4.0 reports 57.47% top-1, 79.84% top-5).

Larq Zoo's TrainBiRealNet: Adam 5e-3, linear decay to 0 over 300 epochs
at batch 512, binary kernels clipped to +-1.
The model is layer for layer Larq Zoo's (docs/models.md). Prepare the data as
in configs/adambnn_imagenet.py, then:
  python -m bnn_jax.main --config=configs/birealnet18_imagenet.py \
      --config.dataset.data_dir=$DATA --workdir=$WORKDIR
Check the plan first with --dry_run. To start from Larq Zoo's released
weights instead, import them (python -m bnn_jax.import_larq --model=birealnet18
--weights=FILE.h5 --out=DIR) and evaluate or fine-tune with init_from=DIR.
"""

from bnn_jax.configs import larq_zoo_base


def get_config():
  config = larq_zoo_base.imagenet_config(batch_size=512)
  config.phase_order = "train"
  config.phases.train = larq_zoo_base.birealnet_phase()
  return config
