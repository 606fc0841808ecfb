"""`bnn_jax.main --dry_run`: every shipped config, 1 and 8 devices, writes nothing.

One subprocess per device count runs `bnn_jax.main`'s flag parsing and
`_run` for every config file in turn (the command line
`python -m bnn_jax.main --config=configs/X.py --workdir=W --dry_run`
without paying for a fresh interpreter per config), with a TFDS data_dir
($TFDS_DATA_DIR) that holds no data set: the plan's split sizes then come from the known
metadata, and nothing may be created, neither W nor the data_dir.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from bnn_jax.training import topology

from conftest import REPO

# Runs the CLI once per config file; prints one JSON line per config.
_SCRIPT = r"""
import contextlib, io, json, sys
from bnn_jax import main
workdir, paths = sys.argv[1], sys.argv[2:]
for path in paths:
  if main.FLAGS.is_parsed():
    main.FLAGS.unparse_flags()
  sys.argv = ["bnn_jax.main", f"--config={path}", f"--workdir={workdir}",
              "--dry_run"]
  main.parse_flags(sys.argv)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    try:
      code, error = main._run([]), ""
    except ValueError as e:
      code, error = 1, main._one_line(e)
  print(json.dumps({"path": path, "code": code, "error": error,
                    "out": out.getvalue()}), flush=True)
"""


def _config_files():
  """Every config file of configs/ (each re-exports a packaged config)."""
  return [os.path.relpath(path, REPO) for path in
          sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
          if os.path.basename(path) != "__init__.py"]


def _dry_runs(devices, tmp_path, paths):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  workdir, data_dir = tmp_path / "W", tmp_path / "tfds"
  env["TFDS_DATA_DIR"] = str(data_dir)  # TFDS's default data_dir
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(workdir), *paths],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not workdir.exists() and not data_dir.exists()
  results = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith("{")]
  assert [r["path"] for r in results] == paths
  return {os.path.basename(r["path"])[:-3]: r for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 8])
def test_dry_run_passes_for_every_config(devices, tmp_path):
  paths = _config_files()
  assert len(paths) >= 6  # digits*, cifar10, imagenet configs
  results = _dry_runs(devices, tmp_path, paths)
  for name, result in results.items():
    assert result["code"] == 0, (name, result["error"])
    assert f"1 process(es), {devices} cpu device(s)" in result["out"]
    assert "dry run OK: nothing was read or written" in result["out"]

  imagenet = results["adambnn_imagenet"]["out"]
  layout = topology.padded_eval_batch_size(500, devices)
  # 1,281,167 // 256 = 5004 steps per epoch, from the known metadata.
  assert ("train 'train' 1281167 examples, eval 'validation' 50000 examples "
          "(NOT prepared in") in imagenet
  assert (f"train batch: 256 global = {256 // devices} per device x "
          f"{devices} (256 per process); 5004 steps per epoch") in imagenet
  batches = -(-50000 // layout)
  assert (f"eval batch: 500 requested -> {layout} global = "
          f"{layout // devices} per device; {batches} batches per "
          f"evaluation, {batches * layout - 50000} masked fillers") in imagenet
  assert ("[step1] reactnet_a: 29,343,592 params (111.9 MiB)") in imagenet
  assert ("[step2]   256 epochs x 5004 steps = 1281024 steps; adam lr "
          "0.001245 at step 1 -> 0 at step 1281024 (linear_epoch)") in imagenet
  assert "checkpoint every 2000 steps and at the end: 641 saves" in imagenet
  assert ("phase 'teacher' trains 0 epochs and loads nothing: set "
          "--config.phases.teacher.init_from=<checkpoint dir>") in imagenet
  assert "tfds build imagenet2012" in imagenet
  digits = results["digits"]["out"]
  assert "train 'train' 1437 examples, eval 'test' 360 examples" in digits
  assert "22 steps per epoch" in digits
  assert "before the run" not in digits  # digits is built offline


def test_dry_run_refuses_a_batch_that_does_not_split(tmp_path):
  """8 devices (conftest), in-process: the one-line error, nothing written."""
  from configs import digits as digits_config
  from bnn_jax.training import dry_run
  config = digits_config.get_config()
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.batch_size = 60
  with pytest.raises(ValueError, match=r"config.batch_size=60 must be a "
                     r"positive multiple of the device count 8; set "
                     r"--config.batch_size=<multiple of 8> \(e.g. 64"):
    dry_run.run(config, str(tmp_path / "W"))
  config.batch_size = 64
  config.eval_batch_size = 1  # any eval batch runs: rounded up to 8
  assert dry_run.run(config, str(tmp_path / "W")) == 0
  assert os.listdir(tmp_path) == []
