"""Losses and accuracy: the distribution (KD) loss of AdamBNN, cross-entropy.

AdamBNN (and ReActNet) train the binary student with knowledge distillation
only: the "distributional loss" of ReActNet, the cross-entropy from a frozen
real-valued teacher's softmax to the student's,

    L_KD = 1/|B| sum_{i in B} -sum_c softmax(t_i / T)_c * log_softmax(s_i / T)_c

with temperature T = 1 and no label term. It equals KL(p_t || p_s) plus the
teacher's entropy, a constant for the student, so the gradients are those of
the KL divergence. There is no T^2 factor (Hinton et al. 2015 multiply by T^2
to keep the gradient scale when T > 1); with the reference T = 1 it makes no
difference, and for T != 1 the caller scales `kd_weight` if it wants one.

Every loss is a mean over the examples of the batch where `mask` is 1 (the
padding of the last evaluation batch has mask 0); a fully masked batch gives 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import ml_collections

from bnn_jax import config_fields

Array = jax.Array
ConfigLike = Union[ml_collections.ConfigDict, Mapping[str, Any]]


def masked_mean(values: Array, mask: Optional[Array] = None) -> Array:
  """sum_i mask_i * values_i / max(1, sum_i mask_i); the plain mean if no mask.

  Args:
    values: per-example values, shape (batch,).
    mask: 0/1 (or bool) weights, shape (batch,), or None.
  """
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def distillation_loss(student_logits: Array, teacher_logits: Array,
                      temperature: float = 1.0,
                      mask: Optional[Array] = None) -> Array:
  """The KD loss: mean_i -sum_c softmax(t_i / T)_c * log_softmax(s_i / T)_c.

  The teacher logits go through `jax.lax.stop_gradient`: the teacher is
  frozen, the gradient flows to the student only.

  Args:
    student_logits: (batch, classes).
    teacher_logits: (batch, classes).
    temperature: T > 0 (reference: 1); no T^2 factor.
    mask: (batch,) 0/1 weights of real examples, or None.

  Returns:
    The scalar loss (float32).
  """
  teacher_probs = jax.nn.softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
  log_probs = jax.nn.log_softmax(
      student_logits.astype(jnp.float32) / temperature)
  # Classes the teacher gives probability 0 contribute 0 (not 0 * -inf).
  terms = jnp.where(teacher_probs > 0, teacher_probs * log_probs, 0.0)
  return masked_mean(-jnp.sum(terms, axis=-1), mask)


def cross_entropy(logits: Array, labels: Array, label_smoothing: float = 0.0,
                  mask: Optional[Array] = None) -> Array:
  """mean_i -sum_c q_ic * log_softmax(z_i)_c with smoothed one-hot targets.

  q_ic = (1 - eps) * [c == y_i] + eps / K for K classes and smoothing eps
  (Szegedy et al. 2016); eps = 0 is the plain cross-entropy -log p_{y_i}.

  Args:
    logits: (batch, classes).
    labels: (batch,) integer class ids.
    label_smoothing: eps in [0, 1).
    mask: (batch,) 0/1 weights of real examples, or None.

  Returns:
    The scalar loss (float32).
  """
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return masked_mean(-jnp.sum(targets * log_probs, axis=-1), mask)


def topk_correct(logits: Array, labels: Array, k: int) -> Array:
  """Per example, 1.0 if the label is among the k largest logits, else 0.0.

  Ties are broken by `jax.lax.top_k` (the lower class index first).

  Args:
    logits: (batch, classes).
    labels: (batch,) integer class ids.
    k: 1 <= k <= classes.

  Returns:
    (batch,) float32 of 0/1.
  """
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def accuracy(logits: Array, labels: Array, k: int = 1,
             mask: Optional[Array] = None) -> Array:
  """Top-k accuracy over the (masked) batch: masked_mean(topk_correct)."""
  return masked_mean(topk_correct(logits, labels, k), mask)


def default_loss_config() -> ml_collections.ConfigDict:
  """The reference loss: KD only, temperature 1, no label term.

  See docs/recipe.md#loss-and-teacher.
  """
  return ml_collections.ConfigDict(dict(
      kd_weight=1.0,
      ce_weight=0.0,
      label_smoothing=0.0,
      temperature=1.0,
  ))


def resolve_loss_config(
    loss_cfg: ConfigLike) -> ml_collections.FrozenConfigDict:
  """Fills missing fields from `default_loss_config()` and validates.

  Raises:
    ValueError: unknown field or out-of-range value.
  """
  c = config_fields.fill_defaults(loss_cfg, default_loss_config().to_dict(),
                                  "unknown loss field(s)")
  if c["kd_weight"] < 0 or c["ce_weight"] < 0:
    raise ValueError(f"loss weights must be >= 0; got kd_weight="
                     f"{c['kd_weight']}, ce_weight={c['ce_weight']}")
  if c["kd_weight"] == 0 and c["ce_weight"] == 0:
    raise ValueError("loss.kd_weight and loss.ce_weight are both 0: nothing "
                     "to train on")
  if not 0 <= c["label_smoothing"] < 1:
    raise ValueError(f"loss.label_smoothing={c['label_smoothing']}; expected "
                     "in [0, 1)")
  if c["temperature"] <= 0:
    raise ValueError(f"loss.temperature={c['temperature']}; expected > 0")
  return ml_collections.FrozenConfigDict(c)


def combined_loss(loss_cfg: ConfigLike, student_logits: Array, labels: Array,
                  teacher_logits: Optional[Array] = None,
                  mask: Optional[Array] = None
                  ) -> tuple[Array, dict[str, Array]]:
  """L = kd_weight * L_KD(s, t; T) + ce_weight * L_CE(s, y; label_smoothing).

  Args:
    loss_cfg: loss config (missing fields take the defaults: KD only).
    student_logits: (batch, classes).
    labels: (batch,) integer class ids.
    teacher_logits: (batch, classes); required when kd_weight > 0.
    mask: (batch,) 0/1 weights of real examples, or None.

  A term whose weight is 0 is not part of L at all (not `0 * term`, which is
  NaN once the term is infinite, and whose gradient is NaN likewise); it is
  still reported in the components, computed on `stop_gradient` logits so
  nothing of it reaches the gradient.

  Returns:
    (L, components): components has 'loss' (= L), 'ce_loss' (the configured
    cross-entropy, reported even at weight 0) and, when teacher logits are
    given, 'kd_loss' (reported even at weight 0).

  Raises:
    ValueError: kd_weight > 0 without teacher logits, or a bad config.
  """
  cfg = resolve_loss_config(loss_cfg)
  if teacher_logits is None and cfg.kd_weight > 0:
    raise ValueError(f"loss.kd_weight={cfg.kd_weight} needs teacher logits; "
                     "give the phase a teacher or set kd_weight=0")
  reported = jax.lax.stop_gradient(student_logits)
  terms = []  # (weight, value) of the terms with a positive weight
  ce = cross_entropy(student_logits if cfg.ce_weight > 0 else reported,
                     labels, cfg.label_smoothing, mask)
  components = {"ce_loss": ce}
  if cfg.ce_weight > 0:
    terms.append((cfg.ce_weight, ce))
  if teacher_logits is not None:
    kd = distillation_loss(student_logits if cfg.kd_weight > 0 else reported,
                           teacher_logits, cfg.temperature, mask)
    components["kd_loss"] = kd
    if cfg.kd_weight > 0:
      terms.append((cfg.kd_weight, kd))
  # resolve_loss_config guarantees at least one positive weight.
  loss = terms[0][0] * terms[0][1]
  for weight, value in terms[1:]:
    loss = loss + weight * value
  components["loss"] = loss
  return loss, components
