"""Larq / Keras `.h5` weights of Larq Zoo models -> bnn_jax variables.

Reads what Keras 2 `model.save_weights("W.h5")` or `model.save("M.h5")`
writes for a Larq Zoo model (larq-zoo 2.4.0: `QuickNetSmall`, `QuickNet`,
`QuickNetLarge`, `BiRealNet`, `BinaryResNetE18`, `RealToBinaryNet`) and fills the matching bnn_jax model (`models.create`).
h5py reads the file; TensorFlow is not needed.

Matching. Keras names a layer after its class and a number that counts
the layers of that class the session created before it (`quant_conv2d`,
`quant_conv2d_1`, ...; a model built second in a session starts higher):
the numbers follow the order in which Larq Zoo's code creates the layers,
which is bnn_jax's call order. So the file's layers of each class, sorted
by their number, are matched one to one to the bnn_jax layers of that
class in call order, strictly: the counts per class must be equal, the
weight names exactly the expected ones and every shape equal. (Keras'
own `layer_names` order is topological, which puts a shortcut conv after
the binary conv of its block, so it is not used.) RealToBinaryNet names
its layers explicitly ("r2b_bnn_block_2a_conv2d"): those are matched by
name (`NAMED_LAYERS`). Otherwise
`LarqWeightsMismatchError` names each disagreement (Keras layer, bnn_jax
module, what was expected and found).

Tensors (Keras -> bnn_jax):

  Conv2D / QuantConv2D kernel (kh, kw, I, O)    -> kernel, the same (HWIO)
  (Quant)DepthwiseConv2D depthwise_kernel (kh, kw, C, 1)
                                                -> kernel (kh, kw, 1, C):
                                                   k[a, b, 0, c] = dk[a, b, c, 0]
  BatchNormalization gamma, beta                -> params scale, bias
  BatchNormalization moving_mean, moving_variance -> batch_stats mean, var
  Dense / QuantDense kernel (F, classes), bias  -> kernel, bias (the same)
  PReLU alpha (1, 1, C)                         -> alpha (C,)
  QuickNet blur DepthwiseConv2D (3, 3, C, 1)    -> nothing: a constant in
                                                   bnn_jax; the file's value
                                                   must equal it (1e-6).

Values are cast to float32. Larq's sign(0) is +1 (bnn_jax `zero_to=1.0`).

Python:

  from bnn_jax.interop import larq_import
  variables = larq_import.load("quicknet_weights.h5", "quicknet")
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax import models
from bnn_jax.layers import BatchNorm, BinaryConv
from bnn_jax.models import quicknet
from bnn_jax.models import real_to_binary

# Larq's sign(0) (`larq.math.sign`): +1.
SIGN_ZERO = 1.0
H5PY_INSTALL = "pip install h5py"
# The Keras class name (a layer's name without its _<number>) of each kind
# of bnn_jax layer, per Larq Zoo model family.
_QUICKNET_NAMES = {"conv": "quant_conv2d", "binary_conv": "quant_conv2d",
                   "depthwise": "quant_depthwise_conv2d",
                   "blur": "depthwise_conv2d",
                   "batch_norm": "batch_normalization", "dense": "quant_dense"}
_RESNET_NAMES = {"conv": "conv2d", "binary_conv": "quant_conv2d",
                 "batch_norm": "batch_normalization", "dense": "dense"}
KERAS_NAMES: dict[str, dict[str, str]] = {
    "quicknet_small": _QUICKNET_NAMES, "quicknet": _QUICKNET_NAMES,
    "quicknet_large": _QUICKNET_NAMES,
    "birealnet18": _RESNET_NAMES, "binary_resnet_e18": _RESNET_NAMES,
    "real_to_binary_net": {},  # named layers: NAMED_LAYERS
}
# Models whose Keras layers have explicit names: prefix + the bnn_jax path
# joined by '_' (the head "fc" is Keras' "block_10_logits").
NAMED_LAYERS = {"real_to_binary_net": real_to_binary.KERAS_PREFIX}
_NAMED_HEAD = "block_10_logits"
_NUMBER = re.compile(r"_\d+$")

Path = tuple[str, ...]


class LarqWeightsMismatchError(ValueError):
  """The .h5 file's layers are not those of the bnn_jax model.

  `problems` lists every disagreement; the message names the first five.
  """

  def __init__(self, model_name: str, problems: list[str]):
    self.problems = problems
    super().__init__(
        f"the weights do not fit {model_name!r} ({len(problems)} problem(s); "
        f"is it a Larq Zoo {model_name} file?): " + "; ".join(problems[:5])
        + (" ..." if len(problems) > 5 else ""))


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """One Keras layer with weights as bnn_jax expects it.

  Attributes:
    kind: conv, binary_conv, depthwise, blur, batch_norm, dense or prelu.
    keras_name: the Keras layer name without its number ("quant_conv2d").
    path: the bnn_jax module path (() for the blur constant).
    weights: {Keras weight name: (collection, bnn_jax leaf name, Keras shape)}.
    constant: the Keras value a fixed weight must have (the blur kernel).
  """
  kind: str
  keras_name: str
  path: Path
  weights: dict[str, tuple[str, str, tuple[int, ...]]]
  constant: Optional[np.ndarray] = None

  def describe(self) -> str:
    where = "/".join(self.path) or "(a constant)"
    return f"{self.kind} {where}"


def supported_models() -> list[str]:
  """The registry names whose Larq Zoo layout is known."""
  return sorted(KERAS_NAMES)


def expected_layers(model_name: str, input_size: int = 224,
                    num_classes: int = 1000) -> list[KerasLayer]:
  """The Keras layers with weights of Larq Zoo's `model_name`, in order.

  Traced from the bnn_jax model's calls (shapes only): every conv, dense and
  BatchNorm call, and QuickNet's blur kernel at the start of each transition.
  """
  if model_name not in supported_models():
    raise ValueError(f"no Larq Zoo layout is known for model {model_name!r}; "
                     f"supported: {supported_models()}")
  model = models.create(model_name, num_classes=num_classes)
  names = KERAS_NAMES[model_name]
  layers: list[KerasLayer] = []

  def add(kind, path, weights, constant=None):
    if model_name in NAMED_LAYERS:
      joined = _NAMED_HEAD if path == ("fc",) else "_".join(path)
      keras_name = NAMED_LAYERS[model_name] + joined
    else:
      keras_name = names[kind]
    layers.append(KerasLayer(kind, keras_name, path, weights, constant))

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    x = args[0]
    if isinstance(module, quicknet.QuickNetTransition):
      c = x.shape[-1]
      blur = quicknet.blur_kernel(c).transpose(0, 1, 3, 2)  # Keras (3, 3, C, 1)
      add("blur", (), {"depthwise_kernel": ("", "", blur.shape)}, blur)
    out = next_fun(*args, **kwargs)
    c_in, c_out = x.shape[-1], out.shape[-1]
    if isinstance(module, (BinaryConv, nn.Conv)):
      k = (module.kernel_size if isinstance(module, BinaryConv)
           else module.kernel_size[0])
      groups = getattr(module, "feature_group_count", 1)
      if groups > 1:
        add("depthwise", path, {
            "depthwise_kernel": ("params", "kernel", (k, k, c_in, 1))})
      else:
        binary = isinstance(module, BinaryConv) and module.binary_inputs
        add("binary_conv" if binary else "conv", path, {
            "kernel": ("params", "kernel", (k, k, c_in, c_out))})
    elif isinstance(module, nn.Dense):
      weights = {"kernel": ("params", "kernel", (c_in, c_out))}
      if module.use_bias:
        weights["bias"] = ("params", "bias", (c_out,))
      add("dense", path, weights)
    elif isinstance(module, real_to_binary.PReLU):
      add("prelu", path, {"alpha": ("params", "alpha", (1, 1, c_in))})
    elif isinstance(module, BatchNorm):
      weights = {}
      if module.use_scale:
        weights["gamma"] = ("params", "scale", (c_in,))
      if module.use_bias:
        weights["beta"] = ("params", "bias", (c_in,))
      weights["moving_mean"] = ("batch_stats", "mean", (c_in,))
      weights["moving_variance"] = ("batch_stats", "var", (c_in,))
      add("batch_norm", path, weights)
    return out

  x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return layers


def _import_h5py():
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading a Keras .h5 file needs h5py ({H5PY_INSTALL})"
                      ) from None
  return h5py


def _text(value: Any) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_h5(path: str) -> list[tuple[str, dict[str, np.ndarray]]]:
  """[(Keras layer name, {weight name: float32 array})] of the layers with
  weights, in the file's (the model's) order.

  Reads `model.save_weights` files (layers at the root) and `model.save`
  files (under `model_weights`). Weight names lose their layer prefix and
  ':0' ('quant_conv2d_3/kernel:0' -> 'kernel').
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path} does not exist")
  h5py = _import_h5py()
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise ValueError(f"cannot read {path} as an HDF5 (.h5) file: {e}") from None
  with f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise ValueError(f"{path} is an HDF5 file without Keras 'layer_names'; "
                       "save the Larq model with model.save_weights('W.h5')")
    layers = []
    for name in map(_text, root.attrs["layer_names"]):
      group = root[name]
      weight_names = [_text(w) for w in group.attrs.get("weight_names", [])]
      if not weight_names:
        continue
      weights = {}
      for full in weight_names:
        leaf = full.split("/")[-1].split(":")[0]
        weights[leaf] = np.asarray(group[full], np.float32)
      layers.append((name, weights))
  return layers


