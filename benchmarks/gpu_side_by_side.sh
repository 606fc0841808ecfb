#!/usr/bin/env bash
# Every GPU measurement of docs/performance.md in one go, within a time budget.
#
#   benchmarks/gpu_side_by_side.sh [OUTDIR]        # OUTDIR default: $OUT, else
#                                                  # ./gpu_results
#   BNN_GPU_SMOKE=1 benchmarks/gpu_side_by_side.sh /tmp/smoke   # tiny, any host
#
# Run from the repository root, on a host with JAX (CUDA) and PyTorch (CUDA);
# TensorFlow is neither needed nor imported. Rows, most important first, each
# a separate process under its own time limit and the overall deadline (a
# failure or timeout costs that row only):
#
#   jax_step2_bf16            bnn_jax step 2, bf16, batch 256, 224x224, with a
#                             jax.profiler trace of 3 more steps (summarised
#                             into profile_step2_bf16.{json,txt}; the Perfetto
#                             trace kept if < 6 MiB) and the optimised HLO of
#                             the step (xla_dump/*.txt.gz)
#   torch_step2               PyTorch reference network: float32 NCHW eager
#                             (the reference code), bf16 autocast +
#                             channels_last eager, + torch.compile
#   lever_fp8 / lever_bn_one_pass / lever_remat_blocks
#                             bnn_jax opt-in levers (step 2 bf16)
#   jax_step2_f32             bnn_jax step 2, float32
#   jax_step1_bf16_resnet34   step 1 bf16 + ResNet-34 teacher, 120 steps on
#                             fresh random batches, every step checked finite
#                             (needs bnn_jax.benchmark --fresh_batches)
#   torch_step1_resnet34      the PyTorch configurations, step 1 + teacher
#   lever_xla_no_triton_gemm / lever_int8 / lever_fp8_bn_one_pass_remat /
#   lever_f32_force_conv_nhwc            more levers
#   inference                 python -m bnn_jax.benchmark --inference, if present
#   inference_cifar32         the same at 32x32 (reactnet_a_cifar), not in smoke
#
# Output in OUTDIR: rows.jsonl (one JSON object per row: the benchmark's
# result plus row name, command, wall time; `error` when it failed),
# run.log (everything the commands printed), summary.md (the tables of
# docs/performance.md, from benchmarks/summarize_gpu.py).
#
# Missing ml_collections / absl on the image: run
# benchmarks/prepare_gpu_deps.sh here first and carry .gpu_deps along.
#
# Environment: PYTHON (default: python), BNN_GPU_BUDGET_S (overall wall-clock
# budget, default 530 s), BNN_GPU_SMOKE=1 (batch 2, tiny models, 2 steps; with
# BNN_GPU_SMOKE_COMPILE=1 also torch.compile), BNN_GPU_BLOCK_TF=1 (make any
# `import tensorflow` fail, to prove none happens; on by default in smoke mode),
# BNN_GPU_ROWS (a bash regex: run only the rows whose name matches),
# BNN_GPU_AUTOTUNE_CACHE=0 (no shared XLA autotuning cache).

set -u
OUTDIR="${1:-${OUT:-gpu_results}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
ROWS="$OUTDIR/rows.jsonl"
LOG="$OUTDIR/run.log"
PY="${PYTHON:-python}"
BUDGET="${BNN_GPU_BUDGET_S:-530}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SMOKE="${BNN_GPU_SMOKE:-0}"
export TF_CPP_MIN_LOG_LEVEL=3

if [ "$SMOKE" = 1 ]; then
  MODEL=reactnet_small; TEACHER=resnet_small; SIZE=16; BATCH=2; CLASSES=10
  STEPS=2; WARMUP=1; STABLE_STEPS=3; TORCH_SIZE=32; TORCH_BATCH=2
  TORCH_STEPS=1; TORCH_WARMUP=1
  TORCH_CONFIGS=reference,amp_channels_last
  if [ "${BNN_GPU_SMOKE_COMPILE:-0}" = 1 ]; then
    TORCH_CONFIGS=$TORCH_CONFIGS,amp_channels_last_compile
  fi
  T_JAX=300; T_TORCH=400; T_INF=120
  : "${BNN_GPU_BLOCK_TF:=1}"
