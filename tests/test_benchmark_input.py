"""The input benchmark's synthetic ImageNet is read by the real pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from bnn_jax.tools import benchmark_input


@pytest.mark.slow
def test_synthetic_imagenet_is_an_imagenet2012_for_the_pipeline(tmp_path):
  data_dir = str(tmp_path)
  builder = benchmark_input.prepare(data_dir, num_train=8, num_validation=4)
  assert builder.name == "imagenet2012"
  assert str(builder.version) == "5.1.0"
  assert builder.info.features["label"].num_classes == 1000
  stats = benchmark_input.file_stats(builder)
  # ImageNet's train set: ~110 KB for ~0.18 MP, ~0.6 bytes per pixel.
  bytes_per_pixel = stats["mean_jpeg_kb"] * 1024 / (
      stats["mean_megapixels"] * 1e6)
  assert 0.4 < bytes_per_pixel < 0.9, stats
  assert 0.14 < stats["mean_megapixels"] < 0.31, stats
  result = benchmark_input.measure(
      data_dir, batch_size=4, image_size=32, warmup=1, batches=3,
      eval_passes=1, shuffle_buffer_size=4)
  assert result["train_images_per_s"] > 0
  assert result["eval_images_per_s"] > 0
  # Prepared once; another size is refused rather than mixed up.
  assert benchmark_input.prepare(data_dir, 8, 4).info.splits[
      "train"].num_examples == 8
  with pytest.raises(ValueError, match="8 train / 4 validation images"):
    benchmark_input.prepare(data_dir, num_train=16, num_validation=4)
  levers = benchmark_input.lever_rates(data_dir, image_size=32, batch_size=4,
                                       batches=1, rounds=2)
  assert set(levers) == {
      "recipe", "resize_no_antialias", "jpeg_integer_fast_idct",
      "uint8_output", "max_intra_op_parallelism_1",
      "no_default_optimizations", "crop_and_decode_only"}
  assert levers["recipe"]["vs_recipe"] == 1.0
  assert all(row["images_per_s"] > 0 for row in levers.values())


def test_lever_variants_compute_what_they_say(tmp_path):
  """Same crop and flip: uint8 output is the recipe's pixels rounded, the
  fast IDCT is close, the resize without antialiasing differs."""
  jpeg = benchmark_input.synthetic_jpeg(np.random.default_rng(1), 300, 400)
  seed = tf.constant([5, 9], tf.int64)
  variants = benchmark_input._lever_variants(32)  # pylint: disable=protected-access
  out = {name: fn(tf.constant(jpeg), seed).numpy()
         for name, (fn, _) in variants.items()}
  recipe = out["recipe"]
  assert recipe.shape == (32, 32, 3) and recipe.dtype == np.float32
  # libjpeg's fast IDCT: pixels off by a few levels at most.
  np.testing.assert_allclose(out["jpeg_integer_fast_idct"], recipe,
                             atol=8 / 255 / 0.224)
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(out["uint8_output"] / 255.0, recipe * std + mean,
                             atol=0.5 / 255 + 1e-5)
  assert not np.array_equal(out["resize_no_antialias"], recipe)


def test_synthetic_jpeg_decodes_to_its_size():
  jpeg = benchmark_input.synthetic_jpeg(np.random.default_rng(0), 50, 70)
  assert tf.io.decode_jpeg(jpeg).shape == (50, 70, 3)
