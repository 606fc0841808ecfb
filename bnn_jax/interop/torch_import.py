"""Reference PyTorch state dicts <-> bnn_jax variables.

The checkpoint layout is in docs/recipe.md#reference-pytorch-checkpoints.

Two layouts, chosen by the model's class:

* ReActNet-A (`reactnet_a`, `reactnet_a_cifar`, `reactnet_small`): the
  AdamBNN / ReActNet reference `reactnet` module. `feature.0` is the stem
  (`conv1`, `bn1`), `feature.{i}` block i (1..13), `fc` the classifier.
  A block's torch modules map to bnn_jax modules one to one except RPReLU,
  which is three torch modules: `rprelu1` = (`move12`, `prelu1`, `move13`),
  `rprelu2` = (`move22`, `prelu2`, `move23`).
* torchvision ResNet (`resnet18`, `resnet34`, `resnet18_cifar`,
  `resnet_small`), the distillation teachers: `layer{i}.{j}` is bnn_jax's
  `layer{i}_{j}`, `downsample.0` / `downsample.1` are `downsample_conv` /
  `downsample_bn`; every other name is the same.

Tensors (torch -> bnn_jax; the exporter applies the inverse):

  conv weight (O, I, kh, kw), OIHW     -> kernel (kh, kw, I, O), HWIO:
                                          k[a, b, i, o] = weight[o, i, a, b]
  HardBinaryConv `weights` (O*I*kh*kw, 1) (ReActNet step-2 files)
                                       -> reshaped to (O, I, kh, kw), as above
  LearnableBias `bias` (1, C, 1, 1)    -> Shift / RPReLU shift (C,)
  PReLU `weight` (C,)                  -> RPReLU slope (C,)
  BatchNorm weight, bias               -> params scale, bias
  BatchNorm running_mean, running_var  -> batch_stats mean, var
  BatchNorm num_batches_tracked        -> nothing (a step counter, no model
                                          state; optional on import)
  Linear weight (classes, F), bias     -> Dense kernel (F, classes) = weight^T,
                                          bias

Matching is strict: every tensor the model needs must be present with its
exact shape and every key of the file must be used (`num_batches_tracked`
aside), otherwise `StateDictMismatchError` names the missing, unexpected and
mis-shaped keys. Values are cast to float32. Released ReActNet files that
store binary weights as exact +-1 with the scale folded into BN import as
they are: alpha = mean |w| = 1 then, so `scaled_sign` gives the same +-1.

Python:

  from bnn_jax.interop import torch_import
  variables = torch_import.load("model_best.pth.tar", "reactnet_a")
  state_dict = torch_import.to_state_dict(variables, "reactnet_a")

`.pth` / `.pth.tar` files need PyTorch (an optional dependency, imported
only then); `.npz` files of the state dict and dicts of arrays do not.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from bnn_jax import models
from bnn_jax.models.reactnet import ReActNetA
from bnn_jax.models.resnet import ResNet

TORCH_INSTALL = "pip install torch==2.13.0"
# sign(0) of the reference code: torch.sign(0) = 0, for activations and
# weights (bnn_jax's `zero_to`). Imported checkpoints record it in their meta
# (`model.zero_to`), and evaluation and export use it.
SIGN_ZERO = 0.0
DATA_PARALLEL_PREFIX = "module."
NUM_BATCHES_TRACKED = "num_batches_tracked"

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]

# Each bnn_jax leaf name -> the torch tensor name, per collection.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("params", "shift"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# ReActNet-A's RPReLU leaves -> (torch module, tensor name), per RPReLU module.
_RPRELU_MODULES = {
    "rprelu1": {"shift_in": ("move12", "bias"), "slope": ("prelu1", "weight"),
                "shift_out": ("move13", "bias")},
    "rprelu2": {"shift_in": ("move22", "bias"), "slope": ("prelu2", "weight"),
                "shift_out": ("move23", "bias")},
}
_SHIFT_LEAVES = ("shift", "shift_in", "shift_out")


class StateDictMismatchError(ValueError):
  """A state dict does not match the model.

  Attributes `missing`, `unexpected` and `mis_shaped` list every offending
  key; the message names the first `SHOWN` of each.
  """
  SHOWN = 10

  def __init__(self, model_name: str, missing: list[str],
               unexpected: list[str], mis_shaped: list[str]):
    self.missing, self.unexpected, self.mis_shaped = (missing, unexpected,
                                                      mis_shaped)
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected),
                        ("mis-shaped", mis_shaped)):
      if keys:
        more = ", ..." if len(keys) > self.SHOWN else ""
        parts.append(f"{label} ({len(keys)}): "
                     f"{', '.join(keys[:self.SHOWN])}{more}")
    super().__init__(f"the state dict does not match {model_name!r}; "
                     + "; ".join(parts))


def _torch_module_reactnet_a(module: Path, leaf: str) -> tuple[str, str]:
  """(torch module, tensor name) of ReActNet-A's leaf `module/leaf`."""
  top = {"stem_conv": "feature.0.conv1", "stem_bn": "feature.0.bn1",
         "fc": "fc"}
  block = re.fullmatch(r"block_(\d+)", module[0])
  if module[0] in top and len(module) == 1:
    return top[module[0]], ""
  if block and len(module) == 2:
    prefix = f"feature.{block.group(1)}"
    if module[1] in _RPRELU_MODULES:
      name, tensor = _RPRELU_MODULES[module[1]][leaf]
      return f"{prefix}.{name}", tensor
    return f"{prefix}.{module[1]}", ""
  raise KeyError("/".join(module))


