"""`python -m bnn_jax.main ... --dry_run`: check a run and print its plan.

For a pod user before spending accelerator hours. On the current topology
(processes, devices) it

* validates the config (`phases.validate`, with `topology.batch_layout` for
  the batches over the devices);
* traces every phase's training state (model init on an input of the data
  set's image shape, optimizer state) with `jax.eval_shape`: shapes only,
  no compilation, no device memory; a phase starting from the previous
  one's variables is checked against their shapes;
* prints the plan of each phase: epochs, steps, global / per-device batch,
  evaluation batches, learning rate at the first and the last step,
  checkpoint cadence, teacher, `init_from`;
* lists what the run still needs from outside the config (a data set that is
  not prepared here, a checkpoint for a 0-epoch phase, a missing `init_from`
  directory) without failing on it.

It reads no data: split sizes come from the prepared data set's metadata
when it is prepared, else from the published TFDS sizes in `KNOWN_SPLITS`
(the plan says which). It writes nothing: no workdir, no data set. Exit 0,
or 1 with the one-line error of `bnn_jax.main`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from bnn_jax import checkpoint as checkpoint_lib
from bnn_jax import models
from bnn_jax import optim
from bnn_jax import train_step
from bnn_jax.training import input_pipeline
from bnn_jax.training import phases
from bnn_jax.training import preprocess
from bnn_jax.training import topology

# Examples per split of the TFDS releases the recipes read (imagenet2012
# 5.1.0, cifar10 3.0.2) and of bnn_jax's digits (bnn_jax.datasets.digits).
KNOWN_SPLITS = {
    "imagenet2012": {"train": 1_281_167, "validation": 50_000},
    "cifar10": {"train": 50_000, "test": 10_000},
    "digits": {"train": 1437, "test": 360},
}


def _split_size(spec: str, sizes: dict[str, int]) -> int:
  """Examples in TFDS split `spec` (sub-split syntax) given the full splits' sizes."""
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[n],
                                     num_bytes=0)
           for name, n in sizes.items()}
  try:
    instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(
        infos)
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f"split {spec!r} is not a split of {sorted(sizes)}: "
                     f"{e}; fix config.dataset.train_split / eval_split"
                     ) from None
  total = 0
  for instruction in instructions:
    n = sizes[instruction.splitname]
    start = 0 if instruction.from_ is None else instruction.from_
    stop = n if instruction.to is None else instruction.to
    total += max(0, stop - start)
  return total


def dataset_info(dataset_cfg: ml_collections.ConfigDict
                 ) -> tuple[input_pipeline.DatasetInfo, str, Optional[str]]:
  """(sizes and shapes, where the sizes come from, how to prepare or None).

  Reads only metadata: the prepared data set's `dataset_info.json` when
  there is one, else `KNOWN_SPLITS`. Prepares nothing.
  """
  cfg = input_pipeline.default_dataset_config(dataset_cfg.name)
  cfg.update(dataset_cfg.to_dict())
  recipe = preprocess.get_recipe(cfg.name)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # TFDS warns about absent versions.
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    prepared = builder.is_prepared()
  finally:
    logging.set_verbosity(verbosity)
  data_dir = str(builder.data_dir_root)
  how = None
  if prepared:
    sizes = {name: split.num_examples
             for name, split in builder.info.splits.items()}
    source = f"prepared in {data_dir}"
  elif recipe.prepare is not None:  # digits: built on first use, offline.
    sizes = KNOWN_SPLITS[cfg.name]
    source = (f"not yet built in {data_dir}, the run builds it without "
              "download; sizes from bnn_jax.datasets")
  else:
    sizes = KNOWN_SPLITS[cfg.name]
    source = (f"NOT prepared in {data_dir}; sizes from the published TFDS "
              "metadata")
    how = recipe.how_to_prepare.format(data_dir=data_dir)
  size = cfg.image_size or recipe.image_size
  info = input_pipeline.DatasetInfo(
      name=cfg.name,
      num_classes=builder.info.features["label"].num_classes,
      image_shape=(size, size, recipe.channels),
      num_train=_split_size(cfg.train_split, sizes),
      num_eval=_split_size(cfg.eval_split, sizes))
  return info, source, how


def _count(tree: Any) -> tuple[int, int]:
  """(elements, bytes) of a pytree of ShapeDtypeStructs."""
  leaves = jax.tree.leaves(tree)
  return (sum(math.prod(l.shape) for l in leaves),
          sum(math.prod(l.shape) * jnp.dtype(l.dtype).itemsize
              for l in leaves))


def _shape_only(tree: Any) -> Any:
  """ShapeDtypeStructs -> zero-size-in-memory arrays of the same shapes."""
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), bool), s.shape),
                      tree)


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def _evals(num_epochs: int, every: int) -> int:
  """Evaluations of a phase: every `every` epochs and after the last one."""
  if num_epochs == 0:
    return 1
  return num_epochs // every + (1 if num_epochs % every else 0)


