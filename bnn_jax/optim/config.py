"""The optimizer config: its fields and defaults, validation, per-group configs.

`resolve_config` fills missing fields from `default_optimizer_config()`,
rejects unknown ones and bad values, and returns a `ResolvedConfig`
(frozen); every builder takes a resolved config as it is, so a phase
resolves its optimizer config once.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

from absl import logging
import ml_collections
from ml_collections import config_dict

from bnn_jax import config_fields
from bnn_jax.optim.registry import chain_factory, factory_kwargs


WEIGHT_DECAY_MODES = ("decoupled", "coupled")
SCHEDULES = ("linear_epoch", "linear", "cosine", "constant", "step")
# Optimizers dividing by sqrt(v) + eps.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "lamb", "bop")  # bop: Adam on the rest
ConfigLike = Union[ml_collections.ConfigDict, Mapping[str, Any]]


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every optimizer field with its default (a phase overrides some).

  Returns:
    A ConfigDict with: name (a built-in, a registered name or a dotted optax
    path), kwargs (keyword arguments of a registered or optax chain),
    learning_rate (base lr, the value at batch 256 of
    docs/recipe.md#training-recipe), b1, b2, eps (Adam / LAMB),
    weight_decay, weight_decay_mode, decay_regexes (None = the reference
    group), lr_mults (None, or (regex, multiplier) pairs), schedule,
    warmup_epochs, momentum and nesterov (sgd), bop_threshold, bop_gamma and
    bop_rest (bop), grad_clip_norm (None = no clipping), groups (None, or
    (label, regex, overrides) triples: one chain per parameter group) and
    weight_clip (None, or c: w <- clip(w, -c, c) after each update),
    step_epochs and step_factor (schedule 'step').
  """
  return ml_collections.ConfigDict(dict(
      name="adam",
      kwargs={},
      learning_rate=1.25e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      weight_decay_mode="decoupled",
      decay_regexes=config_dict.placeholder(tuple),
      lr_mults=config_dict.placeholder(tuple),
      schedule="linear_epoch",
      warmup_epochs=0.0,
      momentum=0.9,
      nesterov=False,
      bop_threshold=1e-8,
      bop_gamma=1e-4,
      bop_rest="adam",
      grad_clip_norm=config_dict.placeholder(float),
      groups=config_dict.placeholder(tuple),
      weight_clip=config_dict.placeholder(float),
      step_epochs=config_dict.placeholder(tuple),
      step_factor=0.1,
  ))



def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"optimizer.{field}={value!r}; choose one of "
                     f"{list(choices)}")


def _check_range(field: str, value: float, ok: bool, expected: str) -> None:
  if not ok:
    raise ValueError(f"optimizer.{field}={value!r}; expected {expected}")


def _check_regexes(field: str, regexes: Sequence[str]) -> None:
  for pattern in regexes:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"optimizer.{field}: bad regex {pattern!r}: {e}"
                       ) from e


class ResolvedConfig(ml_collections.FrozenConfigDict):
  """An optimizer config that `resolve_config` completed and validated.

  Every builder (`build`, `build_optimizer`, `build_schedule`, masks) takes
  one as it is; given anything else, it resolves it first. A phase resolves
  its optimizer config once and hands the result to all of them.
  """


