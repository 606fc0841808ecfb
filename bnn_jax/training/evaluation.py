"""Evaluation over a whole split: the one loop for training, checkpoints and packed files.

Every example of the config's eval split is seen exactly once (the last
batch is padded and masked, `input_pipeline.eval_iterator`), in eval mode:

  top-1 = #{argmax logits = label} / N,  top-5 = #{label in top 5} / N,
  loss  = mean cross-entropy -log softmax(logits)_label.

The model is anything with flax's `apply(variables, images, train=False)`:
a float model restored from a checkpoint (`load_phase`) or the packed
forward of a packed file (`deploy.packed_forward.PackedModel`), so
`python -m bnn_jax.evaluate --checkpoint` and `--packed` and the training
loop's evaluations run the same code.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import config_lib
from bnn_jax import models
from bnn_jax import train_step
from bnn_jax.deploy import packed_format
from bnn_jax.deploy import packed_forward
from bnn_jax.training import input_pipeline
from bnn_jax.training import preprocess
from bnn_jax.training import topology


def sharded_eval_step(model: Any, mesh: Mesh) -> Callable:
  """`train_step.make_eval_step(model)` jitted: variables replicated, batch `P('data')`."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step.make_eval_step(model),
                 in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=replicated)


def evaluate_split(eval_step: Callable, variables: Any,
                   config: ml_collections.ConfigDict,
                   batch_sharding: NamedSharding) -> dict:
  """{'eval/top1', 'eval/top5', 'eval/loss', 'eval/count'} over the eval split."""
  batches = input_pipeline.eval_iterator(
      config.dataset, global_batch_size=config.eval_batch_size,
      sharding=batch_sharding)
  return train_step.evaluate(eval_step, variables, batches)


def evaluate_model(model: Any, variables: Any,
                   config: ml_collections.ConfigDict,
                   mesh: Optional[Mesh] = None) -> dict:
  """`evaluate_split` of `model` on a mesh of every device, as a result record:
  {'dataset', 'split', 'top1', 'top5', 'loss', 'count'}."""
  mesh = topology.make_mesh() if mesh is None else mesh
  result = evaluate_split(
      sharded_eval_step(model, mesh),
      jax.device_put(variables, NamedSharding(mesh, P())), config,
      NamedSharding(mesh, P("data")))
  return {"dataset": config.dataset.name, "split": config.dataset.eval_split,
          "top1": result["eval/top1"], "top5": result["eval/top5"],
          "loss": result["eval/loss"], "count": int(result["eval/count"])}


def load_phase(config: ml_collections.ConfigDict, checkpoint: str,
               phase: Optional[str] = None) -> dict:
  """Phase `phase`'s model (default: the last phase), `checkpoint`'s variables.

  `checkpoint` is a run's workdir (its phase `phase` is read) or a
  checkpoint directory (`checkpoint.resolve_directory`). The model is the
  config's, except its sign(0) convention (`zero_to`): when the
  checkpoint's meta records one (training runs and `bnn_jax.import_torch`
  do), that one is used, since the weights were trained or imported under
  it. The variables must match the model exactly.

  Returns:
    {'phase', 'model_cfg' (name + attributes as built), 'model',
     'variables' ({'params', 'batch_stats'}, host arrays), 'meta', 'info'
     (the data set's `input_pipeline.DatasetInfo`), 'checkpoint'}.
  """
  names = config_lib.phase_names(config)
  phase = phase or names[-1]
  if phase not in config.phases:
    raise ValueError(f"--phase={phase!r} is not a phase of the config; "
                     f"defined phases: {sorted(config.phases)}")
  info = input_pipeline.get_info(config.dataset)
  checkpoint = checkpoint_lib.resolve_directory(checkpoint, phase)
  variables, meta = checkpoint_lib.load_variables(checkpoint)
  model_cfg = ml_collections.ConfigDict(config.phases[phase].model.to_dict())
  recorded = (meta.get("model") or {}).get("zero_to")
  if recorded is not None and "zero_to" in model_cfg:
    model_cfg.zero_to = float(recorded)
  model = models.from_config(config, model_cfg, info.num_classes)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.float32))
  checkpoint_lib.check_variables_match(abstract, variables,
                                       f"checkpoint {checkpoint}")
  return {"phase": phase, "model_cfg": model_cfg.to_dict(), "model": model,
          "variables": variables, "meta": meta, "info": info,
          "checkpoint": checkpoint}


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str,
                        phase: Optional[str] = None) -> dict:
  """Evaluates `checkpoint` with phase `phase`'s model over the eval split.

  Returns:
    {'phase', 'model', 'checkpoint', 'dataset', 'split', 'top1', 'top5',
     'loss', 'count'}; count is the number of examples evaluated.
  """
  loaded = load_phase(config, checkpoint, phase)
  return {"phase": loaded["phase"], "model": loaded["model_cfg"]["name"],
          "checkpoint": loaded["checkpoint"],
          **evaluate_model(loaded["model"], loaded["variables"], config)}


def evaluate_packed(config: ml_collections.ConfigDict, path: str) -> dict:
  """Top-1, top-5 and CE of a packed file (XNOR-popcount binary convs) over
  the config's eval split; the config must feed the data it was exported for.

  Returns:
    {'phase', 'model', 'checkpoint' (the file), 'format': 'packed',
     'dataset', 'split', 'top1', 'top5', 'loss', 'count'}.
  """
  packed_model, variables = packed_forward.load(path)
  info = input_pipeline.get_info(config.dataset)
  recipe = preprocess.get_recipe(config.dataset.name)
  packed_format.check_input_matches(packed_model.header, config.dataset.name,
                                    info.image_shape, recipe.mean,
                                    recipe.std)
  header = packed_model.header
  return {"phase": header["source"]["phase"],
          "model": header["model"]["name"],
          "checkpoint": os.path.abspath(path), "format": "packed",
          **evaluate_model(packed_model, variables, config)}