def plan(config: ml_collections.ConfigDict) -> list[str]:
  """Validates `config` on this topology and returns the plan's lines.

  Raises:
    ValueError: the config cannot run here (the message names the fix).
  """
  names = phases.phase_names(config)
  layout = topology.batch_layout(config, jax.device_count(),
                                 jax.process_count())
  info, source, how_to_prepare = dataset_info(config.dataset)
  phases.validate(config, info=info, check_inputs=False)

  devices = jax.devices()
  lines = [
      f"topology: {layout.num_processes} process(es), "
      f"{layout.num_devices} {devices[0].platform} device(s) "
      f"({jax.local_device_count()} on this process)",
      f"data: {info.name} {info.image_shape}, {info.num_classes} classes; "
      f"train {config.dataset.train_split!r} {info.num_train} examples, "
      f"eval {config.dataset.eval_split!r} {info.num_eval} examples "
      f"({source})",
  ]
  steps_per_epoch = input_pipeline.steps_per_epoch(info, layout.batch_size)
  per_process_eval = layout.eval_batch_size // layout.num_processes
  eval_batches = math.ceil(math.ceil(info.num_eval / layout.num_processes)
                           / per_process_eval)
  lines += [
      f"train batch: {layout.batch_size} global = {layout.per_device_batch} "
      f"per device x {layout.num_devices} ({layout.per_process_batch} per "
      f"process); {steps_per_epoch} steps per epoch (last "
      f"{info.num_train - steps_per_epoch * layout.batch_size} examples of "
      "each epoch dropped)",
      f"eval batch: {config.eval_batch_size} requested -> "
      f"{layout.eval_batch_size} global = {layout.per_device_eval_batch} per "
      f"device; {eval_batches} batches per evaluation, "
      f"{eval_batches * layout.eval_batch_size - info.num_eval} masked "
      "fillers",
  ]

  needs = []
  if how_to_prepare:
    needs.append(f"data set {info.name}: {how_to_prepare}")
  abstract: dict[str, Any] = {}  # phase -> its abstract variables
  for index, name in enumerate(names):
    phase = config.phases[name]
    where = f"config.phases.{name}"
    model = models.from_config(config, phase.model, info.num_classes)
    epochs = phase.num_epochs
    total = steps_per_epoch * epochs
    opt = optim.resolve_config(phase.optimizer)  # once per phase
    built = optim.build(opt, steps_per_epoch=steps_per_epoch,
                        num_epochs=max(epochs, 1))
    tx = built.tx

    state = jax.eval_shape(
        lambda rng, model=model, tx=tx: train_step.init_state(
            model, tx, rng, info.image_shape), jax.random.key(0))
    if phase.init_from == "previous":
      previous = names[index - 1]
      checkpoint_lib.check_variables_match(state.variables,
                                  _shape_only(abstract[previous]),
                                  f"phase {previous!r}'s final variables "
                                  f"(init_from='previous' of {where})")
    abstract[name] = state.variables

    params, params_bytes = _count(state.params)
    _, stats_bytes = _count(state.batch_stats)
    _, opt_bytes = _count(state.opt_state)
    lines.append(
        f"[{name}] {phase.model.name}: {params:,} params ({_mb(params_bytes)}"
        f"), BN statistics {_mb(stats_bytes)}, optimizer state "
        f"{_mb(opt_bytes)}; replicated on every device")
    if epochs:
      k = config.checkpoint_every_steps
      saves = total // k + (1 if total % k else 0)
      if opt.groups:  # one chain (and schedule) per parameter group
        rates = "; ".join(
            f"group {label}: {g.name} lr {float(s(0)):.4g} at step 1, peak "
            f"{g.learning_rate:.4g} -> {float(s(total - 1)):.4g} at step "
            f"{total} ({g.schedule})"
            for label, s, g in (
                (label, built.learning_rate[label],
                 optim.group_config(opt, label))
                for label, _, _ in opt.groups))
      else:
        schedule = built.learning_rate
        rates = (f"{opt.name} lr {float(schedule(0)):.4g} at step 1 -> "
                 f"{float(schedule(total - 1)):.4g} at step {total} "
                 f"({opt.schedule})")
      lines.append(
          f"[{name}]   {epochs} epochs x {steps_per_epoch} steps = {total} "
          f"steps; {rates}; eval every {config.eval_every_epochs} "
          f"epoch(s): {_evals(epochs, config.eval_every_epochs)} x "
          f"{eval_batches} batches; checkpoint every {k} steps and at the "
          f"end: {saves} saves, last {config.keep_checkpoints} kept")
    else:
      lines.append(f"[{name}]   0 epochs: loads init_from and evaluates "
                   f"once ({eval_batches} batches)")
    init = phase.init_from or "fresh initialisation"
    lines.append(f"[{name}]   teacher: {phase.teacher or 'none'}; init_from: "
                 f"{init}")
    if epochs == 0 and not phase.init_from:
      needs.append(f"phase {name!r} trains 0 epochs and loads nothing: set "
                   f"--{where}.init_from=<checkpoint dir>")
    elif (phase.init_from not in ("", "previous")
          and "://" not in phase.init_from  # remote: checked by the run
          and not os.path.isdir(phase.init_from)):
      needs.append(f"{where}.init_from={phase.init_from!r} is not a "
                   "directory: pass a bnn_jax checkpoint directory")
  if needs:
    lines.append("before the run:")
    lines += [f"  - {need}" for need in needs]
  return lines


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Prints the plan of `config` (process 0 only); returns the exit status 0.

  Raises:
    ValueError: the config cannot run on this topology.
  """
  lines = plan(config)
  if jax.process_index() == 0:
    print("\n".join(lines))
    print(f"dry run OK: nothing was read or written (--workdir={workdir} "
          "untouched); drop --dry_run to train", flush=True)
  return 0
