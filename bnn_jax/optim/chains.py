"""The chain of a resolved optimizer config: preconditioner, weight decay in its
mode, clipping, per-group learning-rate multipliers, weight clip; and
`build`, which makes a phase's chain and the rate it logs from one schedule.

The formulas: the package docstring (`bnn_jax.optim`).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax
from bnn_jax.optim.bop import bop
from bnn_jax.optim.config import ConfigLike, plain_overrides, group_config, resolve_config
from bnn_jax.optim.masks import decay_mask, label_tree, param_names, bop_labels, group_labels
from bnn_jax.optim.registry import chain_factory
from bnn_jax.optim.schedules import build_schedule



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
# Chains.


def _decay(cfg: ml_collections.FrozenConfigDict
           ) -> optax.GradientTransformation:
  """u + lambda * M * w (optax.add_decayed_weights on the decay group M)."""
  return optax.add_decayed_weights(
      cfg.weight_decay, mask=lambda tree: decay_mask(tree, cfg.decay_regexes))


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
      lambda tree: decay_mask(tree, cfg.decay_regexes)))


def _lr_multipliers(pairs: Sequence[tuple[str, float]]
                    ) -> optax.GradientTransformation:
  """u <- m(path) * u, m = the multiplier of the first regex matching the path.

  Paths no regex matches keep m = 1; a regex matching no parameter errs.
  """

  def multipliers(tree):
    names = param_names(tree)
    unmatched = [r for r, _ in pairs
                 if not any(re.fullmatch(r, n) for n in names)]
    if unmatched:
      raise ValueError(f"optimizer.lr_mults regexes {unmatched} match no "
                       "parameter (re.fullmatch on '/'-joined paths such as "
                       f"{names[:4]})")
    return label_tree(
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


class Built(NamedTuple):
  """A phase's optimizer: the chain and what the train step logs as its rate."""
  tx: optax.GradientTransformation
  learning_rate: Union[optax.Schedule, dict[str, optax.Schedule]]


def build(opt_cfg: ConfigLike, *, steps_per_epoch: int,
          num_epochs: int) -> Built:
  """The chain of `opt_cfg` and its logged rate, from one schedule per group.

  Args:
    opt_cfg: optimizer config (missing fields take the defaults); a
      `ResolvedConfig` is used as it is.
    steps_per_epoch: optimizer steps per epoch.
    num_epochs: epochs of the phase.

  Returns:
    Built(tx, learning_rate): `tx` is driven by `build_schedule(opt_cfg, ...)`
    (optax counts the updates in the state; call `update(grads, state,
    params)`: params are needed for weight decay and Bop), so the rate of
    update n (0-based) is schedule(n). `learning_rate` is that schedule, or
    {group label: its schedule} with `groups`: pass it to
    `train_step.make_train_step(..., learning_rate=...)` to log it.
  """
  cfg = resolve_config(opt_cfg)
  if cfg.groups:
    groups = tuple((g[0], g[1], plain_overrides(g[2])) for g in cfg.groups)
    built = {label: build(group_config(cfg, label),
                          steps_per_epoch=steps_per_epoch,
                          num_epochs=num_epochs)
             for label, _, _ in groups}
    tx = optax.partition({label: b.tx for label, b in built.items()},
                         lambda params: group_labels(params, groups))
    if cfg.grad_clip_norm is not None:
      tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return Built(tx, {label: b.learning_rate for label, b in built.items()})
  schedule = build_schedule(cfg, steps_per_epoch=steps_per_epoch,
                            num_epochs=num_epochs)
  return Built(_chain(cfg, schedule), schedule)


def build_optimizer(opt_cfg: ConfigLike, *, steps_per_epoch: int,
                    num_epochs: int) -> optax.GradientTransformation:
  """`build(...).tx`: the chain alone."""
  return build(opt_cfg, steps_per_epoch=steps_per_epoch,
               num_epochs=num_epochs).tx


def logged_learning_rate(opt_cfg: ConfigLike, *, steps_per_epoch: int,
                         num_epochs: int
                         ) -> Union[optax.Schedule, dict[str, optax.Schedule]]:
  """`build(...).learning_rate`: the schedule, or {group label: its schedule}."""
  return build(opt_cfg, steps_per_epoch=steps_per_epoch,
               num_epochs=num_epochs).learning_rate
