#!/usr/bin/env bash
# Copies the pure-Python packages bnn_jax.benchmark needs and accelerator
# images may lack (ml_collections; absl) into DEST (default .gpu_deps, git
# ignored), from a local Python where they are installed, so they travel with
# the working tree to the GPU machine (pass it as a carried path).
# gpu_side_by_side.sh puts DEST on PYTHONPATH only if the image lacks them.
#
#   PYTHON=/work/venv/bin/python benchmarks/prepare_gpu_deps.sh [DEST]
set -eu
DEST="${1:-.gpu_deps}"
PY="${PYTHON:-python}"
mkdir -p "$DEST"
for module in ml_collections absl; do
  src=$("$PY" -c "import os, $module; print(os.path.dirname($module.__file__))")
  rm -rf "${DEST:?}/$module"
  cp -r "$src" "$DEST/$module"
  find "$DEST/$module" -name __pycache__ -type d -prune -exec rm -rf {} +
done
du -sh "$DEST"
