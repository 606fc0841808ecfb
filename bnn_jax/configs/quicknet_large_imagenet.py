"""QuickNetLarge on ImageNet (Larq Zoo 2.4.0 reports 66.9% top-1, 87.0% top-5).

QuickNet's recipe (Larq Zoo TrainQuickNet): 600 epochs at batch 2048, Adam
1e-2 on the binary kernels, SGD (momentum 0.9) 0.1 on everything else, both
cosine with a 5-epoch warm-up; binary kernels clipped to +-1.25.
The model is layer for layer Larq Zoo's (docs/models.md). Prepare the data as
in configs/adambnn_imagenet.py, then:
  python -m bnn_jax.main --config=configs/quicknet_large_imagenet.py \
      --config.dataset.data_dir=$DATA --workdir=$WORKDIR
Check the plan first with --dry_run. To start from Larq Zoo's released
weights instead, import them (python -m bnn_jax.import_larq --model=quicknet_large
--weights=FILE.h5 --out=DIR) and evaluate or fine-tune with init_from=DIR.
"""

from bnn_jax.configs import larq_zoo_base


def get_config():
  config = larq_zoo_base.imagenet_config(batch_size=2048)
  config.phase_order = "train"
  config.phases.train = larq_zoo_base.quicknet_phase("quicknet_large")
  return config
