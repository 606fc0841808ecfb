#!/usr/bin/env bash
# Runs bnn_jax on the GPUs of this machine: one process drives all of them
# (or the --gpus listed); every step's global batch is sharded over them on
# the `data` mesh axis. See docs/scaling.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_node.sh [--gpus=0,1,...] [--python=PATH] -- <bnn_jax.main flags>

  --gpus=LIST     CUDA devices to use (sets CUDA_VISIBLE_DEVICES; default:
                  all visible).
  --python=PATH   interpreter (default: $PYTHON, else .venv/bin/python of
                  this checkout, else python3). Its JAX needs CUDA support:
                  pip install "jax[cuda12]==<the jax pin of requirements.txt>"
  -h, --help      this text.

config.batch_size and config.eval_batch_size are global: they must be
multiples of the GPU count, and the learning rate is that of the config
whatever the GPU count.

Example (8 GPUs, 32 images per GPU, the reference's per-GPU BatchNorm):
  launch/gpu_node.sh -- --config=configs/adambnn_imagenet.py \
      --config.dataset.data_dir=/data/tensorflow_datasets \
      --config.model.bn_group_size=32 --workdir=/runs/adambnn
EOF
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
while (($#)); do
  case "$1" in
    --gpus=*)
      gpus="${1#*=}"
      if ! [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        echo "launch/gpu_node.sh: --gpus wants a list like 0,1,2,3, got '$gpus'" >&2
        exit 2
      fi
      export CUDA_VISIBLE_DEVICES="$gpus" ;;
    --python=*) python="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch/gpu_node.sh: unknown option $1 (flags for bnn_jax.main go after --)" >&2
       usage >&2; exit 2 ;;
  esac
  shift
done
if (($# == 0)); then
  echo "launch/gpu_node.sh: no bnn_jax.main flags after --" >&2
  usage >&2; exit 2
fi
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
  else python="python3"; fi
fi
cd "$repo"

# Fail early, in one line, when this JAX cannot see a GPU (CPU-only jaxlib).
if ! gpu_count="$(JAX_PLATFORMS=cuda "$python" -c \
    'import jax; print(jax.device_count())' 2>/dev/null)"; then
  echo "launch/gpu_node.sh: $python's JAX sees no CUDA GPU; install" \
       "jax[cuda12] matching requirements.txt's jax pin" >&2
  exit 2
fi
echo "launch/gpu_node.sh: $gpu_count GPUs" >&2
export JAX_PLATFORMS=cuda
exec "$python" -m bnn_jax.main --distributed=off "$@"