def resolve_config(opt_cfg: ConfigLike) -> ResolvedConfig:
  """Fills missing fields from `default_optimizer_config()` and validates.

  Args:
    opt_cfg: a ConfigDict or mapping with any subset of the default fields,
      or an already resolved config (returned as it is).

  Returns:
    A `ResolvedConfig` (frozen) with every field.

  Raises:
    ValueError: unknown field, unknown choice or out-of-range value.
  """
  if isinstance(opt_cfg, ResolvedConfig):
    return opt_cfg
  given = config_fields.as_dict(opt_cfg)
  c = config_fields.fill_defaults(given, default_optimizer_config().to_dict(),
                                  "unknown optimizer field(s)")
  chain_factory(c["name"])  # raises on an unknown name
  if c["name"] == "bop":
    if c["bop_rest"] == "bop":
      raise ValueError("optimizer.bop_rest='bop': Bop trains binary kernels "
                       "only; name the chain for the other parameters")
    chain_factory(c["bop_rest"], "bop_rest")
  _check_choice("weight_decay_mode", c["weight_decay_mode"], WEIGHT_DECAY_MODES)
  _check_choice("schedule", c["schedule"], SCHEDULES)
  if c["name"] == "adamw" and c["weight_decay_mode"] == "coupled":
    raise ValueError("optimizer.name='adamw' is decoupled by definition; use "
                     "name='adam' with weight_decay_mode='coupled' for L2")
  kwargs = c["kwargs"] if c["kwargs"] is not None else {}
  if not isinstance(kwargs, Mapping):
    raise ValueError("optimizer.kwargs must be a dict, e.g. "
                     f"\"{{'b1': 0.95}}\", not {kwargs!r}")
  chain_name = c["bop_rest"] if c["name"] == "bop" else c["name"]
  factory = chain_factory(chain_name)
  if factory is None and kwargs:
    raise ValueError(f"optimizer.kwargs={dict(kwargs)} apply to registered "
                     f"and optax chains; the built-in {chain_name!r} takes "
                     "its own fields (b1, b2, eps, momentum, ...)")
  c["kwargs"] = (factory_kwargs(chain_name, factory, kwargs)
                 if factory is not None else {})
  _check_range("learning_rate", c["learning_rate"], c["learning_rate"] > 0,
               "> 0")
  for field in ("b1", "b2", "momentum"):
    _check_range(field, c[field], 0 <= c[field] < 1, "in [0, 1)")
  if c["name"] in ADAPTIVE_OPTIMIZERS:
    # m / (sqrt(v) + eps) with eps = 0 is 0 / 0 = NaN for a parameter whose
    # gradients have all been 0 (v = 0), and unbounded for tiny ones.
    _check_range("eps", c["eps"], c["eps"] > 0,
                 f"> 0 for {c['name']} (default 1e-8)")
  else:
    _check_range("eps", c["eps"], c["eps"] >= 0, ">= 0")
  _check_range("weight_decay", c["weight_decay"], c["weight_decay"] >= 0,
               ">= 0")
  _check_range("warmup_epochs", c["warmup_epochs"], c["warmup_epochs"] >= 0,
               ">= 0")
  _check_range("bop_threshold", c["bop_threshold"], c["bop_threshold"] >= 0,
               ">= 0")
  _check_range("bop_gamma", c["bop_gamma"], 0 < c["bop_gamma"] <= 1,
               "in (0, 1]")
  clip = c["grad_clip_norm"]
  _check_range("grad_clip_norm", clip, clip is None or clip > 0,
               "None or > 0")
  if c["decay_regexes"] is not None:
    if isinstance(c["decay_regexes"], str):
      raise ValueError("optimizer.decay_regexes must be a tuple of regexes, "
                       f"not the string {c['decay_regexes']!r}")
    c["decay_regexes"] = tuple(c["decay_regexes"])
    _check_regexes("decay_regexes", c["decay_regexes"])
  if c["lr_mults"] is not None:
    pairs = c["lr_mults"]
    if isinstance(pairs, str) or not all(
        isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
        and isinstance(p[1], (int, float)) and p[1] >= 0 for p in pairs):
      raise ValueError("optimizer.lr_mults must be (regex, multiplier >= 0) "
                       f"pairs, e.g. \"(('fc/.*', 0.1),)\", not {pairs!r}")
    c["lr_mults"] = tuple((r, float(m)) for r, m in pairs)
    _check_regexes("lr_mults", [r for r, _ in c["lr_mults"]])
  clip = c["weight_clip"]
  _check_range("weight_clip", clip, clip is None or clip > 0, "None or > 0")
  if c["schedule"] == "step":
    bounds = c["step_epochs"]
    if bounds is None or isinstance(bounds, str) or not all(
        isinstance(b, (int, float)) and b > 0 for b in bounds):
      raise ValueError("optimizer.schedule='step' needs step_epochs, "
                       "increasing epochs > 0 such as (70, 90, 110); got "
                       f"{bounds!r}")
    c["step_epochs"] = tuple(float(b) for b in bounds)
    _check_range("step_factor", c["step_factor"], c["step_factor"] > 0,
                 "> 0")
  if c["groups"] is not None:
    c["groups"] = _resolve_groups(c["groups"], given)
  return ResolvedConfig(c)


