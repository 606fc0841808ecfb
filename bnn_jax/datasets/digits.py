"""TFDS builder for scikit-learn's 8x8 handwritten digits (`digits`).

The data are the 1797 8x8 grey-level images of `sklearn.datasets.load_digits`
(the UCI "Optical Recognition of Handwritten Digits" test set, 10 classes),
bundled with scikit-learn, so building this data set needs no network.

Split (fixed, stratified by class):

  train_idx, test_idx = sklearn.model_selection.train_test_split(
      np.arange(1797), test_size=360, stratify=target, random_state=0)

gives 1437 train and 360 test examples. Test examples per class 0..9:
[36, 36, 35, 37, 36, 37, 36, 36, 35, 36]; train: [142, 146, 142, 146, 145,
145, 145, 143, 139, 144].

Features:
  image: uint8 (8, 8, 1). scikit-learn's pixels are integers v in 0..16; they
    are stored as round(v * 255 / 16) with halves rounded up, computed as
    `(v * 255 + 8) // 16` (0 -> 0, 1 -> 16, 8 -> 128, 15 -> 239, 16 -> 255).
  label: ClassLabel(num_classes=10), the digit.

Each example's key is its row in `load_digits()`. Use `prepare(data_dir)` to
build the data set into `data_dir` on first use (a no-op when it is there).
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable, Iterator, Optional

import numpy as np
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils as tfds_tqdm

__all__ = ["Digits", "NUM_TEST", "prepare", "split_indices", "to_uint8"]

# Size of the test split; the train split gets the remaining 1797 - 360 = 1437.
NUM_TEST = 360
_SPLIT_SEED = 0

_DESCRIPTION = """\
scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), split into
1437 train / 360 test examples, stratified by class
(`train_test_split(test_size=360, stratify=y, random_state=0)`). Pixels
0..16 are stored as uint8 `(v * 255 + 8) // 16`.
"""

_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}
"""


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Maps scikit-learn digit pixels 0..16 to uint8 0..255, halves rounded up."""
  pixels = np.asarray(pixels).astype(np.int64)
  return ((pixels * 255 + 8) // 16).astype(np.uint8)


def split_indices() -> tuple[np.ndarray, np.ndarray]:
  """Returns the `load_digits()` row indices of the (train, test) splits."""
  target = sklearn_datasets.load_digits().target
  return model_selection.train_test_split(
      np.arange(len(target)), test_size=NUM_TEST, stratify=target,
      random_state=_SPLIT_SEED)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits with a fixed stratified 1437/360 split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/"
                 "sklearn.datasets.load_digits.html",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ship with scikit-learn.
    digits = sklearn_datasets.load_digits()
    images = to_uint8(digits.images)[..., None]
    train_idx, test_idx = split_indices()
    return {
        "train": self._generate_examples(images, digits.target, train_idx),
        "test": self._generate_examples(images, digits.target, test_idx),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         indices: np.ndarray) -> Iterator[tuple[int, dict]]:
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: Optional[str] = None,
            report: Optional[Callable[[str], None]] = None) -> Digits:
  """Builds `digits` into `data_dir` unless it is already there.

  The build is quiet: TFDS's "Downloading and preparing dataset ..." lines
  (nothing is downloaded: the data ship with scikit-learn) and progress
  bars are not shown; `report`, when given, gets one line saying what was
  built where.

  Args:
    data_dir: TFDS data directory; None means TFDS's default
      (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
    report: called with one line after a build (not when already built).

  Returns:
    The prepared builder (call `as_dataset` on it).
  """
  builder = Digits(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  progress_bars = tfds_tqdm._active  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:
    # Several processes sharing `data_dir` (e.g. a multi-process run on one
    # machine) race to rename their build into place; losing is fine.
    if not Digits(data_dir=data_dir).is_prepared():
      raise
  finally:
    tfds.display_progress_bar(progress_bars)
  builder = Digits(data_dir=data_dir)
  if report is not None:
    report(f"digits: built the TFDS data set from scikit-learn's copy "
           f"({builder.info.splits['train'].num_examples} train / "
           f"{builder.info.splits['test'].num_examples} test examples) in "
           f"{builder.data_dir}")
  return builder
