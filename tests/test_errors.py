"""Bad input gets a one-line error naming the fix, and nothing is overwritten."""

import json
import os
import re
import shutil
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import pytest

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import cli
from bnn_jax import main as main_lib
from bnn_jax.tools import analyze
from bnn_jax.training import input_pipeline
from bnn_jax.training import phases
from configs import digits as digits_config

from conftest import REPO


def _error_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, stderr
  assert "Traceback" not in stderr, stderr
  return lines[0]


def _main_in_process(monkeypatch, capsys, *args) -> tuple[int, str]:
  """`python -m bnn_jax.main *args` in this process (main's flag parser,
  then main); returns (exit status, stderr). Only for runs that fail before
  training."""
  argv = ["bnn_jax.main", *args]
  monkeypatch.setattr(sys, "argv", argv)  # config overrides are read there
  try:
    with pytest.raises(SystemExit) as exit_info:
      main_lib.main(main_lib.parse_flags(argv))
  finally:
    # As a fresh process would be: no values, no `--config.*` override
    # flags (ml_collections defines them while parsing).
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
  return exit_info.value.code, capsys.readouterr().err


@pytest.fixture
def config(digits_data_dir):
  config = digits_config.get_config()
  config.dataset.data_dir = digits_data_dir
  return config


_CLI_ERRORS = [
    ("--config.phases.step1.optimizer.weigth_decay=1",
     "unknown config key 'weigth_decay' in "
     "--config.phases.step1.optimizer.weigth_decay; Did you mean "
     "\"weight_decay\""),
    ("--config.phases.step1.optimizer.learning_rate=-1",
     "learning_rate=-1.0; expected > 0"),
    ("--config.cpu_malloc=reuse_buffers",
     "config.cpu_malloc='reuse_buffers' is not a malloc mode; use 'reuse'"),
]


@pytest.mark.parametrize("override, expected", _CLI_ERRORS)
def test_cli_errors_are_one_line(override, expected, tmp_path, monkeypatch,
                                 capsys, digits_data_dir):
  workdir = tmp_path / "run"
  code, stderr = _main_in_process(
      monkeypatch, capsys, "--config=configs/digits.py", f"--workdir={workdir}",
      f"--config.dataset.data_dir={digits_data_dir}", override)
  assert code == 1
  assert expected in _error_line(stderr)
  assert not workdir.exists() or not any(workdir.iterdir())


def test_cli_missing_config_file(tmp_path, monkeypatch, capsys):
  code, stderr = _main_in_process(monkeypatch, capsys,
                                  "--config=configs/digts.py",
                                  f"--workdir={tmp_path}")
  assert code == 1
  assert "config file 'configs/digts.py' not found" in _error_line(stderr)


def test_cli_file_that_is_not_a_config(tmp_path, monkeypatch, capsys):
  base = os.path.join(REPO, "bnn_jax", "configs", "analysis_base.py")
  # ml_collections loads every config file as module 'config_config' and
  # load_module() re-runs a file in that module if it exists: a fresh
  # process's state, where no earlier config's get_config is left.
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  code, stderr = _main_in_process(monkeypatch, capsys, f"--config={base}",
                                  f"--workdir={tmp_path / 'run'}")
  assert code == 1
  assert _error_line(stderr) == (
      f"error: {base} is not a config file (it defines no get_config()); "
      "pass one of configs/*.py, e.g. --config=configs/digits.py "
      "(`python -m bnn_jax.configs` lists them)")
  assert not (tmp_path / "run").exists()


def test_startup_noise_filter_keeps_warnings_and_errors(capfd, monkeypatch):
  """What C++ writes to file descriptor 2 while TensorFlow is imported:
  its INFO lines are dropped, its W/E lines and anything else kept."""
  monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
  noise = [
      "WARNING: All log messages before absl::InitializeLog() is called "
      "are written to STDERR\n",
      "I0000 00:00:1796643704.439527    2781 port.cc:153] oneDNN custom "
      "operations are on.\n",
      "I1207 11:41:48.461385 140077 cpu_feature_guard.cc:227] This "
      "TensorFlow binary is optimized\n",
      "To enable the following instructions: AVX2 FMA, in other operations"
      "\n"]
  kept = ["W1207 11:41:48.461385 140077 file.cc:1] a real warning\n",
          "E0000 00:00:1.0 1 cuda_dnn.cc:1] a real error\n",
          "Traceback (most recent call last):\n"]
  with cli.filtered_stderr(cli.is_startup_noise):
    for line in noise + kept:
      os.write(2, line.encode())
  assert capfd.readouterr().err == "".join(kept)
  assert not cli.verbose(["main"])
  assert cli.verbose(["main", "--verbose"])
  monkeypatch.setenv(cli.VERBOSE_ENV, "1")
  assert cli.verbose(["main"])


