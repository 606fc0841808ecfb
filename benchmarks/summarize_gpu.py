"""Markdown tables for docs/performance.md from gpu_side_by_side.sh's rows.

  python -m benchmarks.summarize_gpu OUTDIR/rows.jsonl \
      [--profile OUTDIR/profile_step2_bf16.json ...] > summary.md

Tables:

* same GPU: every PyTorch configuration and every bnn_jax row that is not a
  lever (step, images/s, MFU, peak memory, compile), grouped by phase, with
  the ratio to the strongest PyTorch configuration of the same phase and
  teacher;
* levers: each `lever_*` row against the bnn_jax row it changes (same phase
  and dtype, no lever): images/s, the ratio, MFU, memory;
* the step-1 stability run (steps, finite, first non-finite step);
* each profile's time by kind and top ops, when given (one section per
  `--profile`);
* rows that failed, with their error.

MFU is the rows' own: model FLOPs (`bnn_jax.benchmark.model_flops_per_step`,
the same count for both frameworks) / step time / the device's dense peak
(bf16 rows: the bf16 peak, float32 rows: the TF32 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


def load_rows(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except ValueError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e})") from e
  return rows


def label(r: dict) -> str:
  if r.get("framework") == "pytorch":
    return f"PyTorch {r.get('config')}"
  return f"bnn_jax {r.get('row', '')}".strip()


def _f(value: Optional[float], fmt: str, scale: float = 1.0) -> str:
  return "" if value is None else format(value * scale, fmt)


def _pct(value: Optional[float]) -> str:
  return "" if value is None else f"{100 * value:.1f}%"


def _ips(value: float) -> str:
  return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _mib(value: Optional[float]) -> str:
  return "" if value is None else f"{value / 2**20:,.0f} MiB"


def _compile(r: dict) -> str:
  if r.get("framework") == "pytorch":
    return _f(r.get("first_step_s"), ".1f") + " s (first step)"
  if r.get("compile_s") is None:
    return ""
  return f"{r.get('lower_s', 0):.1f} + {r['compile_s']:.1f} s"


def is_lever(r: dict) -> bool:
  return str(r.get("row", "")).startswith("lever_")


def ok(r: dict) -> bool:
  return "error" not in r and r.get("images_per_s") is not None


def strongest_torch(rows: list[dict], phase: str, teacher) -> Optional[dict]:
  torch_rows = [r for r in rows if r.get("framework") == "pytorch" and ok(r)
                and r.get("phase") == phase and r.get("teacher") == teacher]
  return max(torch_rows, key=lambda r: r["images_per_s"], default=None)


def same_gpu_table(rows: list[dict]) -> list[str]:
  out = ["| phase | teacher | configuration | dtype | step | images/s | MFU | "
         "peak memory | compile | / strongest PyTorch |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  main = [r for r in rows if ok(r) and not is_lever(r)
          and r.get("row") != "inference"]
  main.sort(key=lambda r: (r.get("phase", ""), str(r.get("teacher")),
                           r.get("framework") != "pytorch",
                           r.get("images_per_s", 0)))
  for r in main:
    best = strongest_torch(rows, r.get("phase"), r.get("teacher"))
    ratio = ("" if best is None
             else f"{r['images_per_s'] / best['images_per_s']:.2f}x")
    out.append(
        f"| {r.get('phase')} | {r.get('teacher') or '-'} | {label(r)} | "
        f"{r.get('dtype')} | {_f(r.get('step_s_median'), '.1f', 1e3)} ms | "
        f"{_ips(r['images_per_s'])} | {_pct(r.get('mfu'))} | "
        f"{_mib(r.get('peak_memory_bytes'))} | {_compile(r)} | {ratio} |")
  return out


def baseline_for(rows: list[dict], lever: dict) -> Optional[dict]:
  for r in rows:
    if (ok(r) and not is_lever(r) and r.get("framework") != "pytorch"
        and r.get("phase") == lever.get("phase")
        and r.get("dtype") == lever.get("dtype")
        and r.get("teacher") == lever.get("teacher")
        and r.get("batch") == lever.get("batch")):
      return r
  return None


def levers_table(rows: list[dict]) -> list[str]:
  out = ["| lever | command / XLA_FLAGS | images/s | vs the same step "
         "without it | MFU | peak memory | compile |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    if not is_lever(r):
      continue
    how = " ".join(a for a in r.get("command", "").split()
                   if a.startswith(("--binary_conv", "--bn_one", "--bn_stats",
                                    "--remat")))
    flags = " ".join(  # the flags that change the program, not the logistics
        f for f in (r.get("env") or {}).get("XLA_FLAGS", "").split()
        if not f.startswith(("--xla_dump", "--xla_gpu_per_fusion_autotune")))
    how = " ".join(x for x in (how, f"XLA_FLAGS={flags}" if flags else "") if x)
    if not ok(r):
      out.append(f"| {r['row']} | `{how}` | failed: "
                 f"{str(r.get('error', ''))[:160]} | | | | |")
      continue
    base = baseline_for(rows, r)
    ratio = ("" if base is None else
             f"{r['images_per_s'] / base['images_per_s']:.3f}x "
             f"({_ips(base['images_per_s'])})")
    out.append(f"| {r['row']} | `{how}` | {_ips(r['images_per_s'])} | {ratio} | "
               f"{_pct(r.get('mfu'))} | "
               f"{_mib(r.get('peak_memory_bytes'))} | {_compile(r)} |")
  return out


def stability_lines(rows: list[dict]) -> list[str]:
  out = []
  for r in rows:
    if r.get("phase") == "step1" and r.get("framework") != "pytorch" and (
        r.get("fresh_batches") or "fresh" in str(r.get("row", ""))):
      losses = r.get("loss_per_step") or []
      out.append(
          f"- {r.get('row')}: {r.get('dtype')}, teacher {r.get('teacher')}, "
          f"batch {r.get('batch')}, fresh batches: {len(losses)} steps run, "
          f"first non-finite step: {r.get('first_nonfinite_step')}, "
          f"loss first/last: {losses[0] if losses else ''} / "
          f"{losses[-1] if losses else ''}"
          + (f"; error: {r['error'][:200]}" if "error" in r else ""))
  return out


def profile_lines(path: str, top: int = 15) -> list[str]:
  with open(path) as f:
    s = json.load(f)
  out = [f"Device busy {s['device_busy_ms_per_step']:.2f} ms per step "
         f"({s['events']} kernels over {s['steps']} steps).", "",
         "| kind | ms / step | share |", "|---|---|---|"]
  for kind, v in s["by_kind"].items():
    out.append(f"| {kind} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% |")
  out += ["", "| op | kind | calls / step | ms / step | share |",
          "|---|---|---|---|---|"]
  for op in s["top_ops"][:top]:
    out.append(f"| `{op['name'][:80]}` | {op['kind']} | "
               f"{op['calls_per_step']:.0f} | {op['ms_per_step']:.3f} | "
               f"{100 * op['share']:.1f}% |")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("rows")
  parser.add_argument("--profile", action="append", default=[],
                      help="a trace_summary JSON (profile_NAME.json); "
                           "repeat for several")
  args = parser.parse_args(argv)
  try:
    rows = load_rows(args.rows)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  device = next((r["device"] for r in rows if r.get("device")), "?")
  lines = [f"Device: {device}. MFU = model FLOPs / step time / dense peak "
           "(bf16 rows: bf16 peak; float32 rows: TF32 peak).", "",
           "### Same GPU", ""] + same_gpu_table(rows)
  lines += ["", "### Levers", ""] + levers_table(rows)
  stability = stability_lines(rows)
  if stability:
    lines += ["", "### Step 1 bf16 + teacher on fresh batches", ""] + stability
  for path in args.profile:
    name = os.path.basename(path).removeprefix("profile_").removesuffix(
        ".json")
    lines += ["", f"### Profile: {name}", ""]
    try:
      lines += profile_lines(path)
    except (OSError, ValueError, KeyError) as e:
      lines.append(f"(no profile: {e})")
  failed = [r for r in rows if "error" in r and not is_lever(r)]
  if failed:
    lines += ["", "### Failed rows", ""]
    lines += [f"- {r.get('row') or label(r)}: {str(r['error'])[:300]}"
              for r in failed]
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
