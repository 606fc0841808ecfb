"""Optimizer chains from a phase's optimizer config (optax).

The AdamBNN recipe (docs/recipe.md#training-recipe) trains with Adam
(b1 0.9, b2 0.999, eps 1e-8), a per-epoch linear learning-rate decay and, in
step 1, a small weight decay on a fixed group of parameters.

Chains (`name`):

* built-ins: `adam` (mode as configured), `adamw` (`adam`, decoupled), `sgd`
  (heavy-ball or Nesterov momentum, torch SGD semantics), `lamb` (You et al.
  2020), and `bop`: Bop (Helwegen et al., NeurIPS 2019, "Latent weights do
  not exist") on the binary kernels, the chain named by `bop_rest` (Adam by
  default; any name accepted here except `bop`) on every other parameter;
* a name given to `register(name, factory)`;
* a dotted optax path, e.g. `optax.lion`, `optax.adafactor`,
  `optax.contrib.muon`: the function is looked up in optax.

A registered factory or an optax function is called as
`factory(schedule, **kwargs)` with the phase's learning-rate schedule (below)
and `kwargs` (`--config.phases.step2.optimizer.kwargs="{'b1': 0.95}"`). An
optax function with a `weight_decay` argument gets `weight_decay=0.0` unless
`kwargs` sets it, so that weight decay stays what `weight_decay`,
`weight_decay_mode` and the decay group below say (optax.lion's own default
would decay every parameter, BatchNorm included). Every chain, built-in or
not, gets the same schedule, decay, clipping, multipliers and logging.

Weight decay, two modes (`weight_decay_mode`), lambda = `weight_decay`,
M = the decay mask, g = gradient, w = parameter, eta_t = learning rate:

* `coupled` (the reference: torch Adam's `weight_decay`, an L2 penalty):
      g'  = g + lambda * M * w                 (before the moments)
      m_t = b1 m + (1 - b1) g',  v_t = b2 v + (1 - b2) g'^2
      w  <- w - eta_t * m_hat / (sqrt(v_hat) + eps)
  i.e. `add_decayed_weights` BEFORE `scale_by_adam`. Adam's normalisation
  rescales the decay per weight, so its strength depends on the gradients.
* `decoupled` (AdamW, Loshchilov & Hutter 2019; the default for new configs):
      w  <- w - eta_t * (m_hat / (sqrt(v_hat) + eps) + lambda * M * w)
  computed from the moments of g alone; the decay is multiplied by eta_t as
  in optax.adamw and torch AdamW.
The same rule holds for the other chains: `coupled` adds lambda * M * w to the
gradient before the optimizer's own preconditioner (SGD momentum, Adam's
moments in LAMB, the whole of a registered or optax chain); `decoupled` adds
it to the preconditioned update (for a registered or optax chain u, whose
update already includes -eta_t: u - eta_t * lambda * M * w).

The reference decay group M (the torch code selects `p.ndim == 4 or 'conv' in
name`; its shifts are (1, C, 1, 1), hence 4-D): every 4-D parameter (all conv
kernels, the real-valued stem included) and every learnable shift (`shift`,
`shift_in`, `shift_out`); NOT the BatchNorm scale/bias, the PReLU slopes or the
FC kernel/bias. On ReActNet-A that is 28,285,792 of 29,343,592 parameters.
`decay_regexes` replaces the group by the parameters whose '/'-joined path
matches (re.fullmatch) one of the regexes.

Learning-rate multipliers (`lr_mults`, as big_vision's `lr_mults`): pairs
(regex, m); the final update of a parameter whose '/'-joined path fullmatches
a regex (the first that matches) is multiplied by m (0 freezes it); other
parameters keep m = 1. Every regex must match some parameter.

Parameter groups (`groups`, as optax.partition / Larq's CaseOptimizer):
triples (label, regex, overrides), overrides a dict of fields or
(field, value) pairs. A parameter belongs to the first group
whose regex fullmatches its '/'-joined path; every parameter must belong to
a group and every group must have a parameter. Each group trains with its
own chain: the phase's optimizer fields updated by `overrides` (a dict of
fields: name, learning_rate, schedule, warmup_epochs, momentum, ...), with
its own schedule; gradient clipping (`grad_clip_norm`) stays global, over
all groups. The train step logs each group's rate as 'train/lr/<label>'
(and the first group's as 'train/lr'). QuickNet's recipe:
  groups = (("binary", BINARY_KERNEL_REGEX, {"name": "adam",
             "learning_rate": 1e-2}),
            ("real", ".*", {"name": "sgd", "momentum": 0.9,
             "learning_rate": 0.1}))

Weight clip (`weight_clip`, Larq's `WeightClip` kernel constraint): after
the update, w <- clip(w, -c, c) for every parameter of the chain (set it in
the binary kernels' group).

Learning-rate schedules (`schedule`; base = `learning_rate`, E epochs of S
steps, T = E * S):

* `linear_epoch` (reference): epoch e = floor(t / S) (0-based) runs at
  base * (1 - (e + 1) / E), constant within the epoch; the last epoch at 0.
* `linear`: base * (1 - t / T), per step.
* `cosine`: base * (1 + cos(pi * t / T)) / 2.
* `constant`: base.
* `step`: base * step_factor^k, k = the number of `step_epochs` boundaries
  b with t >= b * S (absolute epochs, the warm-up included; Larq Zoo's
  BinaryResNetE18 and Real-to-Binary schedules).
An optional linear warm-up from 0 to base over W = `warmup_epochs` * S steps
comes first; the decay then runs over the remaining T - W steps (E - W / S
epochs), as in optax.warmup_cosine_decay_schedule. The schedule is passed to
the chain itself (optax counts the updates in its state); the train step logs
schedule(step), the rate of the update it applies
(`train_step.make_train_step(..., learning_rate=schedule)`).
"""