def _number(name: str) -> int:
  """The Keras layer name's number: 'conv2d' 0, 'conv2d_7' 7."""
  m = _NUMBER.search(name)
  return int(m.group()[1:]) if m else 0


def match(expected: list[KerasLayer],
          found: list[tuple[str, dict[str, np.ndarray]]],
          by_name: bool = False
          ) -> tuple[list[tuple[KerasLayer, str, dict[str, np.ndarray]]],
                     list[str]]:
  """(pairs of expected and file layers, problems), per Keras class by number
  (or, `by_name`, by the exact layer name).

  Problems name every class (name) whose counts differ, every unexpected
  class (name), and every pair whose weight names or shapes differ or whose
  constant is not the expected value.
  """
  by_class: dict[str, list[tuple[str, dict[str, np.ndarray]]]] = {}
  for name, weights in found:
    key = name if by_name else _NUMBER.sub("", name)
    by_class.setdefault(key, []).append((name, weights))
  pairs, problems = [], []
  wanted: dict[str, list[KerasLayer]] = {}
  for layer in expected:
    wanted.setdefault(layer.keras_name, []).append(layer)
  for keras_name, want in wanted.items():
    have = sorted(by_class.pop(keras_name, []), key=lambda l: _number(l[0]))
    if len(have) != len(want):
      problems.append(f"the file has {len(have)} {keras_name} layers, the "
                      f"model {len(want)}")
    for layer, (name, weights) in zip(want, have):
      where = f"layer {name!r} (for {layer.describe()})"
      if set(weights) != set(layer.weights):
        problems.append(f"{where}: weights {sorted(weights)}, expected "
                        f"{sorted(layer.weights)}")
        continue
      bad = [f"{where}: {leaf} has shape {weights[leaf].shape}, expected "
             f"{shape}" for leaf, (_, _, shape) in layer.weights.items()
             if weights[leaf].shape != shape]
      problems += bad
      if not bad and layer.constant is not None and not np.allclose(
          next(iter(weights.values())), layer.constant, rtol=0, atol=1e-6):
        problems.append(f"{where}: not the fixed blur kernel "
                        "outer([1,2,1], [1,2,1]) / 16")
      pairs.append((layer, name, weights))
  for keras_name, have in by_class.items():
    problems.append(f"unexpected {keras_name} layers in the file: "
                    f"{[n for n, _ in have][:3]}")
  return pairs, problems


