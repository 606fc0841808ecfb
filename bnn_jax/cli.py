"""What bnn_jax's command-line programs share: one-line errors, quiet logs.

Bad input (a config typo, a wrong value, a missing file) ends a program with
exit status 1 and ONE line on stderr,

  error: <the exception's message, at most its first two lines joined>

instead of a traceback; `--debug` re-raises the exception to show it.
`main`, `evaluate`, `import_torch`, `analyze` and `benchmark` all use
`reporting_errors`:

  with cli.reporting_errors(debug=FLAGS.debug):
    result = run(...)
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, NoReturn

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
  from bnn_jax import multihost  # pylint: disable=g-import-not-at-top
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


def quiet_logging(level: int = logging.WARNING) -> None:
  """Shows absl log records of `level` and above only.

  At INFO, orbax logs every save and restore with its whole
  CheckpointManagerOptions; at WARNING it still notes every read-only
  restore, so programs whose output is one result line (evaluate) pass
  `logging.ERROR`.
  """
  logging.set_verbosity(level)
