"""Input-pipeline throughput: images/s per host for ImageNet-sized JPEGs.

  python -m bnn_jax.benchmark_input [--data_dir=/tmp/bnn_jax_synthetic_imagenet]
      [--num_train=2048] [--num_validation=1024] [--batch_size=256]
      [--batches=40] [--shuffle_buffer_size=512] [--cpus=N] [--json]
      [--levers [--rounds=5]]

Measures `input_pipeline.train_iterator` and `eval_iterator` for
`imagenet2012`, exactly as training runs them on one host (numpy batches, no
accelerator), on synthetic data written once into `--data_dir` as a real
TFDS `imagenet2012` data set (same name, version 5.1.0, features and
TFRecord files; `SyntheticImagenet`):

* JPEGs of ImageNet's typical sizes (short side 333-480, long side 375-640,
  both orientations; 0.2 MP mean), quality 90, content with detail at
  several scales plus sensor-like noise, so that files have ImageNet's
  bytes per pixel (mean size and resolution are printed; ImageNet's train
  set: ~110 KB, ~0.18 MP).
* labels uniform over the 1000 classes.

Train: the reference recipe (docs/recipe.md#data: fused decode + random-resized
crop, resize to 224, flip, normalise). The default shuffle buffer (512) is
smaller than the split, so every epoch re-reads the TFRecord files in a new
order with a window shuffle: ImageNet's path (per-host shards). The first
`--warmup` batches (start-up, tf.data autotuning) are not timed; then
`--batches` batches are. Eval: resize-256 + centre-crop 224 passes over the
validation split, after one untimed pass.

`--cpus=N` pins the process to N of its CPUs before TensorFlow starts, so
tf.data's thread pool (sized by the CPUs it may use) has N threads: run it
with 1, 2, ... to see how the pipeline scales with host cores.

`--levers` times the train recipe's per-example preprocessing against
variants that each change one thing (resize without antialiasing, libjpeg's
fast IDCT, uint8 output, tf.data threading and optimisation options, the
JPEG crop-decode alone), in interleaved rounds (`lever_rates`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from typing import Iterator

# Before TensorFlow is imported: keep it quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("data_dir", "/tmp/bnn_jax_synthetic_imagenet",
                      "TFDS data dir; the synthetic imagenet2012 is written "
                      "there once (reused while its sizes match).")
  flags.DEFINE_integer("num_train", 2048, "Synthetic train images.")
  flags.DEFINE_integer("num_validation", 1024, "Synthetic validation images.")
  flags.DEFINE_integer("batch_size", 256, "Images per batch (one host).")
  flags.DEFINE_integer("image_size", 224, "Model input size.")
  flags.DEFINE_integer("warmup", 5, "Train batches before timing.")
  flags.DEFINE_integer("batches", 40, "Timed train batches.")
  flags.DEFINE_integer("eval_passes", 2, "Timed passes over validation.")
  flags.DEFINE_integer("shuffle_buffer_size", 512, "Train shuffle buffer "
                       "(smaller than the split: ImageNet's file-order + "
                       "window shuffle path).")
  flags.DEFINE_integer("cpus", None, "Pin to this many CPUs (default: all "
                       "this process may use).")
  flags.DEFINE_bool("levers", False, "Instead: time the train recipe's "
                    "per-example preprocessing against variants (cheaper "
                    "resize, IDCT, uint8 output, tf.data options), in "
                    "interleaved rounds.")
  flags.DEFINE_integer("rounds", 5, "Interleaved rounds of --levers.")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")

# (height, width) of common ImageNet photos, both orientations.
_SIZES = ((375, 500), (500, 375), (333, 500), (500, 333), (480, 640),
          (640, 480), (400, 500), (500, 400), (450, 600), (375, 375))


def synthetic_jpeg(rng: np.random.Generator, height: int, width: int,
                   quality: int = 90) -> bytes:
  """A photo-like random RGB image, JPEG-encoded.

  Pixels: 128 + colour fields at four scales (random 4x4, 16x16, 64x64 and
  256x256 grids upsampled bicubically, amplitudes 60, 30, 30, 30) +
  Gaussian noise (std 10), clipped to 0..255. At quality 90 that is about
  0.6 bytes per pixel, ImageNet's average (~110 KB for ~0.18 MP), so
  reading and entropy decoding cost what they cost on ImageNet; flat images
  would be far smaller, white noise far bigger.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image = np.full((height, width, 3), 128.0, np.float32)
  for cells, amplitude in ((4, 60.0), (16, 30.0), (64, 30.0), (256, 30.0)):
    grid = rng.normal(size=(1, cells, cells, 3)).astype(np.float32)
    image += amplitude * tf.image.resize(grid, (height, width),
                                         method="bicubic")[0].numpy()
  image += rng.normal(scale=10.0, size=image.shape).astype(np.float32)
  pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return tf.io.encode_jpeg(pixels, quality=quality).numpy()


