"""BinaryResNetE18 on ImageNet (Larq Zoo 2.4.0 reports 58.32% top-1, 80.79% top-5).

Larq Zoo's TrainBinaryResNetE18: Adam 4e-3 (eps 1e-8), x0.3 at epochs 70,
90, 110 of 120, batch 1024, binary kernels clipped to +-1.25.
The model is layer for layer Larq Zoo's (docs/models.md). Prepare the data as
in configs/adambnn_imagenet.py, then:
  python -m bnn_jax.main --config=configs/binary_resnet_e18_imagenet.py \
      --config.dataset.data_dir=$DATA --workdir=$WORKDIR
Check the plan first with --dry_run. To start from Larq Zoo's released
weights instead, import them (python -m bnn_jax.import_larq --model=binary_resnet_e18
--weights=FILE.h5 --out=DIR) and evaluate or fine-tune with init_from=DIR.
"""

from bnn_jax.configs import larq_zoo_base


def get_config():
  config = larq_zoo_base.imagenet_config(batch_size=1024)
  config.phase_order = "train"
  config.phases.train = larq_zoo_base.binary_resnet_e_phase()
  return config
