"""Learning-rate schedules (step -> rate): linear_epoch (the reference's
per-epoch linear decay), linear, cosine, constant, step, each after an
optional linear warm-up; and reading an injected rate back from a state.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from bnn_jax.optim.config import ConfigLike, resolve_config


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
