"""Building blocks for config files (configs/*.py): the run and phase schemas.

A run config:

  seed                    one seed for init, data order and augmentation
  dataset                 see `input_pipeline.default_dataset_config`
  batch_size              global training batch (all devices, all hosts)
  eval_batch_size         global evaluation batch (the last one is padded)
  model.bn_group_size     per-group ("ghost") BatchNorm statistics; unset = global
  model.dtype             computation dtype of every model ('float32', 'bfloat16'),
                          unless its phase sets phases.<name>.model.dtype
  model.binary_conv_impl  formulation of the binary convs' forward in every
                          model that has the attribute (ReActNet-A;
                          `bnn_jax.exact_binary_conv`); unset = 'auto'
  model.bn_stats_method   BatchNorm batch statistics of those models
                          (`bnn_jax.batch_stats`); unset = 'two_pass'
  phase_order             comma-separated phase names, run in order
  phases.<name>           one phase (below)
  log_every_steps, eval_every_epochs, checkpoint_every_steps, keep_checkpoints
  dynamics.every          log `bnn_jax.dynamics` metrics every N steps (0 = off);
                          dynamics.dead_threshold, dynamics.per_layer
  cpu_malloc              'glibc' (default) or 'reuse': on a CPU-only host,
                          keep XLA's per-step buffers mapped between steps
                          (`bnn_jax.malloc_defaults`; faster for models whose
                          step buffers exceed 64 MiB, e.g. ReActNet-A).
                          Applied by `bnn_jax.main` / `bnn_jax.evaluate`
                          before JAX starts; elsewhere call
                          `malloc_defaults.apply(config.cpu_malloc)` before
                          the first JAX computation

A phase config:

  model                   name (bnn_jax.models.MODELS) + attribute overrides;
                          model.dtype: this phase's computation dtype (unset =
                          config.model.dtype). A KD teacher runs in its own
                          phase's dtype (docs/performance.md, precision policy)
  num_epochs              epochs (converted to steps at run time; 0 = only
                          load `init_from` and evaluate)
  optimizer               see `optim.default_optimizer_config`
  loss                    see `losses.default_loss_config`
  teacher                 name of an earlier phase to distil from ('' = none)
  init_from               '' (fresh), 'previous' (hand-off), or a checkpoint dir

Durations are in epochs and converted to steps at run time, so
`--config.batch_size=...` never leaves a stale step count behind.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from bnn_jax import config_fields
from bnn_jax import dynamics
from bnn_jax import losses
from bnn_jax import models
from bnn_jax import optim
from bnn_jax.training import input_pipeline


def base_config(dataset_name: str) -> ml_collections.ConfigDict:
  """Run-level defaults for a data set; add phases and set phase_order."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = input_pipeline.default_dataset_config(dataset_name)
  config.batch_size = 256
  config.eval_batch_size = 256
  config.model = ml_collections.ConfigDict()
  config.model.bn_group_size = config_dict.placeholder(int)
  config.model.dtype = "float32"
  # Performance levers of the models that have them (ReActNet-A); unset =
  # the model's default (docs/performance.md).
  config.model.binary_conv_impl = config_dict.placeholder(str)
  config.model.bn_stats_method = config_dict.placeholder(str)
  config.phase_order = ""
  config.phases = ml_collections.ConfigDict()
  config.log_every_steps = 100
  config.eval_every_epochs = 1
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  config.dynamics = dynamics.default_dynamics_config()
  config.cpu_malloc = "glibc"
  return config


def phase_config(model_name: str, num_epochs: int,
                 **model_attributes) -> ml_collections.ConfigDict:
  """A phase training `model_name` (with attribute overrides) for `num_epochs`."""
  phase = ml_collections.ConfigDict()
  # Every plain attribute of the model, so any can be set from the command
  # line (--config.phases.step1.model.activation_binarizer=ste_sign).
  attributes = models.default_attributes(model_name)
  config_fields.check_known(model_attributes, attributes,
                            f"model {model_name!r} has no attribute(s)")
  attributes.update(model_attributes)
  phase.model = ml_collections.ConfigDict(dict(name=model_name, **attributes))
  phase.model.dtype = config_dict.placeholder(str)
  phase.num_epochs = num_epochs
  phase.optimizer = optim.default_optimizer_config()
  phase.loss = losses.default_loss_config()
  phase.teacher = ""
  phase.init_from = ""
  return phase


def phase_names(config: ml_collections.ConfigDict) -> list[str]:
  """The phases to run, in order, validated against `config.phases`."""
  names = [n.strip() for n in str(config.phase_order).split(",") if n.strip()]
  if not names:
    raise ValueError("config.phase_order is empty; name at least one phase, "
                     f"e.g. --config.phase_order={','.join(config.phases)}")
  unknown = [n for n in names if n not in config.phases]
  if unknown:
    raise ValueError(f"config.phase_order names unknown phase(s) {unknown}; "
                     f"defined phases: {sorted(config.phases)}")
  return names
