"""Options objects: one frozen, hashable dataclass per method, and the ``official=True`` preset.

Everything that changes a method's mathematics lives on its options object (a jit static
argument, recorded in ``info["options"]``). Each class has two readings: its field defaults
(jaxprune's defaults: the best model the method gives, from our measurements) and
:meth:`official` (every field set to the official code's reading). A method call resolves them
in one way for every method::

    method(..., options=None, official=False, **overrides)

``options`` (an instance) or else the preset (``official``) is the base; keyword ``overrides``
replace single fields on top of it, so ``official=True, stages=10`` is the official reading with
ten stages.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, TypeVar

T = TypeVar("T")


class Options:
  """Mixin of the options dataclasses: the official preset and checked replacement."""

  OFFICIAL: dict = {}   # field -> the official code's value, where it differs from the default

  @classmethod
  def official(cls: type[T]) -> T:
    """Every field at the official code's reading."""
    return cls(**cls.OFFICIAL)

  def replace(self: T, **changes: Any) -> T:
    """A copy with ``changes``; an unknown field is a ``TypeError`` naming it and the known ones."""
    known = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(changes) - known)
    if unknown:
      raise TypeError(f"{type(self).__name__} has no option {', '.join(map(repr, unknown))}; "
                      f"the options are {sorted(known)}")
    return dataclasses.replace(self, **changes)


def resolve(cls: type[T], options: Optional[T], official: bool, overrides: dict) -> T:
  """The options a call runs with: ``options`` or the preset, then ``overrides`` field by field."""
  if not isinstance(official, bool):
    raise TypeError(f"official must be True or False, got {official!r}")
  if options is not None:
    if not isinstance(options, cls):
      raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    if official:
      raise ValueError("options: give either an options object or official=True, not both "
                       f"({cls.__name__}.official() is the official preset as an object)")
    base = options
  else:
    base = cls.official() if official else cls()
  out = base.replace(**overrides) if overrides else base
  check = getattr(out, "check", None)
  if check is not None:
    check()
  return out