else
  MODEL=reactnet_a; TEACHER=resnet34; SIZE=224; BATCH=256; CLASSES=1000
  STEPS=10; WARMUP=2; STABLE_STEPS=120; TORCH_SIZE=224; TORCH_BATCH=256
  TORCH_STEPS=10; TORCH_WARMUP=3
  TORCH_CONFIGS=reference,amp_channels_last,amp_channels_last_compile
  T_JAX=120; T_TORCH=240; T_INF=60
fi

if [ "${BNN_GPU_BLOCK_TF:-0}" = 1 ]; then
  # A sitecustomize that makes `import tensorflow` raise ImportError.
  mkdir -p "$OUTDIR/.no_tensorflow"
  echo "import sys; sys.modules['tensorflow'] = None" \
    > "$OUTDIR/.no_tensorflow/sitecustomize.py"
  export PYTHONPATH="$OUTDIR/.no_tensorflow${PYTHONPATH:+:$PYTHONPATH}"
fi

# Pure-Python dependencies the image may lack (benchmarks/prepare_gpu_deps.sh).
if ! "$PY" -c "import ml_collections, absl" 2> /dev/null && [ -d .gpu_deps ]; then
  export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
  echo "using $PWD/.gpu_deps for ml_collections / absl" >> "$LOG"
fi

{
  echo "gpu_side_by_side: $(date -u) budget ${BUDGET}s smoke=$SMOKE outdir=$OUTDIR"
  "$PY" -c "import ml_collections, absl, flax, optax; print('deps ok')" 2>&1 | tail -1
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import jax, sys; print('jax', jax.__version__, jax.devices())" 2>&1 | tail -1
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" 2>&1 | tail -1
} >> "$LOG" 2>&1

# XLA's per-fusion autotuning cache, shared by the bnn_jax rows: the convs
# and GEMMs a later row shares with an earlier one are not autotuned again
# (shorter compiles, same kinds of kernels). Only if this XLA knows the flag.
XF=""
CACHE_FLAG="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/bnn_gpu_autotune_cache_$$"
if [ "${BNN_GPU_AUTOTUNE_CACHE:-1}" = 1 ] && XLA_FLAGS="$CACHE_FLAG" \
    timeout 60 "$PY" -c "import jax; jax.devices()" >> "$LOG" 2>&1; then
  XF="$CACHE_FLAG"
fi
echo "XLA flags of every bnn_jax row: '$XF'" >> "$LOG"

row() {  # row NAME TIMEOUT_S [--env K=V ...] [--jsonl_out F] -- COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ -n "${BNN_GPU_ROWS:-}" ] && ! [[ "$name" =~ $BNN_GPU_ROWS ]]; then
    return 0
  fi
  "$PY" -m benchmarks.run_row --rows="$ROWS" --log="$LOG" --name="$name" \
    --timeout="$limit" --deadline="$DEADLINE" "$@"
}

BENCH=("$PY" -m bnn_jax.benchmark --json --model=$MODEL --batch=$BATCH
       --input_size=$SIZE --num_classes=$CLASSES --steps=$STEPS
       --warmup=$WARMUP)

jax_row() {  # jax_row NAME TIMEOUT_S "EXTRA XLA FLAGS" BENCHMARK_FLAGS...
  local name=$1 limit=$2 xla_flags="$XF $3"
  shift 3
  row "$name" "$limit" --env "XLA_FLAGS=${xla_flags# }" -- "${BENCH[@]}" "$@"
}

# 1. bnn_jax step 2 bf16: the "before" row, a profile and the optimised HLO.
jax_row jax_step2_bf16 $((T_JAX + 30)) \
  "--xla_dump_to=$OUTDIR/xla_dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \
  --phase=step2 --dtype=bfloat16 --trace_dir="$OUTDIR/trace"
timeout 90 "$PY" -m benchmarks.trace_summary "$OUTDIR/trace" \
  "$OUTDIR/profile_step2_bf16.json" > "$OUTDIR/profile_step2_bf16.txt" \
  2>> "$LOG" || echo "trace summary failed" >> "$LOG"
# Keep what comes back small: the optimised HLO (gzipped), trace files < 6 MiB.
if [ -d "$OUTDIR/xla_dump" ]; then
  find "$OUTDIR/xla_dump" -type f ! -name '*after_optimizations.txt' \
    ! -name '*buffer-assignment.txt' -delete
  find "$OUTDIR/xla_dump" -type f -name '*.txt' -exec gzip -f {} +
  find "$OUTDIR/xla_dump" -type d -empty -delete
