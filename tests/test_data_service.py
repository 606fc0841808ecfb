"""tf.data service on localhost: a dispatcher and two workers.

`python -m bnn_jax.data_service --port=P --workers=2` runs in a subprocess;
the trainer reads its batches through `config.dataset.data_service_address`.
The batches are those of the local pipeline, bit for bit (digits' batched
recipe and ImageNet's per-example JPEG recipe, both shuffles, resumed
runs), and a short digits training run learns from them.
"""

import itertools
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from bnn_jax.training import data_service
from bnn_jax.training import input_pipeline
from bnn_jax.training import phases

from conftest import REPO


def _free_port_block(size: int) -> int:
  """A port p such that p .. p + size - 1 are free now."""
  for _ in range(100):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      base = s.getsockname()[1]
    if base + size >= 65536:
      continue
    try:
      for port in range(base, base + size):
        with socket.socket() as s:
          s.bind(("localhost", port))
      return base
    except OSError:
      continue
  raise RuntimeError("no block of free ports")


@pytest.fixture(scope="module")
def service_address():
  port = _free_port_block(3)
  process = subprocess.Popen(
      [sys.executable, "-m", "bnn_jax.data_service", f"--port={port}",
       "--workers=2", "--host=localhost"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    address = f"localhost:{port}"
    data_service.check_reachable(address, timeout_s=120)
    yield address
  finally:
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  """12 synthetic train JPEGs written as a TFDS imagenet2012."""
  from bnn_jax.tools import benchmark_input  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("imagenet"))
  benchmark_input.prepare(data_dir, num_train=12, num_validation=4)
  return data_dir


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_bad_address_is_one_line():
  for address in ("localhost", "localhost:port", "a b:1", "localhost:70000"):
    with pytest.raises(data_service.DataServiceError,
                       match="is not host:port"):
      data_service.parse_address(address)
  assert data_service.parse_address("grpc://host-1.example:5050") == (
      "host-1.example", 5050)


@pytest.mark.slow
def test_cli_bad_address_is_one_line_before_training(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "bnn_jax.main", "--config=configs/digits.py",
       f"--workdir={workdir}", f"--config.dataset.data_dir={tmp_path}",
       "--config.dataset.data_service_address=dispatcher-host"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert errors == [
      "error: config.dataset.data_service_address='dispatcher-host' is not "
      "host:port (e.g. localhost:5050 or grpc://dispatcher-host:5050)"
  ], proc.stderr
  assert "Traceback" not in proc.stderr
  assert not workdir.exists() or not any(workdir.iterdir())


def test_unreachable_dispatcher_fails_fast(digits_cfg, monkeypatch):
  monkeypatch.setattr(data_service, "CONNECT_TIMEOUT_S", 1.0)  # 10 s in use.
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.data_service_address = f"localhost:{_free_port_block(1)}"
  with pytest.raises(data_service.DataServiceError) as e:
    input_pipeline.train_iterator(cfg, global_batch_size=64, seed=0)
  message = str(e.value)
  assert "\n" not in message
  assert "no tf.data service dispatcher answers at localhost:" in message
  assert "within 1 s" in message  # the patched timeout, not the 10 s one
  assert "python -m bnn_jax.data_service" in message


def test_a_missing_worker_is_an_error_not_a_hang():
  """The dispatcher lists two workers, one runs: step 1 never comes."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  port = _free_port_block(3)
  dispatcher = data_service.start_dispatcher(
      port, [f"localhost:{port + 1}", f"localhost:{port + 2}"])
  worker = data_service.start_worker(port + 1, f"localhost:{port}",
                                     "localhost")
  try:
    steps = tf.data.Dataset.counter()
    numbered = data_service.shard_by_step(tf.data.Dataset.zip(steps, steps))
    batches = data_service.distribute(numbered, f"localhost:{port}",
                                      first_step=0)
    assert next(batches) == 0  # Worker 0's first step.
    with pytest.raises(RuntimeError, match="but not step 1: is every worker"):
      next(batches)
    # A finite job: worker 0 sends steps 0, 2, 4 and then fillers.
    finite = data_service.shard_by_step(
        tf.data.Dataset.zip(steps, steps).take(6))
    batches = data_service.distribute(finite, f"localhost:{port}",
                                      first_step=0, num_batches=6)
    assert next(batches) == 0
    with pytest.raises(RuntimeError, match="filler batches but not step 1"):
      next(batches)
  finally:
    worker.stop()
    dispatcher.stop()


@pytest.mark.slow
@pytest.mark.parametrize("shuffle_buffer_size", [None, 100])
def test_service_batches_are_the_local_batches(digits_cfg, service_address,
                                               shuffle_buffer_size):
  """Cached whole-split shuffle and per-epoch window shuffle, and resume."""
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.shuffle_buffer_size = shuffle_buffer_size
  remote = cfg.copy_and_resolve_references()
  remote.data_service_address = service_address
  # 1437 // 64 = 22 steps per epoch: 25 batches cross into epoch 1.
  local = _take(input_pipeline.train_iterator(
      cfg, global_batch_size=64, seed=3), 25)
  _assert_same_batches(_take(input_pipeline.train_iterator(
      remote, global_batch_size=64, seed=3), 25), local)
  _assert_same_batches(_take(input_pipeline.train_iterator(
      remote, global_batch_size=64, seed=3, start_step=20), 5), local[20:])


@pytest.mark.slow
@pytest.mark.parametrize("shuffle_buffer_size", [None, 4])
def test_service_imagenet_batches_are_the_local_batches(
    service_address, imagenet_dir, shuffle_buffer_size):
  """The per-example recipe (JPEG crops) on the workers: same batches."""
  cfg = input_pipeline.default_dataset_config("imagenet2012")
  cfg.data_dir = imagenet_dir
  cfg.image_size = 24
  cfg.shuffle_buffer_size = shuffle_buffer_size
  remote = cfg.copy_and_resolve_references()
  remote.data_service_address = service_address
  # 12 // 4 = 3 steps per epoch: 5 batches cross into epoch 1.
  local = _take(input_pipeline.train_iterator(
      cfg, global_batch_size=4, seed=1), 5)
  _assert_same_batches(_take(input_pipeline.train_iterator(
      remote, global_batch_size=4, seed=1), 5), local)
  _assert_same_batches(_take(input_pipeline.train_iterator(
      remote, global_batch_size=4, seed=1, start_step=2), 3), local[2:])


@pytest.mark.slow
def test_digits_trains_on_the_service(digits_cfg, service_address, tmp_path):
  """One short phase (a ResNet teacher, 2 epochs) fed by two workers."""
  from configs import digits as digits_config  # pylint: disable=g-import-not-at-top

  config = digits_config.get_config()
  config.dataset.data_dir = digits_cfg.data_dir
  config.dataset.data_service_address = service_address
  config.batch_size = 128
  config.eval_batch_size = 128
  config.log_every_steps = 11
  config.checkpoint_every_steps = 100
  config.phases.teacher.num_epochs = 2
  config.phase_order = "teacher"
  results = phases.run(config, str(tmp_path / "service"))
  assert results["teacher"]["steps"] == 22  # 1437 // 128 = 11 per epoch.
  # The same batches either way: trained on local input instead, the phase
  # ends with bitwise the same parameters and the same test accuracy.
  config.dataset.data_service_address = None
  local = phases.run(config, str(tmp_path / "local"))
  assert local["teacher"]["params_sha256"] == results["teacher"][
      "params_sha256"]
  assert local["teacher"]["top1"] == results["teacher"]["top1"] >= 0.7
