"""A packed ReActNet-A as a Larq model, converted to TFLite with LCE binary ops.

Runs in the LCE environment (`bash tools/make_lce_env.sh`: TensorFlow 2.16,
tf-keras, Larq, larq-compute-engine 0.16, numpy < 2), not in bnn_jax's own:
`python -m bnn_jax.export --format=lce` calls it as

  LCE_PYTHON -m bnn_jax.export_lce --packed=FILE --out=MODEL.tflite \
      [--check=CHECK.npz]

It reads the packed file with numpy alone (the format is in
docs/deploy.md; no JAX here), rebuilds the network with tf.keras and
`larq.layers.QuantConv2D`, sets the weights, converts it with
`larq_compute_engine.convert_keras_model` and, with `--check`, runs the
.tflite in LCE's interpreter on the check file's images and compares with
its logits (those of bnn_jax's packed forward). Prints one JSON line.

Mapping (ReActNet-A family: reactnet_a, reactnet_a_cifar, reactnet_small):

* binary conv: `QuantConv2D(input_quantizer='ste_sign',
  kernel_quantizer='ste_sign', padding='same', pad_values=0)` on the +-1
  kernel unpacked from the bits (becomes LceQuantize + LceBconv2d), then the
  per-output-channel scale alpha as a multiplication (which LCE fuses into
  the bconv's output transform with the folded BatchNorm).
* maps smaller than the kernel (2x2 maps under a 3x3 conv: the last
  blocks at 8x8 or 32x32 input): LCE 0.16's zero-padding correction gives
  wrong sums there (measured), so such a conv runs as one 1x1 LceBconv2d
  over the flattened map (`small_map_kernel`), which needs no padding.
* stride-2 3x3 binary convs: TensorFlow's 'same' padding is asymmetric for
  stride 2 (nothing on top/left), the reference's is 1 on every side, so
  they run at stride 1 and keep every other row and column: the same
  outputs, 4x the work of those (4) layers.
* folded BatchNorm, shifts: per-channel multiply / add; RPReLU: add,
  `PReLU(shared_axes=[1, 2])`, add; AvgPool 2x2; concatenation; stem
  conv (explicit zero padding for stride 2); global mean; dense.
* sign(0): LCE's LceQuantize gives sign(0) = +1. A packed file with
  activation sign(0) = 0 (a torch import) differs from it at exact-zero
  activations only; the result reports the file's convention.
"""

from __future__ import annotations

import argparse
import json
import os
import re

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Larq needs Keras 2.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from bnn_jax import cli  # noqa: E402

from bnn_jax.deploy.packed_format import read_flat, unpack_kernel  # noqa: E402

REACTNET_A_FAMILY = ("reactnet_a", "reactnet_a_cifar", "reactnet_small")


def small_map_kernel(kernel: np.ndarray, height: int, width: int
                     ) -> np.ndarray:
  """[1, 1, H*W*C, H*W*O]: a 'same' k x k conv on an H x W map as one 1x1 conv.

  When H and W are at most (k - 1) / 2 + 1, every output (i, j) sees every
  input (u, v), through tap (u - i + p, v - j + p), p = (k - 1) / 2, and the
  padded taps only ever meet zeros. On the flattened map
  (index (u * W + v) * C + c):

    K[(u, v, c), (i, j, o)] = kernel[u - i + p, v - j + p, c, o].
  """
  k, _, c, o = kernel.shape
  p = (k - 1) // 2
  dense = np.zeros((height, width, c, height, width, o), np.float32)
  for u in range(height):
    for v in range(width):
      for i in range(height):
        for j in range(width):
          dense[u, v, :, i, j, :] = kernel[u - i + p, v - j + p]
  return dense.reshape(1, 1, height * width * c, height * width * o)