def _synthetic_builder_class():
  """`SyntheticImagenet`, defined once TensorFlow Datasets is imported."""
  from tensorflow_datasets.datasets.imagenet2012 import (  # pylint: disable=g-import-not-at-top
      imagenet2012_dataset_builder)

  class SyntheticImagenet(imagenet2012_dataset_builder.Builder,
                          skip_registration=True):
    """`imagenet2012` (name, version, features) filled with synthetic JPEGs.

    Written with TFDS's own writer into `<data_dir>/imagenet2012/5.1.0`, so
    `tfds.builder('imagenet2012', data_dir=...)` and the input pipeline read
    it as the real data set.
    """
    name = "imagenet2012"  # Not the class name: the real data set's.
    MANUAL_DOWNLOAD_INSTRUCTIONS = None

    def __init__(self, *, num_train: int, num_validation: int,
                 seed: int = 0, **kwargs):
      self._counts = {"train": num_train, "validation": num_validation}
      self._seed = seed
      super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {split: self._generate_examples(split, count)
              for split, count in self._counts.items()}

    def _generate_examples(self, split: str, count: int
                           ) -> Iterator[tuple[str, dict]]:
      rng = np.random.default_rng([self._seed, split == "train"])
      for i in range(count):
        height, width = _SIZES[rng.integers(len(_SIZES))]
        name = f"synthetic_{split}_{i:07d}.JPEG"
        yield name, {"image": io.BytesIO(synthetic_jpeg(rng, height, width)),
                     "label": int(rng.integers(1000)), "file_name": name}

  return SyntheticImagenet


def prepare(data_dir: str, num_train: int, num_validation: int):
  """The synthetic imagenet2012 in `data_dir`, written unless present.

  Returns:
    The prepared builder.

  Raises:
    ValueError: `data_dir` holds an imagenet2012 of other sizes (a real one
      must not be mistaken for the benchmark's).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  existing = tfds.builder("imagenet2012", data_dir=data_dir)
  if existing.is_prepared():
    splits = existing.info.splits
    sizes = (splits["train"].num_examples, splits["validation"].num_examples)
    if sizes != (num_train, num_validation):
      raise ValueError(
          f"{data_dir} holds an imagenet2012 with {sizes[0]} train / "
          f"{sizes[1]} validation images, not {num_train} / "
          f"{num_validation}; pass another --data_dir")
    return existing
  builder = _synthetic_builder_class()(
      num_train=num_train, num_validation=num_validation, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return tfds.builder("imagenet2012", data_dir=data_dir)


def file_stats(builder) -> dict:
  """Mean JPEG bytes and pixels over the first 200 train images."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = builder.as_dataset(split="train",
                          decoders={"image": tfds.decode.SkipDecoding()})
  sizes, pixels = [], []
  for example in ds.take(200):
    sizes.append(len(example["image"].numpy()))
    shape = tf.image.extract_jpeg_shape(example["image"]).numpy()
    pixels.append(int(shape[0]) * int(shape[1]))
  return {"mean_jpeg_kb": round(float(np.mean(sizes)) / 1024, 1),
          "mean_megapixels": round(float(np.mean(pixels)) / 1e6, 3)}


