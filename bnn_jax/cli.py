"""What bnn_jax's command-line programs share: one-line errors, quiet logs.

Foreign output. A program's screen shows bnn_jax's own lines, real warnings
and errors. What other libraries print for information is dropped unless
`--verbose` is on the command line or `BNN_VERBOSE=1` is in the environment
(`verbose()`): TensorFlow's start-up INFO lines (written by its C++ logger
before anything can configure it, so `quiet_imports` filters file
descriptor 2 while TensorFlow is imported), TFDS progress bars and absl
records below ERROR (orbax's notes on every save, TFDS's notes on absent
metadata). Warnings and errors of TensorFlow's C++ logger (`W...`, `E...`,
`F...` lines) always pass.

Bad input (a config typo, a wrong value, a missing file) ends a program with
exit status 1 and ONE line on stderr,

  error: <the exception's message, at most its first two lines joined>

instead of a traceback; `--debug` re-raises the exception to show it.
Every `python -m bnn_jax.<name>` command starts the same way
(`run_command`) and wraps its work in `reporting_errors`:

  def main(argv):
    with cli.reporting_errors(debug=FLAGS.debug):
      result = run(...)

  if __name__ == "__main__":
    cli.run_command(main, define_flags=define_flags)
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterator, NoReturn, Optional

from absl import logging

# What bad input raises (checkpoint.CheckpointError is a ValueError,
# missing optional packages an ImportError); other types are bugs and keep
# their traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, KeyError, TypeError, RuntimeError, OSError, ImportError)


def one_line(e: BaseException) -> str:
  """An exception's message on one line.

  KeyError and AttributeError quote their message (`str(KeyError('x'))` is
  "'x'"): the quotes and escaped newlines are undone. The first two
  non-empty lines are joined with a space; an empty message gives repr(e).
  """
  text = str(e.args[0]) if (isinstance(e, KeyError) and e.args) else str(e)
  text = text.replace("\\n", "\n").replace("\\'", "'").strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  return " ".join(lines[:2]) if lines else repr(e)


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` to stderr and exits with status 1.

  On a process other than 0 of a multi-process run the line starts with
  `[process i] ` (`multihost.prefix`).
  """
  from bnn_jax.training import multihost  # pylint: disable=g-import-not-at-top
  print(f"{multihost.prefix()}error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


@contextlib.contextmanager
def reporting_errors(debug: bool = False,
                     errors: tuple[type[BaseException], ...] = INPUT_ERRORS
                     ) -> Iterator[None]:
  """Turns `errors` raised inside into `fail(one_line(e))`; re-raises if `debug`."""
  try:
    yield
  except errors as e:
    if debug:
      raise
    fail(one_line(e))


VERBOSE_ENV = "BNN_VERBOSE"

# Lines of TensorFlow's start-up that only inform: absl's note that it was
# not initialised, and INFO records ('I' + MMDD, e.g. "I0000 00:00:... port.cc:
# 153] oneDNN custom operations are on ...") with their continuation lines
# (cpu_feature_guard's "To enable the following instructions: ...").
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} |To enable the following instructions:)")


def is_startup_noise(line: str) -> bool:
  """True for TensorFlow's informational start-up lines (`_STARTUP_NOISE`)."""
  return bool(_STARTUP_NOISE.match(line))


def verbose(argv: Optional[list[str]] = None) -> bool:
  """True when foreign libraries' output should pass unfiltered.

  `--verbose` among the arguments (read before flags are parsed, since
  the filtering starts before that) or `BNN_VERBOSE=1` in the environment.
  """
  argv = sys.argv if argv is None else argv
  return ("--verbose" in argv[1:] or
          os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes"))


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool]) -> Iterator[None]:
  """Captures file descriptor 2 inside; replays the lines `drop` rejects.

  C++ libraries write to the descriptor, not to `sys.stderr`, so the
  capture is at the descriptor (a temporary file dup2'ed over it).
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode("utf-8", errors="replace")
      kept = [line for line in text.splitlines(keepends=True)
              if not drop(line)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def quiet_imports() -> None:
  """Imports TensorFlow with its start-up INFO lines dropped.

  Call it at the top of an entry point, before anything imports
  TensorFlow (config files do, through the input pipeline). It sets
  `TF_CPP_MIN_LOG_LEVEL=3` unless set; with `verbose()` it imports
  TensorFlow unfiltered. A program that never imports TensorFlow pays
  for the import (about 3 s): call it only where TensorFlow is used.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if "tensorflow" in sys.modules:
    return
  if verbose():
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top
    return
  with filtered_stderr(is_startup_noise):
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


class _DropOrbaxRecords(py_logging.Filter):
  """Drops orbax's log records, errors included.

  A failed save or restore raises in bnn_jax, which reports it in one line
  (`checkpoint`); orbax first logs the same failure from each of its
  threads, with a traceback and the whole TensorStore spec.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_logging(level: Optional[int] = None) -> None:
  """Shows absl log records of `level` and above only; no TFDS progress bars.

  The default `level` is ERROR (WARNING with `verbose()`): at INFO, orbax
  logs every save and restore with its whole CheckpointManagerOptions; at
  WARNING it still notes every read-only restore and TFDS notes absent
  metadata files. bnn_jax's own warnings go through `warnings.warn`, which
  this leaves alone. With `verbose()`, TFDS progress bars stay on.
  """
  if level is None:
    level = logging.WARNING if verbose() else logging.ERROR
  logging.set_verbosity(level)
  absl_logger = py_logging.getLogger("absl")
  if not verbose() and not any(isinstance(f, _DropOrbaxRecords)
                               for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxRecords())
  if not verbose() and "tensorflow_datasets" in sys.modules:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.display_progress_bar(False)


def run_command(main: Callable[[list[str]], Any], *,
                define_flags: Optional[Callable[[], None]] = None,
                flags_parser: Optional[Callable[[list[str]], Any]] = None,
                quiet_tensorflow: bool = False,
                xla: bool = True) -> None:
  """The preamble of every `python -m bnn_jax.<name>` command, then absl runs `main`.

  In order, before TensorFlow or JAX is imported: TF_CPP_MIN_LOG_LEVEL=3
  unless set (TensorFlow's C++ INFO lines); with `xla`, bnn_jax's XLA
  defaults (`xla_defaults.apply`, read when JAX starts its backend); with
  `quiet_tensorflow`, TensorFlow imported without its start-up lines
  (`quiet_imports`; for commands whose config file imports it); the
  command's flags (`define_flags`); then `app.run(main, flags_parser)`.
  """
  from absl import app  # pylint: disable=g-import-not-at-top

  from bnn_jax import xla_defaults  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if xla:
    xla_defaults.apply()
  if quiet_tensorflow:
    quiet_imports()
  if define_flags is not None:
    define_flags()
  if flags_parser is None:
    app.run(main)
  else:
    app.run(main, flags_parser=flags_parser)
