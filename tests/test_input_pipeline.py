"""Input pipeline: digits for real, ImageNet and CIFAR-10 under mock_data."""

import collections
import itertools
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest
from sklearn import datasets as sklearn_datasets
import tensorflow as tf
import tensorflow_datasets as tfds

from bnn_jax.datasets import digits
from bnn_jax.training import input_pipeline

# tests/testdata/<name>/<version>/ holds the metadata mock_data needs; its
# splits have this many examples, and mock_data generates this many.
_MOCK_EXAMPLES = 10
_TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")

_DIGITS_MEAN, _DIGITS_STD = 0.30543, 0.37596
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
_IMAGENET_STD = np.array([0.229, 0.224, 0.225])
_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
_CIFAR_STD = np.array([0.2470, 0.2435, 0.2616])


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _to_uint8(images):
  """Digits images back to their stored uint8 pixels."""
  pixels = np.round((images * _DIGITS_STD + _DIGITS_MEAN) * 255)
  np.testing.assert_allclose(pixels, (images * _DIGITS_STD + _DIGITS_MEAN)
                             * 255, atol=1e-2)
  return pixels.astype(np.uint8)


def _records(images, labels):
  return collections.Counter(
      bytes([label]) + image.tobytes() for image, label in zip(images, labels))


# ---------------------------------------------------------------------------
# digits: the real data set, built into a temporary data_dir (conftest).
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_splits(digits_cfg):
  builder = digits.prepare(digits_cfg.data_dir)
  return {split: tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
          for split in ("train", "test")}


def test_default_config_has_every_field():
  cfg = input_pipeline.default_dataset_config("imagenet2012")
  assert cfg.to_dict() == {
      "name": "imagenet2012", "data_dir": None, "train_split": "train",
      "eval_split": "validation", "image_size": None, "augment": True,
      "shuffle_buffer_size": 50_000, "data_service_address": None}
  assert input_pipeline.default_dataset_config("cifar10").eval_split == "test"
  with pytest.raises(ValueError, match="Unknown data set"):
    input_pipeline.default_dataset_config("mnist")


def test_digits_info(digits_cfg):
  info = input_pipeline.get_info(digits_cfg)
  assert info == input_pipeline.DatasetInfo(
      name="digits", num_classes=10, image_shape=(8, 8, 1), num_train=1437,
      num_eval=360)
  assert input_pipeline.steps_per_epoch(info, 64) == 22
  with pytest.raises(ValueError, match="larger than"):
    input_pipeline.steps_per_epoch(info, 2048)


def test_digits_train_batches(digits_cfg):
  batches = _take(input_pipeline.train_iterator(
      digits_cfg, global_batch_size=32, seed=0), 3)
  for batch in batches:
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 8, 8, 1)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,)
    assert batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    lo, hi = -_DIGITS_MEAN / _DIGITS_STD, (1 - _DIGITS_MEAN) / _DIGITS_STD
    assert batch["image"].min() >= lo - 1e-5
    assert batch["image"].max() <= hi + 1e-5


def test_digits_normalisation_constants_are_the_train_statistics(digits_cfg):
  """Over the train split, normalised pixels have mean 0 and std 1."""
  images = np.concatenate([
      b["image"][b["mask"]] for b in input_pipeline.eval_iterator(
          digits_cfg, global_batch_size=500, split="train")])
  assert images.shape == (1437, 8, 8, 1)
  assert abs(images.mean()) < 1e-4
  assert abs(images.std() - 1) < 1e-4
  train_idx, _ = digits.split_indices()
  pixels = digits.to_uint8(
      sklearn_datasets.load_digits().images[train_idx]) / 255
  np.testing.assert_allclose([pixels.mean(), pixels.std()],
                             [_DIGITS_MEAN, _DIGITS_STD], atol=1e-5)


def test_digits_determinism(digits_cfg):
  def run(seed):
    return _take(input_pipeline.train_iterator(
        digits_cfg, global_batch_size=64, seed=seed), 3)
  first = run(0)
  _assert_same_batches(first, run(0))
  other = run(1)
  assert not np.array_equal(first[0]["image"], other[0]["image"])


