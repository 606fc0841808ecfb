"""Entry point: `python -m bnn_jax.main --config=configs/digits.py --workdir=DIR`.

Runs the config's phases (see `bnn_jax.phases`), prints per-phase results and
writes `DIR/results.json`. Any config field can be overridden on the command
line, e.g. `--config.phases.step1.optimizer.weight_decay=1e-5`.

Exit status: 0 done; 1 bad input or a failed run (one-line error, `--debug`
shows the traceback); 143 stopped on SIGTERM/preemption after saving a
checkpoint (re-run the same command to resume).
"""

from __future__ import annotations

import os
import sys

# Before TensorFlow / JAX are imported: keep TF quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and "
                    "results.json; re-running continues the run in it.")
flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")

EXIT_PREEMPTED = 143


def _run(argv) -> int:
  del argv
  import jax  # noqa: F401  (after flags: lets XLA_FLAGS set by launchers apply)

  from bnn_jax import phases
  from bnn_jax import train

  if FLAGS.config is None or FLAGS.workdir is None:
    raise ValueError("pass --config=configs/<name>.py and --workdir=<dir>")
  logging.set_verbosity(logging.WARNING)
  try:
    phases.run(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  print(f"results: {os.path.join(FLAGS.workdir, phases.RESULTS_FILE)}")
  return 0


def main(argv):
  try:
    sys.exit(_run(argv))
  except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
    if FLAGS.debug:
      raise
    message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
