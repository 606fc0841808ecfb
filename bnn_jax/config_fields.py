"""Filling a config section's defaults and refusing fields it does not have.

The one helper behind the loss, optimizer and model sections (and the
zoo's attributes):

  fill_defaults(given, defaults, "unknown loss field(s)")
    = {**defaults, **given}, or ValueError
      "unknown loss field(s) ['kd_wieght']; valid: ['ce_weight', ...]"

so a typo names itself and the fields that exist.
"""

from __future__ import annotations

from typing import Any, Mapping


def as_dict(section: Any) -> dict:
  """A ConfigDict (or FrozenConfigDict) or a mapping as a plain dict."""
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def check_known(given: Any, valid: Any, unknown_message: str) -> None:
  """ValueError `<unknown_message> [names]; valid: [names]` for names of
  `given` not in `valid`."""
  unknown = sorted(set(given) - set(valid))
  if unknown:
    raise ValueError(f"{unknown_message} {unknown}; valid: {sorted(valid)}")


def fill_defaults(given: Any, defaults: Mapping[str, Any],
                  unknown_message: str) -> dict:
  """{**defaults, **given} after `check_known(given, defaults, ...)`."""
  given = as_dict(given)
  check_known(given, defaults, unknown_message)
  return {**as_dict(defaults), **given}
