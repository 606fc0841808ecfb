"""Seeds come from a phase's name, not its position in `phase_order`."""

import jax
import numpy as np
import pytest

from bnn_jax.training import loop
from bnn_jax.training import phases
from configs import digits as digits_config


def test_phase_seeds_depend_on_name_and_seed_only():
  key_a, data_a = loop.phase_seeds(0, "step2")
  key_b, data_b = loop.phase_seeds(0, "step2")
  assert data_a == data_b
  np.testing.assert_array_equal(jax.random.key_data(key_a),
                                jax.random.key_data(key_b))
  assert len({loop.phase_seeds(s, n)[1] for s in (0, 1)
              for n in ("teacher", "step1", "step2")}) == 6


@pytest.mark.slow
def test_a_phase_run_alone_trains_as_within_the_whole_run(tmp_path):
  """`other` (a second teacher) after `teacher`, and alone: same bits."""
  config = digits_config.get_config()
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.dataset.train_split = "train[:128]"
  config.dataset.eval_split = "test[:64]"
  config.batch_size = 64  # 2 steps.
  config.eval_batch_size = 64
  config.phases.teacher.num_epochs = 1
  config.phases.other = config.phases.teacher.copy_and_resolve_references()
  config.phase_order = "teacher,other"
  both = phases.run(config, str(tmp_path / "both"))
  config.phase_order = "other"
  alone = phases.run(config, str(tmp_path / "alone"))
  assert alone["other"]["params_sha256"] == both["other"]["params_sha256"]
  # Different names, different seeds: the two teachers differ.
  assert both["teacher"]["params_sha256"] != both["other"]["params_sha256"]