@pytest.mark.slow
@pytest.mark.parametrize("start_step", [1, 21, 22, 30, 47])
def test_digits_resume(digits_cfg, start_step):
  """start_step=k yields batches k, k+1, ... of the run from step 0."""
  reference = _take(input_pipeline.train_iterator(
      digits_cfg, global_batch_size=64, seed=3), 50)
  resumed = _take(input_pipeline.train_iterator(
      digits_cfg, global_batch_size=64, seed=3, start_step=start_step),
      50 - start_step)
  _assert_same_batches(resumed, reference[start_step:])


def test_digits_epochs_are_fresh_permutations(digits_cfg, digits_splits):
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.augment = False
  batches = _take(input_pipeline.train_iterator(
      cfg, global_batch_size=64, seed=0), 44)
  split = _records(digits_splits["train"]["image"],
                   digits_splits["train"]["label"])
  epochs = []
  for epoch in (batches[:22], batches[22:]):
    images = _to_uint8(np.concatenate([b["image"] for b in epoch]))
    labels = np.concatenate([b["label"] for b in epoch])
    records = _records(images, labels)
    assert sum(records.values()) == 22 * 64
    assert not records - split  # Each example at most once per epoch.
    epochs.append(labels)
  assert not np.array_equal(epochs[0], epochs[1])


def test_digits_augmentation_is_a_shift_of_at_most_one_pixel(digits_cfg):
  """With and without augmentation the same seed gives the same examples."""
  plain_cfg = digits_cfg.copy_and_resolve_references()
  plain_cfg.augment = False
  plain = _take(input_pipeline.train_iterator(
      plain_cfg, global_batch_size=64, seed=5), 2)
  augmented = _take(input_pipeline.train_iterator(
      digits_cfg, global_batch_size=64, seed=5), 2)
  shifts = collections.Counter()
  for p, a in zip(plain, augmented):
    np.testing.assert_array_equal(p["label"], a["label"])
    originals, shifted = _to_uint8(p["image"]), _to_uint8(a["image"])
    for original, image in zip(originals, shifted):
      padded = np.pad(original, ((1, 1), (1, 1), (0, 0)))
      matches = [(dy, dx) for dy in range(3) for dx in range(3)
                 if np.array_equal(padded[dy:dy + 8, dx:dx + 8], image)]
      assert matches, "not a shift by at most one pixel"
      shifts[matches[0]] += 1
  assert len(shifts) == 9  # Every shift occurs among 128 examples.