class _Net:
  """Builds the Keras graph of a packed ReActNet-A, layer by layer."""

  def __init__(self, header: dict, arrays: dict[str, np.ndarray]):
    import tensorflow as tf
    self.tf = tf
    self.arrays = arrays
    self.convs = {c["path"]: c for c in header["binary_convs"]}
    self.real_convs = {c["path"]: c for c in header["real_convs"]}
    self.weights: list[tuple[object, list[np.ndarray]]] = []

  def get(self, key: str) -> np.ndarray:
    return self.arrays[key]

  def affine(self, x, multiplier, offset):
    tf = self.tf
    # 1-D constants: LCE fuses them into the bconv's output transform only
    # in that shape.
    if multiplier is not None:
      x = x * tf.constant(multiplier.reshape(-1))
    if offset is not None:
      x = x + tf.constant(offset.reshape(-1))
    return x

  def batch_norm(self, x, path: str):
    return self.affine(x, self.get(f"packed/{path}/multiplier"),
                       self.get(f"packed/{path}/offset"))

  def shift(self, x, path: str):
    return self.affine(x, None, self.get(f"params/{path}/shift"))

  def rprelu(self, x, path: str):
    tf = self.tf
    x = self.affine(x, None, self.get(f"params/{path}/shift_in"))
    prelu = tf.keras.layers.PReLU(shared_axes=[1, 2])
    x = prelu(x)
    self.weights.append((prelu, [self.get(f"params/{path}/slope").reshape(
        1, 1, -1)]))
    return self.affine(x, None, self.get(f"params/{path}/shift_out"))

  def binary_conv(self, x, path: str):
    import larq
    tf = self.tf
    conv = self.convs[path]
    k, s = conv["kernel_size"], conv["strides"]
    p = (k - 1) // 2
    if conv["padding"] != p:
      raise ValueError(f"{path}: padding {conv['padding']} is not 'same'")
    kernel = unpack_kernel(self.get(f"packed/{path}/weight_bits"),
                           conv["in_channels"])
    height, width = int(x.shape[1]), int(x.shape[2])
    out = conv["out_channels"]
    # LCE 0.16's zero-padding correction gives wrong sums on maps smaller
    # than the kernel (measured: 2x2 inputs to a 3x3 bconv); there the conv
    # runs as one 1x1 bconv over the flattened map (no padding at all).
    small_map = k > 1 and max(height, width) <= p + 1
    if small_map:
      x = tf.keras.layers.Reshape((1, 1, height * width * x.shape[-1]))(x)
      kernel = small_map_kernel(kernel, height, width)
    layer = larq.layers.QuantConv2D(
        kernel.shape[-1], kernel.shape[0], strides=1 if k > 1 else s,
        padding="same", pad_values=0.0, input_quantizer="ste_sign",
        kernel_quantizer="ste_sign", kernel_constraint=None, use_bias=False)
    y = layer(x)
    self.weights.append((layer, [kernel]))
    if small_map:
      y = tf.keras.layers.Reshape((height, width, out))(y)
    if k > 1 and s > 1:  # stride-1 outputs at the stride-s positions
      y = y[:, ::s, ::s, :]
    return self.affine(y, self.get(f"packed/{path}/scale"), None)

  def stem(self, x):
    tf = self.tf
    conv = self.real_convs["stem_conv"]
    kernel = self.get("params/stem_conv/kernel")
    pad = conv["padding"]
    if pad:
      x = tf.keras.layers.ZeroPadding2D(pad)(x)
    layer = tf.keras.layers.Conv2D(kernel.shape[-1], conv["kernel_size"],
                                   strides=conv["strides"], padding="valid",
                                   use_bias=False)
    y = layer(x)
    self.weights.append((layer, [kernel]))
    return self.batch_norm(y, "stem_bn")

  def block(self, x, i: int):
    tf = self.tf
    p = f"block_{i}"
    stride = self.convs[f"{p}/binary_3x3"]["strides"]
    out1 = self.binary_conv(self.shift(x, f"{p}/move11"), f"{p}/binary_3x3")
    out1 = self.batch_norm(out1, f"{p}/bn1")
    shortcut = x
    if stride == 2:
      shortcut = tf.keras.layers.AveragePooling2D(2)(x)
    out1 = self.rprelu(out1 + shortcut, f"{p}/rprelu1")
    out2 = self.shift(out1, f"{p}/move21")
    if f"{p}/binary_pw" in self.convs:
      out2 = self.batch_norm(self.binary_conv(out2, f"{p}/binary_pw"),
                             f"{p}/bn2") + out1
    else:
      down1 = self.batch_norm(self.binary_conv(out2, f"{p}/binary_pw_down1"),
                              f"{p}/bn2_1") + out1
      down2 = self.batch_norm(self.binary_conv(out2, f"{p}/binary_pw_down2"),
                              f"{p}/bn2_2") + out1
      out2 = tf.keras.layers.Concatenate()([down1, down2])
    return self.rprelu(out2, f"{p}/rprelu2")

  def build(self, input_shape: tuple[int, ...]):
    tf = self.tf
    inputs = tf.keras.Input(input_shape)
    x = self.stem(inputs)
    blocks = sorted({int(m.group(1)) for key in self.convs
                     if (m := re.match(r"block_(\d+)/", key))})
    for i in blocks:
      x = self.block(x, i)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    dense = tf.keras.layers.Dense(self.get("params/fc/kernel").shape[-1])
    logits = dense(x)
    self.weights.append((dense, [self.get("params/fc/kernel"),
                                 self.get("params/fc/bias")]))
    model = tf.keras.Model(inputs, logits)
    for layer, values in self.weights:
      layer.set_weights(values)
    return model


