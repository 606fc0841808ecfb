"""Weight dynamics of binary networks: flip-flops, C2I, dead weights.

The measurements behind AdamBNN's analysis (Liu et al., ICML 2021), as pure
jittable functions of parameter, gradient, intermediate and optimizer-state
pytrees, plus the hook that logs them during training.

Binary weights are the `kernel`s of modules named `binary_*`
(`optim.BINARY_KERNEL_REGEX`): the 13 + 18 binary convs of ReActNet-A, the 16
of ReActNet-18. In AdamBNN's step 1 these kernels are still real-valued (only
the activations are binary); their signs are what step 2 starts from, so the
same metrics apply. The binary state of a latent weight w is sign(w) with
sign(0) = +1, i.e. `w >= 0`; a boolean tree (True = +1, `binary_signs`) can
stand for a parameter tree wherever signs are compared.

Every metric returns a dict with one entry per binary layer (keyed by the
module path, e.g. 'block_1/binary_3x3') and `OVERALL`, the same fraction over
all binary weights (or inputs) of the network, so large layers weigh more:

  flip ratio   FF = sum_i |sign(w_i^b) - sign(w_i^a)| / 2 / N   (a, b: two
               steps, normally consecutive: the paper's stability measure)
  C2I          C2I = 1 - sum_i |sign(w_i) - sign(w_i^0)| / 2 / N   (w^0: the
               initialisation or the phase start: sluggishness)
  outside      sum_i [|w_i| > clip] / N: latent weights outside the weight
               STE window (clamp(w, -1, 1) passes no gradient there)
  dead         sum_i [|g_i| <= rho * mean_{j in layer} |g_j|] / N: weights
               whose gradient is (near) zero relative to their layer's mean
               |g| (rho = `dead_threshold`; exact zeros are always dead)
  zero grad    sum_i [g_i == 0] / N
  saturated    sum over binarised inputs x of [B'(x) == 0] / M: binariser
               inputs outside the activation STE window (approx_sign:
               |x| >= 1), from the forward pass
               (`layers.binarizer_input_stats`)
  constant     sum over binarised input channels of [one value over the
               whole batch] / C: the weights reading such a channel are
               dead, its constant contribution being removed by the
               BatchNorm after the conv
  Adam v       mean of Adam's second moment v (the raw EMA of g^2, no bias
               correction) over the dead and over the live binary weights:
               Adam's step m / (sqrt(v) + eps) is large for a weight with a
               small v, which is how it revives dead weights
               (docs/recipe.md#weight-dynamics).

The training hook (`bnn_jax.training.dynamics_monitor.DynamicsMonitor`, which
imports this module, never the other way round) computes them every
`config.dynamics.every` steps with `make_dynamics_step`, a separate jitted
function (one extra forward and backward pass on the last training batch),
so the train step itself is unchanged. This module needs no TensorFlow.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bnn_jax import layers
from bnn_jax import optim
from bnn_jax import paths
from bnn_jax import train_step

Array = jax.Array
# A metric: fraction per binary layer (module path) plus OVERALL.
LayerMetric = dict[str, Array]

OVERALL = "overall"
# Latent weights outside [-CLIP, CLIP] get no gradient (binary._clamp_ste_bwd).
WEIGHT_STE_CLIP = 1.0
DEFAULT_DEAD_THRESHOLD = 1e-3
# Name of the file (in a phase directory) holding the reference signs
# (`bnn_jax.training.dynamics_monitor`).
SIGNS_FILE = "dynamics_signs.npz"
# Name of the file (in a phase directory) holding the reference signs.

_KERNEL_SUFFIX = "/kernel"


def binary_kernels(tree: Any) -> dict[str, Array]:
  """The binary kernels of a parameter-shaped tree, keyed by '/'-joined path.

  Leaves whose path (e.g. 'block_1/binary_3x3/kernel') fullmatches
  `optim.BINARY_KERNEL_REGEX`. The result is itself such a tree (its keys
  are the paths), so `binary_kernels(binary_kernels(t)) == binary_kernels(t)`.
  Works on params, gradients, Adam's mu / nu and sign snapshots alike.
  """
  return {name: leaf for name, leaf in
          ((paths.tree_path(p), leaf) for p, leaf in
           jax.tree_util.tree_flatten_with_path(tree)[0])
          if re.fullmatch(optim.BINARY_KERNEL_REGEX, name)}


def layer_name(kernel_path: str) -> str:
  """'block_1/binary_3x3/kernel' -> 'block_1/binary_3x3'."""
  return kernel_path[:-len(_KERNEL_SUFFIX)]


def binary_signs(params: Any) -> dict[str, Array]:
  """Binary state of each binary kernel: w >= 0 (True = +1, sign(0) = +1)."""
  return {k: _positive(w) for k, w in binary_kernels(params).items()}


def _positive(w: Array) -> Array:
  return w if w.dtype == jnp.bool_ else w >= 0


def _fractions(hits: Mapping[str, Array],
               totals: Mapping[str, Any]) -> LayerMetric:
  """{layer: hits / total} and OVERALL = sum(hits) / sum(totals), float32."""
  out = {name: jnp.asarray(hits[name], jnp.float32) /
         jnp.asarray(totals[name], jnp.float32) for name in hits}
  out[OVERALL] = (sum(jnp.asarray(h, jnp.float32) for h in hits.values()) /
                  sum(jnp.asarray(t, jnp.float32) for t in totals.values()))
  return out


def _kernel_fractions(masks: Mapping[str, Array]) -> LayerMetric:
  """Per-layer and overall fraction of True in boolean kernel masks."""
  if not masks:
    raise ValueError("no binary kernel (a `kernel` under a module named "
                     "binary_*) in this tree")
  return _fractions({layer_name(k): jnp.sum(m, dtype=jnp.int32)
                     for k, m in masks.items()},
                    {layer_name(k): m.size for k, m in masks.items()})


def _paired(a: Any, b: Any) -> tuple[dict[str, Array], dict[str, Array]]:
  ka, kb = binary_kernels(a), binary_kernels(b)
  if set(ka) != set(kb):
    raise ValueError(f"the trees hold different binary kernels: "
                     f"{sorted(set(ka) ^ set(kb))}")
  return ka, kb


def flip_ratio(before: Any, after: Any) -> LayerMetric:
  """FF = sum_i |sign(after_i) - sign(before_i)| / 2 / N.

  The paper's stability measure (docs/recipe.md#weight-dynamics): the
  fraction of binary weights whose sign differs between two parameter
  trees (or sign snapshots from `binary_signs`), per layer and overall.
  """
  ka, kb = _paired(before, after)
  return _kernel_fractions({k: _positive(ka[k]) != _positive(kb[k])
                            for k in ka})


def c2i(params: Any, reference: Any) -> LayerMetric:
  """C2I = 1 - sum_i |sign(w_i) - sign(w_i^0)| / 2 / N.

  The paper's sluggishness measure (docs/recipe.md#weight-dynamics): the
  fraction of binary weights with the same sign as in `reference` (the
  initialisation, or the phase start), per layer and overall.
  """
  return {k: 1.0 - v for k, v in flip_ratio(reference, params).items()}


def outside_window_fraction(params: Any,
                            clip: float = WEIGHT_STE_CLIP) -> LayerMetric:
  """sum_i [|w_i| > clip] / N: latent weights the weight STE passes no gradient.

  The window is inclusive (torch's clamp gradient is 1 at +-1), so |w| = clip
  is inside.
  """
  return _kernel_fractions({k: jnp.abs(w) > clip
                            for k, w in binary_kernels(params).items()})


def dead_mask(grads: Any,
              threshold: float = DEFAULT_DEAD_THRESHOLD) -> dict[str, Array]:
  """Dead binary weights: |g_i| <= threshold * mean_{j in layer} |g_j|.

  The threshold is relative to the layer's gradient scale because that scale
  differs by orders of magnitude between layers (measured at init on
  reactnet_small: mean |g| 0.6 in block 1, 0.002 in block 5). Exact zeros
  (weights outside the STE window, output channels that receive no
  gradient, a layer with no gradient at all) are always dead. Chance sets a
  floor: if a layer's gradients were Gaussian, P(|g| <= rho E|g|) ~ 2 rho /
  pi, i.e. 0.064% at the default rho = 1e-3; fractions well above that
  mean weights whose gradient is systematically small.
  """
  out = {}
  for k, g in binary_kernels(grads).items():
    mag = jnp.abs(g)
    out[k] = mag <= threshold * jnp.mean(mag)
  return out


def dead_fraction(grads: Any,
                  threshold: float = DEFAULT_DEAD_THRESHOLD) -> LayerMetric:
  """sum_i [|g_i| <= threshold * mean_{j in layer} |g_j|] / N (`dead_mask`)."""
  return _kernel_fractions(dead_mask(grads, threshold))


def zero_grad_fraction(grads: Any) -> LayerMetric:
  """sum_i [g_i == 0] / N: binary weights with an exactly zero gradient."""
  return _kernel_fractions({k: g == 0
                            for k, g in binary_kernels(grads).items()})


def _binarizer_fractions(intermediates: Any, hit: str,
                         total: str) -> LayerMetric:
  """sum hit / sum total of what the binary convs sowed, per conv and total."""
  hits, totals = {}, {}
  flat = traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  for keys, calls in flat.items():
    if keys[-1] != layers.BINARIZER_STATS_KEY:
      continue
    layer = "/".join(keys[:-1])
    for stats in calls:
      hits[layer] = hits.get(layer, 0.0) + jnp.asarray(stats[hit],
                                                       jnp.float32)
      totals[layer] = totals.get(layer, 0.0) + jnp.asarray(stats[total],
                                                           jnp.float32)
  if not hits:
    raise ValueError("no binariser statistics in these intermediates; apply "
                     "the model with mutable=['intermediates']")
  return _fractions(hits, totals)


def saturated_fraction(intermediates: Any) -> LayerMetric:
  """Fraction of binariser inputs outside the activation STE window.

  Reads what `layers.BinaryConv` sows under `layers.BINARIZER_STATS_KEY`
  when the 'intermediates' collection is mutable: per conv, the number of
  its binariser's inputs where the pseudo-gradient is 0, summed over the
  conv's calls. Per layer (keyed by the conv's module path) and overall:
  sum saturated / sum inputs.

  Args:
    intermediates: the 'intermediates' collection of a forward pass.

  Raises:
    ValueError: nothing was sown (no binarised input, or the collection was
      not mutable).
  """
  return _binarizer_fractions(intermediates, "saturated", "inputs")


def constant_channel_fraction(intermediates: Any) -> LayerMetric:
  """Fraction of binarised input channels with one value over the whole batch.

  sum constant channels / sum channels (per conv and overall), from what
  `layers.BinaryConv` sows (see `layers.binarizer_input_stats`). The
  weights reading a constant channel get (almost) no gradient: its
  contribution is the same at every output position and example, and the
  BatchNorm after the conv subtracts it.
  """
  return _binarizer_fractions(intermediates, "constant_channels", "channels")


def adam_second_moment(opt_state: Any) -> Optional[dict[str, Array]]:
  """Adam's second moment v of the binary kernels, or None without Adam.

  Finds the `optax.ScaleByAdamState` anywhere in the optimizer state (inside
  inject_hyperparams, chain, partition or masked states) whose `nu` holds
  the binary kernels, and returns `binary_kernels(nu)`.
  """
  states = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  for s in states:
    if isinstance(s, optax.ScaleByAdamState):
      nu = binary_kernels(s.nu)
      if nu:
        return nu
  return None


def second_moment_by_deadness(nu: Mapping[str, Array],
                              dead: Mapping[str, Array]) -> dict[str, Array]:
  """Mean of v over the dead and over the live binary weights.

  Returns {'adam_v_dead': sum_{i dead} v_i / #dead,
           'adam_v_live': sum_{i live} v_i / #live}; NaN for an empty set.
  """
  if set(nu) != set(dead):
    raise ValueError(f"v and the dead mask cover different kernels: "
                     f"{sorted(set(nu) ^ set(dead))}")
  sums = {"dead": 0.0, "live": 0.0}
  counts = {"dead": 0.0, "live": 0.0}
  for k, v in nu.items():
    d = dead[k]
    for key, mask in (("dead", d), ("live", ~d)):
      sums[key] = sums[key] + jnp.sum(jnp.where(mask, v, 0.0))
      counts[key] = counts[key] + jnp.sum(mask, dtype=jnp.float32)
  return {f"adam_v_{key}": sums[key] / counts[key] for key in sums}


def weight_dynamics(params: Any, grads: Any, opt_state: Any,
                    intermediates: Any, *, previous: Optional[Any],
                    init: Any, start: Any,
                    dead_threshold: float = DEFAULT_DEAD_THRESHOLD,
                    per_layer: bool = True) -> dict[str, Array]:
  """Every metric of this module, as one flat dict of scalars.

  Names: 'flip_ratio' (vs `previous`, omitted when None), 'c2i' (vs `init`),
  'c2i_phase' (vs `start`), 'outside_window', 'dead_fraction',
  'zero_grad_fraction', 'saturated_fraction' and
  'constant_channel_fraction' (when the binary convs sowed statistics),
  'adam_v_dead' / 'adam_v_live' (with Adam); with `per_layer`, also
  '<metric>/<layer path>' for every layer metric.

  Args:
    params: parameters (latent weights) now.
    grads: the loss gradient at `params`.
    opt_state: the optimizer state (for Adam's v).
    intermediates: 'intermediates' of the forward pass at `params`.
    previous: parameters or signs one step earlier (for the flip ratio).
    init: parameters or signs at initialisation.
    start: parameters or signs at the start of the phase.
    dead_threshold: rho of `dead_mask`.
    per_layer: add the per-layer values.
  """
  metrics: dict[str, LayerMetric] = {}
  if previous is not None:
    metrics["flip_ratio"] = flip_ratio(previous, params)
  metrics["c2i"] = c2i(params, init)
  metrics["c2i_phase"] = c2i(params, start)
  metrics["outside_window"] = outside_window_fraction(params)
  dead = dead_mask(grads, dead_threshold)
  metrics["dead_fraction"] = _kernel_fractions(dead)
  metrics["zero_grad_fraction"] = zero_grad_fraction(grads)
  if jax.tree_util.tree_leaves(intermediates):
    metrics["saturated_fraction"] = saturated_fraction(intermediates)
    metrics["constant_channel_fraction"] = constant_channel_fraction(
        intermediates)
  out = {}
  for name, values in metrics.items():
    out[name] = values[OVERALL]
    if per_layer:
      out.update({f"{name}/{layer}": v for layer, v in values.items()
                  if layer != OVERALL})
  nu = adam_second_moment(opt_state)
  if nu is not None:
    out.update(second_moment_by_deadness(nu, dead))
  return out


# ---------------------------------------------------------------------------
# The training hook's config and step (the hook: bnn_jax.training.dynamics_monitor).
# ---------------------------------------------------------------------------
def default_dynamics_config() -> ml_collections.ConfigDict:
  """`config.dynamics`: every (0 = off), dead_threshold (rho), per_layer."""
  return ml_collections.ConfigDict(dict(
      every=0, dead_threshold=DEFAULT_DEAD_THRESHOLD, per_layer=True))


def make_dynamics_step(model: nn.Module, loss_cfg: Any,
                       teacher_model: Optional[nn.Module], *,
                       dead_threshold: float, per_layer: bool) -> Callable:
  """(state, batch, teacher_variables, previous, init, start) -> metrics.

  One forward and backward pass of the phase's training loss
  (`train_step.make_loss_fn`, the function the train step differentiates:
  train-mode BatchNorm, teacher logits for KD) at `state.params`, with the
  'intermediates' collection mutable so the binary convs report their
  saturation; the updated BatchNorm statistics are discarded. Then
  `weight_dynamics`. To be jitted.
  """
  loss_fn = train_step.make_loss_fn(model, loss_cfg, intermediates=True)

  def dynamics_step(state, batch, teacher_variables, previous, init, start):
    logits_t = train_step.teacher_logits(teacher_model, teacher_variables,
                                         batch["image"])
    (_, (_, _, _, intermediates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state.batch_stats, batch,
                               logits_t)
    return weight_dynamics(state.params, grads, state.opt_state,
                           intermediates, previous=previous, init=init,
                           start=start, dead_threshold=dead_threshold,
                           per_layer=per_layer)

  return dynamics_step

