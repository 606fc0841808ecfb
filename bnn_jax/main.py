"""Entry point: `python -m bnn_jax.main --config=configs/digits.py --workdir=DIR`.

Runs the config's phases (see `bnn_jax.phases`), prints per-phase results and
writes `DIR/results.json`. Any config field can be overridden on the command
line, e.g. `--config.phases.step1.optimizer.weight_decay=1e-5`.

Several processes (TPU pod hosts, GPU nodes, localhost tests) run the same
command; `--distributed` and `--coordinator_address/--num_processes/
--process_id` start JAX's multi-process runtime (`bnn_jax.training.multihost`,
launchers in launch/, docs/scaling.md).

Only process 0 prints progress and results; the others print warnings and
errors only, prefixed with `[process i]`. `--workdir` may be a local
directory or `gs://bucket/dir` (`bnn_jax.paths`).

Exit status: 0 done; 1 bad input or a failed run (one-line error, `--debug`
shows the traceback); 143 stopped on SIGTERM/preemption after saving a
checkpoint (re-run the same command to resume); 75 another process was lost
(a host died; one line names it; re-run the same command to resume from the
last checkpoint). A multi-process run trains in a child of a small
supervisor process that turns JAX's C++ abort on a lost process into that
line (`multihost.supervise`).
"""

from __future__ import annotations

import os
import sys

from bnn_jax import cli
from bnn_jax import malloc_defaults
from bnn_jax import xla_defaults
from bnn_jax.training import multihost

# Before JAX is imported: the measured-faster XLA:CPU conv path unless
# XLA_FLAGS is set.
xla_defaults.apply()

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and "
                    "results.json; re-running continues the run in it.")
flags.DEFINE_bool("debug", False, "Show full tracebacks on errors.")
flags.DEFINE_bool("verbose", False, "Also show what other libraries print "
                  "for information (TensorFlow's start-up lines, TFDS "
                  "progress bars, absl warnings); same as BNN_VERBOSE=1.")
flags.DEFINE_bool("dry_run", False, "Check the config against this "
                  "topology, trace every phase's shapes and print the plan "
                  "(steps, batches, learning rates, checkpoints); reads no "
                  "data, writes nothing (bnn_jax.training.dry_run).")
flags.DEFINE_bool("overwrite", False, "If --workdir holds a run of a "
                  "different config, move it aside to <workdir>.replaced-<time> "
                  "and start afresh (without this flag such a workdir is "
                  "refused).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize() (multi-process runs). "
                  "auto: when --coordinator_address/--num_processes/"
                  "--process_id are given or srun/mpirun/GKE started several "
                  "processes; on: always, arguments detected by JAX (Cloud "
                  "TPU pods); off: never. See docs/scaling.md.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0's "
                    "coordinator service, for manual multi-process launches "
                    "(e.g. 127.0.0.1:12355 on one machine).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a manual "
                     "multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's index (0 .. "
                     "num_processes - 1) in a manual multi-process launch.")
flags.DEFINE_integer("distributed_heartbeat_timeout",
                     multihost.DEFAULT_HEARTBEAT_TIMEOUT_S,
                     "Multi-process runs: seconds without a heartbeat after "
                     "which a process counts as dead and the others stop "
                     f"(exit {multihost.EXIT_HOST_LOST}). Shorter detects a "
                     "dead host sooner; too short stops runs whose hosts "
                     "stall (swap, network). See docs/scaling.md.")

EXIT_PREEMPTED = 143


def _run(argv) -> int:
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise ValueError("pass --config=configs/<name>.py and --workdir=<dir>")
  from bnn_jax import paths
  workdir = paths.resolve(FLAGS.workdir)  # Refuses an unusable scheme.
  # Before JAX's backend starts its threads (config.cpu_malloc).
  applied = malloc_defaults.apply(FLAGS.config.cpu_malloc)
  import jax  # noqa: F401  (after flags: lets XLA_FLAGS set by launchers apply)

  # Before anything touches a device.
  started = multihost.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                                 FLAGS.num_processes, FLAGS.process_id,
                                 FLAGS.distributed_heartbeat_timeout)
  if started:  # Every process: the line that shows it joined.
    print(f"distributed: {started}", flush=True)
  if applied:
    multihost.report(f"cpu_malloc=reuse: {', '.join(applied)}")

  cli.quiet_logging()
  if FLAGS.dry_run:
    from bnn_jax.training import dry_run
    return dry_run.run(FLAGS.config, FLAGS.workdir)

  from bnn_jax.training import phases
  from bnn_jax.training import loop
  try:
    phases.run(FLAGS.config, workdir, overwrite=FLAGS.overwrite)
  except loop.Preempted as e:
    if multihost.process_index() == 0:
      print(f"stopped: {e}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  multihost.report(f"results: {workdir / phases.RESULTS_FILE}")
  return 0


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (unknown config key, bad value, missing file)."""
  debug = "--debug" in argv
  for i, arg in enumerate(argv[1:], start=1):
    # --config=FILE[:ARG] or --config FILE[:ARG]; ARG goes to get_config.
    path = (arg.split("=", 1)[1] if arg.startswith("--config=") else
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
      cli.fail(f"config file {path.split(':', 1)[0]!r} not found; pass one of "
            f"configs/*.py, e.g. --config=configs/digits.py")
  try:
    return FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise many types here.
    if debug:
      raise
    detail = cli.one_line(e)
    cause = e.__cause__ or e.__context__
    if cause is not None and "earlier failure" in detail:
      detail = cli.one_line(cause)
    config_file = next((a.split("=", 1)[1].split(":", 1)[0] for a in argv[1:]
                        if a.startswith("--config=")), "the --config file")
    if "has no attribute 'get_config'" in detail:
      cli.fail(f"{config_file} is not a config file (it defines no "
               f"get_config()); pass one of configs/*.py, e.g. "
               f"--config=configs/digits.py (`python -m bnn_jax.configs` "
               f"lists them)")
    if isinstance(e, (AttributeError, KeyError)):
      key = detail.split()[0].strip("'\"") if detail else ""
      bad = [a.split("=", 1)[0] for a in argv[1:]
             if a.startswith("--config.") and
             key in a.split("=", 1)[0].split(".")]
      where = f" in {bad[0]}" if bad else ""
      detail = f"unknown config key {key!r}{where}" + (
          f"; {' '.join(detail.split()[1:])}" if len(detail.split()) > 1
          else "; print the config with --config=... --helpfull or read it")
    cli.fail(detail)
  return []


def main(argv):
  with cli.reporting_errors(debug=FLAGS.debug):
    with multihost.stopping_on_peer_loss(debug=FLAGS.debug):
      code = _run(argv)
  sys.exit(code)


if __name__ == "__main__":
  if multihost.wants_supervisor(sys.argv):  # Several processes: see there.
    sys.exit(multihost.supervise(
        [sys.executable, "-m", "bnn_jax.main", *sys.argv[1:]],
        debug="--debug" in sys.argv))
  # Before the flags load the config file (which imports TensorFlow):
  # TensorFlow without its start-up INFO lines (--verbose shows them). The
  # supervisor above never imports it.
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_command(main, flags_parser=parse_flags, quiet_tensorflow=True)