def _resolve_groups(groups: Any, given: Mapping[str, Any]
                    ) -> tuple[tuple[str, str, dict], ...]:
  """The groups as (label, regex, overrides) with each group's config valid."""
  if isinstance(groups, str) or not all(
      isinstance(g, (tuple, list)) and len(g) == 3 and isinstance(g[0], str)
      and isinstance(g[1], str) and _is_overrides(g[2])
      for g in groups) or not groups:
    raise ValueError("optimizer.groups must be (label, regex, {field: value}) "
                     "triples, e.g. ((\"binary\", \".*binary_conv/kernel\", "
                     f"{{\"name\": \"adam\"}}), ...), not {groups!r}")
  labels = [g[0] for g in groups]
  if len(set(labels)) != len(labels):
    raise ValueError(f"optimizer.groups labels {labels} repeat")
  _check_regexes("groups", [g[1] for g in groups])
  base = {k: v for k, v in given.items() if k != "groups"}
  out = []
  for label, regex, overrides in groups:
    overrides = plain_overrides(overrides)
    if "groups" in overrides:
      raise ValueError(f"optimizer.groups[{label!r}] cannot have groups")
    try:
      resolve_config({**base, **overrides})
    except ValueError as e:
      raise ValueError(f"optimizer.groups[{label!r}]: {e}") from None
    # (field, value) pairs: a frozen config holds no dict inside a tuple.
    out.append((label, regex, tuple(sorted(overrides.items()))))
  return tuple(out)


def _is_overrides(value: Any) -> bool:
  """A dict of fields, or (field, value) pairs."""
  return isinstance(value, Mapping) or hasattr(value, "to_dict") or (
      isinstance(value, (tuple, list)) and all(
          isinstance(p, (tuple, list)) and len(p) == 2
          and isinstance(p[0], str) for p in value))


def group_config(opt_cfg: ConfigLike, label: str) -> ResolvedConfig:
  """The optimizer config of group `label`: the phase's fields, overridden
  by the group's, without groups and without clipping (clipping is global)."""
  cfg = resolve_config(opt_cfg)
  base = {k: v for k, v in cfg.to_dict().items() if k != "groups"}
  for name, _, overrides in cfg.groups:
    if name == label:
      return resolve_config({**base, **plain_overrides(overrides),
                             "grad_clip_norm": None})
  raise ValueError(f"no optimizer group {label!r}")


def plain_overrides(overrides: Any) -> dict:
  """{field: value} of a dict, a ConfigDict or (field, value) pairs."""
  return overrides.to_dict() if hasattr(overrides, "to_dict") else dict(
      overrides)



def warn_if_no_training(opt_cfg: ConfigLike, num_epochs: int,
                        where: str = "config.phases.<name>"
                        ) -> Optional[str]:
  """Warns (and returns the message) when a phase would train at lr 0 only.

  `linear_epoch` runs epoch e at base * (1 - (e + 1) / E): with E = 1 decay
  epoch (num_epochs - warmup_epochs == 1) every step has learning rate 0,
  so the phase changes nothing but the BatchNorm statistics. That is the
  reference's definition, kept; the warning says how to get a real rate.
  """
  cfg = resolve_config(opt_cfg)
  if cfg.schedule != "linear_epoch" or num_epochs - cfg.warmup_epochs != 1:
    return None
  message = (f"{where}: schedule 'linear_epoch' over 1 epoch trains at "
             "learning rate 0 (epoch e runs at base * (1 - (e + 1) / E)); "
             f"set --{where}.optimizer.schedule=linear (or constant), "
             "or more epochs")
  logging.warning("%s", message)
  warnings.warn(message, UserWarning, stacklevel=2)
  return message


