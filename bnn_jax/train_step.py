"""The train step (loss, gradients, optimizer update, metrics) and eval step.

Pure functions of a model, an optax chain and a loss config, to be jitted by
the caller (`bnn_jax.training.loop` shards them over a mesh; `bnn_jax.benchmark`
times them). Nothing here reads data, writes logs or checkpoints, so it
needs only JAX, Flax and optax.

One training step, for a batch (x, y) and the student f(W, x):

  teacher logits  t = stop_gradient(teacher(x))        (KD phases only)
  loss            L = `losses.combined_loss`(f(W, x), y, t)
  gradients       g = dL/dW (binarisers backpropagate their pseudo-gradients)
  update          W <- W + optax update(g, opt_state, W)
  metrics         loss, top-1, |g|, max |g|, lr, the loss parts, and `finite`
                  (loss, max |g| and max |W| all finite: `tree_max_abs`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bnn_jax import losses
from bnn_jax import optim


@flax.struct.dataclass
class TrainState:
  """Everything a phase needs to resume: step, params, BN statistics, optimizer state."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  @classmethod
  def create(cls, tx, variables: dict) -> "TrainState":
    """Step 0 from {'params', 'batch_stats'}: the one constructor of a state
    (a fresh init, a hand-off, `init_from`, the benchmarks, the dry run)."""
    return cls(step=jnp.zeros((), jnp.int32), params=variables["params"],
               batch_stats=variables.get("batch_stats", {}),
               opt_state=tx.init(variables["params"]))


def init_state(model, tx, rng: jax.Array,
               image_shape: tuple[int, ...]) -> TrainState:
  """A fresh state: `model.init(rng, zeros((1, *image_shape)))`, step 0, `tx.init`."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return TrainState.create(tx, model.init(rng, dummy, train=False))


# Leaves with at most this many elements are reduced together, as one
# concatenated vector: ReActNet-A has hundreds of per-channel leaves (shifts,
# slopes, BatchNorm scales and biases), and one reduction per leaf is one
# XLA:CPU thunk per leaf, each costing more in dispatch than in arithmetic.
SMALL_LEAF_SIZE = 65536


def reduction_groups(tree: Any) -> list[jax.Array]:
  """The non-empty leaves of `tree` as arrays to reduce, in float32.

  Every leaf above `SMALL_LEAF_SIZE` elements on its own; all the others
  concatenated (flattened) into one vector. A reduction over the groups
  covers every element of the tree exactly once.
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.size(x)]
  groups = [x.astype(jnp.float32) for x in leaves if jnp.size(x) > SMALL_LEAF_SIZE]
  small = [jnp.ravel(x).astype(jnp.float32) for x in leaves
           if jnp.size(x) <= SMALL_LEAF_SIZE]
  if small:
    groups.append(jnp.concatenate(small))
  return groups


def tree_max_abs(tree: Any) -> jax.Array:
  """max_i |x_i| over every element of every leaf, in float32 (0 for no leaves).

  The finite check uses it instead of a norm: sqrt(sum x^2) squares, so it
  overflows to Inf for |x| > ~1e19 and reads 0 below ~1e-27, while the
  maximum is finite exactly when every element is, and NaN propagates
  through it.
  """
  maxima = [jnp.max(jnp.abs(x)) for x in reduction_groups(tree)]
  if not maxima:
    return jnp.zeros((), jnp.float32)
  return jnp.max(jnp.stack(maxima))


def tree_norm(tree: Any) -> jax.Array:
  """sqrt(sum_i x_i^2) over every element of every leaf, in float32.

  `optax.tree.norm` up to the order of the float32 additions (it sums
  per leaf; here the small leaves are summed as one vector).
  """
  squares = [jnp.sum(jnp.square(x)) for x in reduction_groups(tree)]
  if not squares:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.stack(squares)))


