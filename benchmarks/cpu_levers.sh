#!/usr/bin/env bash
# Same-run ratios on the CPU: bnn_jax (defaults and each opt-in lever) against
# the PyTorch reference, in interleaved rounds.
#
#   benchmarks/cpu_levers.sh [OUTDIR] [ROUNDS]     # default ./cpu_levers, 3
#   python -m benchmarks.summarize_cpu OUTDIR/rows.jsonl
#
# Each round runs, one after the other, for 224x224 batch 16 (5 steps) and
# 32x32 batch 64 (10 steps): the reference (`bnn_jax.interop.torch_reference`,
# step 2), bnn_jax step 2 with its defaults, with `--bn_one_pass_stats`, with
# `--remat_blocks`, and with both. A machine shared with other work slows the
# rows of one round alike, so the per-round ratio bnn_jax / reference is the
# number to compare with the targets (2.0x at 224, 2.5x at 32x32). Rows are
# JSON lines with `row` = r<round>_<input>_<config>. Needs torch (CPU).
#
# Environment: PYTHON (default: python), NICE (default: 0; the documented
# rounds used nice -n -10), BNN_CPU_SIZES (default "224 32"), BNN_CPU_LEVERS
# (default "bn_one_pass remat_blocks bn_one_pass_remat"; empty: only the
# reference and the defaults; also bn_shifted and the exact binary conv
# formulations int8, float8_e4m3fn, float16_chunked, bfloat16,
# bfloat16_im2col).

set -u
OUTDIR="${1:-cpu_levers}"
ROUNDS="${2:-3}"
mkdir -p "$OUTDIR"
ROWS="$OUTDIR/rows.jsonl"
LOG="$OUTDIR/run.log"
PY="${PYTHON:-python}"
NICE="${NICE:-0}"

row() {  # row NAME -- COMMAND...
  local name=$1
  shift
  nice -n "$NICE" "$PY" -m benchmarks.run_row --rows="$ROWS" --log="$LOG" \
    --name="$name" --timeout=1800 "$@"
}

for round in $(seq 1 "$ROUNDS"); do
  for size in ${BNN_CPU_SIZES:-224 32}; do
    if [ "$size" = 224 ]; then batch=16; steps=5; else batch=64; steps=10; fi
    common=(--batch=$batch --input_size=$size --steps=$steps)
    bench=("$PY" -m bnn_jax.benchmark --json --model=reactnet_a
           --phase=step2 "${common[@]}")
    row "r${round}_${size}_reference" -- "$PY" -m \
      bnn_jax.interop.torch_reference "${common[@]}"
    row "r${round}_${size}_bnn_jax" -- "${bench[@]}"
    for lever in ${BNN_CPU_LEVERS-bn_one_pass remat_blocks bn_one_pass_remat}; do
      case "$lever" in
        bn_one_pass) args=(--bn_one_pass_stats) ;;
        remat_blocks) args=(--remat_blocks) ;;
        bn_one_pass_remat) args=(--bn_one_pass_stats --remat_blocks) ;;
        bn_shifted) args=(--bn_stats_method=shifted_one_pass) ;;
        int8|float8_e4m3fn|float16_chunked|bfloat16|bfloat16_im2col)
          args=(--binary_conv_impl=$lever) ;;
        *) echo "unknown lever in BNN_CPU_LEVERS: $lever" >&2; exit 2 ;;
      esac
      row "r${round}_${size}_${lever}" -- "${bench[@]}" "${args[@]}"
    done
  done
done
"$PY" -m benchmarks.summarize_cpu "$ROWS" | tee "$OUTDIR/summary.md"