def _torch_module_resnet(module: Path, leaf: str) -> tuple[str, str]:
  """(torch module, tensor name) of torchvision ResNet's leaf `module/leaf`."""
  del leaf
  renames = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
  parts = []
  for name in module:
    layer = re.fullmatch(r"layer(\d+)_(\d+)", name)
    parts.append(f"layer{layer.group(1)}.{layer.group(2)}" if layer
                 else renames.get(name, name))
  return ".".join(parts), ""


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one model family names its tensors in torch."""
  name: str
  torch_module: Callable[[Path, str], tuple[str, str]]
  stem_weight: str       # the first conv's weight: gives the input channels
  classifier_weight: str  # gives the number of classes


_LAYOUTS = {
    ReActNetA: _Layout("ReActNet-A (AdamBNN / ReActNet reference)",
                       _torch_module_reactnet_a, "feature.0.conv1.weight",
                       "fc.weight"),
    ResNet: _Layout("torchvision ResNet", _torch_module_resnet,
                    "conv1.weight", "fc.weight"),
}


def supported_models() -> list[str]:
  """The registry models with a known torch layout."""
  return sorted(n for n in models.MODELS
                if isinstance(models.create(n), tuple(_LAYOUTS)))


def _layout(model_name: str) -> _Layout:
  model = models.create(model_name)
  for cls, layout in _LAYOUTS.items():
    if isinstance(model, cls):
      return layout
  raise ValueError(f"no torch layout is known for model {model_name!r}; "
                   f"supported: {supported_models()}")


@dataclasses.dataclass(frozen=True)
class TorchTensor:
  """One torch tensor and the bnn_jax variable it holds.

  Attributes:
    key: the torch state-dict key (no `module.` prefix).
    collection: 'params' or 'batch_stats'.
    path: the variable's path inside `collection`.
    kind: 'conv' (OIHW <-> HWIO), 'dense' (transpose), 'shift'
      ((1, C, 1, 1) <-> (C,)) or 'vector' (as is).
    shape: the bnn_jax shape.
    flat: the conv is stored as HardBinaryConv's flat `weights` (N, 1).
  """
  key: str
  collection: str
  path: Path
  kind: str
  shape: tuple[int, ...]
  flat: bool = False

  @property
  def torch_shape(self) -> tuple[int, ...]:
    if self.flat:
      return (int(np.prod(self.shape)), 1)
    if self.kind == "conv":
      kh, kw, i, o = self.shape
      return (o, i, kh, kw)
    if self.kind == "dense":
      return self.shape[::-1]
    if self.kind == "shift":
      return (1, self.shape[0], 1, 1)
    return self.shape

  def as_flat(self) -> "TorchTensor":
    """The same conv stored as HardBinaryConv's flat `weights`."""
    return dataclasses.replace(self, key=self.key + "s", flat=True)

  def to_flax(self, value: np.ndarray) -> np.ndarray:
    """The torch tensor as the bnn_jax variable (float32)."""
    value = np.asarray(value, np.float32)
    if self.kind == "conv":
      kh, kw, i, o = self.shape
      return value.reshape(o, i, kh, kw).transpose(2, 3, 1, 0)
    if self.kind == "dense":
      return value.T
    return value.reshape(self.shape)

  def to_torch(self, value: np.ndarray) -> np.ndarray:
    """The bnn_jax variable as the torch tensor (float32)."""
    value = np.asarray(value, np.float32)
    if self.kind == "conv":
      value = value.transpose(3, 2, 0, 1)
    elif self.kind == "dense":
      value = value.T
    return np.ascontiguousarray(value.reshape(self.torch_shape))


