"""Runs one benchmark command as a named row, under a time limit and a deadline.

  python -m benchmarks.run_row --rows=rows.jsonl --log=run.log --name=NAME \
      --timeout=120 --deadline=EPOCH_S [--env=KEY=VALUE ...] -- COMMAND ...

The command runs in its own process group with `--env` added to the
environment, for at most min(--timeout, --deadline - now - 5) seconds (then
the whole group is killed). Its stdout and stderr go to the log. The row
appended to --rows is the command's last stdout line that parses as a JSON
object, with `row` (the name), `command`, `env`, `wall_s` and `rc` added; when
the command fails, times out or prints no JSON, the row also has `error`
(the last stderr lines). When too little time is left (< --min_s), the command
is skipped and the row says so. Always exits 0: one failed row must not stop
the rows after it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def last_json_object(text: str):
  """The last line of `text` that is a JSON object, or None."""
  for line in reversed(text.strip().splitlines()):
    line = line.strip()
    if line.startswith("{"):
      try:
        value = json.loads(line)
      except ValueError:
        continue
      if isinstance(value, dict):
        return value
  return None


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", required=True)
  parser.add_argument("--log", required=True)
  parser.add_argument("--name", required=True)
  parser.add_argument("--timeout", type=float, required=True)
  parser.add_argument("--deadline", type=float, default=0.0,
                      help="wall-clock epoch seconds; 0 = none")
  parser.add_argument("--min_s", type=float, default=20.0)
  parser.add_argument("--env", action="append", default=[])
  parser.add_argument("--jsonl_out", default="",
                      help="the command appends its own rows to this file "
                           "(then only a failure row is added here)")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  env_add = dict(e.split("=", 1) for e in args.env)
  limit = args.timeout
  if args.deadline:
    limit = min(limit, args.deadline - time.time() - 5)
  row = {"row": args.name, "command": " ".join(command), "env": env_add}
  with open(args.log, "a") as log:
    log.write(f"\n===== {args.name} ({time.strftime('%H:%M:%S')}, limit "
              f"{limit:.0f} s): {' '.join(command)} env {env_add}\n")
    log.flush()
    if limit < args.min_s:
      row["error"] = f"skipped: {max(limit, 0):.0f} s left of the budget"
      log.write(row["error"] + "\n")
    else:
      start = time.time()
      proc = subprocess.Popen(command, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **env_add),
                              start_new_session=True)
      try:
        out, err = proc.communicate(timeout=limit)
        rc = proc.returncode
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = "timeout"
      row["wall_s"] = round(time.time() - start, 1)
      row["rc"] = rc
      log.write(out)
      log.write(err)
      log.write(f"----- {args.name}: rc {rc}, {row['wall_s']} s\n")
      if args.jsonl_out and rc == 0:
        return 0
      result = None if args.jsonl_out else last_json_object(out)
      if result is not None:  # also a failed run's measurements, if any
        row.update(result)
      if rc != 0 or result is None:
        tail = [l for l in err.strip().splitlines() if l.strip()][-3:]
        row["error"] = (f"rc {rc}: " + " | ".join(tail))[-800:]
  with open(args.rows, "a") as f:
    f.write(json.dumps(row) + "\n")
  print(f"[{args.name}] " + (row.get("error") or
                             f"{row.get('images_per_s', 0):.1f} img/s"),
        flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
