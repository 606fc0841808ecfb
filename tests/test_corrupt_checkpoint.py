"""A corrupt checkpoint, whatever file: one line naming the step and the fallback.

One tiny trained run (digits teacher, 11 steps, checkpoints at steps 8 and
11) is shared; each case truncates one file of step 11 of a copy, the way
an interrupted copy to or from a bucket leaves it:

  chunk      the largest array data file under state/ocdbt.process_0/d/
  root_data  the file under state/d/ (the OCDBT root: every array's metadata)
  metadata   state/_METADATA (orbax's JSON tree metadata)
  manifest   state/manifest.ocdbt (the OCDBT manifest)

Re-running must stop with a CheckpointError that names step 11's directory,
what is wrong, and the fallback (delete it to fall back to step 8) without
touching anything; the fallback must work; and `bnn_jax.main` must print
exactly one `error:` line per case, exit 1, no traceback and no "Event loop
is closed" report at exit.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax.training import phases

from conftest import REPO
_LATEST, _EARLIER = 11, 8

# A config file, so that the CLI run below uses exactly the trained config.
_CONFIG_FILE = '''
from configs import digits


def get_config():
  config = digits.get_config()
  config.update_from_flattened_dict({{
      "dataset.data_dir": {data_dir!r}, "phase_order": "teacher",
      "phases.teacher.num_epochs": 1, "batch_size": 128,
      "eval_batch_size": 360, "checkpoint_every_steps": 4,
      "log_every_steps": 11}})
  return config
'''

# What each case truncates, relative to the step directory, and what the
# error must say about it.
_CASES = {
    "chunk": (None, r"array \S+ in state: Requested byte range \[\d+, \d+\) "
              r"is not valid for value of size 100"),
    "root_data": ("state/d/*", r"in state/d/[0-9a-f]+: Requested byte range"),
    "metadata": ("state/_METADATA",
                 r"state/_METADATA is not valid JSON \(truncated\?\)"),
    "manifest": ("state/manifest.ocdbt", r"in state/manifest.ocdbt: Error "
                 r"decoding manifest: Length in header \(\d+\) does not "
                 r"match actual length \(100\)"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(config file, workdir of the finished tiny run)."""
  root = tmp_path_factory.mktemp("corrupt")
  config_file = root / "tiny.py"
  config_file.write_text(_CONFIG_FILE.format(data_dir=str(root / "tfds")))
  workdir = str(root / "run")
  phases.run(_load_config(config_file), workdir)
  steps = sorted(int(s) for s in os.listdir(
      os.path.join(workdir, "teacher", "checkpoints")) if s.isdigit())
  assert steps == [_EARLIER, _LATEST]
  return config_file, workdir


def _load_config(config_file):
  spec = importlib.util.spec_from_file_location("tiny_config", config_file)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, REPO)
  spec.loader.exec_module(module)
  return module.get_config()


def _corrupt_copy(workdir, case, destination):
  """A copy of the run with one file of step 11 cut to 100 bytes."""
  shutil.copytree(workdir, destination)
  step_dir = os.path.join(destination, "teacher", "checkpoints", str(_LATEST))
  pattern = _CASES[case][0]
  if pattern is None:  # the largest array chunk
    chunks = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    names = sorted(os.listdir(chunks),
                   key=lambda n: -os.path.getsize(os.path.join(chunks, n)))
    path = os.path.join(chunks, names[0])
  elif pattern.endswith("*"):
    folder = os.path.join(step_dir, os.path.dirname(pattern))
    (name,) = os.listdir(folder)
    path = os.path.join(folder, name)
  else:
    path = os.path.join(step_dir, pattern)
  assert os.path.getsize(path) > 100
  with open(path, "r+b") as f:
    f.truncate(100)
  return step_dir


def _files(workdir):
  return {os.path.join(r, n): os.path.getsize(os.path.join(r, n))
          for r, _, names in os.walk(workdir) for n in names}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_CASES))
def test_each_kind_names_the_step_and_the_fallback(trained, case, tmp_path):
  config_file, workdir = trained
  copy = str(tmp_path / "run")
  step_dir = _corrupt_copy(workdir, case, copy)
  before = _files(copy)
  config = _load_config(config_file)
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    phases.run(config, copy)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"checkpoint {step_dir} is corrupt or truncated (")
  assert message.endswith(f"); delete {step_dir} to fall back to step "
                          f"{_EARLIER}, or start a new --workdir")
  assert re.search(_CASES[case][1], message), message
  assert "tensorstore_spec" not in message and "TensorStore(" not in message
  assert _files(copy) == before  # nothing touched
  # load_variables (init_from, evaluation) says the same.
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=rf"^checkpoint {step_dir} is corrupt"):
    checkpoint_lib.load_variables(os.path.join(copy, "teacher"))