def tensor_layout(model_name: str, variables: Any) -> list[TorchTensor]:
  """The torch tensors of `model_name`'s `variables` (arrays or shapes).

  Lists the model's tensors in the variables' order; BatchNorm's
  `num_batches_tracked` is not among them (see `bn_modules`).
  """
  layout = _layout(model_name)
  tensors = []
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))
    for key_path, leaf in flat[0]:
      path = tuple(str(k.key) for k in key_path)
      module, name = path[:-1], path[-1]
      try:
        torch_module, tensor = layout.torch_module(module, name)
        tensor = tensor or _LEAF_NAMES[(collection, name)]
      except KeyError:
        raise ValueError(f"{collection}/{'/'.join(path)} has no counterpart "
                         f"in the {layout.name} layout") from None
      shape = tuple(np.shape(leaf))
      if name == "kernel":
        kind = "conv" if len(shape) == 4 else "dense"
      elif name in _SHIFT_LEAVES:
        kind = "shift"
      else:
        kind = "vector"
      tensors.append(TorchTensor(f"{torch_module}.{tensor}", collection, path,
                                 kind, shape))
  return tensors


def bn_modules(tensors: list[TorchTensor]) -> list[str]:
  """Torch names of the BatchNorm modules (those holding running statistics)."""
  return list(dict.fromkeys(t.key.rsplit(".", 1)[0] for t in tensors
                            if t.collection == "batch_stats"))