def make_loss_fn(model: nn.Module, loss_cfg: ml_collections.ConfigDict, *,
                 intermediates: bool = False) -> Callable:
  """The training loss of one batch, the function the train step differentiates.

  Returns loss_fn(params, batch_stats, batch, teacher_logits) ->
  (loss, (new batch_stats, logits, loss parts)): the model in train mode
  (BatchNorm on batch statistics, updating the running ones) and
  `losses.combined_loss`, a mean over the global batch. With
  `intermediates`, the 'intermediates' collection is mutable too (the
  binary convs sow their binariser statistics) and comes fourth in the aux
  tuple (`bnn_jax.dynamics` reads it).
  """
  mutable = ["batch_stats", "intermediates"] if intermediates else [
      "batch_stats"]

  def loss_fn(params, batch_stats, batch, teacher_logits):
    logits, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["image"], train=True, mutable=mutable)
    loss, parts = losses.combined_loss(loss_cfg, logits, batch["label"],
                                       teacher_logits=teacher_logits)
    aux = (mutated["batch_stats"], logits, parts)
    if intermediates:
      aux += (mutated.get("intermediates", {}),)
    return loss, aux

  return loss_fn


def teacher_logits(teacher_model: Optional[nn.Module], teacher_variables: Any,
                   images: jax.Array) -> Optional[jax.Array]:
  """stop_gradient(teacher(images)) in eval mode; None without a teacher."""
  if teacher_model is None:
    return None
  return jax.lax.stop_gradient(
      teacher_model.apply(teacher_variables, images, train=False))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_cfg: ml_collections.ConfigDict,
                    teacher_model: Optional[nn.Module], *,
                    learning_rate: Optional[optax.ScalarOrSchedule] = None
                    ) -> Callable:
  """(state, batch, teacher_variables) -> (state, metrics), to be jitted.

  `tx` is any optax.GradientTransformation. The metric 'train/lr' is the
  rate of this update, learning_rate(state.step) for a schedule (the one
  `tx` was built with, e.g. `optim.build_schedule`) or the number itself;
  without `learning_rate`, the rate an `optax.inject_hyperparams` chain
  keeps in its state (`optim.learning_rate`), else no 'train/lr'. A dict
  {group label: schedule} (`optim.logged_learning_rate` of a config with
  parameter groups) logs 'train/lr/<label>' for each and 'train/lr' for the
  first.
  """
  loss_fn = make_loss_fn(model, loss_cfg)

  def lr_metric(step, opt_state):
    if isinstance(learning_rate, dict):  # parameter groups (optim.groups)
      rates = {f"train/lr/{label}": jnp.asarray(
          lr(step) if callable(lr) else lr, jnp.float32)
               for label, lr in learning_rate.items()}
      return {"train/lr": next(iter(rates.values())), **rates}
    if learning_rate is not None:
      lr = learning_rate(step) if callable(learning_rate) else learning_rate
      return {"train/lr": jnp.asarray(lr, jnp.float32)}
    try:
      return {"train/lr": optim.learning_rate(opt_state)}
    except ValueError:  # a chain that keeps no rate in its state
      return {}

  def train_step(state: TrainState, batch: dict, teacher_variables: Any):
    (loss, (batch_stats, logits, parts)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch,
            teacher_logits(teacher_model, teacher_variables, batch["image"]))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = tree_norm(grads)
    grad_max_abs = tree_max_abs(grads)
    metrics = {
        "train/loss": loss,
        "train/top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "train/grad_norm": grad_norm,
        "train/grad_max_abs": grad_max_abs,
        # Loss, gradients and the updated parameters: a NaN/Inf anywhere
        # stops the run before that state can be checkpointed.
        "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_max_abs)
                   & jnp.isfinite(tree_max_abs(params))),
    }
    metrics.update(lr_metric(state.step, opt_state))
    metrics.update({f"train/{k}": v for k, v in parts.items()})
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """(variables, batch) -> sums of top-1/top-5 hits, CE loss and count over unmasked examples."""

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    k5 = min(5, logits.shape[-1])
    return {
        "correct1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
        "correct5": jnp.sum(losses.topk_correct(logits, labels, k5) * mask),
        "loss_sum": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels) * mask),
        "count": jnp.sum(mask),
    }

  return eval_step


def evaluate(eval_step: Callable, variables: Any, batches) -> dict:
  """Top-1, top-5 and CE over every unmasked example of `batches`."""
  totals = None
  for batch in batches:
    out = eval_step(variables, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"eval/top1": float(totals["correct1"]) / count,
          "eval/top5": float(totals["correct5"]) / count,
          "eval/loss": float(totals["loss_sum"]) / count,
          "eval/count": count}
