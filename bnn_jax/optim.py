"""Optimizer chains from a phase's optimizer config (optax), SPEC §3.

The AdamBNN recipe (Liu et al., ICML 2021, SPEC §3) trains with Adam
(b1 0.9, b2 0.999, eps 1e-8), a per-epoch linear learning-rate decay and, in
step 1, a small weight decay on a fixed group of parameters.

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
moments in LAMB); `decoupled` adds it to the preconditioned update.

The reference decay group M (the torch code selects `p.ndim == 4 or 'conv' in
name`; its shifts are (1, C, 1, 1), hence 4-D): every 4-D parameter (all conv
kernels, the real-valued stem included) and every learnable shift (`shift`,
`shift_in`, `shift_out`); NOT the BatchNorm scale/bias, the PReLU slopes or the
FC kernel/bias. On ReActNet-A that is 28,285,792 of 29,343,592 parameters.
`decay_regexes` replaces the group by the parameters whose '/'-joined path
matches (re.fullmatch) one of the regexes.

Learning-rate schedules (`schedule`; base = `learning_rate`, E epochs of S
steps, T = E * S):

* `linear_epoch` (reference): epoch e = floor(t / S) (0-based) runs at
  base * (1 - (e + 1) / E), constant within the epoch; the last epoch at 0.
* `linear`: base * (1 - t / T), per step.
* `cosine`: base * (1 + cos(pi * t / T)) / 2.
* `constant`: base.
An optional linear warm-up from 0 to base over W = `warmup_epochs` * S steps
comes first; the decay then runs over the remaining T - W steps (E - W / S
epochs), as in optax.warmup_cosine_decay_schedule. The whole chain is wrapped
in `optax.inject_hyperparams`, so the learning rate lives in the optimizer
state and `learning_rate(opt_state)` reads it for logging.

Chains (`name`): `adam` (mode as configured), `adamw` (`adam`, decoupled),
`sgd` (heavy-ball or Nesterov momentum, torch SGD semantics), `lamb` (You et
al. 2020), and `bop`: Bop (Helwegen et al., NeurIPS 2019, "Latent weights do
not exist") on the binary kernels, Adam on every other parameter.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import optax

from bnn_jax import paths

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "bop")
WEIGHT_DECAY_MODES = ("decoupled", "coupled")
SCHEDULES = ("linear_epoch", "linear", "cosine", "constant")

# Leaf names of the learnable shifts (layers.Shift, layers.RPReLU).
SHIFT_PARAM_NAMES = ("shift", "shift_in", "shift_out")
# The kernels Bop trains: `kernel` of every module named binary_* (the binary
# 3x3 and 1x1 convs of ReActNet-A, the binary 3x3 convs of ReActNet-18).
BINARY_KERNEL_REGEX = r"(.*/)?binary_[^/]*/kernel"

ConfigLike = Union[ml_collections.ConfigDict, Mapping[str, Any]]


def default_optimizer_config() -> ml_collections.ConfigDict:
  """Every optimizer field with its default (a phase overrides some).

  Returns:
    A ConfigDict with: name, learning_rate (base lr, the value at batch 256
    of SPEC §3), b1, b2, eps (Adam / LAMB), weight_decay, weight_decay_mode,
    decay_regexes (None = the reference group), schedule, warmup_epochs,
    momentum and nesterov (sgd), bop_threshold and bop_gamma (bop),
    grad_clip_norm (None = no clipping).
  """
  return ml_collections.ConfigDict(dict(
      name="adam",
      learning_rate=1.25e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      weight_decay_mode="decoupled",
      decay_regexes=config_dict.placeholder(tuple),
      schedule="linear_epoch",
      warmup_epochs=0.0,
      momentum=0.9,
      nesterov=False,
      bop_threshold=1e-8,
      bop_gamma=1e-4,
      grad_clip_norm=config_dict.placeholder(float),
  ))


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"optimizer.{field}={value!r}; choose one of "
                     f"{list(choices)}")


def _check_range(field: str, value: float, ok: bool, expected: str) -> None:
  if not ok:
    raise ValueError(f"optimizer.{field}={value!r}; expected {expected}")


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
  _check_choice("name", c["name"], OPTIMIZERS)
  _check_choice("weight_decay_mode", c["weight_decay_mode"], WEIGHT_DECAY_MODES)
  _check_choice("schedule", c["schedule"], SCHEDULES)
  if c["name"] == "adamw" and c["weight_decay_mode"] == "coupled":
    raise ValueError("optimizer.name='adamw' is decoupled by definition; use "
                     "name='adam' with weight_decay_mode='coupled' for L2")
  _check_range("learning_rate", c["learning_rate"], c["learning_rate"] > 0,
               "> 0")
  for field in ("b1", "b2", "momentum"):
    _check_range(field, c[field], 0 <= c[field] < 1, "in [0, 1)")
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
    for pattern in c["decay_regexes"]:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"optimizer.decay_regexes: bad regex {pattern!r}: "
                         f"{e}") from e
  return ml_collections.FrozenConfigDict(c)


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
  """'bop' for the binary kernels (BINARY_KERNEL_REGEX), 'adam' elsewhere."""
  labels = _label_tree(
      params,
      lambda name, _: ("bop" if re.fullmatch(BINARY_KERNEL_REGEX, name)
                       else "adam"),
      "adam")
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


def _decayed(preconditioner: Sequence[optax.GradientTransformation],
             after_decay: Sequence[optax.GradientTransformation],
             lr: jax.Array, cfg: ml_collections.FrozenConfigDict,
             mode: str) -> optax.GradientTransformation:
  """preconditioner, weight decay (placed by `mode`), after_decay, -lr.

  coupled:   chain(decay, preconditioner, after_decay, scale(-lr))
  decoupled: chain(preconditioner, decay, after_decay, scale(-lr))
  """
  decay = optax.add_decayed_weights(
      cfg.weight_decay, mask=lambda tree: _decay_mask(tree, cfg.decay_regexes))
  if mode == "coupled":
    parts = [decay, *preconditioner, *after_decay]
  else:
    parts = [*preconditioner, decay, *after_decay]
  return optax.chain(*parts, optax.scale_by_learning_rate(lr))


def _adam(lr: jax.Array, cfg: ml_collections.FrozenConfigDict,
          mode: str) -> optax.GradientTransformation:
  return _decayed([optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)], [],
                  lr, cfg, mode)


def _chain(cfg: ml_collections.FrozenConfigDict,
           lr: jax.Array) -> optax.GradientTransformation:
  """The optimizer `cfg.name` at learning rate `lr` (no schedule)."""
  mode = cfg.weight_decay_mode
  if cfg.name == "adam":
    tx = _adam(lr, cfg, mode)
  elif cfg.name == "adamw":
    tx = _adam(lr, cfg, "decoupled")
  elif cfg.name == "sgd":
    momentum = ([optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov)]
                if cfg.momentum > 0 else [])
    tx = _decayed(momentum, [], lr, cfg, mode)
  elif cfg.name == "lamb":
    tx = _decayed([optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)],
                  [optax.scale_by_trust_ratio()], lr, cfg, mode)
  else:  # "bop"
    tx = optax.partition(
        {"bop": bop(cfg.bop_threshold, cfg.bop_gamma),
         "adam": _adam(lr, cfg, mode)},
        bop_labels)
  if cfg.grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
  return tx


def build_optimizer(opt_cfg: ConfigLike, *, steps_per_epoch: int,
                    num_epochs: int) -> optax.GradientTransformation:
  """The optimizer of `opt_cfg`, its learning rate injected and scheduled.

  Args:
    opt_cfg: optimizer config (missing fields take the defaults).
    steps_per_epoch: optimizer steps per epoch.
    num_epochs: epochs of the phase.

  Returns:
    `optax.inject_hyperparams(chain)(learning_rate=schedule)`: call
    `update(grads, state, params)` (params are needed for weight decay and
    Bop); `learning_rate(state)` is the lr of the last update.
  """
  cfg = resolve_config(opt_cfg)
  schedule = build_schedule(cfg, steps_per_epoch=steps_per_epoch,
                            num_epochs=num_epochs)

  def chain(learning_rate):  # the name of the injected hyperparameter
    return _chain(cfg, learning_rate)

  return optax.inject_hyperparams(chain)(learning_rate=schedule)


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
  else:  # "constant"
    decay = optax.constant_schedule(base)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup_steps), decay], [warmup_steps])


def learning_rate(opt_state: optax.OptState) -> jax.Array:
  """The learning rate of the last update, for logging.

  Reads the `learning_rate` hyperparameter that `optax.inject_hyperparams`
  keeps in the state (found wherever it sits: inside chain, partition or
  masked states). After n >= 1 updates it is schedule(n - 1); after init,
  schedule(0).

  Raises:
    ValueError: the state holds no injected learning rate.
  """
  # Skip the schedule's own state, `hyperparams_states['learning_rate']`.
  lr = optax.tree_utils.tree_get(
      opt_state, "learning_rate",
      filtering=lambda path, _: getattr(path[-2], "name", "") == "hyperparams")
  if lr is None:
    raise ValueError("no injected 'learning_rate' in this optimizer state; "
                     "build the optimizer with optim.build_optimizer")
  return lr
