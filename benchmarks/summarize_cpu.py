"""Per-round ratios to the PyTorch reference from cpu_levers.sh's rows.

  python -m benchmarks.summarize_cpu OUTDIR/rows.jsonl

Rows are named r<round>_<input size>_<config>; for every input size and
configuration the table lists the images/s of each round, the ratio to the
reference of the same round, and the median ratio.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys

from benchmarks.summarize_gpu import load_rows

_NAME = re.compile(r"^r(\d+)_(\d+)_(.+)$")


def ratio_table(rows: list[dict]) -> list[str]:
  """Markdown lines: input, configuration, img/s per round, ratios, median."""
  ips = {}  # (size, config) -> {round: images/s}
  for r in rows:
    m = _NAME.match(str(r.get("row", "")))
    if m and "error" not in r and r.get("images_per_s"):
      ips.setdefault((m.group(2), m.group(3)), {})[int(m.group(1))] = (
          r["images_per_s"])
  out = ["| input | configuration | images/s per round | / reference, per "
         "round | median ratio |", "|---|---|---|---|---|"]
  by_size = collections.defaultdict(list)
  for size, config in ips:
    by_size[size].append(config)
  for size in sorted(by_size, key=int, reverse=True):
    reference = ips.get((size, "reference"), {})
    for config in sorted(by_size[size], key=lambda c: (c != "reference", c)):
      rounds = ips[(size, config)]
      ratios = [rounds[k] / reference[k] for k in sorted(rounds)
                if k in reference]
      out.append(
          f"| {size}x{size} | {config} | "
          + " / ".join(f"{rounds[k]:.2f}" for k in sorted(rounds)) + " | "
          + " / ".join(f"{x:.2f}x" for x in ratios) + " | "
          + (f"{statistics.median(ratios):.2f}x" if ratios else "") + " |")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("rows")
  args = parser.parse_args(argv)
  try:
    rows = load_rows(args.rows)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n".join(ratio_table(rows)))
  failed = [r for r in rows if "error" in r]
  for r in failed:
    print(f"- failed: {r.get('row')}: {str(r['error'])[:200]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