def test_analyze_cli_errors_are_one_line(tmp_path, capsys):
  missing = tmp_path / "nope"
  with pytest.raises(SystemExit) as exit_info:
    analyze.main(["--workdir", str(missing), "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 1
  assert _error_line(capsys.readouterr().err) == (
      f"error: {missing}/metrics.jsonl does not exist; pass a --workdir "
      "written by `python -m bnn_jax.main`")
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_error_of_the_real_program(tmp_path):
  """The same one line from `python -m bnn_jax.main` (absl's app.run)."""
  override, expected = _CLI_ERRORS[0]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.main", "--config=configs/digits.py",
       f"--workdir={tmp_path / 'run'}", override],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert expected in _error_line(proc.stderr)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error, line", [
    (KeyError("unknown key \\'x\\'\\nmore"), "unknown key 'x' more"),
    (ValueError("first\n\n  second\nthird"), "first second"),
    (ValueError(""), "ValueError('')"),
])
def test_one_line(error, line, capsys):
  assert cli.one_line(error) == line
  with pytest.raises(SystemExit) as exit_info:
    with cli.reporting_errors():
      raise error
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == f"error: {line}\n"
  with pytest.raises(type(error)):  # --debug: the traceback
    with cli.reporting_errors(debug=True):
      raise error


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: setattr(c.phases.step1.optimizer, "name", "adamm"),
     r"optimizer.name='adamm'; choose one of \['adam', 'adamw', 'sgd', "
     r"'lamb', 'bop'\]"),
    (lambda c: setattr(c.phases.step1.optimizer, "schedule", "cosin"),
     r"choose one of \['linear_epoch', 'linear', 'cosine', 'constant', "
     r"'step'\]"),
    (lambda c: setattr(c.phases.step1, "num_epochs", -1),
     r"num_epochs=-1 must be an integer >= 0"),
    (lambda c: setattr(c, "cpu_malloc", "big"),
     r"config.cpu_malloc='big' is not a malloc mode; use 'reuse' .* or "
     r"'glibc'"),
    (lambda c: setattr(c.phases.step1.model, "name", "reactnet_b"),
     r"unknown model 'reactnet_b' \(did you mean 'reactnet_a'\?\); choose "
     r"one of \['binary_resnet_e18', 'birealnet18', 'quicknet'"),
    (lambda c: setattr(c.phases.step1.model, "activation_binarizer", "sgn"),
     r"unknown activation binarizer 'sgn'; choose one of \['approx_sign'"),
    (lambda c: setattr(c.phases.step2.model, "kernel_binarizer", "xnor"),
     r"unknown weight binarizer 'xnor'; choose one of "
     r"\['magnitude_aware_sign', 'scaled_sign', 'sign', 'ste_sign'\]"),
    (lambda c: setattr(c, "batch_size", 0),
     r"config.batch_size=0 must be a positive multiple of the device count"),
    (lambda c: setattr(c.model, "bn_group_size", 5),
     r"bn_group_size=5 must divide the per-device batch 8"),
    (lambda c: setattr(c.model, "dtype", "float33"),
     r"config.model.dtype='float33' is not a dtype"),
    (lambda c: setattr(c.phases.step1, "teacher", "step2"),
     r"distils from 'step2', which is not an earlier phase"),
    (lambda c: setattr(c.phases.step1, "teacher", ""),
     r"loss.kd_weight=1.0 but no teacher; set --config.phases.step1.teacher"),
    (lambda c: setattr(c.phases.teacher, "num_epochs", 0),
     r"phase 'teacher' trains 0 epochs and loads nothing"),
    (lambda c: setattr(c.phases.step2, "init_from", "/nonexistent/ckpt"),
     r"init_from='/nonexistent/ckpt' is not a directory"),
    (lambda c: setattr(c, "phase_order", "teacher,stpe1"),
     r"unknown phase\(s\) \['stpe1'\]; defined phases"),
])
def test_validate_names_the_fix(config, mutate, expected, tmp_path):
  # 8 fake devices (conftest): batch 64 is 8 per device.
  mutate(config)
  with pytest.raises(ValueError, match=expected):
    phases.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_global_batch_must_split_over_devices(config, tmp_path):
  config.batch_size = 60  # 8 fake devices
  with pytest.raises(ValueError, match="multiple of the device count 8"):
    phases.validate(config)


