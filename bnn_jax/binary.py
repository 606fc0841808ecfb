"""Binarisers: sign functions with pseudo-gradients (the core of a BNN).

Every binariser's forward pass is a sign function; they differ only in the
gradient they pretend sign has (the "straight-through estimator", STE). Each
one is a `jax.custom_vjp`, so it works under `jit`, `grad`, `vmap` and with
bfloat16 inputs, and its docstring states the forward and the pseudo-gradient.

The sign(0) convention is explicit everywhere (`zero_to`):
  * `zero_to=1.0` (default): sign(0) = +1. A deployable binary network has
    only two states, and Larq / LCE use +1.
  * `zero_to=0.0`: sign(0) = 0, what `torch.sign` does, i.e. the reference
    AdamBNN / ReActNet code. Exact zeros are rare except in zero padding.

References: Bi-Real Net (Liu et al. 2018) for `approx_sign` and
`magnitude_aware_sign`; Larq (`larq/quantizers.py`: `SteSign`,
`ApproxSign`, `SwishSign`, `MagnitudeAwareSign`, whose forward passes and
pseudo-gradients these reproduce) for `ste_sign` and `swish_sign`; XNOR-Net / ReActNet
(`HardBinaryConv`) for `scaled_sign_weights`.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

__all__ = [
    "sign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "scaled_sign_weights",
    "sign_weights",
    "ste_sign_weights",
    "magnitude_aware_sign",
    "ACTIVATION_BINARIZERS",
    "get_activation_binarizer",
    "WEIGHT_BINARIZERS",
    "get_weight_binarizer",
]


def _sign_forward(x: jax.Array, zero_to: float) -> jax.Array:
  """sign(x) in x's dtype, with sign(0) = zero_to (for +0.0 and -0.0).

  NaN stays NaN, so a diverging run is not hidden behind +-1.
  """
  one = jnp.ones_like(x)
  zero = jnp.where(jnp.isnan(x), x, jnp.full_like(x, zero_to))
  return jnp.where(x > 0, one, jnp.where(x < 0, -one, zero))


# ---------------------------------------------------------------------------
# sign: the exact derivative (zero almost everywhere).
# ---------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sign(x: jax.Array, zero_to: float = 1.0) -> jax.Array:
  """Plain sign with its true derivative.

  forward:  sign(x) = +1 if x > 0, -1 if x < 0, `zero_to` if x == 0.
  gradient: d sign / dx = 0 everywhere (the derivative almost everywhere;
            the Dirac mass at 0 is dropped). Use it where nothing should
            flow back, e.g. to measure signs inside a differentiated function.
  """
  return _sign_forward(x, zero_to)


def _sign_fwd(x, zero_to):
  return _sign_forward(x, zero_to), None


def _sign_bwd(zero_to, _, g):
  del zero_to
  return (jnp.zeros_like(g),)


sign.defvjp(_sign_fwd, _sign_bwd)


def _masked_product(g: jax.Array, pseudo: jax.Array) -> jax.Array:
  """g * pseudo where pseudo != 0, exactly 0 elsewhere, in g's dtype.

  Outside a pseudo-gradient's window the gradient is 0 whatever arrives
  from above: `g * 0` would turn an infinite g into NaN (IEEE inf * 0), and
  a NaN in one example's gradient spreads to every weight through the
  batch sums of the layers below. Inside the window the product is taken
  in float32 (g may be bfloat16) and rounded once to g's dtype.
  """
  pseudo = pseudo.astype(jnp.float32)
  product = g.astype(jnp.float32) * pseudo
  return jnp.where(pseudo != 0, product, 0.0).astype(g.dtype)


def _sign_with_pseudo_gradient(pseudo_grad):
  """f(x, param, zero_to): forward sign(x), backward `_masked_product(g, pseudo_grad(x, param))`.

  `param` (a clip, a beta or None) and `zero_to` are static Python values.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
  def f(x, param, zero_to):
    del param
    return _sign_forward(x, zero_to)

  def fwd(x, param, zero_to):
    return f(x, param, zero_to), x

  def bwd(param, zero_to, x, g):
    del zero_to
    return (_masked_product(g, pseudo_grad(x.astype(jnp.float32), param)),)

  f.defvjp(fwd, bwd)
  return f


# ---------------------------------------------------------------------------
# ste_sign: clipped straight-through estimator.
# ---------------------------------------------------------------------------
def _ste_grad(x, clip):
  if clip is None:
    return jnp.ones_like(x)
  return (jnp.abs(x) <= jnp.asarray(clip, x.dtype)).astype(x.dtype)


_ste_sign = _sign_with_pseudo_gradient(_ste_grad)


