"""Test setup: 8 fake CPU devices (set before jax is imported), quiet TF, fast
compiles, the `slow` marker and the fixtures that several files share.

Tiers: `pytest -m "not slow"` is the fast tier (unit tests and one short
end-to-end digits run); `pytest` runs everything, including the tests marked
`@pytest.mark.slow` (several processes, resume after a kill, the notebook,
the launchers, long runs).
"""

import collections
import os

# The repository's root (tests run commands from it, read its files).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Compile time dominates the small shapes used in tests. (tests/test_resume.py
# also checks bitwise resume at the default optimisation level, in
# subprocesses that do not inherit this.)
jax.config.update("jax_disable_most_optimizations", True)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: takes more than a few seconds (several processes, "
      "resume, notebook, launchers, long runs); the fast tier is "
      "`pytest -m \"not slow\"`")


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
  """One TFDS data dir with the digits data set built, for every test."""
  from bnn_jax.datasets import digits  # noqa: PLC0415

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  digits.prepare(data_dir)
  return data_dir


@pytest.fixture(scope="session")
def digits_cfg(digits_data_dir):
  """The digits data set's config (`input_pipeline.default_dataset_config`),
  reading the suite's built data dir. Copy it before changing it."""
  from bnn_jax.training import input_pipeline  # noqa: PLC0415

  cfg = input_pipeline.default_dataset_config("digits")
  cfg.data_dir = digits_data_dir
  return cfg


def tiny_digits_config(data_dir: str):
  """configs/digits.py shortened: 2 + 1 + 1 epochs of 11 steps, a
  quarter-width student at a large lr, weight dynamics every 5 steps."""
  from configs import digits as digits_config  # noqa: PLC0415

  config = digits_config.get_config()
  config.dataset.data_dir = data_dir
  config.batch_size = 128  # 1437 train examples // 128 = 11 steps per epoch
  config.eval_batch_size = 128
  config.log_every_steps = 5
  config.checkpoint_every_steps = 4
  config.dynamics.every = 5
  config.phases.teacher.num_epochs = 2
  for name in ("step1", "step2"):
    config.phases[name].num_epochs = 1
    config.phases[name].model.width_multiplier = 0.25
    # One epoch of 'linear_epoch' is all at lr 0. The latent weights start
    # in U[0, 0.001): at this lr some signs flip within the 10 steps the
    # dynamics tests look at.
    config.phases[name].optimizer.schedule = "constant"
    config.phases[name].optimizer.learning_rate = 0.02
  return config


TrainedRun = collections.namedtuple("TrainedRun", "config workdir results")


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, digits_data_dir) -> TrainedRun:
  """ONE real digits run (teacher -> step1 with KD -> step2 hand-off), shared
  by the training, evaluation, dynamics and analysis tests. Read it, never
  write into its workdir; copy the config before changing it."""
  from bnn_jax.training import phases  # noqa: PLC0415

  workdir = str(tmp_path_factory.mktemp("digits_run"))
  config = tiny_digits_config(digits_data_dir)
  results = phases.run(config, workdir)
  return TrainedRun(config, workdir, results)
