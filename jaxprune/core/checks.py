"""Argument checks shared by every layer: each raises naming the argument and what it accepts."""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp


def check_key(key: Any, name: str = "key") -> jax.Array:
  """A ``jax.random`` key (new-style typed, or a legacy ``uint32[2]``)."""
  ok = isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or (key.dtype == jnp.uint32 and key.shape == (2,)))
  if not ok:
    raise TypeError(f"{name} must be a jax.random key (jax.random.key(seed)), got {type(key).__name__}"
                    f"{'' if key is not None else ' (None)'}")
  return key


def check_choice(value: Any, allowed: Sequence[Any], name: str) -> Any:
  """``value`` if it is one of ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
  return value


def check_positive_int(value: Any, name: str) -> int:
  """A Python or numpy integer >= 1 (bools rejected)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)
