"""Top device ops of a `jax.profiler` trace, without TensorFlow or TensorBoard.

  python -m benchmarks.trace_summary TRACE_DIR OUT.json [--steps=3] [--top=40]

Reads the XSpace protobuf (`*.xplane.pb`, with `jax.profiler.ProfileData`)
that `jax.profiler.trace` writes, else the Chrome-trace JSON
(`*.trace.json.gz`, `perfetto_trace.json.gz`) next to it, keeps the
complete events ("ph": "X", durations in microseconds) of the device
processes (process names containing "GPU", "TPU" or "device"; every process
if there is none) and, where those have kernel lines (thread names with
"Stream"), only the kernels on them, and writes:

* per op name: calls, total and mean time per traced step, share of the
  device time;
* per kind (convolution, matmul, reduction fusion, elementwise fusion,
  copy / transpose, other), from the kernel names;
* the device busy time per step and the span of the trace; the time per
  trace line (thread).

Also prints the top ops as a text table. `--steps` is the number of steps
the trace holds (bnn_jax.benchmark's `--trace_dir` traces 3).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys

KINDS = (
    ("convolution", ("convolution", "cudnn", "conv2d", "implicit_gemm",
                     "fprop", "dgrad", "wgrad", "conv_kernel")),
    ("matmul", ("gemm", "cublas", "matmul", "dot", "cutlass", "triton_gemm")),
    ("reduction fusion", ("reduce", "reduction")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset")),
    ("elementwise fusion", ("fusion", "loop_", "elementwise")),
)


def kind_of(name: str) -> str:
  lowered = name.lower()
  for kind, needles in KINDS:
    if any(n in lowered for n in needles):
      return kind
  return "other"


def find_traces(trace_dir: str) -> list[str]:
  """Trace files under `trace_dir`, best first: the XSpace protobuf (every
  plane and line), then the Chrome-trace JSON files, largest first."""
  found = []
  for pattern in ("*.xplane.pb", "*.json.gz", "*.json"):
    paths = glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)
    found += sorted(paths, key=os.path.getsize, reverse=True)
  if not found:
    raise FileNotFoundError(f"no *.xplane.pb / *.json.gz / *.json trace "
                            f"under {trace_dir}")
  return found


def events_from_xspace(path: str) -> list:
  """Chrome-trace events from an XSpace protobuf (`jax.profiler.ProfileData`).

  One process per plane ("/device:GPU:0", "/host:CPU", ...), one thread per
  line ("Stream #7(...)", "XLA Ops", ...), times in microseconds.
  """
  from jax import profiler  # pylint: disable=g-import-not-at-top
  data = profiler.ProfileData.from_file(path)
  events = []
  for pid, plane in enumerate(data.planes):
    events.append({"ph": "M", "name": "process_name", "pid": pid,
                   "args": {"name": plane.name}})
    for tid, line in enumerate(plane.lines):
      events.append({"ph": "M", "name": "thread_name", "pid": pid,
                     "tid": tid, "args": {"name": line.name}})
      for e in line.events:
        events.append({"ph": "X", "pid": pid, "tid": tid, "name": e.name,
                       "ts": e.start_ns / 1e3, "dur": e.duration_ns / 1e3})
  return events


def load_events(path: str) -> list:
  if path.endswith(".pb"):
    return events_from_xspace(path)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events: list, steps: int, top: int) -> dict:
  """The summary dict of a list of Chrome-trace events."""
  names, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str(
          e.get("args", {}).get("name", ""))
  device_pids = {pid for pid, n in names.items()
                 if any(k in n for k in ("GPU", "TPU", "device"))}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  if device_pids:
    complete = [e for e in complete if e.get("pid") in device_pids]
  # Device time per trace line; where the device has kernel lines ("Stream
  # #n"), only those, so module- and op-level spans are not counted twice.
  per_line = collections.defaultdict(float)
  for e in complete:
    per_line[threads.get((e.get("pid"), e.get("tid")), str(e.get("tid")))] += (
        float(e["dur"]))
  streams = {key for key, n in threads.items()
             if key[0] in device_pids and "stream" in n.lower()}
  if streams:
    complete = [e for e in complete
                if (e.get("pid"), e.get("tid")) in streams]
  total = sum(float(e["dur"]) for e in complete) or 1.0
  by_name = collections.defaultdict(lambda: [0, 0.0])
  by_kind = collections.defaultdict(float)
  for e in complete:
    entry = by_name[e.get("name", "?")]
    entry[0] += 1
    entry[1] += float(e["dur"])
    by_kind[kind_of(e.get("name", ""))] += float(e["dur"])
  start = min((float(e["ts"]) for e in complete if "ts" in e), default=0.0)
  end = max((float(e["ts"]) + float(e["dur"]) for e in complete
             if "ts" in e), default=0.0)
  ops = sorted(by_name.items(), key=lambda kv: -kv[1][1])
  return {
      "device_processes": sorted(names[p] for p in device_pids),
      "events": len(complete), "steps": steps,
      "device_busy_ms_per_step": total / 1e3 / steps,
      "trace_span_ms": (end - start) / 1e3,
      "by_kind": {k: {"ms_per_step": v / 1e3 / steps, "share": v / total}
                  for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"name": n, "kind": kind_of(n), "calls_per_step": c / steps,
                   "ms_per_step": d / 1e3 / steps, "share": d / total}
                  for n, (c, d) in ops[:top]],
      "distinct_ops": len(by_name),
      "kernel_lines_only": bool(streams),
      "ms_per_step_by_line": {k: v / 1e3 / steps for k, v in sorted(
          per_line.items(), key=lambda kv: -kv[1])[:20]},
  }


def format_table(s: dict) -> str:
  lines = [f"device busy {s['device_busy_ms_per_step']:.2f} ms/step "
           f"({s['events']} events, {s['distinct_ops']} distinct ops)"]
  for kind, v in s["by_kind"].items():
    lines.append(f"  {kind:20s} {v['ms_per_step']:8.2f} ms  "
                 f"{100 * v['share']:5.1f}%")
  for op in s["top_ops"]:
    lines.append(f"  {op['ms_per_step']:8.3f} ms {100 * op['share']:5.1f}% "
                 f"x{op['calls_per_step']:.0f}  [{op['kind']}] "
                 f"{op['name'][:100]}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=40)
  args = parser.parse_args(argv)
  errors = []
  try:
    paths = find_traces(args.trace_dir)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for path in paths:
    try:
      s = summarize(load_events(path), args.steps, args.top)
      break
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{path}: {type(e).__name__}: {e}")
  else:
    print(f"error: cannot summarise the traces in {args.trace_dir}: "
          f"{'; '.join(errors)}", file=sys.stderr)
    return 1
  s["trace_file"] = os.path.relpath(path, args.trace_dir)
  with open(args.out, "w") as f:
    json.dump(s, f, indent=1)
  print(format_table(s))
  return 0


if __name__ == "__main__":
  sys.exit(main())