from __future__ import annotations

import inspect
import operator
import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from bnn_jax import paths

# The built-in chains; `register` adds more, and any dotted optax path works.
OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "bop")
OPTAX_PREFIX = "optax."
WEIGHT_DECAY_MODES = ("decoupled", "coupled")
SCHEDULES = ("linear_epoch", "linear", "cosine", "constant", "step")
# Optimizers dividing by sqrt(v) + eps.
ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "lamb", "bop")  # bop: Adam on the rest

# Leaf names of the learnable shifts (layers.Shift, layers.RPReLU).
SHIFT_PARAM_NAMES = ("shift", "shift_in", "shift_out")
# The kernels Bop trains: `kernel` of every module named binary_* (the binary
# 3x3 and 1x1 convs of ReActNet-A, the binary 3x3 convs of ReActNet-18).
BINARY_KERNEL_REGEX = r"(.*/)?binary_[^/]*/kernel"

ConfigLike = Union[ml_collections.ConfigDict, Mapping[str, Any]]
# factory(learning_rate, **kwargs) -> optax.GradientTransformation.
ChainFactory = Callable[..., optax.GradientTransformation]

_REGISTRY: dict[str, ChainFactory] = {}


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


# ---------------------------------------------------------------------------
# Chain names: built-ins, the registry, dotted optax paths.


def register(name: str, factory: ChainFactory) -> None:
  """Makes `optimizer.name=<name>` build `factory(schedule, **kwargs)`.

  Args:
    name: a new name (not a built-in, not starting with 'optax.'); registering
      a name again replaces its factory.
    factory: factory(learning_rate, **kwargs) -> optax.GradientTransformation,
      where learning_rate is the phase's schedule (a function of the step)
      and kwargs is `optimizer.kwargs`. Its update must return the final
      update (already multiplied by -learning_rate), as optax's optimizers do.

  Raises:
    ValueError: a built-in or dotted name; TypeError: a non-callable factory.
  """
  if not isinstance(name, str) or not name or name in OPTIMIZERS or (
      name.startswith(OPTAX_PREFIX)):
    raise ValueError(f"cannot register {name!r}: built-ins {list(OPTIMIZERS)} "
                     "and dotted optax paths are taken")
  if not callable(factory):
    raise TypeError(f"optim.register({name!r}, ...): the factory must be "
                    f"callable, got {type(factory).__name__}")
  _REGISTRY[name] = factory


def registered() -> tuple[str, ...]:
  """The names added with `register`, sorted."""
  return tuple(sorted(_REGISTRY))


def _unknown_name(field: str, name: Any) -> ValueError:
  return ValueError(
      f"optimizer.{field}={name!r}; choose one of {list(OPTIMIZERS)}, a "
      f"registered name {list(registered())} (bnn_jax.optim.register) or a "
      "dotted optax path such as 'optax.lion'")


