"""Argument checks shared by every layer: each raises naming the argument and what it accepts."""
from __future__ import annotations

import numbers
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def user_stacklevel() -> int:
  """The ``stacklevel`` that makes a warning point at the first frame outside jaxprune (the user's
  call), however deep inside the package it is raised: counted from the caller of this function,
  which is what ``warnings.warn`` calls level 1."""
  frame, level = sys._getframe(1), 1
  while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
    frame, level = frame.f_back, level + 1
  return level


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


def as_real(value: Any) -> Optional[float]:
  """``float(value)`` for a real number or a concrete 0-d real array (numpy or jax, e.g.
  ``jnp.float32(0.5)``); ``None`` for anything else (bools, strings, tracers, arrays with an axis)."""
  if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and (
      jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):   # bfloat16 too
    return float(value)
  return None


def check_budget(k: Any, size: int, name: str = "k") -> None:
  """A concrete budget must be an integer in ``[0, size]``; traced budgets pass (they cannot be read)."""
  if isinstance(k, jax.core.Tracer):
    return
  if isinstance(k, (jax.Array, np.ndarray)):
    if np.ndim(k) != 0 or not jnp.issubdtype(k.dtype, jnp.integer):
      raise TypeError(f"{name} must be an integer scalar, got an array of dtype {k.dtype} and shape {np.shape(k)}")
    k = int(k)
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    raise TypeError(f"{name} must be an integer (entries kept), got {type(k).__name__} {k!r}")
  if not 0 <= int(k) <= size:
    raise ValueError(f"{name}={int(k)} is outside [0, {size}] (the number of entries)")


def check_concrete(call: str, **trees: Any) -> None:
  """Raises ``TypeError`` naming the first of ``trees`` that holds traced arrays: the structured
  methods pick channels from concrete scores on the host (and shrink mode returns shapes that
  depend on them), so they cannot run under ``jax.jit``, ``vmap`` or ``grad``; their array work
  is jitted inside."""
  for name, tree in trees.items():
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree)):
      raise TypeError(f"{name}: jaxprune.{call} got traced arrays (it was called inside jax.jit, vmap or grad). "
                      f"It chooses channels from concrete scores on the host and compiles its own array work, "
                      f"so call it outside the transformation")


def check_finite(tree: Any, name: str) -> None:
  """Raises ``ValueError`` naming the first leaf of ``tree`` that holds NaN or inf (traced leaves,
  under a user's ``jit``, cannot be read and are skipped)."""
  from jaxprune.core.trees import leaves_with_paths, on_host_numeric
  for path, leaf in leaves_with_paths(tree):
    if isinstance(leaf, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    finite = np.isfinite(np.asarray(leaf)).all() if on_host_numeric(leaf) else _all_finite(leaf)
    if not bool(finite):
      raise ValueError(f"{name} holds NaN or inf at {path or '<root>'}")


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  return jnp.isfinite(x).all()


def check_labels(y: Any, n_classes: int, name: str = "labels") -> None:
  """Integer class labels in ``[0, n_classes)`` (1-indexed labels give a NaN loss otherwise).
  Traced labels (under a user's ``jit``) have their dtype checked only."""
  if isinstance(y, jax.core.Tracer):
    if not jnp.issubdtype(y.dtype, jnp.integer):
      raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}")
    return
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"{name} must be integer class indices, got dtype {y.dtype}")
  if y.size and (y.min() < 0 or y.max() >= n_classes):
    raise ValueError(f"{name} must lie in [0, {n_classes}) for {n_classes} logits, got range "
                     f"[{int(y.min())}, {int(y.max())}]")


def traced_call_note(error: BaseException, what: str, inputs: Any) -> None:
  """Adds to ``error`` (raised while tracing the user's model) which call failed and the shapes it
  was given, the usual cause being inputs without the example axis or with other features.
  Python 3.11+ (``add_note``); on 3.10 the error is unchanged."""
  if hasattr(error, "add_note"):
    shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(inputs)]
    error.add_note(f"jaxprune: raised while tracing {what} with input shapes {shapes}; do they match what the "
                   "model expects, leading example axis included?")