def _is_hard_binary_conv(tensor: TorchTensor) -> bool:
  """Binary convs (reference HardBinaryConv) may store flat `weights`."""
  return (tensor.kind == "conv"
          and tensor.key.rsplit(".", 2)[-2].startswith("binary_"))


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy/jax array or a torch tensor (bf16 -> f32)."""
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def normalize_state_dict(obj: Mapping[str, Any]) -> tuple[StateDict, dict]:
  """(state dict, extras) from what `torch.save` wrote or a plain state dict.

  Unwraps the reference's `{'epoch', 'state_dict', 'best_top1_acc',
  'optimizer'}` dict (extras = its scalar entries), strips DataParallel's
  `module.` prefix and turns tensors into numpy arrays.
  """
  extras = {}
  if isinstance(obj.get("state_dict"), Mapping):
    extras = {k: _to_numpy(v).item() for k, v in obj.items()
              if k != "state_dict" and np.ndim(_to_numpy(v)) == 0
              and isinstance(_to_numpy(v).item(), (int, float))}
    obj = obj["state_dict"]
  state_dict = {}
  for key, value in obj.items():
    name = key[len(DATA_PARALLEL_PREFIX):] if key.startswith(
        DATA_PARALLEL_PREFIX) else key
    if name in state_dict:
      raise ValueError(f"key {name!r} appears with and without the "
                       f"{DATA_PARALLEL_PREFIX!r} prefix")
    state_dict[name] = _to_numpy(value)
  return state_dict, extras


def _import_torch():
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading a PyTorch checkpoint needs torch "
                      f"({TORCH_INSTALL}); or save its state dict as .npz "
                      "with numpy where torch is installed") from None
  return torch


def read_checkpoint(path: str) -> tuple[StateDict, dict]:
  """(state dict, extras) of a `.pth` / `.pth.tar` / `.pt` or `.npz` file.

  torch files are read with `torch.load(path, map_location='cpu',
  weights_only=True)` (tensors saved on CUDA load on the CPU; no pickled
  code runs); `.npz` files hold the state dict's arrays under its keys.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file {path} does not exist")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return normalize_state_dict({k: data[k] for k in data.files})
  if path.endswith((".pth", ".pth.tar", ".pt", ".tar")):
    torch = _import_torch()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path} holds a {type(obj).__name__}, not a state "
                       "dict or a dict with 'state_dict'")
    return normalize_state_dict(obj)
  raise ValueError(f"cannot read {path}: expected a .pth, .pth.tar, .pt or "
                   ".npz file")


def abstract_variables(model_name: str, input_channels: int = 3,
                       **model_kwargs: Any) -> dict:
  """Shapes of `model_name`'s {'params', 'batch_stats'} (traced, no compute)."""
  model = models.create(model_name, **model_kwargs)
  x = jax.ShapeDtypeStruct((1, 64, 64, input_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x,
                                             train=False), x)


def from_state_dict(state_dict: Mapping[str, Any], model_name: str,
                    **model_kwargs: Any) -> dict:
  """bnn_jax variables {'params', 'batch_stats'} (numpy) of a torch state dict.

  Args:
    state_dict: torch key -> array (the `module.` prefix and the
      `{'state_dict': ...}` wrapper are accepted).
    model_name: a model of `supported_models()`.
    **model_kwargs: attributes for `models.create` (e.g. width_multiplier);
      `num_classes` defaults to the classifier's rows, the input channels
      come from the stem's weight.

  Raises:
    StateDictMismatchError: keys missing, unexpected or mis-shaped.
  """
  state_dict, _ = normalize_state_dict(state_dict)
  layout = _layout(model_name)
  if layout.classifier_weight in state_dict:
    model_kwargs.setdefault(
        "num_classes", int(np.shape(state_dict[layout.classifier_weight])[0]))
  stem = state_dict.get(layout.stem_weight)
  channels = int(np.shape(stem)[1]) if np.ndim(stem) == 4 else 3
  tensors = tensor_layout(model_name, abstract_variables(
      model_name, channels, **model_kwargs))

  missing, mis_shaped, used = [], [], set()
  variables: dict = {"params": {}, "batch_stats": {}}
  for tensor in tensors:
    if tensor.key not in state_dict and _is_hard_binary_conv(tensor):
      if tensor.as_flat().key in state_dict:
        tensor = tensor.as_flat()
    if tensor.key not in state_dict:
      missing.append(tensor.key)
      continue
    used.add(tensor.key)
    value = state_dict[tensor.key]
    if tuple(np.shape(value)) != tensor.torch_shape:
      mis_shaped.append(f"{tensor.key} {tuple(np.shape(value))} (model wants "
                        f"{tensor.torch_shape})")
      continue
    node = variables[tensor.collection]
    for name in tensor.path[:-1]:
      node = node.setdefault(name, {})
    node[tensor.path[-1]] = tensor.to_flax(value)
  counters = {f"{m}.{NUM_BATCHES_TRACKED}" for m in bn_modules(tensors)}
  unexpected = sorted(set(state_dict) - used - counters)
  if missing or unexpected or mis_shaped:
    raise StateDictMismatchError(model_name, missing, unexpected, mis_shaped)
  return variables


def load(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]],
         model_name: str, **model_kwargs: Any) -> dict:
  """bnn_jax variables from a torch checkpoint file or a state dict.

  Args:
    path_or_state_dict: a `.pth` / `.pth.tar` (needs torch), a `.npz` of the
      state dict, or a dict of arrays / tensors.
    model_name: a model of `supported_models()`.
    **model_kwargs: see `from_state_dict`.
  """
  if isinstance(path_or_state_dict, Mapping):
    return from_state_dict(path_or_state_dict, model_name, **model_kwargs)
  state_dict, _ = read_checkpoint(os.fspath(path_or_state_dict))
  return from_state_dict(state_dict, model_name, **model_kwargs)


def to_state_dict(variables: Mapping[str, Any], model_name: str, *,
                  num_batches_tracked: int = 0, prefix: str = "",
                  flat_binary_weights: bool = False) -> StateDict:
  """The torch state dict (numpy arrays) of bnn_jax `variables`.

  The inverse of `from_state_dict`: `to_state_dict(from_state_dict(sd))`
  gives back sd's keys and values exactly (for float32 sd). Keys follow the
  variables' order, not torch's registration order (torch matches by name).

  Args:
    variables: {'params', 'batch_stats'} of `model_name`.
    model_name: a model of `supported_models()`.
    num_batches_tracked: the value of every BatchNorm's step counter (int64,
      shape ()); bnn_jax keeps none.
    prefix: prepended to every key, e.g. "module." as DataParallel saves.
    flat_binary_weights: store binary convs as HardBinaryConv's flat
      `weights` (N, 1), as ReActNet's step-2 code does.
  """
  tensors = tensor_layout(model_name, variables)
  state_dict: StateDict = {}
  for tensor in tensors:
    if flat_binary_weights and _is_hard_binary_conv(tensor):
      tensor = tensor.as_flat()
    value = variables[tensor.collection]
    for name in tensor.path:
      value = value[name]
    state_dict[prefix + tensor.key] = tensor.to_torch(jax.device_get(value))
  for module in bn_modules(tensors):
    state_dict[f"{prefix}{module}.{NUM_BATCHES_TRACKED}"] = np.asarray(
        num_batches_tracked, np.int64)
  return state_dict