def chain_factory(name: str, field: str = "name") -> Optional[ChainFactory]:
  """The factory of a registered or dotted optax name; None for a built-in.

  Raises:
    ValueError: an unknown name, or an optax path that is not a function.
  """
  if name in OPTIMIZERS:
    return None
  if name in _REGISTRY:
    return _REGISTRY[name]
  if isinstance(name, str) and name.startswith(OPTAX_PREFIX):
    try:
      factory = operator.attrgetter(name[len(OPTAX_PREFIX):])(optax)
    except AttributeError:
      raise _unknown_name(field, name) from None
    if not callable(factory) or inspect.isclass(factory):
      raise ValueError(f"optimizer.{field}={name!r} is not an optax function "
                       "that builds an optimizer")
    return factory
  raise _unknown_name(field, name)


def _factory_kwargs(name: str, factory: ChainFactory,
                    kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """`kwargs`, checked against the factory's signature.

  An optax function with a `weight_decay` argument also gets
  weight_decay=0.0 unless `kwargs` sets it (decay is the config's job).
  """
  kwargs = dict(kwargs)
  try:
    signature = inspect.signature(factory)
  except (TypeError, ValueError):  # a builtin without a signature
    return kwargs
  if (name.startswith(OPTAX_PREFIX) and "weight_decay" in signature.parameters
      and "weight_decay" not in kwargs):
    kwargs["weight_decay"] = 0.0
  try:
    signature.bind(None, **kwargs)
  except TypeError as e:
    raise ValueError(f"optimizer {name!r} cannot be called as "
                     f"{name}(learning_rate, **{kwargs}): {e}") from None
  return kwargs


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


def resolve_config(opt_cfg: ConfigLike) -> ml_collections.FrozenConfigDict:
  """Fills missing fields from `default_optimizer_config()` and validates.

  Args:
    opt_cfg: a ConfigDict or mapping with any subset of the default fields.

  Returns:
    A FrozenConfigDict with every field.

  Raises:
    ValueError: unknown field, unknown choice or out-of-range value.
  """
  given = (opt_cfg.to_dict() if isinstance(opt_cfg, ml_collections.ConfigDict)
           else dict(opt_cfg))
  defaults = default_optimizer_config().to_dict()
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f"unknown optimizer field(s) {unknown}; valid: "
                     f"{sorted(defaults)}")
  c = {**defaults, **given}
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
  c["kwargs"] = (_factory_kwargs(chain_name, factory, kwargs)
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
  return ml_collections.FrozenConfigDict(c)


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
    overrides = _plain(overrides)
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


def group_config(opt_cfg: ConfigLike, label: str
                 ) -> ml_collections.FrozenConfigDict:
  """The optimizer config of group `label`: the phase's fields, overridden
  by the group's, without groups and without clipping (clipping is global)."""
  cfg = resolve_config(opt_cfg)
  base = {k: v for k, v in cfg.to_dict().items() if k != "groups"}
  for name, _, overrides in cfg.groups:
    if name == label:
      return resolve_config({**base, **_plain(overrides),
                             "grad_clip_norm": None})
  raise ValueError(f"no optimizer group {label!r}")


def _plain(overrides: Any) -> dict:
  """{field: value} of a dict, a ConfigDict or (field, value) pairs."""
  return overrides.to_dict() if hasattr(overrides, "to_dict") else dict(
      overrides)


def group_labels(params: Any, groups: Sequence[tuple[str, str, Any]]) -> Any:
  """The label of each parameter: the first group whose regex fullmatches.

  Raises:
    ValueError: a parameter in no group, or a group without parameters.
  """
  def label(name, _):
    for group_label, regex, _ in groups:
      if re.fullmatch(regex, name):
        return group_label
    raise ValueError(f"parameter {name!r} is in no optimizer group (regexes "
                     f"{[g[1] for g in groups]}); add a catch-all '.*' last")
  labels = _label_tree(params, label, groups[-1][0])
  empty = sorted(set(g[0] for g in groups) - set(jax.tree.leaves(labels)))
  if empty:
    raise ValueError(f"optimizer groups {empty} match no parameter (such as "
                     f"{_param_names(params)[:4]})")
  return labels


def weight_clip(clip: float) -> optax.GradientTransformation:
  """Larq's WeightClip after the update: u' = clip(w + u, -c, c) - w."""

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("weight_clip needs the parameters: "
                       "tx.update(grads, state, params)")
    clipped = jax.tree.map(
        lambda u, w: jnp.clip(w + u, -clip, clip).astype(u.dtype) - w,
        updates, params)
    return clipped, state

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Parameter groups.


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _label_tree(tree: Any, label: Callable[[str, Any], Any],
                masked_value: Any) -> Any:
  """Maps every leaf to label('/'-joined path, leaf).

  Leaves that optax.partition / optax.masked replaced by MaskedNode get
  `masked_value` (a prefix of the MaskedNode subtree, which optax accepts).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_masked_node)
  return treedef.unflatten([
      masked_value if _is_masked_node(leaf) else
      label(paths.tree_path(path), leaf)
      for path, leaf in flat])


def _param_names(tree: Any) -> list[str]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked_node)
  return [paths.tree_path(p) for p, _ in flat]


def _regex_mask(tree: Any, regexes: Sequence[str]) -> Any:
  """True where the path fullmatches a regex; a regex matching nothing errs."""
  names = _param_names(tree)
  unmatched = [r for r in regexes
               if not any(re.fullmatch(r, n) for n in names)]
  if unmatched:
    raise ValueError(f"optimizer.decay_regexes {unmatched} match no parameter "
                     f"(re.fullmatch on '/'-joined paths such as "
                     f"{names[:4]})")
  return _label_tree(
      tree, lambda name, _: any(re.fullmatch(r, name) for r in regexes), False)


def reference_decay_mask(params: Any) -> Any:
  """The reference decay group: 4-D parameters and learnable shifts.

  M(w) = ndim(w) == 4  or  name(w) in {shift, shift_in, shift_out}: every conv
  kernel (HWIO, the stem included) and every shift; not BN scale/bias, PReLU
  slopes or the FC. (The torch reference selects `p.ndim == 4 or 'conv' in
  name`, where the shifts are (1, C, 1, 1) tensors.)

  Args:
    params: a parameter pytree (arrays or jax.ShapeDtypeStruct leaves).

  Returns:
    A pytree of bools with the structure of `params`.
  """
  return _label_tree(
      params,
      lambda name, leaf: (len(leaf.shape) == 4 or
                          name.rsplit("/", 1)[-1] in SHIFT_PARAM_NAMES),
      False)


def weight_decay_mask(params: Any, opt_cfg: ConfigLike) -> Any:
  """The weight-decay mask M of `opt_cfg` on `params` (True = decayed).

  With `decay_regexes` None, the reference group (`reference_decay_mask`);
  otherwise the parameters whose '/'-joined path (e.g.
  'block_1/binary_3x3/kernel') matches one of the regexes (re.fullmatch).

  Raises:
    ValueError: a regex that matches no parameter (a likely typo).
  """
  return _decay_mask(params, resolve_config(opt_cfg).decay_regexes)


def _decay_mask(params: Any, decay_regexes: Optional[Sequence[str]]) -> Any:
  if decay_regexes is None:
    return reference_decay_mask(params)
  return _regex_mask(params, decay_regexes)


def bop_labels(params: Any) -> Any:
  """'bop' for the binary kernels (BINARY_KERNEL_REGEX), 'rest' elsewhere."""
  labels = _label_tree(
      params,
      lambda name, _: ("bop" if re.fullmatch(BINARY_KERNEL_REGEX, name)
                       else "rest"),
      "rest")
  if "bop" not in jax.tree.leaves(labels):
    raise ValueError("optimizer 'bop' found no binary kernel (a `kernel` "
                     "under a module named binary_*) among "
                     f"{_param_names(params)[:8]}...")
  return labels


# ---------------------------------------------------------------------------
# Bop.


class BopState(NamedTuple):
  """Bop's state: m, the exponential moving average of the gradients."""
  momentum: optax.Updates


def bop(threshold: float = 1e-8, gamma: float = 1e-4
        ) -> optax.GradientTransformation:
  """Bop, the latent-free binary optimizer (Helwegen et al., NeurIPS 2019).

  Bop treats the sign of each weight as the only state worth optimising and
  flips it when a smoothed gradient consistently pushes towards the other
  sign. With gradient g, threshold tau and adaptivity rate gamma:

      m <- (1 - gamma) * m + gamma * g                      (m_0 = 0)
      flip = |m| > tau  and  sign(m) == sign(w)
      w <- -w where flip, w elsewhere

  (gradient descent moves w against g, so a gradient of w's own sign asks
  for the opposite sign). The transform returns that step as an additive
  update, u = -2 w where flip and 0 elsewhere, so
  `optax.apply_updates(w, u)` flips the weights; no learning rate applies.
  Magnitudes are kept, so the scale alpha = mean |W| of a scaled-sign kernel
  is unchanged.

  Args:
    threshold: tau >= 0.
    gamma: the adaptivity rate in (0, 1].

  Returns:
    An optax.GradientTransformation (its update needs `params`).
  """

  def init_fn(params):
    return BopState(momentum=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("bop needs the parameters: tx.update(g, state, params)")
    momentum = jax.tree.map(lambda m, g: (1 - gamma) * m + gamma * g,
                            state.momentum, updates)

    def flip(m, w):
      flips = (jnp.abs(m) > threshold) & (jnp.sign(m) == jnp.sign(w))
      return jnp.where(flips, -2 * w, jnp.zeros_like(w))

    return jax.tree.map(flip, momentum, params), BopState(momentum=momentum)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Chains.


def _decay(cfg: ml_collections.FrozenConfigDict
           ) -> optax.GradientTransformation:
  """u + lambda * M * w (optax.add_decayed_weights on the decay group M)."""
  return optax.add_decayed_weights(
      cfg.weight_decay, mask=lambda tree: _decay_mask(tree, cfg.decay_regexes))


def _decayed(preconditioner: Sequence[optax.GradientTransformation],
             after_decay: Sequence[optax.GradientTransformation],
             lr: optax.ScalarOrSchedule, cfg: ml_collections.FrozenConfigDict,
             mode: str) -> optax.GradientTransformation:
  """preconditioner, weight decay (placed by `mode`), after_decay, -lr.

  coupled:   chain(decay, preconditioner, after_decay, scale(-lr))
  decoupled: chain(preconditioner, decay, after_decay, scale(-lr))
  """
  if mode == "coupled":
    parts = [_decay(cfg), *preconditioner, *after_decay]
  else:
    parts = [*preconditioner, _decay(cfg), *after_decay]
  return optax.chain(*parts, optax.scale_by_learning_rate(lr))


def _scheduled_decay(weight_decay: float, lr: optax.ScalarOrSchedule
                     ) -> optax.GradientTransformation:
  """u <- u - eta_t * lambda * w, eta_t = lr(t) (t counted in the state).

  The decoupled decay of a registered or optax chain, whose update u
  already includes -eta_t; `optax.masked` restricts it to the decay group.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decoupled weight decay needs the parameters: "
                       "tx.update(g, state, params)")
    eta = lr(state.count) if callable(lr) else lr
    updates = jax.tree.map(
        lambda u, w: u - (eta * weight_decay * w).astype(u.dtype),
        updates, params)
    return updates, optax.ScaleByScheduleState(
        count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _factory_chain(name: str, lr: optax.ScalarOrSchedule,
                   cfg: ml_collections.FrozenConfigDict,
                   mode: str) -> optax.GradientTransformation:
  """A registered or optax chain `factory(lr, **kwargs)` with weight decay.

  coupled:   chain(decay, factory(lr))
  decoupled: chain(factory(lr), masked(-lr * lambda * w))
  """
  factory = chain_factory(name)
  kwargs = cfg.kwargs.to_dict() if hasattr(cfg.kwargs, "to_dict") else dict(
      cfg.kwargs)
  try:
    tx = factory(lr, **kwargs)
  except TypeError as e:
    raise ValueError(f"optimizer {name!r}: {name}(learning_rate, **{kwargs}) "
                     f"failed: {e}") from e
  if not isinstance(tx, optax.GradientTransformation):
    raise ValueError(f"optimizer {name!r} returned {type(tx).__name__}, not "
                     "an optax.GradientTransformation")
  if not cfg.weight_decay:
    return tx
  if mode == "coupled":
    return optax.chain(_decay(cfg), tx)
  return optax.chain(tx, optax.masked(
      _scheduled_decay(cfg.weight_decay, lr),
      lambda tree: _decay_mask(tree, cfg.decay_regexes)))


def _lr_multipliers(pairs: Sequence[tuple[str, float]]
                    ) -> optax.GradientTransformation:
  """u <- m(path) * u, m = the multiplier of the first regex matching the path.

  Paths no regex matches keep m = 1; a regex matching no parameter errs.
  """

  def multipliers(tree):
    names = _param_names(tree)
    unmatched = [r for r, _ in pairs
                 if not any(re.fullmatch(r, n) for n in names)]
    if unmatched:
      raise ValueError(f"optimizer.lr_mults regexes {unmatched} match no "
                       "parameter (re.fullmatch on '/'-joined paths such as "
                       f"{names[:4]})")
    return _label_tree(
        tree, lambda name, _: next(
            (m for r, m in pairs if re.fullmatch(r, name)), 1.0), 1.0)

  def init_fn(params):
    multipliers(params)  # fail at init on a regex that matches nothing
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates,
                          multipliers(updates))
    return scaled, state

  return optax.GradientTransformation(init_fn, update_fn)


def _named_chain(name: str, lr: optax.ScalarOrSchedule,
                 cfg: ml_collections.FrozenConfigDict
                 ) -> optax.GradientTransformation:
  """The chain `name` (built-in other than bop, registered or optax) at `lr`."""
  mode = cfg.weight_decay_mode
  if name in ("adam", "adamw"):  # adamw: decoupled by definition
    return _decayed([optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)],
                    [], lr, cfg, "decoupled" if name == "adamw" else mode)
  if name == "sgd":
    momentum = ([optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)]
                if cfg.momentum > 0 else [])
    return _decayed(momentum, [], lr, cfg, mode)
  if name == "lamb":
    return _decayed([optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)],
                    [optax.scale_by_trust_ratio()], lr, cfg, mode)
  return _factory_chain(name, lr, cfg, mode)


def _chain(cfg: ml_collections.FrozenConfigDict,
           lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """clip, the optimizer `cfg.name` at learning rate `lr`, lr multipliers."""
  if cfg.name == "bop":
    tx = optax.partition(
        {"bop": bop(cfg.bop_threshold, cfg.bop_gamma),
         "rest": _named_chain(cfg.bop_rest, lr, cfg)},
        bop_labels)
  else:
    tx = _named_chain(cfg.name, lr, cfg)
  if cfg.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  if cfg.lr_mults:
    tx = optax.chain(tx, _lr_multipliers(cfg.lr_mults))
  if cfg.weight_clip is not None:
    tx = optax.chain(tx, weight_clip(cfg.weight_clip))
  return tx


def build_optimizer(opt_cfg: ConfigLike, *, steps_per_epoch: int,
                    num_epochs: int) -> optax.GradientTransformation:
  """The optimizer of `opt_cfg`, driven by its learning-rate schedule.

  Args:
    opt_cfg: optimizer config (missing fields take the defaults).
    steps_per_epoch: optimizer steps per epoch.
    num_epochs: epochs of the phase.

  Returns:
    The chain built with `build_schedule(opt_cfg, ...)` as its learning rate
    (optax counts the updates in the state): call
    `update(grads, state, params)` (params are needed for weight decay and
    Bop). The rate of update n (0-based) is schedule(n); pass the schedule
    to `train_step.make_train_step(..., learning_rate=...)` to log it.
  """
  cfg = resolve_config(opt_cfg)
  if cfg.groups:
    groups = tuple((g[0], g[1], _plain(g[2])) for g in cfg.groups)
    tx = optax.partition(
        {label: build_optimizer(group_config(cfg, label),
                                steps_per_epoch=steps_per_epoch,
                                num_epochs=num_epochs)
         for label, _, _ in groups},
        lambda params: group_labels(params, groups))
    if cfg.grad_clip_norm is not None:
      tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx
  schedule = build_schedule(cfg, steps_per_epoch=steps_per_epoch,
                            num_epochs=num_epochs)
  return _chain(cfg, schedule)


def logged_learning_rate(opt_cfg: ConfigLike, *, steps_per_epoch: int,
                         num_epochs: int
                         ) -> Union[optax.Schedule, dict[str, optax.Schedule]]:
  """What the train step logs: the schedule, or {group label: its schedule}."""
  cfg = resolve_config(opt_cfg)
  if not cfg.groups:
    return build_schedule(cfg, steps_per_epoch=steps_per_epoch,
                          num_epochs=num_epochs)
  return {label: build_schedule(group_config(cfg, label),
                                steps_per_epoch=steps_per_epoch,
                                num_epochs=num_epochs)
          for label, _, _ in cfg.groups}


# ---------------------------------------------------------------------------
# Schedules.


def linear_epoch_schedule(base: float, steps_per_epoch: int,
                          num_epochs: int) -> optax.Schedule:
  """The reference decay: lr(t) = base * max(0, 1 - (floor(t / S) + 1) / E).

  Epoch e (0-based) runs at base * (1 - (e + 1) / E), constant within the
  epoch; the last epoch (and anything after it) at 0. This is the reference's
  torch LambdaLR(lambda epoch: 1 - epoch / E) stepped once per epoch, before
  the epoch's updates.
  """

  def schedule(step):
    epoch = jnp.asarray(step) // steps_per_epoch
    return base * jnp.clip(1.0 - (epoch + 1) / num_epochs, 0.0, 1.0)

  return schedule


def build_schedule(opt_cfg: ConfigLike, *, steps_per_epoch: int,
                   num_epochs: int) -> optax.Schedule:
  """The learning rate as a function of the step (see the module docstring).

  Args:
    opt_cfg: optimizer config (`learning_rate`, `schedule`, `warmup_epochs`).
    steps_per_epoch: S >= 1.
    num_epochs: E >= 1.

  Returns:
    An optax schedule: step -> learning rate.

  Raises:
    ValueError: bad sizes, a warm-up not shorter than the phase, or a
      fractional warm-up with `linear_epoch` (its epochs must stay whole).
  """
  cfg = resolve_config(opt_cfg)
  if steps_per_epoch < 1 or num_epochs < 1:
    raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and num_epochs "
                     f"({num_epochs}) must be >= 1")
  base = cfg.learning_rate
  warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
  decay_steps = steps_per_epoch * num_epochs - warmup_steps
  if decay_steps < 1:
    raise ValueError(f"optimizer.warmup_epochs={cfg.warmup_epochs} leaves no "
                     f"step to decay in a {num_epochs}-epoch phase")
  if cfg.schedule == "linear_epoch":
    if not float(cfg.warmup_epochs).is_integer():
      raise ValueError("schedule 'linear_epoch' needs a whole number of "
                       f"warmup_epochs; got {cfg.warmup_epochs}")
    decay = linear_epoch_schedule(base, steps_per_epoch,
                                  num_epochs - int(cfg.warmup_epochs))
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(base, 0.0, decay_steps)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(base, decay_steps)
  elif cfg.schedule == "step":  # boundaries after the warm-up's steps
    decay = optax.piecewise_constant_schedule(base, {
        max(round(b * steps_per_epoch) - warmup_steps, 0): cfg.step_factor
        for b in cfg.step_epochs})
  else:  # "constant"
    decay = optax.constant_schedule(base)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup_steps), decay], [warmup_steps])


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


def learning_rate(opt_state: optax.OptState) -> jax.Array:
  """The injected learning rate of a chain built with optax.inject_hyperparams.

  `build_optimizer` passes the schedule to the chain instead, and the train
  step logs schedule(step); this reads the `learning_rate` hyperparameter
  that `optax.inject_hyperparams` keeps in the state of a chain built that
  way (found wherever it sits: inside chain, partition or masked states).
  After n >= 1 updates it is the lr of update n - 1; after init, that of
  update 0.

  Raises:
    ValueError: the state holds no injected learning rate.
  """
  # Skip the schedule's own state, `hyperparams_states['learning_rate']`.
  lr = optax.tree_utils.tree_get(
      opt_state, "learning_rate",
      filtering=lambda path, _: getattr(path[-2], "name", "") == "hyperparams")
  if lr is None:
    raise ValueError("no injected 'learning_rate' in this optimizer state; "
                     "wrap the chain in optax.inject_hyperparams or pass the "
                     "schedule to train_step.make_train_step(learning_rate=)")
  return lr
