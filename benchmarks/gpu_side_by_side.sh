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
#   jax_step2_bf16            bnn_jax step 2, bf16, batch 256, 224x224, the
#                             defaults, with a jax.profiler trace of 3 more
#                             steps (summarised into profile_step2_bf16.
#                             {json,txt}; the Perfetto trace kept if < 6 MiB)
#                             and the optimised HLO of the step
#                             (xla_dump/*.txt.gz)
#   jax_step1_bf16_resnet34_fresh
#                             step 1 bf16 + ResNet-34 teacher, 120 steps on
#                             fresh random batches, every step checked finite
#   lever_f16_chunked / lever_int8 / lever_bf16_im2col
#                             the exact narrow-operand binary forward convs
#                             (--binary_conv_impl, bnn_jax.exact_binary_conv;
#                             float16 with a profile, profile_f16_chunked.*)
#   lever_bn_shifted_one_pass / lever_f16_chunked_bn_shifted
#                             one-pass BatchNorm statistics exact at
#                             mean >> std (--bn_stats_method), alone and with
#                             the float16 convs
#   torch_step2               PyTorch, strongest configuration (bf16 autocast
#                             + channels_last + torch.compile), on cards
#                             without PyTorch rows in docs/performance.md
#                             (all three configurations with BNN_GPU_TORCH=1)
#   lever_fp8 / lever_bf16    float8_e4m3fn (slow to compile) and bfloat16
#                             operands
#   torch_step1_resnet34 / lever_bn_one_pass / lever_remat_blocks /
#   jax_step2_f32 / lever_xla_no_triton_gemm
#                             rows measured on the H200 before, if time is left
#   inference                 python -m bnn_jax.benchmark --inference, if present
#   inference_cifar32         the same at 32x32 (reactnet_a_cifar), not in smoke
#   lever_f32_force_conv_nhwc last
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
# budget, default 480 s: with the summaries the whole run fits a 9-minute
# call), BNN_GPU_SMOKE=1 (batch 2, tiny models, 2 steps; with
# BNN_GPU_SMOKE_COMPILE=1 also torch.compile), BNN_GPU_BLOCK_TF=1 (make any
# `import tensorflow` fail, to prove none happens; on by default in smoke mode),
# BNN_GPU_ROWS (a bash regex: run only the rows whose name matches),
# BNN_GPU_AUTOTUNE_CACHE=0 (no shared XLA autotuning cache), BNN_GPU_TORCH
# (auto: PyTorch rows only on cards other than the H200; 1 always; 0 never).
#
# Every row is appended to rows.jsonl as soon as its process ends (a failed
# or timed-out row as a row with `error`), so what was measured is on disk
# before any later row runs, and survives the call being cut.

set -u
OUTDIR="${1:-${OUT:-gpu_results}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
ROWS="$OUTDIR/rows.jsonl"
LOG="$OUTDIR/run.log"
PY="${PYTHON:-python}"
BUDGET="${BNN_GPU_BUDGET_S:-480}"
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
  T_JAX=300; T_NARROW=300; T_FP8=300; T_TORCH=400; T_INF=120
  : "${BNN_GPU_BLOCK_TF:=1}"
else
  MODEL=reactnet_a; TEACHER=resnet34; SIZE=224; BATCH=256; CLASSES=1000
  STEPS=10; WARMUP=2; STABLE_STEPS=120; TORCH_SIZE=224; TORCH_BATCH=256
  TORCH_STEPS=10; TORCH_WARMUP=3
  TORCH_CONFIGS=reference,amp_channels_last,amp_channels_last_compile
  T_JAX=120; T_NARROW=150; T_FP8=200; T_TORCH=240; T_INF=60
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

summarize_trace() {  # summarize_trace TRACE_DIR NAME: profile_NAME.{json,txt}
  # Within the deadline (at most 90 s); then only the Perfetto trace
  # (ui.perfetto.dev) is kept, if < 6 MiB.
  local dir=$1 name=$2 limit=$((DEADLINE - $(date +%s) - 5))
  [ -d "$dir" ] || return 0
  [ "$limit" -gt 90 ] && limit=90
  if [ "$limit" -lt 10 ]; then
    echo "no time left to summarise $dir" >> "$LOG"
  else
    timeout "$limit" "$PY" -m benchmarks.trace_summary "$dir" \
      "$OUTDIR/profile_$name.json" > "$OUTDIR/profile_$name.txt" \
      2>> "$LOG" || echo "trace summary $name failed" >> "$LOG"
  fi
  find "$dir" -type f \( ! -name 'perfetto_trace.json.gz' -o -size +6M \) \
    -delete
}

# PyTorch rows: only on a card without them in docs/performance.md (the H200
# rows of 2026-11-30), and then only the strongest configuration (bf16
# autocast + channels_last + torch.compile); BNN_GPU_TORCH=1 runs them
# always, =0 never.
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
TORCH_ROWS="${BNN_GPU_TORCH:-auto}"
if [ "$TORCH_ROWS" = auto ]; then
  TORCH_ROWS=1
  case "$GPU_NAME" in *H200*) TORCH_ROWS=0 ;; esac
  [ "$SMOKE" = 1 ] || TORCH_CONFIGS=amp_channels_last_compile
