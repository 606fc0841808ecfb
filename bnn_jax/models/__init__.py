"""Model registry: `create(name, num_classes=..., **overrides)`.

Every model is a linen Module applied as
`model.apply(variables, images_nhwc, train=bool)` (with
`mutable=['batch_stats']` when training); variables are
`{'params': ..., 'batch_stats': ...}`.

Small-input variants (documented changes from the ImageNet layouts):
* `reactnet_a_cifar`: ReActNet-A with a stride-1 stem, so a 32x32 input keeps
  32x32 through block 1 (maps 32/16/8/4/2 instead of 112/56/28/14/7).
* `reactnet_small`: ReActNet-A's stem and first 5 blocks (channels
  32-64-128-128-256-256, the same stride rule), stride-1 stem, for 8x8 digits
  (maps 8/4/4/2/2) or 32x32 (32/16/16/8/8); `width_multiplier` scales it.
* `resnet18_cifar`: ResNet-18 with a 3x3/1 stem and no maxpool.
* `resnet_small`: 3 stages of one BasicBlock (32-64-128), 3x3/1 stem: the
  real-valued teacher for 8x8 digits.

Larq Zoo 2.4.0's models, layer for layer (docs/models.md): `quicknet_small`,
`quicknet`, `quicknet_large` (models/quicknet.py), `birealnet18`
(models/birealnet.py), `binary_resnet_e18` (models/binary_resnet_e.py),
`real_to_binary_net` (models/real_to_binary.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bnn_jax import config_fields
from bnn_jax.models import quicknet
from bnn_jax.models.binary_resnet_e import BinaryResNetE
from bnn_jax.models.birealnet import BiRealNet
from bnn_jax.models.reactnet import REACTNET_A_CHANNELS, ReActNet18, ReActNetA
from bnn_jax.models.real_to_binary import RealToBinaryNet
from bnn_jax.models.resnet import ResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "reactnet_a": ReActNetA,
    "reactnet_a_cifar": functools.partial(ReActNetA, stem_strides=1),
    "reactnet_small": functools.partial(
        ReActNetA, channels=REACTNET_A_CHANNELS[:6], stem_strides=1),
    "reactnet_18": ReActNet18,
    "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3)),
    "resnet18_cifar": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                                        stem="small"),
    "resnet_small": functools.partial(ResNet, stage_sizes=(1, 1, 1),
                                      widths=(32, 64, 128), stem="small"),
    # Larq Zoo models (docs/models.md), layer for layer.
    "quicknet_small": functools.partial(quicknet.QuickNet,
                                        **quicknet.QUICKNET_SMALL),
    "quicknet": functools.partial(quicknet.QuickNet, **quicknet.QUICKNET),
    "quicknet_large": functools.partial(quicknet.QuickNet,
                                        **quicknet.QUICKNET_LARGE),
    "birealnet18": BiRealNet,
    "binary_resnet_e18": BinaryResNetE,
    "real_to_binary_net": RealToBinaryNet,
}


def _check_name(name: str) -> None:
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}; choose one of "
                     f"{sorted(MODELS)}")


def _module_class(name: str) -> type:
  _check_name(name)
  factory = MODELS[name]
  return factory.func if isinstance(factory, functools.partial) else factory


def model_fields(name: str) -> list[str]:
  """The overridable attributes of model `name`."""
  return [f.name for f in dataclasses.fields(_module_class(name))
          if f.name not in ("parent", "name")]


def default_attributes(name: str) -> dict[str, Any]:
  """Model `name`'s configurable attributes with plain-value defaults.

  Leaves out `num_classes` (from the data set), `dtype` and `bn_group_size`
  (run-wide, `config.model`) and non-literal defaults (initialisers).
  """
  factory = MODELS[name] if name in MODELS else None
  _check_name(name)
  preset = factory.keywords if isinstance(factory, functools.partial) else {}
  out = {}
  for field in dataclasses.fields(_module_class(name)):
    if field.name in ("parent", "name", "num_classes", "dtype", "bn_group_size"):
      continue
    value = preset.get(field.name, field.default)
    if isinstance(value, (bool, int, float, str, tuple)):
      out[field.name] = value
  return out


def create(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
  """Builds model `name` with `num_classes` outputs and attribute overrides."""
  _check_name(name)
  fields = model_fields(name)
  config_fields.check_known(overrides, fields,
                            f"model {name!r} has no attribute(s)")
  return MODELS[name](num_classes=num_classes, **overrides)


def from_config(config: ml_collections.ConfigDict,
                model_cfg: ml_collections.ConfigDict,
                num_classes: int) -> nn.Module:
  """The phase's model: `model_cfg` (name + attributes) + the shared `config.model`.

  An attribute set in `model_cfg` wins over the shared one; an unset (None)
  `model_cfg.dtype` takes `config.model.dtype`.
  """
  overrides = {k: v for k, v in model_cfg.items()
               if k != "name" and not (k == "dtype" and v is None)}
  shared = dict(config.model)
  fields = model_fields(model_cfg.name)
  for key, value in shared.items():
    if key in fields and key not in overrides:
      overrides[key] = value
  if "dtype" in overrides:
    overrides["dtype"] = jnp.dtype(overrides["dtype"])
  return create(model_cfg.name, num_classes=num_classes, **overrides)