fi
if [ -d "$OUTDIR/trace" ]; then  # the Perfetto trace (ui.perfetto.dev) only
  find "$OUTDIR/trace" -type f \( ! -name 'perfetto_trace.json.gz' -o \
    -size +6M \) -delete
fi

# 2. PyTorch, step 2, no teacher: reference, AMP + channels_last, + compile.
row torch_step2 $T_TORCH --jsonl_out "$ROWS" -- "$PY" -m \
  benchmarks.torch_side_by_side --out="$ROWS" --phase=step2 \
  --batch=$TORCH_BATCH --input_size=$TORCH_SIZE --steps=$TORCH_STEPS \
  --warmup=$TORCH_WARMUP --configs=$TORCH_CONFIGS

# 3. Levers on the bnn_jax step 2 bf16 step.
jax_row lever_fp8 $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_operand_dtype=float8_e4m3fn
jax_row lever_bn_one_pass $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --bn_one_pass_stats
jax_row lever_remat_blocks $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --remat_blocks

# 4. bnn_jax step 2 float32.
jax_row jax_step2_f32 $T_JAX "" --phase=step2 --dtype=float32

# 5. Step 1 bf16 + teacher: the KD stability run on fresh batches.
if grep -q "fresh_batches" bnn_jax/tools/benchmark.py; then
  jax_row jax_step1_bf16_${TEACHER}_fresh $((T_JAX + 60)) "" --phase=step1 \
    --dtype=bfloat16 --teacher=$TEACHER --fresh_batches --steps=$STABLE_STEPS
else
  echo "bnn_jax.benchmark has no --fresh_batches: fixed-batch step 1 row" >> "$LOG"
  jax_row jax_step1_bf16_${TEACHER} $T_JAX "" --phase=step1 --dtype=bfloat16 \
    --teacher=$TEACHER
fi

# 6. PyTorch, step 1 + ResNet-34 teacher.
row torch_step1_resnet34 $T_TORCH --jsonl_out "$ROWS" -- "$PY" -m \
  benchmarks.torch_side_by_side --out="$ROWS" --phase=step1 \
  --teacher=resnet34 --batch=$TORCH_BATCH --input_size=$TORCH_SIZE \
  --steps=$TORCH_STEPS --warmup=$TORCH_WARMUP --configs=$TORCH_CONFIGS

# 7. More levers.
jax_row lever_xla_no_triton_gemm $T_JAX "--xla_gpu_enable_triton_gemm=false" \
  --phase=step2 --dtype=bfloat16
jax_row lever_int8 $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_operand_dtype=int8
jax_row lever_fp8_bn_one_pass_remat $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_operand_dtype=float8_e4m3fn --bn_one_pass_stats --remat_blocks

# 8. Inference (float vs 1-bit packed forward), where the benchmark has it.
if grep -q -- "--inference" bnn_jax/benchmark.py; then
  row inference $T_INF -- "$PY" -m bnn_jax.benchmark --inference \
    --cases=$MODEL:$SIZE --batches=1,$BATCH --rounds=3 --num_classes=$CLASSES \
    --json
fi

# 8b. Inference at 32x32 as well (docs/deploy.md measures the packed forward
# at 224 and at 32: reactnet_a_cifar). Not in smoke mode (full width).
if [ "$SMOKE" != 1 ] && grep -q -- "--inference" bnn_jax/benchmark.py; then
  row inference_cifar32 $T_INF -- "$PY" -m bnn_jax.benchmark --inference \
    --cases=reactnet_a_cifar:32 --batches=1,64 --rounds=3 --gemm= --json
fi

# 9. Last, if time is left: float32 convs in NHWC (XLA picks NCHW for f32).
jax_row lever_f32_force_conv_nhwc $T_JAX "--xla_gpu_force_conv_nhwc=true" \
  --phase=step2 --dtype=float32

timeout 60 "$PY" -m benchmarks.summarize_gpu "$ROWS" --profile \
  "$OUTDIR/profile_step2_bf16.json" > "$OUTDIR/summary.md" 2>> "$LOG" \
  || echo "summarize_gpu failed" >> "$LOG"
echo "done in $(( $(date +%s) - START )) s: $(wc -l < "$ROWS") rows in $ROWS" \
  | tee -a "$LOG"
if [ "$(wc -c < "$LOG")" -gt 4000000 ]; then  # keep what comes back small
  tail -c 4000000 "$LOG" > "$LOG.tail" && mv "$LOG.tail" "$LOG"
fi
exit 0