def from_layers(found: list[tuple[str, dict[str, np.ndarray]]],
                model_name: str, input_size: int = 224) -> dict:
  """{'params', 'batch_stats'} of `model_name` from `read_h5`'s layers.

  The classes come from the head's kernel's columns (the last layer with a
  2-D kernel and a bias). Raises
  `LarqWeightsMismatchError` naming every mismatch.
  """
  num_classes = 1000  # the head: the last layer with a 2-D kernel and a bias
  heads = [w for _, w in found if "bias" in w and w.get(
      "kernel", np.zeros(0)).ndim == 2]
  if heads:
    num_classes = int(heads[-1]["kernel"].shape[1])
  expected = expected_layers(model_name, input_size, num_classes)
  pairs, problems = match(expected, found,
                          by_name=model_name in NAMED_LAYERS)
  if problems:
    raise LarqWeightsMismatchError(model_name, problems)
  variables: dict = {"params": {}, "batch_stats": {}}
  for want, _, weights in pairs:
    for leaf, (collection, name, _) in want.weights.items():
      if not collection:
        continue  # a constant, checked above
      value = weights[leaf]
      if want.kind == "depthwise":
        value = value.transpose(0, 1, 3, 2)
      elif want.kind == "prelu":
        value = value.reshape(-1)
      tree = variables[collection]
      for part in want.path:
        tree = tree.setdefault(part, {})
      tree[name] = value
  return variables


def load(path: str, model_name: str, input_size: int = 224) -> dict:
  """{'params', 'batch_stats'} of `model_name` from a Larq Zoo .h5 file."""
  return from_layers(read_h5(path), model_name, input_size)
