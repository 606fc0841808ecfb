"""Larq / Keras `.h5` weights of Larq Zoo models -> bnn_jax variables.

Reads what Keras 2 `model.save_weights("W.h5")` or `model.save("M.h5")`
writes for a Larq Zoo model (larq-zoo 2.4.0: `QuickNetSmall`, `QuickNet`,
`QuickNetLarge`) and fills the matching bnn_jax model (`models.create`).
h5py reads the file; TensorFlow is not needed.

Matching. Keras stores the layers in the model's order (the `layer_names`
attribute) and loads an .h5 by that order; the layer names carry a number
that depends on what else the session built (`quant_conv2d_17`). So the
i-th Keras layer with weights is matched to the i-th bnn_jax layer in call
order, strictly: its name without the number must be one that Keras gives
that kind of layer, its weight names must be exactly the expected ones and
every shape must be equal; the number of layers must be equal too.
Otherwise `LarqWeightsMismatchError` names each disagreement (Keras layer,
bnn_jax module, what was expected and found).

Tensors (Keras -> bnn_jax):

  Conv2D / QuantConv2D kernel (kh, kw, I, O)    -> kernel, the same (HWIO)
  (Quant)DepthwiseConv2D depthwise_kernel (kh, kw, C, 1)
                                                -> kernel (kh, kw, 1, C):
                                                   k[a, b, 0, c] = dk[a, b, c, 0]
  BatchNormalization gamma, beta                -> params scale, bias
  BatchNormalization moving_mean, moving_variance -> batch_stats mean, var
  Dense / QuantDense kernel (F, classes), bias  -> kernel, bias (the same)
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

# Larq's sign(0) (`larq.math.sign`): +1.
SIGN_ZERO = 1.0
H5PY_INSTALL = "pip install h5py"
# Keras layer names (without their _<number>) per kind of bnn_jax layer.
KERAS_NAMES = {
    "conv": ("quant_conv2d", "conv2d"),
    "depthwise": ("quant_depthwise_conv2d", "depthwise_conv2d"),
    "blur": ("depthwise_conv2d",),
    "batch_norm": ("batch_normalization",),
    "dense": ("quant_dense", "dense"),
}
_NUMBER = re.compile(r"_\d+$")

Path = tuple[str, ...]


class LarqWeightsMismatchError(ValueError):
  """The .h5 file's layers are not those of the bnn_jax model."""


@dataclasses.dataclass(frozen=True)
class KerasLayer:
  """One Keras layer with weights as bnn_jax expects it.

  Attributes:
    kind: a key of `KERAS_NAMES`.
    path: the bnn_jax module path ('' for the blur constant).
    weights: {Keras weight name: (collection, bnn_jax leaf name, Keras shape)}.
    constant: the Keras value a fixed weight must have (the blur kernel).
  """
  kind: str
  path: Path
  weights: dict[str, tuple[str, str, tuple[int, ...]]]
  constant: Optional[np.ndarray] = None

  def describe(self) -> str:
    where = "/".join(self.path) or "(a constant)"
    return f"{self.kind} {where}"


