"""A packed Larq Zoo model (QuickNet, Bi-Real, ResNetE, Real-to-Binary) as a
.tflite with LCE binary ops, built from Larq Zoo's own Keras definition.

Runs in the LCE environment (tools/make_lce_env.sh, with larq-zoo 2.4.0;
no JAX): `python -m bnn_jax.export --format=lce` calls it for these models as

  LCE_PYTHON -m bnn_jax.export_lce_zoo --packed=FILE --layers=LAYERS.json \
      --out=MODEL.tflite [--check=CHECK.npz]

It builds the Larq Zoo model (`weights=None`, the packed file's input shape
and classes), sets its weights from the packed file, drops the final
softmax (bnn_jax's models end with the logits), converts it with
`larq_compute_engine.convert_keras_model` and, with `--check`, compares the
interpreter's logits with the check file's (bnn_jax's packed forward).
LAYERS.json lists the Keras layers with weights in bnn_jax's call order
({kind, keras_name, path}, `bnn_jax.interop.larq_import.expected_layers`);
they are paired with the built model's layers as the importer pairs them
(per Keras class by the layer's number, or by name for RealToBinaryNet).

Weights (packed file -> Keras):
* binary conv: the +-1 kernel of the bits times the packed scale alpha_o
  (1 for ste_sign, mean |W| for magnitude_aware_sign): the Keras kernel
  quantizer gives back alpha_o * sign, i.e. the packed kernel.
* folded BatchNorm y = x m + o: gamma = m sqrt(1 + eps), beta = o,
  moving mean 0, variance 1; without gamma and beta (QuickNet's stem):
  variance 1 / m^2 - eps, mean -o / m (m > 0 there).
* real convs, depthwise convs (kernel (k, k, 1, C) -> (k, k, C, 1)), PReLU
  slopes, dense layers: the float parameters. QuickNet's blur kernels are
  Larq Zoo's fixed ones.

Parts with no LCE binary equivalent run as TFLite float ops: the real stem
and shortcut convs, QuickNet's depthwise and blur convs, Real-to-Binary's
squeeze-and-excite scaling (two dense layers and a sigmoid per block),
pooling and the classifier. Bi-Real's and ResNetE's binary convs use zero
padding (Larq `pad_values=0`), which LCE 0.16 corrects in its output
transform; on maps smaller than the kernel that correction is wrong
(export_lce.py), so check those models at inputs whose smallest binary-conv
map is at least 3x3 (e.g. 96x96).
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

from bnn_jax.deploy.export_lce import convert_and_check  # noqa: E402
from bnn_jax.deploy.packed_format import read_flat, unpack_kernel  # noqa: E402

_NUMBER = re.compile(r"_\d+$")
NAMED = {"real_to_binary_net": "r2b_bnn_"}


def _constructor(name: str):
  import larq_zoo as lqz
  return {
      "quicknet_small": lqz.sota.QuickNetSmall,
      "quicknet": lqz.sota.QuickNet,
      "quicknet_large": lqz.sota.QuickNetLarge,
      "birealnet18": lqz.literature.BiRealNet,
      "binary_resnet_e18": lqz.literature.BinaryResNetE18,
      "real_to_binary_net": lqz.literature.RealToBinaryNet,
  }[name]


def _number(name: str) -> int:
  m = _NUMBER.search(name)
  return int(m.group()[1:]) if m else 0


def pair_layers(model, layers: list[dict], named: bool) -> list:
  """[(Keras layer, expected entry)]: per class by number, or by name."""
  have = [l for l in model.layers if l.weights]
  if named:
    by_name = {l.name: l for l in have}
    missing = [e["keras_name"] for e in layers if e["keras_name"] not in by_name]
    if missing or len(have) != len(layers):
      raise ValueError(f"the Larq Zoo model's layers differ from the packed "
                       f"model's: missing {missing[:3]}")
    return [(by_name[e["keras_name"]], e) for e in layers]
  groups: dict[str, list] = {}
  for layer in have:
    groups.setdefault(_NUMBER.sub("", layer.name), []).append(layer)
  for group in groups.values():
    group.sort(key=lambda l: _number(l.name))
  pairs = []
  for entry in layers:
    group = groups.get(entry["keras_name"], [])
    if not group:
      raise ValueError(f"the Larq Zoo model has too few {entry['keras_name']} "
                       "layers for the packed model")
    pairs.append((group.pop(0), entry))
  left = [l.name for g in groups.values() for l in g]
  if left:
    raise ValueError(f"Larq Zoo layers left without weights: {left[:3]}")
  return pairs


def keras_weights(layer, entry: dict, header: dict,
                  arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
  """The values of `layer.weights` (in order) from the packed arrays."""
  path = "/".join(entry["path"])
  kind = entry["kind"]
  names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
  convs = {c["path"]: c for c in header["binary_convs"]}
  if kind == "blur":
    return [w.numpy() for w in layer.weights]
  if kind == "binary_conv":
    conv = convs[path]
    kernel = unpack_kernel(arrays[f"packed/{path}/weight_bits"],
                           conv["in_channels"])
    return [kernel * arrays[f"packed/{path}/scale"].reshape(1, 1, 1, -1)]
  if kind == "conv":
    return [arrays[f"params/{path}/kernel"]]
  if kind == "depthwise":
    return [arrays[f"params/{path}/kernel"].transpose(0, 1, 3, 2)]
  if kind == "prelu":
    return [arrays[f"params/{path}/alpha"].reshape(1, 1, -1)]
  if kind == "dense":
    return [arrays[f"params/{path}/{n}"] for n in names]
  if kind == "batch_norm":
    m = arrays[f"packed/{path}/multiplier"].astype(np.float64)
    o = arrays[f"packed/{path}/offset"].astype(np.float64)
    eps = layer.epsilon
    if "gamma" in names:
      values = {"gamma": m * np.sqrt(1.0 + eps), "beta": o,
                "moving_mean": np.zeros_like(m),
                "moving_variance": np.ones_like(m)}
    else:
      values = {"moving_variance": 1.0 / m ** 2 - eps, "moving_mean": -o / m}
    return [np.asarray(values[n], np.float32) for n in names]
  raise ValueError(f"no Keras weights for a {kind} layer")


def build(header: dict, arrays: dict[str, np.ndarray], layers: list[dict]):
  """The Larq Zoo Keras model with the packed weights, ending in the logits."""
  import tensorflow as tf
  name = header["model"]["name"]
  model = _constructor(name)(input_shape=tuple(header["input"]["shape"]),
                             weights=None,
                             num_classes=header["model"]["num_classes"])
  for layer, entry in pair_layers(model, layers, name in NAMED):
    layer.set_weights(keras_weights(layer, entry, header, arrays))
  return tf.keras.Model(model.input, model.layers[-2].output)


def convert(packed_path: str, layers_path: str, out: str,
            check: str | None = None) -> dict:
  """Builds, converts and (with `check`) verifies; returns a JSON summary."""
  header, arrays = read_flat(packed_path)
  with open(layers_path) as f:
    layers = json.load(f)
  model = build(header, arrays, layers)
  return convert_and_check(model, header, out, check)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--packed", required=True)
  parser.add_argument("--layers", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--check", default=None)
  args = parser.parse_args()
  with cli.reporting_errors(errors=(ValueError, KeyError, OSError)):
    result = convert(args.packed, args.layers, args.out, args.check)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
