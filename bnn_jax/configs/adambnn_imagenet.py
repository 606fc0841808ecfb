"""AdamBNN on ImageNet (Liu et al., ICML 2021), exactly the paper: 70.5% top-1.

The recipe: docs/recipe.md#training-recipe.

Prepare the data once (TFDS, manual download):
  put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in
  $DATA/downloads/manual/, then `tfds build imagenet2012 --data_dir=$DATA`.
Prepare the teacher once (torchvision's ImageNet ResNet-34 weights, fetched
on a machine with internet, e.g. torchvision.models.resnet34(weights=
"IMAGENET1K_V1").state_dict() saved with torch.save):
  python -m bnn_jax.import_torch --checkpoint=resnet34.pth --model=resnet34 \
      --out=$CKPT/resnet34

Run (one host; see docs/scaling.md for TPU pods and GPU clusters):
  python -m bnn_jax.main --config=configs/adambnn_imagenet.py \
      --config.dataset.data_dir=$DATA \
      --config.phases.teacher.init_from=$CKPT/resnet34 --workdir=$WORKDIR

Phases:
  teacher  ResNet-34, loaded (0 epochs) and evaluated once (~73.3% top-1).
  step1    ReActNet-A, binary activations / real weights, 256 epochs, Adam
           (0.9, 0.999, 1e-8), lr 1.25e-3 at batch 256, linear per-epoch decay,
           coupled L2 weight decay 5e-6 on conv kernels and shifts, KD-only
           loss from the teacher. Expected best top-1: 71.44%.
  step2    binary weights and activations, every step-1 parameter and BN
           statistic handed over strictly, weight decay 0, otherwise as
           step 1. Expected best top-1: 70.5% (results.json "best_top1").

The reference trained with torch DataParallel, so its BatchNorm statistics
were per GPU sub-batch; set --config.model.bn_group_size=<per-GPU batch> to
reproduce that (global statistics by default).
"""

from bnn_jax import config_lib


def _adambnn_phase(binary_weights: bool, weight_decay: float):
  phase = config_lib.phase_config("reactnet_a", num_epochs=256,
                                  binary_weights=binary_weights)
  phase.teacher = "teacher"
  phase.optimizer.name = "adam"
  phase.optimizer.learning_rate = 1.25e-3
  phase.optimizer.b1 = 0.9
  phase.optimizer.b2 = 0.999
  phase.optimizer.eps = 1e-8
  phase.optimizer.weight_decay = weight_decay
  phase.optimizer.weight_decay_mode = "coupled"  # torch Adam's L2, as the paper
  phase.optimizer.schedule = "linear_epoch"
  phase.loss.kd_weight = 1.0  # distribution loss only, temperature 1
  phase.loss.ce_weight = 0.0
  return phase


def get_config():
  config = config_lib.base_config("imagenet2012")
  config.batch_size = 256
  config.eval_batch_size = 500
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  # ReActNet-A's step buffers exceed glibc's 64 MiB heaps: on a CPU-only host
  # keep them mapped between steps (bnn_jax.malloc_defaults; no effect on
  # GPU/TPU).
  config.cpu_malloc = "reuse"
  config.phase_order = "teacher,step1,step2"

  teacher = config_lib.phase_config("resnet34", num_epochs=0)
  teacher.loss.kd_weight = 0.0
  teacher.loss.ce_weight = 1.0
  # Set to the import_torch output directory (see the docstring).
  teacher.init_from = ""

  step1 = _adambnn_phase(binary_weights=False, weight_decay=5e-6)
  step2 = _adambnn_phase(binary_weights=True, weight_decay=0.0)
  step2.init_from = "previous"

  config.phases.teacher = teacher
  config.phases.step1 = step1
  config.phases.step2 = step2
  return config