def supported_models() -> list[str]:
  """The registry names whose Larq Zoo layout is known."""
  return sorted(n for n in models.MODELS
                if models._module_class(n) is quicknet.QuickNet)  # pylint: disable=protected-access


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
  layers: list[KerasLayer] = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = tuple(module.path)
    x = args[0]
    if isinstance(module, quicknet.QuickNetTransition):
      c = x.shape[-1]
      blur = quicknet.blur_kernel(c).transpose(0, 1, 3, 2)  # Keras (3, 3, C, 1)
      layers.append(KerasLayer("blur", (), {
          "depthwise_kernel": ("", "", blur.shape)}, blur))
    out = next_fun(*args, **kwargs)
    c_in, c_out = x.shape[-1], out.shape[-1]
    if isinstance(module, (BinaryConv, nn.Conv)):
      k = (module.kernel_size if isinstance(module, BinaryConv)
           else module.kernel_size[0])
      groups = getattr(module, "feature_group_count", 1)
      if groups > 1:
        layers.append(KerasLayer("depthwise", path, {
            "depthwise_kernel": ("params", "kernel", (k, k, c_in, 1))}))
      else:
        layers.append(KerasLayer("conv", path, {
            "kernel": ("params", "kernel", (k, k, c_in, c_out))}))
    elif isinstance(module, nn.Dense):
      layers.append(KerasLayer("dense", path, {
          "kernel": ("params", "kernel", (c_in, c_out)),
          "bias": ("params", "bias", (c_out,))}))
    elif isinstance(module, BatchNorm):
      weights = {}
      if module.use_scale:
        weights["gamma"] = ("params", "scale", (c_in,))
      if module.use_bias:
        weights["beta"] = ("params", "bias", (c_in,))
      weights["moving_mean"] = ("batch_stats", "mean", (c_in,))
      weights["moving_variance"] = ("batch_stats", "var", (c_in,))
      layers.append(KerasLayer("batch_norm", path, weights))
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


def _problems(expected: list[KerasLayer],
              found: list[tuple[str, dict[str, np.ndarray]]]) -> list[str]:
  """Every disagreement between the expected and the file's layers."""
  problems = []
  if len(expected) != len(found):
    problems.append(f"the file has {len(found)} layers with weights, the "
                    f"model {len(expected)}")
  for i, (want, (name, weights)) in enumerate(zip(expected, found)):
    where = f"layer {i} {name!r} (for {want.describe()})"
    if _NUMBER.sub("", name) not in KERAS_NAMES[want.kind]:
      problems.append(f"{where}: expected a Keras "
                      f"{' or '.join(KERAS_NAMES[want.kind])} layer")
      continue
    if set(weights) != set(want.weights):
      problems.append(f"{where}: weights {sorted(weights)}, expected "
                      f"{sorted(want.weights)}")
      continue
    for leaf, (_, _, shape) in want.weights.items():
      if weights[leaf].shape != shape:
        problems.append(f"{where}: {leaf} has shape {weights[leaf].shape}, "
                        f"expected {shape}")
    if want.constant is not None and not problems:
      (value,) = weights.values()
      if not np.allclose(value, want.constant, rtol=0, atol=1e-6):
        problems.append(f"{where}: not the fixed blur kernel "
                        "outer([1,2,1], [1,2,1]) / 16")
  return problems


def from_layers(found: list[tuple[str, dict[str, np.ndarray]]],
                model_name: str, input_size: int = 224) -> dict:
  """{'params', 'batch_stats'} of `model_name` from `read_h5`'s layers.

  The classes come from the Dense kernel's columns. Raises
  `LarqWeightsMismatchError` naming every mismatch.
  """
  num_classes = 1000
  dense = [w for n, w in found if _NUMBER.sub("", n) in KERAS_NAMES["dense"]]
  if dense and "kernel" in dense[-1] and dense[-1]["kernel"].ndim == 2:
    num_classes = int(dense[-1]["kernel"].shape[1])
  expected = expected_layers(model_name, input_size, num_classes)
  problems = _problems(expected, found)
  if problems:
    raise LarqWeightsMismatchError(
        f"the weights do not fit {model_name!r} ({len(problems)} problem(s); "
        f"is it a Larq Zoo {model_name} file?): " + "; ".join(problems[:5])
        + (" ..." if len(problems) > 5 else ""))
  variables: dict = {"params": {}, "batch_stats": {}}
  for want, (_, weights) in zip(expected, found):
    for leaf, (collection, name, _) in want.weights.items():
      if not collection:
        continue  # a constant, checked above
      value = weights[leaf]
      if want.kind == "depthwise":
        value = value.transpose(0, 1, 3, 2)
      tree = variables[collection]
      for part in want.path:
        tree = tree.setdefault(part, {})
      tree[name] = value
  return variables


def load(path: str, model_name: str, input_size: int = 224) -> dict:
  """{'params', 'batch_stats'} of `model_name` from a Larq Zoo .h5 file."""
  return from_layers(read_h5(path), model_name, input_size)