def measure(data_dir: str, *, batch_size: int, image_size: int, warmup: int,
            batches: int, eval_passes: int,
            shuffle_buffer_size: int) -> dict:
  """Train and eval images/s of the input pipeline on the prepared data."""
  from bnn_jax.training import input_pipeline  # pylint: disable=g-import-not-at-top

  cfg = input_pipeline.default_dataset_config("imagenet2012")
  cfg.data_dir = data_dir
  cfg.image_size = image_size
  cfg.shuffle_buffer_size = shuffle_buffer_size

  train = input_pipeline.train_iterator(cfg, global_batch_size=batch_size,
                                        seed=0)
  for _ in range(warmup):
    next(train)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(train)
  train_seconds = time.perf_counter() - start
  assert batch["image"].shape == (batch_size, image_size, image_size, 3)

  def eval_pass() -> int:
    return sum(int(b["mask"].sum()) for b in input_pipeline.eval_iterator(
        cfg, global_batch_size=batch_size))

  eval_pass()  # Untimed: file cache, start-up.
  start = time.perf_counter()
  eval_images = sum(eval_pass() for _ in range(eval_passes))
  eval_seconds = time.perf_counter() - start
  return {
      "train_images_per_s": round(batches * batch_size / train_seconds, 1),
      "eval_images_per_s": round(eval_images / eval_seconds, 1),
      "train_seconds": round(train_seconds, 2),
      "eval_seconds": round(eval_seconds, 2),
  }


