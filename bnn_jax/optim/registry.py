"""The optimizer registry: `register(name, factory)`, built-in names, dotted optax paths.

A name in `optimizer.name` (or `bop_rest`) is a built-in chain (`OPTIMIZERS`),
a name given to `register`, or a dotted optax path (`optax.lion`): this module
resolves it to a factory `factory(learning_rate, **kwargs)` and checks the
`kwargs` against its signature.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Mapping, Optional

import optax


# The built-in chains; `register` adds more, and any dotted optax path works.
OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "bop")
OPTAX_PREFIX = "optax."
# factory(learning_rate, **kwargs) -> optax.GradientTransformation.
ChainFactory = Callable[..., optax.GradientTransformation]

_REGISTRY: dict[str, ChainFactory] = {}
# ---------------------------------------------------------------------------
# Chain names: built-ins, the registry, dotted optax paths.


def register(name: str, factory: ChainFactory) -> None:
  """Makes `optimizer.name=<name>` build `factory(schedule, **kwargs)`.

  Args:
    name: a new name (not a built-in, not starting with 'optax.'); registering
      a name again replaces its factory.
    factory: factory(learning_rate, **kwargs) -> optax.GradientTransformation,
      where learning_rate is the phase's schedule (a function of the step)
      and kwargs is `optimizer.kwargs`. Its update must return the final
      update (already multiplied by -learning_rate), as optax's optimizers do.

  Raises:
    ValueError: a built-in or dotted name; TypeError: a non-callable factory.
  """
  if not isinstance(name, str) or not name or name in OPTIMIZERS or (
      name.startswith(OPTAX_PREFIX)):
    raise ValueError(f"cannot register {name!r}: built-ins {list(OPTIMIZERS)} "
                     "and dotted optax paths are taken")
  if not callable(factory):
    raise TypeError(f"optim.register({name!r}, ...): the factory must be "
                    f"callable, got {type(factory).__name__}")
  _REGISTRY[name] = factory


def registered() -> tuple[str, ...]:
  """The names added with `register`, sorted."""
  return tuple(sorted(_REGISTRY))


def _unknown_name(field: str, name: Any) -> ValueError:
  return ValueError(
      f"optimizer.{field}={name!r}; choose one of {list(OPTIMIZERS)}, a "
      f"registered name {list(registered())} (bnn_jax.optim.register) or a "
      "dotted optax path such as 'optax.lion'")


def chain_factory(name: str, field: str = "name") -> Optional[ChainFactory]:
  """The factory of a registered or dotted optax name; None for a built-in.

  Raises:
    ValueError: an unknown name, or an optax path that is not a function.
  """
  if name in OPTIMIZERS:
    return None
  if name in _REGISTRY:
    return _REGISTRY[name]
  if isinstance(name, str) and name.startswith(OPTAX_PREFIX):
    try:
      factory = operator.attrgetter(name[len(OPTAX_PREFIX):])(optax)
    except AttributeError:
      raise _unknown_name(field, name) from None
    if not callable(factory) or inspect.isclass(factory):
      raise ValueError(f"optimizer.{field}={name!r} is not an optax function "
                       "that builds an optimizer")
    return factory
  raise _unknown_name(field, name)


def factory_kwargs(name: str, factory: ChainFactory,
                    kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """`kwargs`, checked against the factory's signature.

  An optax function with a `weight_decay` argument also gets
  weight_decay=0.0 unless `kwargs` sets it (decay is the config's job).
  """
  kwargs = dict(kwargs)
  try:
    signature = inspect.signature(factory)
  except (TypeError, ValueError):  # a builtin without a signature
    return kwargs
  if (name.startswith(OPTAX_PREFIX) and "weight_decay" in signature.parameters
      and "weight_decay" not in kwargs):
    kwargs["weight_decay"] = 0.0
  try:
    signature.bind(None, **kwargs)
  except TypeError as e:
    raise ValueError(f"optimizer {name!r} cannot be called as "
                     f"{name}(learning_rate, **{kwargs}): {e}") from None
  return kwargs

