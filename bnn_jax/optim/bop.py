"""Bop (Helwegen et al., NeurIPS 2019): flips a binary weight's sign when the
gradient's moving average is large and agrees with it.

  m_t = (1 - gamma) m_{t-1} + gamma g_t
  w_t = -sign(w_{t-1})  if |m_t| > tau and sign(m_t) = sign(w_{t-1}),
        sign(w_{t-1})   otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


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