def test_missing_dataset_says_how_to_prepare(tmp_path):
  config = digits_config.get_config()
  config.dataset = input_pipeline.default_dataset_config("cifar10")
  config.dataset.data_dir = str(tmp_path)
  with pytest.raises(input_pipeline.DatasetNotFoundError,
                     match=r"tfds build cifar10 --data_dir="):
    phases.validate(config)


def _tiny(config):
  config.batch_size = 128
  config.eval_batch_size = 128
  config.checkpoint_every_steps = 4
  config.phase_order = "teacher"
  config.phases.teacher.num_epochs = 1
  return config


@pytest.mark.slow
def test_workdir_of_another_config_is_refused_then_moved_aside(config,
                                                                tmp_path):
  workdir = str(tmp_path / "run")
  config = _tiny(config)
  first = phases.run(config, workdir)
  before = sorted(os.listdir(workdir))
  other = config.copy_and_resolve_references()
  other.phases.teacher.optimizer.learning_rate = 1e-2
  with pytest.raises(ValueError, match=r"holds a run of a different config "
                     r"\(differs in: phases.teacher.optimizer.learning_rate\)"
                     r"; use a new --workdir, or pass --overwrite"):
    phases.run(other, workdir)
  assert sorted(os.listdir(workdir)) == before  # nothing touched
  # Operational fields may change: the run continues (nothing to do here).
  same = config.copy_and_resolve_references()
  same.log_every_steps = 7
  assert phases.run(same, workdir) == first
  # --overwrite moves the old run aside, never deletes it.
  phases.run(other, workdir, overwrite=True)
  aside = [d for d in os.listdir(tmp_path) if d.startswith("run.replaced-")]
  assert len(aside) == 1
  with open(os.path.join(tmp_path, aside[0], "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(first))


def test_corrupt_checkpoint_is_reported_and_kept(trained_digits, tmp_path):
  """A copy of the shared run whose teacher's last checkpoint is truncated:
  the re-run restores it (a finished phase) and stops naming it."""
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_digits.workdir, workdir)
  config = trained_digits.config
  ckpt_dir = os.path.join(workdir, "teacher", "checkpoints")
  latest = checkpoint_lib.Checkpointer(ckpt_dir).latest_step()
  # Truncate every array file of the latest step.
  state_dir = os.path.join(ckpt_dir, str(latest), "state")
  truncated = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and not name.endswith(".json") and (
          "metadata" not in name):
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        truncated += 1
  assert truncated
  snapshot = {os.path.join(r, n): os.path.getsize(os.path.join(r, n))
              for r, _, fs in os.walk(workdir) for n in fs}
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=rf"checkpoint .*/{latest} is corrupt or "
                     rf"truncated \(.*\); delete .*/{latest} to fall back to "
                     "step"):
    phases.run(config, workdir)
  after = {os.path.join(r, n): os.path.getsize(os.path.join(r, n))
           for r, _, fs in os.walk(workdir) for n in fs}
  assert after == snapshot


def test_load_variables_rejects_foreign_directories(tmp_path):
  with pytest.raises(checkpoint_lib.CheckpointError, match="does not exist"):
    checkpoint_lib.load_variables(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match="holds no bnn_jax checkpoint"):
    checkpoint_lib.load_variables(str(tmp_path / "empty"))


@pytest.mark.slow
def test_nan_stops_with_phase_and_step_and_keeps_good_checkpoint(config,
                                                                 tmp_path):
  workdir = str(tmp_path / "run")
  config = _tiny(config)
  config.checkpoint_every_steps = 1
  opt = config.phases.teacher.optimizer
  # Warm-up from lr 0 (step 1 is harmless and checkpointed), then 1e30.
  opt.name, opt.learning_rate, opt.schedule = "sgd", 1e30, "constant"
  opt.warmup_epochs, opt.weight_decay = 1.0, 0.0
  config.phases.teacher.num_epochs = 2
  with pytest.raises(RuntimeError, match=r"phase 'teacher': loss or gradients "
                     r"became NaN/Inf at step (\d+); the last good checkpoint")\
      as info:
    phases.run(config, workdir)
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "teacher",
                                                  "checkpoints"))
  latest = ckpt.latest_step()
  assert latest is not None and 1 <= latest < bad_step
  variables, _ = checkpoint_lib.load_variables(os.path.join(workdir,
                                                            "teacher"))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