def ste_sign(x: jax.Array, clip: Optional[float] = 1.0,
             zero_to: float = 1.0) -> jax.Array:
  """Sign with the clipped straight-through estimator (Larq's `ste_sign`).

  forward:  sign(x), sign(0) = `zero_to`.
  gradient: d/dx = 1 if |x| <= clip (inclusive) else 0.
            With `clip=None` every gradient passes: d/dx = 1.
  """
  return _ste_sign(x, None if clip is None else float(clip), float(zero_to))


# ---------------------------------------------------------------------------
# approx_sign: the reference activation (Bi-Real "ApproxSign").
# ---------------------------------------------------------------------------
def _approx_grad(x, unused):
  del unused
  two = jnp.asarray(2, x.dtype)
  return jnp.where((x >= -1) & (x < 0), two + two * x,
                   jnp.where((x >= 0) & (x < 1), two - two * x,
                             jnp.zeros_like(x)))


_approx_sign = _sign_with_pseudo_gradient(_approx_grad)


def approx_sign(x: jax.Array, zero_to: float = 1.0) -> jax.Array:
  """Sign with the Bi-Real polynomial pseudo-gradient (reference `BinaryActivation`).

  forward:  sign(x), sign(0) = `zero_to`.
  gradient: d/dx = 2 + 2x  on [-1, 0)
                   2 - 2x  on [0, 1)
                   0       elsewhere.
  This is the derivative of the piecewise quadratic
  F(x) = -1 (x < -1); 2x + x^2 (-1 <= x < 0); 2x - x^2 (0 <= x < 1); 1 (x >= 1).
  """
  return _approx_sign(x, None, float(zero_to))


# ---------------------------------------------------------------------------
# swish_sign: Darabi et al. 2018 ("BNN+"), as in Larq.
# ---------------------------------------------------------------------------
def _swish_grad(x, beta):
  bx = beta * x.astype(jnp.float32)
  return beta * (2.0 - bx * jnp.tanh(bx / 2.0)) / (1.0 + jnp.cosh(bx))


_swish_sign = _sign_with_pseudo_gradient(_swish_grad)


def swish_sign(x: jax.Array, beta: float = 5.0,
               zero_to: float = 1.0) -> jax.Array:
  """Sign with the SwishSign pseudo-gradient.

  forward:  sign(x), sign(0) = `zero_to`.
  gradient: d/dx = beta * (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)),
            the derivative of 2 sigmoid(beta x) (1 + beta x (1 - sigmoid(beta x))) - 1.
            It peaks at x = 0 with value beta and decays to 0 for |x| >> 1/beta.
  """
  return _swish_sign(x, float(beta), float(zero_to))


# ---------------------------------------------------------------------------
# scaled_sign_weights: binary weights with a per-output-channel scale.
# ---------------------------------------------------------------------------
def _scale_per_output_channel(w: jax.Array) -> jax.Array:
  """alpha_o = mean |w[..., o]| over every axis but the last."""
  return jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)


def _clamp_ste_bwd(w: jax.Array, g: jax.Array) -> jax.Array:
  """Gradient of clamp(w, -1, 1) as torch computes it: 1 on [-1, 1] inclusive."""
  inside = (w >= -1) & (w <= 1)  # jnp.clip's grad would be 0.5 at +-1
  return jnp.where(inside, g, jnp.zeros_like(g))  # where, never g * 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scaled_sign_weights(w, zero_to):
  return jax.lax.stop_gradient(_scale_per_output_channel(w)) * _sign_forward(
      w, zero_to)


def _scaled_sign_weights_fwd(w, zero_to):
  return _scaled_sign_weights(w, zero_to), w


def _scaled_sign_weights_bwd(zero_to, w, g):
  del zero_to
  return (_clamp_ste_bwd(w, g),)


_scaled_sign_weights.defvjp(_scaled_sign_weights_fwd, _scaled_sign_weights_bwd)


def scaled_sign_weights(w: jax.Array, zero_to: float = 1.0) -> jax.Array:
  """Binary weights alpha * sign(w) for an HWIO (or IO) kernel (reference `HardBinaryConv`).

  forward:  alpha_o * sign(w[..., o]),  alpha_o = mean |w[..., o]| over every
            axis but the last (the output channel).
  gradient: d/dw = 1 if -1 <= w <= 1 (inclusive) else 0: the straight-through
            gradient of clamp(w, -1, 1). alpha is excluded from the gradient
            and does *not* scale it.

  The reference writes this as
  `alpha.detach() * sign(w).detach() - clamp(w).detach() + clamp(w)`, whose
  gradient w.r.t. w is exactly torch's clamp gradient (1 at the boundary);
  `jnp.clip` would give 0.5 there and `lax.clamp` 0, hence the custom_vjp.
  """
  return _scaled_sign_weights(w, float(zero_to))