def _lever_variants(image_size: int) -> dict:
  """name -> (per-example fn(encoded, seed), tf.data options or None).

  "recipe" is the train recipe exactly as the pipeline runs it per example
  (fused decode + random-resized crop, antialiased resize, flip, float32
  normalisation); every other variant changes one thing.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bnn_jax.training import preprocess  # pylint: disable=g-import-not-at-top

  recipe = preprocess.get_recipe("imagenet2012")

  def train(**kwargs):
    return lambda encoded, seed: preprocess.normalise(
        recipe.train(encoded, image_size, seed, **kwargs), recipe)

  def uint8_out(encoded, seed):  # What a device-side normalisation needs.
    return tf.cast(tf.round(recipe.train(encoded, image_size, seed) * 255.0),
                   tf.uint8)

  def crop_decode_only(encoded, seed):  # The JPEG work alone.
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    top, left, _ = tf.unstack(begin)
    height, width, _ = tf.unstack(crop_size)
    image = tf.image.decode_and_crop_jpeg(
        encoded, tf.stack([top, left, height, width]), channels=3)
    return tf.reduce_sum(tf.cast(image, tf.int32))  # Keeps it from pruning.

  single_op_thread = tf.data.Options()
  single_op_thread.threading.max_intra_op_parallelism = 1
  no_optimizations = tf.data.Options()
  no_optimizations.experimental_optimization.apply_default_optimizations = (
      False)
  return {
      "recipe": (train(), None),
      "resize_no_antialias": (train(antialias=False), None),
      "jpeg_integer_fast_idct": (train(dct_method="INTEGER_FAST"), None),
      "uint8_output": (uint8_out, None),
      "max_intra_op_parallelism_1": (train(), single_op_thread),
      "no_default_optimizations": (train(), no_optimizations),
      "crop_and_decode_only": (crop_decode_only, None),
  }


def lever_rates(data_dir: str, *, image_size: int, batch_size: int,
                batches: int, rounds: int) -> dict:
  """Train images/s of the per-example recipe and its variants, interleaved.

  The train JPEGs are read into memory once (no file I/O in the timing);
  every variant maps its per-example function over them (parallel,
  deterministic, as the pipeline does), batches and prefetches. Each round
  times every variant once, after 2 untimed batches, so a machine shared
  with other jobs slows all variants alike within a round.

  Returns:
    {variant: {"images_per_s": median over rounds, "vs_recipe": median
    over rounds of (variant rate / recipe rate) in the same round}}.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  encoded = [example["image"] for example in tfds.as_numpy(
      builder.as_dataset(split="train",
                         decoders={"image": tfds.decode.SkipDecoding()}))]
  records = tf.data.Dataset.from_tensor_slices(encoded).cache()
  rates: dict[str, list[float]] = {}
  for _ in range(rounds):
    for name, (fn, options) in _lever_variants(image_size).items():
      ds = tf.data.Dataset.zip(
          records.repeat(),
          tf.data.Dataset.range(1 << 62).map(lambda i: tf.stack([i, i])))
      ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
      if options is not None:
        ds = ds.with_options(options)
      iterator = iter(ds.as_numpy_iterator())
      for _ in range(2):
        next(iterator)
      start = time.perf_counter()
      for _ in range(batches):
        next(iterator)
      rates.setdefault(name, []).append(
          batches * batch_size / (time.perf_counter() - start))
  base = np.array(rates["recipe"])
  return {name: {"images_per_s": round(float(np.median(r)), 1),
                 "vs_recipe": round(float(np.median(np.array(r) / base)), 3)}
          for name, r in rates.items()}


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.cpus is not None:
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= FLAGS.cpus <= len(available):
      raise app.UsageError(f"--cpus={FLAGS.cpus}: this process may use "
                           f"{len(available)} CPUs")
    os.sched_setaffinity(0, available[:FLAGS.cpus])
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (after pinning)

  tf.config.set_visible_devices([], "GPU")
  builder = prepare(FLAGS.data_dir, FLAGS.num_train, FLAGS.num_validation)
  if FLAGS.levers:
    levers = lever_rates(FLAGS.data_dir, image_size=FLAGS.image_size,
                         batch_size=FLAGS.batch_size, batches=FLAGS.batches,
                         rounds=FLAGS.rounds)
    if FLAGS.json:
      print(json.dumps({"cpus_used": len(os.sched_getaffinity(0)),
                        "levers": levers}))
      return
    print(f"train preprocessing levers on {len(os.sched_getaffinity(0))} "
          f"CPUs (median of {FLAGS.rounds} interleaved rounds):")
    for name, row in levers.items():
      print(f"  {name:28s} {row['images_per_s']:8.1f} images/s  "
            f"{row['vs_recipe']:.3f}x the recipe")
    return
  result = {
      "host": platform.node(),
      "cpu": platform.processor() or platform.machine(),
      "cpus_used": len(os.sched_getaffinity(0)),
      "cpus_on_machine": os.cpu_count(),
      "batch_size": FLAGS.batch_size,
      "image_size": FLAGS.image_size,
      "shuffle_buffer_size": FLAGS.shuffle_buffer_size,
      "num_train": FLAGS.num_train,
      "num_validation": FLAGS.num_validation,
      **file_stats(builder),
      **measure(FLAGS.data_dir, batch_size=FLAGS.batch_size,
                image_size=FLAGS.image_size, warmup=FLAGS.warmup,
                batches=FLAGS.batches, eval_passes=FLAGS.eval_passes,
                shuffle_buffer_size=FLAGS.shuffle_buffer_size),
  }
  if FLAGS.json:
    print(json.dumps(result))
    return
  print(f"input pipeline, imagenet2012 (synthetic JPEGs: "
        f"{result['mean_jpeg_kb']} KB, {result['mean_megapixels']} MP mean) "
        f"on {result['cpus_used']} of {result['cpus_on_machine']} CPUs:")
  print(f"  train (decode+random-resized-crop {FLAGS.image_size}, flip): "
        f"{result['train_images_per_s']} images/s")
  print(f"  eval  (decode+resize+centre-crop {FLAGS.image_size}):  "
        f"{result['eval_images_per_s']} images/s")


