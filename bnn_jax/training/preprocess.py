"""Preprocessing: per-example and per-batch image ops and the data sets' recipes.

Data sets (`dataset_cfg.name`) and their preprocessing
(docs/recipe.md#data). Every image
ends as float32 [H, W, C] = (pixel / 255 - mean) / std, per channel.

* `imagenet2012` (default size 224, eval split `validation`), per example:
  train: fused JPEG decode and random-resized crop: a window is drawn with
    `tf.image.stateless_sample_distorted_bounding_box` (area 8%-100% of the
    image, aspect ratio 3/4-4/3, 10 attempts, else the whole image) and only
    that window is decoded (`tf.image.decode_and_crop_jpeg`); resize to
    image_size x image_size (bilinear, antialiased); random horizontal flip.
    This is torchvision's RandomResizedCrop but for the sampling details: TF
    draws the aspect ratio uniformly (torchvision: log-uniformly) and falls
    back to the whole image (torchvision: to a centre crop).
  eval: decode; resize the short side to image_size * 256 / 224 rounded
    half up (256 at 224) and the long side to int(that * long / short)
    (torchvision's `Resize(int)`); centre crop image_size x image_size
    (torchvision's `CenterCrop`, offsets rounded half to even).
  mean/std (ImageNet): (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
* `cifar10` (default size 32, eval split `test`), per batch (vectorised):
  train: zero-pad 4 pixels on each side, random 32x32 crop, random horizontal
    flip. eval: nothing. Both then resize to image_size if it is not 32.
  mean/std (the CIFAR-10 train set's per-channel statistics):
    (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616).
* `digits` (default size 8, eval split `test`; `bnn_jax.datasets.digits`,
  built into data_dir on first use), per batch (vectorised):
  train: random shift by up to 1 pixel (zero-pad 1, random 8x8 crop), no flip
    (digits are not mirror-symmetric). eval: nothing. Both then resize to
    image_size if it is not 8.
  mean/std (of all pixels of the 1437 train images on [0, 1], population
    std; one channel): (0.30543,) / (0.37596,).

`augment=False` gives the train split the eval preprocessing. The host side
(reading, sharding per process, batching, iterators) is
`bnn_jax.training.input_pipeline`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import ml_collections
from ml_collections import config_dict
import tensorflow as tf
import tensorflow_datasets as tfds

from bnn_jax.datasets import digits

# ---------------------------------------------------------------------------
# Preprocessing. A recipe's `decode` runs once per stored example (its output
# may be cached). `train(images, size, seed)` and `eval(images, size)` take
# one decoded example or, for a `batched` recipe, a batch of them, and return
# float32 in [0, 1] of static shape [(B,) size, size, C]; normalisation
# follows.
# ---------------------------------------------------------------------------
def _to_unit_float(images: tf.Tensor, size: int) -> tf.Tensor:
  """uint8 -> float32 in [0, 1], resized to size x size when it is not."""
  images = tf.cast(images, tf.float32) / 255.0
  if tuple(images.shape[-3:-1]) != (size, size):
    images = tf.image.resize(images, [size, size], method="bilinear",
                             antialias=True)
  return images


def _imagenet_train(encoded: tf.Tensor, size: int, seed: tf.Tensor, *,
                    antialias: bool = True,
                    dct_method: str = "") -> tf.Tensor:
  """Fused decode + random-resized crop, resize, random horizontal flip.

  Args:
    encoded: one JPEG, scalar string.
    size: output size.
    seed: int64 [2].
    antialias: antialiased bilinear resize (the recipe; False only for the
      input benchmark's lever measurements).
    dct_method: libjpeg's IDCT ("" = its accurate default; "INTEGER_FAST"
      only for the lever measurements).
  """
  crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(encoded),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=crop_seed,
      min_object_covered=0.0,  # The area range alone bounds the crop.
      aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  top, left, _ = tf.unstack(begin)
  height, width, _ = tf.unstack(crop_size)
  image = tf.image.decode_and_crop_jpeg(
      encoded, tf.stack([top, left, height, width]), channels=3,
      dct_method=dct_method)
  image = tf.image.resize(image, [size, size], method="bilinear",
                          antialias=antialias) / 255.0
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def _imagenet_eval(encoded: tf.Tensor, size: int) -> tf.Tensor:
  """Decode, resize the short side to size*256/224, centre crop size."""
  image = tf.io.decode_jpeg(encoded, channels=3)
  resize = int(size * 256 / 224 + 0.5)
  height, width = tf.unstack(tf.shape(image)[:2])
  portrait = width <= height
  new_height = tf.where(portrait, resize * height // width, resize)
  new_width = tf.where(portrait, resize, resize * width // height)
  image = tf.image.resize(image, tf.stack([new_height, new_width]),
                          method="bilinear", antialias=True) / 255.0
  top = tf.cast(tf.round(tf.cast(new_height - size, tf.float32) / 2),
                tf.int32)
  left = tf.cast(tf.round(tf.cast(new_width - size, tf.float32) / 2),
                 tf.int32)
  return tf.ensure_shape(image[top:top + size, left:left + size],
                         (size, size, 3))


def _decode_png(encoded: tf.Tensor, *, native: int,
                channels: int) -> tf.Tensor:
  return tf.ensure_shape(tf.io.decode_png(encoded, channels=channels),
                         (native, native, channels))


def _pad_crop_train(images: tf.Tensor, size: int, seed: tf.Tensor, *,
                    pad: int, flip: bool, draws: Optional[int] = None,
                    offset: tf.Tensor | int = 0) -> tf.Tensor:
  """Per example of a batch: zero-pad, random crop back, optional flip.

  Args:
    images: uint8 [B, H, W, C].
    size: output size.
    seed: int64 [2], seeds the draws.
    pad: zero padding on each side (the largest shift).
    flip: random horizontal flips.
    draws: random values are drawn for this many examples (None: B) and
      examples offset..offset + B - 1 of them are used, so a process's rows
      of a global batch get the augmentation of a 1-process run.
    offset: int32 scalar, see `draws`.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
  batch = tf.shape(images)[0]
  draws = batch if draws is None else draws
  _, height, width, _ = images.shape
  offsets = tf.random.stateless_uniform([2, draws], crop_seed,
                                        maxval=2 * pad + 1, dtype=tf.int32)
  offsets = offsets[:, offset:offset + batch]
  padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  images = tf.gather(padded, offsets[0][:, None] + tf.range(height), axis=1,
                     batch_dims=1)
  images = tf.gather(images, offsets[1][:, None] + tf.range(width), axis=2,
                     batch_dims=1)
  if flip:
    mirror = tf.random.stateless_uniform([draws], flip_seed) < 0.5
    mirror = mirror[offset:offset + batch]
    images = tf.where(mirror[:, None, None, None],
                      tf.reverse(images, axis=[2]), images)
  return _to_unit_float(images, size)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one data set is read, augmented and normalised."""
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  decode: Callable[[tf.Tensor], tf.Tensor]
  # Batched recipes also take keyword arguments `draws` and `offset` (see
  # `_pad_crop_train`).
  train: Callable[..., tf.Tensor]
  eval: Callable[[tf.Tensor, int], tf.Tensor]
  batched: bool  # train / eval take batches (cheap ops on small images).
  eval_split: str
  shuffle_buffer_size: Optional[int]
  # Either how to prepare the data by hand (formatted with data_dir) or a
  # function prepare(data_dir, report) that prepares it into data_dir
  # (calling report with one line when it builds) and returns the builder.
  how_to_prepare: str = ""
  prepare: Optional[Callable[..., tfds.core.DatasetBuilder]] = None


RECIPES = {
    "imagenet2012": Recipe(
        image_size=224, channels=3,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        decode=tf.identity,  # JPEG decoding is fused with the train crop.
        train=_imagenet_train, eval=_imagenet_eval, batched=False,
        eval_split="validation", shuffle_buffer_size=50_000,
        how_to_prepare=(
            "download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            "from image-net.org into {data_dir}/downloads/manual/ and run "
            "`tfds build imagenet2012 --data_dir={data_dir}`")),
    "cifar10": Recipe(
        image_size=32, channels=3,
        # Per-channel mean and (population) std of the 50,000 train images.
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
        decode=functools.partial(_decode_png, native=32, channels=3),
        train=functools.partial(_pad_crop_train, pad=4, flip=True),
        eval=_to_unit_float, batched=True,
        eval_split="test", shuffle_buffer_size=None,
        how_to_prepare=(
            "run `tfds build cifar10 --data_dir={data_dir}` on a machine "
            "with internet access (then copy {data_dir}/cifar10 here if "
            "that was another machine)")),
    "digits": Recipe(
        image_size=8, channels=1,
        # Mean and (population) std of all pixels of the 1437 train images
        # on the [0, 1] scale: pixels = digits.to_uint8(load_digits().images)
        # [train_idx] / 255; (pixels.mean(), pixels.std()) =
        # (0.305434, 0.375957). tests/test_input_pipeline.py recomputes them.
        mean=(0.30543,), std=(0.37596,),
        decode=functools.partial(_decode_png, native=8, channels=1),
        train=functools.partial(_pad_crop_train, pad=1, flip=False),
        eval=_to_unit_float, batched=True,
        eval_split="test", shuffle_buffer_size=None,
        prepare=digits.prepare),
}


def get_recipe(name: str) -> Recipe:
  """The recipe of data set `name`; ValueError naming the known ones."""
  if name not in RECIPES:
    raise ValueError(
        f"Unknown data set {name!r}; known: {', '.join(sorted(RECIPES))}.")
  return RECIPES[name]


def default_dataset_config(name: str) -> ml_collections.ConfigDict:
  """The dataset config with every field the pipeline reads, at its default.

  Fields: name; data_dir (None: TFDS's default, `$TFDS_DATA_DIR` or
  `~/tensorflow_datasets`); train_split; eval_split; image_size (None: the
  data set's own, 224 / 32 / 8); augment (train augmentation on/off);
  shuffle_buffer_size (None: the whole per-process train split);
  data_service_address (None: preprocess in this process; 'host:port' of a
  tf.data service dispatcher: the training batches are prepared on its
  workers, the same batches bit for bit, see `bnn_jax.data_service`).

  Args:
    name: 'digits', 'cifar10' or 'imagenet2012'.

  Returns:
    A new ConfigDict.
  """
  recipe = get_recipe(name)
  return ml_collections.ConfigDict({
      "name": name,
      # Typed placeholders (None until set) so --config.dataset.X=... works.
      "data_dir": config_dict.placeholder(str),
      "train_split": "train",
      "eval_split": recipe.eval_split,
      "image_size": config_dict.placeholder(int),
      "augment": True,
      "shuffle_buffer_size": config_dict.FieldReference(
          recipe.shuffle_buffer_size, field_type=int),
      "data_service_address": config_dict.placeholder(str),
  })



def normalise(images: tf.Tensor, recipe: Recipe) -> tf.Tensor:
  """(images - mean) / std, per channel."""
  return (images - tf.constant(recipe.mean)) / tf.constant(recipe.std)
