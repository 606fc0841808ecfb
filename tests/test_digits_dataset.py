"""The `digits` TFDS builder: split sizes, stratification, exact content."""

import hashlib
import os

import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

from bnn_jax.datasets import digits

# sha256 of the sorted records bytes([label]) + image.tobytes() of each split.
_SHA256 = {
    "train": "da26c6d360ad2e913a9202c747c1ca8351a4a7e5fef999525e35a7069216df60",
    "test": "a50ed21907bab28b8df78447e158d162c02af9a4c732ae0e2c6a6fceaf350ae0",
}


@pytest.fixture(scope="module")
def builder(digits_data_dir):
  """The data set built into a fresh data dir (conftest `digits_data_dir`)."""
  return digits.prepare(digits_data_dir)


@pytest.fixture(scope="module")
def splits(builder):
  return {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
          for split in ("train", "test")}


def _records(split):
  return sorted(bytes([label]) + image.tobytes()
                for image, label in zip(split["image"], split["label"]))


def test_builder_metadata(builder):
  assert builder.name == "digits"
  assert str(builder.version) == "1.0.0"
  features = builder.info.features
  assert features["image"].shape == (8, 8, 1)
  assert features["image"].np_dtype == np.uint8
  assert features["label"].num_classes == 10


def test_split_sizes(builder, splits):
  assert builder.info.splits["train"].num_examples == 1437
  assert builder.info.splits["test"].num_examples == 360
  assert splits["train"]["image"].shape == (1437, 8, 8, 1)
  assert splits["test"]["image"].shape == (360, 8, 8, 1)


def test_split_is_stratified(splits):
  test_counts = np.bincount(splits["test"]["label"], minlength=10)
  train_counts = np.bincount(splits["train"]["label"], minlength=10)
  np.testing.assert_array_equal(test_counts,
                                [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])
  np.testing.assert_array_equal(train_counts,
                                [142, 146, 142, 146, 145, 145, 145, 143, 139,
                                 144])
  all_counts = np.bincount(sklearn_datasets.load_digits().target)
  assert np.all(np.abs(test_counts - 360 * all_counts / 1797) <= 1)


def test_content_is_sklearn_digits(splits):
  """Each split holds exactly its rows of load_digits(), pixels mapped."""
  sk = sklearn_datasets.load_digits()
  train_idx, test_idx = digits.split_indices()
  assert len(set(train_idx) | set(test_idx)) == 1797
  assert not set(train_idx) & set(test_idx)
  for name, idx in (("train", train_idx), ("test", test_idx)):
    expected = {"image": digits.to_uint8(sk.images[idx])[..., None],
                "label": sk.target[idx]}
    assert _records(splits[name]) == _records(expected)


def test_content_checksum(splits):
  for name, digest in _SHA256.items():
    assert hashlib.sha256(b"".join(_records(splits[name]))).hexdigest() == (
        digest)


def test_pixel_mapping():
  np.testing.assert_array_equal(
      digits.to_uint8(np.arange(17)),
      [0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207, 223,
       239, 255])


def test_prepare_reuses_the_built_data(builder):
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.stat(os.path.join(builder.data_dir, f)).st_mtime_ns
            for f in files]
  again = digits.prepare(str(builder.data_dir_root))
  assert again.data_dir == builder.data_dir
  assert sorted(os.listdir(again.data_dir)) == files
  assert [os.stat(os.path.join(again.data_dir, f)).st_mtime_ns
          for f in files] == mtimes
  assert set(again.info.splits.keys()) == {"train", "test"}