fi
echo "GPU '$GPU_NAME': PyTorch rows $TORCH_ROWS ($TORCH_CONFIGS)" >> "$LOG"

# 1. bnn_jax step 2 bf16 with the defaults: a profile and the optimised HLO.
jax_row jax_step2_bf16 $((T_JAX + 30)) \
  "--xla_dump_to=$OUTDIR/xla_dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \
  --phase=step2 --dtype=bfloat16 --trace_dir="$OUTDIR/trace"
summarize_trace "$OUTDIR/trace" step2_bf16
# Keep what comes back small: the optimised HLO (gzipped).
if [ -d "$OUTDIR/xla_dump" ]; then
  find "$OUTDIR/xla_dump" -type f ! -name '*after_optimizations.txt' \
    ! -name '*buffer-assignment.txt' -delete
  find "$OUTDIR/xla_dump" -type f -name '*.txt' -exec gzip -f {} +
  find "$OUTDIR/xla_dump" -type d -empty -delete
fi

# 2. Step 1 bf16 + teacher with the defaults: the KD stability run on fresh
#    batches, every step checked finite.
jax_row jax_step1_bf16_${TEACHER}_fresh $((T_JAX + 60)) "" --phase=step1 \
  --dtype=bfloat16 --teacher=$TEACHER --fresh_batches --steps=$STABLE_STEPS

# 3. The exact narrow-operand forward convs (bnn_jax.exact_binary_conv), each
#    with a compile limit that lets it finish; float16 in fan-in chunks (a
#    float16 conv with a float16 result, which cuDNN runs as is) first, with
#    a profile.
jax_row lever_f16_chunked $T_NARROW "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_impl=float16_chunked --trace_dir="$OUTDIR/trace_f16_chunked"
summarize_trace "$OUTDIR/trace_f16_chunked" f16_chunked
jax_row lever_int8 $T_NARROW "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_impl=int8
jax_row lever_bf16_im2col $T_NARROW "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_impl=bfloat16_im2col

# 4. Fewer reduction passes: one-pass BatchNorm statistics exact at
#    mean >> std (bnn_jax.batch_stats), alone and with the float16 convs.
jax_row lever_bn_shifted_one_pass $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --bn_stats_method=shifted_one_pass
jax_row lever_f16_chunked_bn_shifted $T_NARROW "" --phase=step2 \
  --dtype=bfloat16 --binary_conv_impl=float16_chunked \
  --bn_stats_method=shifted_one_pass

# 5. PyTorch step 2 (the ratio's denominator), where this card lacks it.
if [ "$TORCH_ROWS" = 1 ]; then
  row torch_step2 $T_TORCH --jsonl_out "$ROWS" -- "$PY" -m \
    benchmarks.torch_side_by_side --out="$ROWS" --phase=step2 \
    --batch=$TORCH_BATCH --input_size=$TORCH_SIZE --steps=$TORCH_STEPS \
    --warmup=$TORCH_WARMUP --configs=$TORCH_CONFIGS
fi

# 6. The slow-compiling narrow operands (float8: 120 s were not enough on
#    the H200) and the last exact formulation.
jax_row lever_fp8 $T_FP8 "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_impl=float8_e4m3fn
jax_row lever_bf16 $T_NARROW "" --phase=step2 --dtype=bfloat16 \
  --binary_conv_impl=bfloat16

# 7. Levers measured on the H200 before (2026-11-30) and the rest, if time
#    is left.
if [ "$TORCH_ROWS" = 1 ]; then
  row torch_step1_resnet34 $T_TORCH --jsonl_out "$ROWS" -- "$PY" -m \
    benchmarks.torch_side_by_side --out="$ROWS" --phase=step1 \
    --teacher=resnet34 --batch=$TORCH_BATCH --input_size=$TORCH_SIZE \
    --steps=$TORCH_STEPS --warmup=$TORCH_WARMUP --configs=$TORCH_CONFIGS
fi
jax_row lever_bn_one_pass $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --bn_one_pass_stats
jax_row lever_remat_blocks $T_JAX "" --phase=step2 --dtype=bfloat16 \
  --remat_blocks
jax_row jax_step2_f32 $T_JAX "" --phase=step2 --dtype=float32
jax_row lever_xla_no_triton_gemm $T_JAX "--xla_gpu_enable_triton_gemm=false" \
  --phase=step2 --dtype=bfloat16

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

timeout 30 "$PY" -m benchmarks.summarize_gpu "$ROWS" \
  --profile "$OUTDIR/profile_step2_bf16.json" \
  --profile "$OUTDIR/profile_f16_chunked.json" > "$OUTDIR/summary.md" \
  2>> "$LOG" || echo "summarize_gpu failed" >> "$LOG"
echo "done in $(( $(date +%s) - START )) s: $(wc -l < "$ROWS") rows in $ROWS" \
  | tee -a "$LOG"
if [ "$(wc -c < "$LOG")" -gt 4000000 ]; then  # keep what comes back small
  tail -c 4000000 "$LOG" > "$LOG.tail" && mv "$LOG.tail" "$LOG"
fi
exit 0
