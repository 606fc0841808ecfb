"""README command 1's main job, as a new user runs it, on a fresh data dir.

The job is read from README.md's quick start (the part after the install),
run with this environment's Python, a fresh TFDS data dir (`TFDS_DATA_DIR`,
so the digits data set is built on first use as for a new user) and a
fresh workdir, at the default XLA optimisation level. Its screen must hold
bnn_jax's own lines only: nothing on stderr, and on stdout the data set's
build line, one progress line per log step, one line per evaluation, one
`done:` line per phase and the results line. results.json must have the
phases, steps and accuracies of README's table.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import multiprocess_util  # noqa: E402  (tests/ is on sys.path)

README = os.path.join(multiprocess_util.REPO, "README.md")
PHASES = ("teacher", "step1", "step2")


def _quick_start_main_job() -> list[str]:
  """The arguments of `python -m bnn_jax.main ...` in README command 1."""
  with open(README) as f:
    text = f.read()
  commands = [l for l in text.splitlines()
              if "pip install" in l and "bnn_jax.main" in l]
  assert len(commands) == 1, commands
  job = commands[0].split("&&")[-1].strip()
  words = shlex.split(job)
  assert words[:3] == [".venv/bin/python", "-m", "bnn_jax.main"], words
  return words[3:]


def _readme_table() -> dict:
  """{phase: (final top-1, best top-1, steps)} of README's quick-start table."""
  with open(README) as f:
    text = f.read()
  rows = re.findall(r"^\| (teacher|step1|step2) \|[^|]*\| ([\d.]+) / ([\d.]+)"
                    r" \| (\d+) \|", text, re.M)
  assert [r[0] for r in rows] == list(PHASES), rows
  return {r[0]: (float(r[1]), float(r[2]), int(r[3])) for r in rows}


@pytest.mark.slow
def test_readme_main_job_on_a_fresh_machine(tmp_path):
  args = _quick_start_main_job()
  assert args == ["--config=configs/digits.py", "--workdir=/tmp/bnn_digits"]
  workdir = tmp_path / "bnn_digits"
  args[-1] = f"--workdir={workdir}"
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL",
                      "JAX_DISABLE_MOST_OPTIMIZATIONS", "BNN_VERBOSE")}
  env["TFDS_DATA_DIR"] = str(tmp_path / "tensorflow_datasets")
  proc = subprocess.run([sys.executable, "-m", "bnn_jax.main", *args],
                        cwd=multiprocess_util.REPO, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr == "", proc.stderr[:3000]  # no foreign lines

  lines = proc.stdout.splitlines()
  data_dir = tmp_path / "tensorflow_datasets" / "digits" / "1.0.0"
  assert lines[0] == ("digits: built the TFDS data set from scikit-learn's "
                      f"copy (1437 train / 360 test examples) in {data_dir}")
  assert lines[-1] == f"results: {workdir / 'results.json'}"
  progress = re.compile(
      r"^\[(teacher|step1|step2)\] step (\d+)/(\d+) epoch (\d+)/(\d+) loss "
      r"[\d.]+ top1 [\d.]+ lr [\d.e+-]+ \| [\d.]+ steps/s, ETA \d+m\d\ds$")
  evaluation = re.compile(
      r"^\[(teacher|step1|step2)\] epoch (\d+)/(\d+) eval top1 [\d.]+ top5 "
      r"[\d.]+ \(best [\d.]+\)$")
  done = re.compile(r"^\[(teacher|step1|step2)\] done: top1 [\d.]+ \(best "
                    r"[\d.]+\) top5 [\d.]+, (\d+) steps, [\d.]+ s, params "
                    r"sha256 [0-9a-f]{12}$")
  kinds = {p: {"progress": 0, "eval": 0, "done": 0} for p in PHASES}
  for line in lines[1:-1]:
    for kind, pattern in (("progress", progress), ("eval", evaluation),
                          ("done", done)):
      match = pattern.match(line)
      if match:
        kinds[match.group(1)][kind] += 1
        break
    else:
      pytest.fail(f"a line that is not bnn_jax's: {line!r}")

  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert list(results) == list(PHASES)
  table = _readme_table()
  epochs = {"teacher": 30, "step1": 40, "step2": 40}
  for phase in PHASES:
    _, best_in_readme, steps_in_readme = table[phase]
    assert results[phase]["steps"] == steps_in_readme
    assert kinds[phase]["eval"] == epochs[phase]  # one per epoch
    assert kinds[phase]["done"] == 1
    # A line per log step (every 50) and per epoch end.
    assert kinds[phase]["progress"] >= epochs[phase]
    # Real accuracies on the 360 test digits; README's within 2%: XLA:CPU
    # rounds differently on other CPUs.
    assert results[phase]["best_top1"] >= 0.97
    assert abs(results[phase]["best_top1"] - best_in_readme) <= 0.02
  print("seconds per phase:", [results[p]["seconds"] for p in PHASES])
