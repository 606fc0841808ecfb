"""Evaluate a checkpoint over a whole evaluation split.

  python -m bnn_jax.evaluate --config=configs/digits.py \
      --checkpoint=/tmp/bnn_digits [--phase=step2] [--json]
  python -m bnn_jax.evaluate --config=configs/digits.py \
      --packed=/tmp/digits_step2.bnn.npz [--json]

Builds the model of phase `--phase` of the config (default: the last phase
of `config.phase_order`), restores `{'params', 'batch_stats'}` from
`--checkpoint` (a run's workdir, whose phase `--phase` is read; a phase
directory such as /tmp/bnn_digits/step2, its `checkpoints/` directory, or
the output of `bnn_jax.import_torch`; the latest step), checks that they match
the model exactly (any missing, unexpected or mis-shaped variable is an
error naming it; sign(0) follows the checkpoint's recorded `zero_to`) and
evaluates it in eval mode (BatchNorm running
statistics) over the config's eval split, every example exactly once (the
last batch is padded and masked):

  top-1 = #{argmax logits = label} / N,  top-5 = #{label in top 5} / N,
  loss  = mean cross-entropy -log softmax(logits)_label.

With `--packed`, evaluates a packed file (`bnn_jax.export`) instead: its
binary convs run as XNOR-popcount over 1-bit words (`bnn_jax.packed`).

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
  flags.DEFINE_string("packed", None, "A packed file (python -m "
                      "bnn_jax.export --format=packed) to evaluate instead "
                      "of --checkpoint, with XNOR-popcount binary convs.")
  flags.DEFINE_string("phase", None, "Phase whose model to build; default: "
                      "the last of config.phase_order.")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")


def load_phase(config, checkpoint: str, phase: str | None = None) -> dict:
  """Phase `phase`'s model (default: the last phase), `checkpoint`'s variables.

  The model is the config's, except its sign(0) convention (`zero_to`):
  when the checkpoint's meta records one (training runs and
  `bnn_jax.import_torch` do), that one is used, since the weights were
  trained or imported under it. The variables must match the model exactly.

  Returns:
    {'phase', 'model_cfg' (name + attributes as built), 'model',
     'variables' ({'params', 'batch_stats'}, host arrays), 'meta', 'info'
     (the data set's `input_pipeline.DatasetInfo`)}.
  """
  import jax
  import jax.numpy as jnp
  import ml_collections

  from bnn_jax import checkpoint as checkpoint_lib
  from bnn_jax import input_pipeline
  from bnn_jax import phases
  from bnn_jax import train

  names = phases.phase_names(config)
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
  model = train.build_model(config, model_cfg, info.num_classes)
  abstract = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.float32))
  train.check_variables_match(abstract, variables, f"checkpoint {checkpoint}")
  return {"phase": phase, "model_cfg": model_cfg.to_dict(), "model": model,
          "variables": variables, "meta": meta, "info": info,
          "checkpoint": checkpoint}


def run_evaluation(config, checkpoint: str, phase: str | None = None) -> dict:
  """Evaluates `checkpoint` with phase `phase`'s model over the eval split.

  `checkpoint` is a run's workdir (its phase `phase` is read) or a
  checkpoint directory (`checkpoint.resolve_directory`).

  Returns:
    {'phase', 'model', 'checkpoint', 'dataset', 'split', 'top1', 'top5',
     'loss', 'count'}; count is the number of examples evaluated.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from bnn_jax import input_pipeline
  from bnn_jax import train
  from bnn_jax import train_step

  loaded = load_phase(config, checkpoint, phase)
  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  eval_step = jax.jit(train_step.make_eval_step(loaded["model"]),
                      in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)
  batches = input_pipeline.eval_iterator(
      config.dataset, global_batch_size=config.eval_batch_size,
      sharding=batch_sharding)
  result = train_step.evaluate(
      eval_step, jax.device_put(loaded["variables"], replicated), batches)
  return {"phase": loaded["phase"], "model": loaded["model_cfg"]["name"],
          "checkpoint": loaded["checkpoint"],
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
    if FLAGS.config is None or (FLAGS.checkpoint is None) == (
        FLAGS.packed is None):
      raise ValueError("pass --config=configs/<name>.py and either "
                       "--checkpoint=<dir> or --packed=<file>")
    # Before JAX's backend starts its threads (config.cpu_malloc).
    malloc_defaults.apply(FLAGS.config.cpu_malloc)
    if FLAGS.packed is not None:
      from bnn_jax import packed  # pylint: disable=g-import-not-at-top
      result = packed.run_evaluation(FLAGS.config, FLAGS.packed)
    else:
      result = run_evaluation(FLAGS.config, FLAGS.checkpoint, FLAGS.phase)
  print(json.dumps(result) if FLAGS.json else format_line(result), flush=True)


if __name__ == "__main__":
  # Before TensorFlow / JAX are imported (lazily, in the functions above).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  xla_defaults.apply()
  define_flags()
  app.run(main)
