"""The input benchmark's synthetic ImageNet is read by the real pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from bnn_jax import benchmark_input


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


def test_synthetic_jpeg_decodes_to_its_size():
  jpeg = benchmark_input.synthetic_jpeg(np.random.default_rng(0), 50, 70)
  assert tf.io.decode_jpeg(jpeg).shape == (50, 70, 3)
