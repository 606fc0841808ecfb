"""Tests of bnn_jax.losses: KD loss, cross-entropy, top-k, combined loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_jax import losses

STUDENT = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
TEACHER = jnp.array([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
LABELS = jnp.array([2, 0])


def softmax64(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def kd_by_hand(s, t, temperature=1.0):
  p_t = softmax64(np.asarray(t) / temperature)
  log_p_s = np.log(softmax64(np.asarray(s) / temperature))
  return np.mean(-np.sum(p_t * log_p_s, axis=-1))


def test_distillation_loss_hand_values():
  np.testing.assert_allclose(losses.distillation_loss(STUDENT, TEACHER),
                             kd_by_hand(STUDENT, TEACHER), rtol=1e-6)
  np.testing.assert_allclose(
      losses.distillation_loss(STUDENT, TEACHER, temperature=2.0),
      kd_by_hand(STUDENT, TEACHER, 2.0), rtol=1e-6)
  # Uniform teacher, uniform student: log(classes).
  np.testing.assert_allclose(
      losses.distillation_loss(jnp.zeros((4, 3)), jnp.ones((4, 3))),
      math.log(3), rtol=1e-6)


def test_distillation_with_one_hot_teacher_is_cross_entropy():
  teacher = 1e4 * jax.nn.one_hot(LABELS, 3)  # softmax is one-hot in float32
  np.testing.assert_allclose(losses.distillation_loss(STUDENT, teacher),
                             losses.cross_entropy(STUDENT, LABELS), rtol=1e-6)


def test_distillation_gradients():
  grad_t = jax.grad(losses.distillation_loss, argnums=1)(STUDENT, TEACHER)
  np.testing.assert_array_equal(grad_t, 0.0)
  # d/ds of mean_i -sum p_t log softmax(s) = (softmax(s) - p_t) / batch.
  grad_s = jax.grad(losses.distillation_loss)(STUDENT, TEACHER)
  np.testing.assert_allclose(
      grad_s, (softmax64(STUDENT) - softmax64(TEACHER)) / 2, rtol=1e-5,
      atol=1e-7)


def test_masked_means_ignore_padding():
  pad_s = jnp.concatenate([STUDENT, 100 * jnp.ones((2, 3))])
  pad_t = jnp.concatenate([TEACHER, -50 * jnp.ones((2, 3))])
  pad_y = jnp.concatenate([LABELS, jnp.array([1, 1])])
  mask = jnp.array([1, 1, 0, 0])
  np.testing.assert_allclose(
      losses.distillation_loss(pad_s, pad_t, mask=mask),
      losses.distillation_loss(STUDENT, TEACHER), rtol=1e-6)
  np.testing.assert_allclose(
      losses.cross_entropy(pad_s, pad_y, mask=mask.astype(bool)),
      losses.cross_entropy(STUDENT, LABELS), rtol=1e-6)
  np.testing.assert_allclose(
      losses.accuracy(pad_s, pad_y, mask=mask),
      losses.accuracy(STUDENT, LABELS), rtol=1e-6)
  assert losses.cross_entropy(pad_s, pad_y, mask=jnp.zeros(4)) == 0.0


def test_cross_entropy_and_label_smoothing_values():
  # p = softmax([0, ln 3]) = [1/4, 3/4].
  logits = jnp.array([[0.0, math.log(3.0)]])
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([1])),
                             math.log(4 / 3), rtol=1e-6)
  # eps = 0.2, K = 2: targets [0.1, 0.9].
  np.testing.assert_allclose(
      losses.cross_entropy(logits, jnp.array([1]), label_smoothing=0.2),
      0.1 * math.log(4) + 0.9 * math.log(4 / 3), rtol=1e-6)


def test_topk_correct_and_accuracy():
  logits = jnp.array([[0.1, 0.5, 0.2, 0.9]] * 4)
  labels = jnp.array([3, 1, 2, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 1),
                                [1, 0, 0, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 2),
                                [1, 1, 0, 0])
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, 3),
                                [1, 1, 1, 0])
  np.testing.assert_allclose(losses.accuracy(logits, labels, k=2), 0.5)


def test_combined_loss():
  kd = losses.distillation_loss(STUDENT, TEACHER)
  ce = losses.cross_entropy(STUDENT, LABELS)
  loss, parts = losses.combined_loss(losses.default_loss_config(), STUDENT,
                                     LABELS, TEACHER)
  assert loss == kd  # the reference: KD only
  assert set(parts) == {"loss", "kd_loss", "ce_loss"}
  np.testing.assert_allclose(parts["ce_loss"], ce)
  loss, _ = losses.combined_loss(dict(kd_weight=0.5, ce_weight=2.0), STUDENT,
                                 LABELS, TEACHER)
  np.testing.assert_allclose(loss, 0.5 * kd + 2.0 * ce, rtol=1e-6)
  loss, parts = losses.combined_loss(dict(kd_weight=0.0, ce_weight=1.0),
                                     STUDENT, LABELS)
  assert loss == ce and "kd_loss" not in parts
  with pytest.raises(ValueError, match="teacher logits"):
    losses.combined_loss(losses.default_loss_config(), STUDENT, LABELS)
  with pytest.raises(ValueError, match="unknown loss field"):
    losses.combined_loss(dict(kd=1.0), STUDENT, LABELS, TEACHER)
  with pytest.raises(ValueError, match="both 0"):
    losses.combined_loss(dict(kd_weight=0.0), STUDENT, LABELS, TEACHER)