def convert(packed_path: str, out: str, check: str | None = None) -> dict:
  """Builds, converts and (with `check`) verifies; returns a JSON summary."""
  header, arrays = read_flat(packed_path)
  name = header["model"]["name"]
  if name not in REACTNET_A_FAMILY:
    raise ValueError(f"the LCE export knows the ReActNet-A family "
                     f"{REACTNET_A_FAMILY}, not {name!r}")
  model = _Net(header, arrays).build(tuple(header["input"]["shape"]))
  return convert_and_check(model, header, out, check)


def convert_and_check(model, header: dict, out: str,
                      check: str | None = None) -> dict:
  """Converts the Keras `model` to LCE's .tflite at `out` (atomically);
  with `check` (an .npz of `images` and the packed forward's `logits`),
  compares the interpreter's logits with them. A JSON summary."""
  import larq_compute_engine as lce

  flatbuffer = lce.convert_keras_model(model)
  with open(out + ".tmp", "wb") as f:
    f.write(flatbuffer)
  os.replace(out + ".tmp", out)
  ops = sorted(op for op in ("LceQuantize", "LceBconv2d", "LceDequantize")
               if op.encode() in flatbuffer)
  result = {"format": "lce", "out": os.path.abspath(out),
            "bytes": len(flatbuffer), "ops": ops,
            "activation_sign_zero_in_file": header["sign_zero"]["activations"],
            "activation_sign_zero_in_lce": 1.0}
  if check:
    from larq_compute_engine.tflite.python.interpreter import Interpreter
    with np.load(check) as data:
      images, want = data["images"], data["logits"]
    keras_logits = model.predict(images, verbose=0)
    got = np.asarray(Interpreter(flatbuffer, num_threads=1).predict(images))
    got = got.reshape(want.shape)
    result.update({
        "examples": int(images.shape[0]),
        "predictions_equal": bool(np.array_equal(got.argmax(-1),
                                                 want.argmax(-1))),
        "prediction_agreement": float(np.mean(got.argmax(-1)
                                              == want.argmax(-1))),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "max_abs_logit": float(np.abs(want).max()),
        "keras_max_abs_logit_diff": float(np.abs(keras_logits - want).max())})
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--packed", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--check", default=None)
  args = parser.parse_args()
  with cli.reporting_errors(errors=(ValueError, KeyError, OSError)):
    result = convert(args.packed, args.out, args.check)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