def test_digits_eval_covers_every_example_once(digits_cfg, digits_splits):
  batches = list(input_pipeline.eval_iterator(digits_cfg,
                                              global_batch_size=64))
  assert len(batches) == 6  # ceil(360 / 64)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.dtype == bool and mask.shape == (384,)
  np.testing.assert_array_equal(mask, np.arange(384) < 360)
  for b in batches:
    assert b["image"].shape == (64, 8, 8, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32
  images = _to_uint8(np.concatenate([b["image"] for b in batches]))[mask]
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert _records(images, labels) == _records(digits_splits["test"]["image"],
                                              digits_splits["test"]["label"])
  assert len(list(input_pipeline.eval_iterator(
      digits_cfg, global_batch_size=7))) == 52  # ceil(360 / 7)


def test_digits_image_size_resizes(digits_cfg):
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.image_size = 16
  assert input_pipeline.get_info(cfg).image_shape == (16, 16, 1)
  train = next(input_pipeline.train_iterator(cfg, global_batch_size=8, seed=0))
  test = next(input_pipeline.eval_iterator(cfg, global_batch_size=8))
  assert train["image"].shape == test["image"].shape == (8, 16, 16, 1)


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def test_digits_two_processes_share_the_data(digits_cfg, digits_splits,
                                             monkeypatch):
  """Simulated 2-process run: disjoint train shards, eval exactly once."""
  cfg = digits_cfg.copy_and_resolve_references()
  cfg.augment = False  # To recognise the train examples.
  train, test = collections.Counter(), collections.Counter()
  num_batches = []
  for index in range(2):
    _as_process(monkeypatch, index, 2)
    epoch = _take(input_pipeline.train_iterator(
        cfg, global_batch_size=64, seed=0), 22)
    assert epoch[0]["image"].shape == (32, 8, 8, 1)  # Per-process half.
    train += _records(_to_uint8(np.concatenate([b["image"] for b in epoch])),
                      np.concatenate([b["label"] for b in epoch]))
    # An odd-sized split: the processes read 180 and 179 examples.
    batches = list(input_pipeline.eval_iterator(
        cfg, global_batch_size=64, split="test[:359]"))
    num_batches.append(len(batches))
    mask = np.concatenate([b["mask"] for b in batches])
    test += _records(
        _to_uint8(np.concatenate([b["image"] for b in batches]))[mask],
        np.concatenate([b["label"] for b in batches])[mask])
  assert num_batches == [6, 6]  # ceil(180 / 32) on both.
  assert sum(train.values()) == 22 * 64
  assert not train - _records(digits_splits["train"]["image"],
                              digits_splits["train"]["label"])
  assert sum(test.values()) == 359
  assert not test - _records(digits_splits["test"]["image"],
                             digits_splits["test"]["label"])
  with pytest.raises(ValueError, match="not divisible"):
    input_pipeline.train_iterator(cfg, global_batch_size=63, seed=0)


def test_digits_sharded_batches_are_global_arrays(digits_cfg):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  plain = next(input_pipeline.train_iterator(
      digits_cfg, global_batch_size=16, seed=0))
  sharded = next(input_pipeline.train_iterator(
      digits_cfg, global_batch_size=16, seed=0, sharding=sharding))
  eval_batch = next(input_pipeline.eval_iterator(
      digits_cfg, global_batch_size=16, sharding=sharding))
  for batch, reference in ((sharded, plain), (eval_batch, None)):
    for key, value in batch.items():
      assert isinstance(value, jax.Array)
      assert value.sharding == sharding
      assert value.shape[0] == 16
      assert len(value.addressable_shards) == 8
      assert value.addressable_shards[0].data.shape[0] == 2
      if reference is not None:
        np.testing.assert_array_equal(np.asarray(value), reference[key])
  assert sharded["image"].shape == (16, 8, 8, 1)
  assert eval_batch["mask"].dtype == bool


@pytest.mark.parametrize("name,hint", [
    ("cifar10", "tfds build cifar10 --data_dir={}"),
    ("imagenet2012", "{}/downloads/manual/"),
])
def test_missing_dataset_says_how_to_prepare_it(tmp_path, name, hint):
  cfg = input_pipeline.default_dataset_config(name)
  cfg.data_dir = str(tmp_path)
  for call in (lambda: input_pipeline.get_info(cfg),
               lambda: input_pipeline.train_iterator(
                   cfg, global_batch_size=8, seed=0),
               lambda: input_pipeline.eval_iterator(cfg, global_batch_size=8)):
    with pytest.raises(input_pipeline.DatasetNotFoundError) as error:
      call()
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "\n" not in message
    assert f"{name} is not prepared in {tmp_path}" in message
    assert hint.format(tmp_path) in message


# ---------------------------------------------------------------------------
# imagenet2012 and cifar10 under tfds.testing.mock_data.
# ---------------------------------------------------------------------------
@pytest.fixture
def mock_tfds():
  with tfds.testing.mock_data(num_examples=_MOCK_EXAMPLES, data_dir=_TESTDATA,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield


_MOCKED = {  # name: (config overrides, image shape, mean, std)
    "imagenet2012": ({"image_size": 16}, (16, 16, 3), _IMAGENET_MEAN,
                     _IMAGENET_STD),
    "cifar10": ({}, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD),
}


def _mocked_cfg(name, **overrides):
  cfg = input_pipeline.default_dataset_config(name)
  cfg.update({**_MOCKED[name][0], **overrides})
  return cfg


@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize("name", list(_MOCKED))
def test_mocked_end_to_end(name):
  _, shape, mean, std = _MOCKED[name]
  cfg = _mocked_cfg(name)
  info = input_pipeline.get_info(cfg)
  assert info.image_shape == shape
  assert (info.num_train, info.num_eval) == (_MOCK_EXAMPLES, _MOCK_EXAMPLES)
  assert info.num_classes == (1000 if name == "imagenet2012" else 10)
  lo, hi = -mean / std - 1e-5, (1 - mean) / std + 1e-5
  train = _take(input_pipeline.train_iterator(
      cfg, global_batch_size=4, seed=0), 5)  # Two and a half epochs.
  for batch in train:
    assert batch["image"].shape == (4, *shape)
    assert batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert np.all((batch["label"] >= 0) & (batch["label"] < info.num_classes))
    assert np.all((batch["image"] >= lo) & (batch["image"] <= hi))
  evals = list(input_pipeline.eval_iterator(cfg, global_batch_size=4))
  assert [int(b["mask"].sum()) for b in evals] == [4, 4, 2]
  for batch in evals:
    assert batch["image"].shape == (4, *shape)
    assert batch["image"].dtype == np.float32
    assert batch["mask"].dtype == bool
    assert np.all((batch["image"] >= lo) & (batch["image"] <= hi))
  # Same seed, same batches; another seed, other batches.
  _assert_same_batches(train, _take(input_pipeline.train_iterator(
      cfg, global_batch_size=4, seed=0), 5))
  other = next(input_pipeline.train_iterator(cfg, global_batch_size=4, seed=1))
  assert not np.array_equal(train[0]["image"], other["image"])
  # Evaluation is deterministic too.
  _assert_same_batches(evals, list(input_pipeline.eval_iterator(
      cfg, global_batch_size=4)))


@pytest.mark.slow
@pytest.mark.usefixtures("mock_tfds")
@pytest.mark.parametrize("name", list(_MOCKED))
@pytest.mark.parametrize("shuffle_buffer_size", [None, 3])
def test_mocked_resume(name, shuffle_buffer_size):
  """Both shuffles (whole split cached; window + file order) resume exactly."""
  cfg = _mocked_cfg(name, shuffle_buffer_size=shuffle_buffer_size)
  reference = _take(input_pipeline.train_iterator(
      cfg, global_batch_size=4, seed=7), 6)
  for start_step in (1, 3):
    _assert_same_batches(
        _take(input_pipeline.train_iterator(
            cfg, global_batch_size=4, seed=7, start_step=start_step),
            6 - start_step),
        reference[start_step:])


@pytest.mark.usefixtures("mock_tfds")
def test_cifar10_augmentation_is_a_shift_and_a_flip():
  """Pad 4 + random 32 x 32 crop + random flip of the unaugmented image."""
  def pixels(batches):
    images = np.concatenate([b["image"] for b in batches])
    return np.round((images * _CIFAR_STD + _CIFAR_MEAN) * 255).astype(np.uint8)
  plain = _take(input_pipeline.train_iterator(
      _mocked_cfg("cifar10", augment=False), global_batch_size=4, seed=2), 5)
  augmented = _take(input_pipeline.train_iterator(
      _mocked_cfg("cifar10"), global_batch_size=4, seed=2), 5)
  flips = collections.Counter()
  for original, image in zip(pixels(plain), pixels(augmented)):
    padded = np.pad(original, ((4, 4), (4, 4), (0, 0)))
    matches = [flip for dy in range(9) for dx in range(9) for flip in (0, 1)
               if np.array_equal(
                   padded[dy:dy + 32, dx:dx + 32][:, ::1 - 2 * flip], image)]
    assert matches, "not a shifted (and maybe mirrored) copy"
    flips[matches[0]] += 1
  assert flips[0] and flips[1]


def _mock_imagenet_of(image):
  """mock_data whose every imagenet2012 example is `image`, label 7."""
  jpeg = tf.io.encode_jpeg(image, quality=100, chroma_downsampling=False)

  def as_dataset(self, split, **kwargs):
    del self, split, kwargs
    return tf.data.Dataset.from_tensors({
        "image": jpeg, "label": tf.constant(7, tf.int64),
        "file_name": tf.constant("x.JPEG")}).repeat(_MOCK_EXAMPLES)

  return tfds.testing.mock_data(
      num_examples=_MOCK_EXAMPLES, data_dir=_TESTDATA,
      policy=tfds.testing.MockPolicy.USE_FILES, as_dataset_fn=as_dataset)


def test_imagenet_train_crop_follows_the_spec():
  """Random-resized crops: area 8%-100%, aspect 3/4-4/3, random flips.

  The image is 100 x 100 with red = 2 x and green = 2 y. A crop of w x h
  pixels resized to 16 x 16 is again a ramp, with slope 2 w / 16 (red, along
  columns; negative when flipped) and 2 h / 16 (green, along rows).
  """
  y, x = np.mgrid[:100, :100]
  image = np.stack([2 * x, 2 * y, np.zeros_like(x)], -1).astype(np.uint8)
  with _mock_imagenet_of(image):
    batches = _take(input_pipeline.train_iterator(
        _mocked_cfg("imagenet2012"), global_batch_size=4, seed=0), 5)
  pixels = np.concatenate([b["image"] for b in batches])
  pixels = (pixels * _IMAGENET_STD + _IMAGENET_MEAN) * 255
  inner = np.arange(2, 14)  # Away from the antialiasing at the crop edges.
  widths = np.polyfit(inner, pixels[:, 8, 2:14, 0].T, 1)[0] * 16 / 2
  heights = np.polyfit(inner, pixels[:, 2:14, 8, 1].T, 1)[0] * 16 / 2
  assert np.all(heights > 0)
  assert 0 < np.sum(widths < 0) < len(widths)  # Both flip states occur.
  widths = np.abs(widths)
  area, aspect = widths * heights / 100**2, widths / heights
  assert np.all((area > 0.08 - 0.02) & (area < 1 + 0.02)), area
  assert np.all((aspect > 3 / 4 - 0.05) & (aspect < 4 / 3 + 0.05)), aspect
  assert area.min() < 0.2 and area.max() > 0.6  # Crops vary in size.


@pytest.mark.parametrize("portrait", [False, True])
def test_imagenet_eval_resizes_the_short_side_and_crops_the_centre(portrait):
  """Short side to 18 (= round(16 * 256 / 224)), then the central 16 x 16.

  The image is a 60 x 120 grey ramp, pixel = 2 * x along the long side (or
  its transpose). Resized to 18 x 36 (scale 0.3) and cropped at offsets
  (1, 10), output column j samples x = (10 + j + 0.5) / 0.3 - 0.5 (half-pixel
  centres); a linear ramp stays linear under the antialiasing filter.
  """
  ramp = np.broadcast_to(2 * np.arange(120)[None, :, None], (60, 120, 3))
  image = ramp.astype(np.uint8)
  if portrait:
    image = image.transpose(1, 0, 2)
  with _mock_imagenet_of(image):
    batch = next(input_pipeline.eval_iterator(
        _mocked_cfg("imagenet2012"), global_batch_size=4))
  pixels = batch["image"] * _IMAGENET_STD + _IMAGENET_MEAN
  assert pixels.shape == (4, 16, 16, 3)
  expected = 2 * ((10 + np.arange(16) + 0.5) / 0.3 - 0.5) / 255
  expected = np.broadcast_to(expected[None, :, None], (16, 16, 3))
  if portrait:
    expected = expected.transpose(1, 0, 2)
  np.testing.assert_allclose(pixels, np.broadcast_to(expected, pixels.shape),
                             atol=2 / 255)
  np.testing.assert_array_equal(batch["label"], 7)
