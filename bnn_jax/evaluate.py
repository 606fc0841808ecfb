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

from absl import flags
from absl import logging
from ml_collections import config_flags

from bnn_jax import cli
from bnn_jax import malloc_defaults

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
    from bnn_jax.training import evaluation  # pylint: disable=g-import-not-at-top
    if FLAGS.packed is not None:
      result = evaluation.evaluate_packed(FLAGS.config, FLAGS.packed)
    else:
      result = evaluation.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint,
                                              FLAGS.phase)
  print(json.dumps(result) if FLAGS.json else format_line(result), flush=True)


if __name__ == "__main__":
  cli.run_command(main, define_flags=define_flags)
