"""Larq Zoo reference models, run inside the Larq environment (no JAX here).

  TF_USE_LEGACY_KERAS=1 LCE_PYTHON tests/larq_zoo_reference.py summary OUT.json
      [MODEL ...]
  TF_USE_LEGACY_KERAS=1 LCE_PYTHON tests/larq_zoo_reference.py save MODEL
      --size=32 --classes=10 --seed=0 --h5=W.h5 --npz=LOGITS.npz

`summary` writes `larq.models.summary`'s counts of each Larq Zoo model
(224x224x3, 1000 classes) as JSON: totals and one row per layer with
weights ({name, class, 1-bit, 32-bit, trainable (as Larq counts: not a
BatchNorm's), 1-bit MACs, 32-bit MACs, weight names}).
tests/testdata/larq_zoo_summaries.json is its output; the bnn_jax tests
read it (and name the headline numbers literally) without this environment.

`save` builds MODEL with weights=None (nothing is downloaded), draws every
trainable weight from N(0, 1) (glorot-scaled for kernels), BatchNorm moving
means from N(0, 0.5^2) and variances from U(0.5, 2) (non-trainable blur
kernels keep their fixed values), writes the weights with
`model.save_weights(W.h5)` and, to LOGITS.npz, fixed N(0, 1) inputs
`images` (NHWC) and the eval-mode `logits` (the classifier's output before
Larq Zoo's softmax).

Requires larq-zoo 2.4.0 (tools/make_lce_env.sh).
"""

import argparse
import json
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import larq as lq  # pylint: disable=g-import-not-at-top
import larq_zoo as lqz
import numpy as np
import tensorflow as tf

CONSTRUCTORS = {
    "quicknet_small": lqz.sota.QuickNetSmall,
    "quicknet": lqz.sota.QuickNet,
    "quicknet_large": lqz.sota.QuickNetLarge,
    "birealnet18": lqz.literature.BiRealNet,
    "binary_resnet_e18": lqz.literature.BinaryResNetE18,
    "real_to_binary_net": lqz.literature.RealToBinaryNet,
}


def build(name, size=224, classes=1000):
  return CONSTRUCTORS[name](input_shape=(size, size, 3), weights=None,
                            num_classes=classes)


def summary_of(name):
  model = build(name)
  profile = lq.models.ModelProfile(model)
  rows = []
  for layer in profile.layer_profiles:
    if not layer.weight_profiles:
      continue
    rows.append({
        "name": layer.name, "class": type(layer._layer).__name__,  # pylint: disable=protected-access
        "binary_params": layer.weight_count(1),
        "real_params": layer.weight_count(32),
        "trainable_params": layer.weight_count(trainable=True),
        "binary_macs": layer.op_count("mac", 1) or 0,
        "real_macs": layer.op_count("mac", 32) or 0,
        "weights": [w.name.split("/")[-1].split(":")[0]
                    for w in layer._layer.weights],  # pylint: disable=protected-access
    })
  return {
      "params": profile.weight_count(),
      "binary_params": profile.weight_count(1),
      "real_params": profile.weight_count(32),
      "trainable_params": profile.weight_count(trainable=True),
      "non_trainable_params": profile.weight_count(trainable=False),
      "binary_macs": profile.op_count("mac", 1),
      "real_macs": profile.op_count("mac", 32),
      "layers": rows,
  }


def write_summaries(path, summaries):
  """JSON with one line per layer row (readable diffs)."""
  lines = ["{"]
  for i, (name, s) in enumerate(summaries.items()):
    totals = {k: v for k, v in s.items() if k != "layers"}
    lines.append(f' "{name}": {json.dumps(totals)[:-1]}, "layers": [')
    lines.append(",\n".join("  " + json.dumps(r) for r in s["layers"]))
    lines.append(" ]}" + ("," if i < len(summaries) - 1 else ""))
  lines.append("}")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def randomize(model, rng):
  for layer in model.layers:
    values = []
    for weight in layer.weights:
      shape, leaf = weight.shape.as_list(), weight.name.split("/")[-1]
      trainable = any(weight is w for w in layer.trainable_weights)
      if not trainable and "moving" not in leaf:
        values.append(weight.numpy())  # a fixed kernel (QuickNet's blur)
      elif "moving_mean" in leaf:
        values.append(rng.normal(0, 0.5, shape))
      elif "moving_variance" in leaf:
        values.append(rng.uniform(0.5, 2.0, shape))
      elif "gamma" in leaf:
        values.append(rng.uniform(0.5, 1.5, shape))
      elif len(shape) > 1:  # a kernel: glorot-scaled so activations stay O(1)
        fan_in = int(np.prod(shape[:-1]))
        if "depthwise" in leaf:
          fan_in = shape[0] * shape[1]
        values.append(rng.normal(0, 1, shape) * np.sqrt(2.0 / fan_in))
      else:
        values.append(rng.normal(0, 0.5, shape))
    if values:
      layer.set_weights([np.asarray(v, np.float32) for v in values])


def save(name, size, classes, seed, h5, npz):
  model = build(name, size, classes)
  rng = np.random.default_rng(seed)
  randomize(model, rng)
  model.save_weights(h5)
  logits_model = tf.keras.Model(model.input, model.layers[-2].output)
  images = rng.normal(size=(4, size, size, 3)).astype(np.float32)
  logits = logits_model(images, training=False).numpy()
  np.savez(npz, images=images, logits=logits)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["summary", "save"])
  parser.add_argument("args", nargs="*")
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--h5")
  parser.add_argument("--npz")
  args = parser.parse_args()
  if args.mode == "summary":
    out, names = args.args[0], args.args[1:] or list(CONSTRUCTORS)
    write_summaries(out, {n: summary_of(n) for n in names})
  else:
    save(args.args[0], args.size, args.classes, args.seed, args.h5, args.npz)


if __name__ == "__main__":
  main()