@pytest.mark.slow
def test_the_named_fallback_works(trained, tmp_path):
  """Deleting the step directory resumes from step 8 and ends as the run did."""
  config_file, workdir = trained
  copy = str(tmp_path / "run")
  step_dir = _corrupt_copy(workdir, "chunk", copy)
  shutil.rmtree(step_dir)
  config = _load_config(config_file)
  resumed = phases.run(config, copy)
  with open(os.path.join(workdir, phases.RESULTS_FILE)) as f:
    original = json.load(f)
  assert resumed["teacher"]["steps"] == _LATEST
  assert (resumed["teacher"]["params_sha256"]
          == original["teacher"]["params_sha256"])


# Runs bnn_jax.main once per workdir in one interpreter (flags re-parsed,
# no --config.* overrides); prints each exit status.
_CLI = r"""
import sys
from absl import app
from bnn_jax import main
config_file, workdirs = sys.argv[1], sys.argv[2:]
codes = []
for workdir in workdirs:
  if main.FLAGS.is_parsed():
    main.FLAGS.unparse_flags()
  sys.argv = ["bnn_jax.main", f"--config={config_file}",
              f"--workdir={workdir}"]
  main.parse_flags(sys.argv)
  try:
    main.main([])
  except SystemExit as e:
    codes.append(e.code)
print("codes", codes, flush=True)
"""


@pytest.mark.slow
def test_cli_one_line_exit_1_no_noise_at_exit(trained, tmp_path):
  config_file, workdir = trained
  copies, step_dirs = [], []
  for case in sorted(_CASES):
    copies.append(str(tmp_path / case))
    step_dirs.append(_corrupt_copy(workdir, case, copies[-1]))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  proc = subprocess.run(
      [sys.executable, "-c", _CLI, str(config_file), *copies], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"codes {[1] * len(_CASES)}" in proc.stdout
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == len(_CASES), proc.stderr[-3000:]
  for line, step_dir in zip(errors, step_dirs):
    assert line.startswith(f"error: checkpoint {step_dir} is corrupt")
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


def _coroutine_from(filename):
  namespace = {}
  exec(compile("async def read():\n  pass\n", filename, "exec"), namespace)
  return namespace["read"]()


def test_failed_restore_leftovers_are_silenced_and_nothing_else(monkeypatch):
  """After a failed restore, the reports orbax leaves behind (a closed event
  loop, as unraisable or through sys.excepthook; its read coroutines
  finalized with the read's error, or never awaited) are dropped; every
  other report goes on to the previous hook."""
  seen, excepthook_seen = [], []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  monkeypatch.setattr(sys, "excepthook",
                      lambda *args: excepthook_seen.append(args[1]))
  asyncio_logger = logging.getLogger("asyncio")
  level = asyncio_logger.level
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      checkpoint_lib._ignore_closed_event_loop()
      checkpoint_lib._ignore_closed_event_loop()  # installed once
      assert asyncio_logger.level == logging.CRITICAL
    finally:
      asyncio_logger.setLevel(level)
    warnings.warn("coroutine '_read_array_index_and_device_put' was never "
                  "awaited", RuntimeWarning)
    warnings.warn("something else", RuntimeWarning)
  assert [str(w.message) for w in caught] == ["something else"]

  orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint",
                            "_src", "serialization", "serialization.py")
  orbax_read = _coroutine_from(orbax_file)
  other_read = _coroutine_from(os.path.join(os.sep, "elsewhere", "io.py"))
  report = lambda error, obj: type("Unraisable", (), dict(
      exc_value=error, object=obj))()
  reports = [
      report(RuntimeError("Event loop is closed"), None),
      report(Exception("Encountered error while reading array index"),
             orbax_read),
      report(RuntimeError("something else"), None),
      report(Exception("Encountered error while reading array index"),
             other_read),
  ]
  for r in reports:
    sys.unraisablehook(r)
  assert seen == reports[2:]
  closed, other = RuntimeError("Event loop is closed"), ValueError("x")
  sys.excepthook(RuntimeError, closed, None)
  sys.excepthook(ValueError, other, None)
  assert excepthook_seen == [other]
  orbax_read.close()
  other_read.close()
