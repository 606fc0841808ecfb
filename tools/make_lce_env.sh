#!/usr/bin/env bash
# Creates the environment of `python -m bnn_jax.export --format=lce`: a
# Python 3.11 virtual environment with TensorFlow 2.16 (CPU), tf-keras,
# Larq, larq-compute-engine 0.16 (built on TensorFlow 2.16; Larq needs
# numpy < 2) and larq-zoo 2.4.0 (the Larq Zoo model definitions that
# tests/test_larq_import.py builds with weights=None: nothing downloaded).
# It is separate from the main environment (numpy >= 2, TensorFlow 2.21) and holds no JAX: the conversion reads the packed file
# (numpy arrays + a JSON header), which the main environment writes.
#
#   bash tools/make_lce_env.sh [DIR]        (default DIR: /work/venvs/lce)
#
# Build: 46 s on 2 CPU cores from a local package index; 2.3 GB on disk.
# Then: python -m bnn_jax.export --format=lce --lce_python=DIR/bin/python ...
set -euo pipefail
DIR="${1:-/work/venvs/lce}"
PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null; then
  echo "error: $PYTHON not found; larq-compute-engine 0.16 has wheels for Python 3.9-3.11; set PYTHON=python3.11" >&2
  exit 1
fi
"$PYTHON" -m venv "$DIR"
"$DIR/bin/python" -m pip install -q --upgrade pip
# Pins: the TensorFlow that larq-compute-engine 0.16 was built against, the
# tf-keras of that TensorFlow (Larq needs Keras 2: TF_USE_LEGACY_KERAS=1
# makes tf.keras that one) and numpy < 2. (tf-keras depends on the full
# `tensorflow` package, so that is the one pinned.)
"$DIR/bin/python" -m pip install -q \
  "tensorflow==2.16.2" "tf-keras==2.16.0" "larq==0.13.3" \
  "larq-compute-engine==0.16.0" "larq-zoo==2.4.0" "numpy==1.26.4"
TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=3 "$DIR/bin/python" -c "import larq_compute_engine as lce, larq, larq_zoo, tensorflow as tf; print('lce env ok: tensorflow', tf.__version__, 'larq', larq.__version__, 'lce', lce.__version__, 'larq_zoo', larq_zoo.__version__)"
