"""Evaluate a checkpoint over a whole evaluation split.

  python -m bnn_jax.evaluate --config=configs/digits.py \
      --checkpoint=/tmp/bnn_digits [--phase=step2] [--json]

Builds the model of phase `--phase` of the config (default: the last phase
of `config.phase_order`), restores `{'params', 'batch_stats'}` from
`--checkpoint` (a run's workdir, whose phase `--phase` is read; a phase
directory such as /tmp/bnn_digits/step2, its `checkpoints/` directory, or
the output of `bnn_jax.import_torch`; the latest step), checks that they match
the model exactly (any missing, unexpected or mis-shaped variable is an
error naming it) and evaluates it in eval mode (BatchNorm running
statistics) over the config's eval split, every example exactly once (the
last batch is padded and masked):

  top-1 = #{argmax logits = label} / N,  top-5 = #{label in top 5} / N,
  loss  = mean cross-entropy -log softmax(logits)_label.

Prints one line, or with `--json` one JSON object. Any config field can be
overridden, e.g. `--config.dataset.data_dir=...` or `--config.eval_batch_size=`.

Exit status: 0 done; 1 bad input (one-line error; `--debug` shows the
traceback).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bnn_jax import cli
from bnn_jax import malloc_defaults
from bnn_jax import xla_defaults

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file (configs/*.py).",
      lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Checkpoint to evaluate: a run's "
                      "workdir (with --phase) or a checkpoint directory.")
  flags.DEFINE_string("phase", None, "Phase whose model to build; default: "
                      "the last of config.phase_order.")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")


def run_evaluation(config, checkpoint: str, phase: str | None = None) -> dict:
  """Evaluates `checkpoint` with phase `phase`'s model over the eval split.

  `checkpoint` is a run's workdir (its phase `phase` is read) or a
  checkpoint directory (`checkpoint.resolve_directory`).

  Returns:
    {'phase', 'model', 'checkpoint', 'dataset', 'split', 'top1', 'top5',
     'loss', 'count'}; count is the number of examples evaluated.
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bnn_jax import checkpoint as checkpoint_lib
  from bnn_jax import input_pipeline
  from bnn_jax import phases
  from bnn_jax import train
  from bnn_jax import train_step

  names = phases.phase_names(config)
  phase = phase or names[-1]
  if phase not in config.phases:
    raise ValueError(f"--phase={phase!r} is not a phase of the config; "
                     f"defined phases: {sorted(config.phases)}")
  info = input_pipeline.get_info(config.dataset)
  model_cfg = config.phases[phase].model
  model = train.build_model(config, model_cfg, info.num_classes)
  checkpoint = checkpoint_lib.resolve_directory(checkpoint, phase)
  variables, _ = checkpoint_lib.load_variables(checkpoint)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.float32))
  train.check_variables_match(abstract, variables, f"checkpoint {checkpoint}")

  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  eval_step = jax.jit(train_step.make_eval_step(model),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)
  batches = input_pipeline.eval_iterator(
      config.dataset, global_batch_size=config.eval_batch_size,
      sharding=batch_sharding)
  result = train_step.evaluate(
      eval_step, jax.device_put(variables, replicated), batches)
  return {"phase": phase, "model": model_cfg.name,
          "checkpoint": os.path.abspath(checkpoint),
          "dataset": config.dataset.name,
          "split": config.dataset.eval_split,
          "top1": result["eval/top1"], "top5": result["eval/top5"],
          "loss": result["eval/loss"], "count": int(result["eval/count"])}


def format_line(r: dict) -> str:
  """One human-readable line of a `run_evaluation` result."""
  return (f"{r['phase']} ({r['model']}) on {r['dataset']}/{r['split']}: "
          f"top1 {r['top1']:.4f} top5 {r['top5']:.4f} loss {r['loss']:.4f} "
          f"over {r['count']} examples, checkpoint {r['checkpoint']}")


def main(argv):
  del argv
  cli.quiet_logging(logging.ERROR)  # the output is the result line
  with cli.reporting_errors(debug=FLAGS.debug):
    if FLAGS.config is None or FLAGS.checkpoint is None:
      raise ValueError("pass --config=configs/<name>.py and --checkpoint=<dir>")
    # Before JAX's backend starts its threads (config.cpu_malloc).
    malloc_defaults.apply(FLAGS.config.cpu_malloc)
    result = run_evaluation(FLAGS.config, FLAGS.checkpoint, FLAGS.phase)
  print(json.dumps(result) if FLAGS.json else format_line(result), flush=True)


if __name__ == "__main__":
  # Before TensorFlow / JAX are imported (lazily, in the functions above).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  xla_defaults.apply()
  define_flags()
  app.run(main)