_sign_weights = _sign_with_pseudo_gradient(
    lambda w, unused: ((w >= -1) & (w <= 1)).astype(w.dtype))


def sign_weights(w: jax.Array, zero_to: float = 1.0) -> jax.Array:
  """Unscaled binary weights sign(w) (scale folded into the following BN).

  forward:  sign(w), sign(0) = `zero_to`.
  gradient: d/dw = 1 if -1 <= w <= 1 (inclusive) else 0.
  """
  return _sign_weights(w, None, float(zero_to))


def ste_sign_weights(w: jax.Array, clip: Optional[float] = 1.0,
                     zero_to: float = 1.0) -> jax.Array:
  """Unscaled binary weights with a clipped STE (Larq `SteSign` as kernel quantizer).

  forward:  sign(w), sign(0) = `zero_to`.
  gradient: d/dw = 1 if |w| <= clip (inclusive) else 0 (QuickNet and
            BinaryResNetE18 use clip = 1.25); `clip=None`: d/dw = 1.
  """
  return _ste_sign(w, None if clip is None else float(clip), float(zero_to))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _magnitude_aware_sign(w, clip, zero_to):
  return jax.lax.stop_gradient(_scale_per_output_channel(w)) * _sign_forward(
      w, zero_to)


def _magnitude_aware_sign_fwd(w, clip, zero_to):
  return _magnitude_aware_sign(w, clip, zero_to), w


def _magnitude_aware_sign_bwd(clip, zero_to, w, g):
  del zero_to
  alpha = _scale_per_output_channel(w.astype(jnp.float32))
  return (_masked_product(g, alpha * _ste_grad(w.astype(jnp.float32), clip)),)


_magnitude_aware_sign.defvjp(_magnitude_aware_sign_fwd,
                             _magnitude_aware_sign_bwd)


def magnitude_aware_sign(w: jax.Array, clip: Optional[float] = 1.0,
                         zero_to: float = 1.0) -> jax.Array:
  """Bi-Real Net's magnitude-aware binary weights (Larq `MagnitudeAwareSign`).

  forward:  alpha_o * sign(w[..., o]),  alpha_o = mean |w[..., o]| over every
            axis but the last (the output channel), as `scaled_sign_weights`.
  gradient: d/dw[..., o] = alpha_o * 1(|w| <= clip): Larq computes
            stop_gradient(alpha) * ste_sign(w), so unlike
            `scaled_sign_weights` the scale *does* multiply the gradient.
  """
  return _magnitude_aware_sign(w, None if clip is None else float(clip),
                               float(zero_to))


# ---------------------------------------------------------------------------
# Registry by name (configs and the command line pick binarisers by name).
# ---------------------------------------------------------------------------
ACTIVATION_BINARIZERS: dict[str, Callable[..., jax.Array]] = {
    "sign": sign,
    "ste_sign": ste_sign,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
}


def get_activation_binarizer(name: str, zero_to: float = 1.0,
                             **kwargs) -> Callable[[jax.Array], jax.Array]:
  """Returns x -> binariser(x) for a name in `ACTIVATION_BINARIZERS`."""
  if name not in ACTIVATION_BINARIZERS:
    raise ValueError(
        f"unknown activation binarizer {name!r}; choose one of "
        f"{sorted(ACTIVATION_BINARIZERS)}")
  fn = ACTIVATION_BINARIZERS[name]
  return lambda x: fn(x, zero_to=zero_to, **kwargs)


WEIGHT_BINARIZERS: dict[str, Callable[..., jax.Array]] = {
    "scaled_sign": scaled_sign_weights,
    "sign": sign_weights,
    "ste_sign": ste_sign_weights,
    "magnitude_aware_sign": magnitude_aware_sign,
}


def get_weight_binarizer(name: str, zero_to: float = 1.0, **kwargs
                         ) -> Callable[[jax.Array], jax.Array]:
  """Returns w -> binary weights for a name in `WEIGHT_BINARIZERS`.

  `kwargs` go to the binariser (e.g. `clip` of "ste_sign").
  """
  if name not in WEIGHT_BINARIZERS:
    raise ValueError(
        f"unknown weight binarizer {name!r}; choose one of "
        f"{sorted(WEIGHT_BINARIZERS)}")
  fn = WEIGHT_BINARIZERS[name]
  return lambda w: fn(w, zero_to=zero_to, **kwargs)
