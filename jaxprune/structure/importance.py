"""Channel importances for structured pruning (Torch-Pruning's conventions).

Each importance maps ``(variables, group)`` to scores ``(n,)`` (higher = more important):

* ``magnitude_importance`` (``"l1"``/``"l2"``): per kernel member, ``sum |w|^p`` over the
  channel's slice (producers: output slice; consumers: input slice, all rows of a flatten
  mapping); biases and norms are not scored. As Torch-Pruning's ``MagnitudeImportance``
  (``group_reduction="mean"``, ``normalizer="mean"``), members are averaged and the result is
  divided by its mean over channels.
* ``taylor_importance``: the same with ``|w * dL/dw|`` (gradients summed over a few batches, see
  :func:`taylor_grads`).
* ``random_importance``: uniform scores from a key.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structure.channel_groups import Group
from jaxprune.core.progress import progress
from jaxprune.core.trees import leaves_with_paths

REDUCTIONS = ("mean", "sum", "max")


def per_channel_sums(leaf: jax.Array, member, n: int) -> jax.Array:
  """``(n,)`` sums of ``leaf`` over each channel's slice (all rows of the member's mapping)."""
  w = jnp.moveaxis(jnp.asarray(leaf), member.axis, 0)
  rows = w[member.positions(n)]                  # (n, r, ...)
  return rows.reshape(n, -1).sum(axis=1)


def _reduce(per_member: list, reduction: str, normalize: bool, group: Group) -> np.ndarray:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if not per_member:
    raise ValueError(f"group {group.name} has no kernel members to score")
  stacked = jnp.stack(per_member)
  imp = {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}[reduction](stacked, axis=0)
  imp = np.asarray(imp, np.float64)
  if normalize and imp.mean() > 0:
    imp = imp / imp.mean()
  return imp


def magnitude_importance(variables: Any, group: Group, p: float = 1, *, reduction: str = "mean",
                         normalize: bool = True) -> np.ndarray:
  """``(n,)`` group-mean ``sum |w|^p`` of the group's kernels (``p=1``: l1, ``p=2``: l2)."""
  leaves = dict(leaves_with_paths(variables))
  parts = [per_channel_sums(jnp.abs(jnp.asarray(leaves[m.path], jnp.float32)) ** p, m, group.size)
           for m in group.kernels]
  return _reduce(parts, reduction, normalize, group)


def taylor_importance(variables: Any, grads: Any, group: Group, *, reduction: str = "mean",
                      normalize: bool = True) -> np.ndarray:
  """``(n,)`` group-mean ``sum |w * g|`` (first-order Taylor), ``grads`` shaped like ``variables``."""
  leaves = dict(leaves_with_paths(variables))
  gleaves = dict(leaves_with_paths(grads))
  missing = [m.path for m in group.kernels if m.path not in gleaves]
  if missing:
    raise KeyError(f"grads: no gradient for {missing[0]}; pass gradients shaped like variables")
  parts = [per_channel_sums(jnp.abs(jnp.asarray(leaves[m.path], jnp.float32) * gleaves[m.path]), m, group.size)
           for m in group.kernels]
  return _reduce(parts, reduction, normalize, group)


def random_importance(key: jax.Array, group: Group) -> np.ndarray:
  """``(n,)`` uniform random scores."""
  return np.asarray(jax.random.uniform(key, (group.size,)), np.float64)


def taylor_grads(loss_fn: Callable[[Any, Any], jax.Array], variables: Any, batches: Iterable[Any], *,
                 show_progress: bool = True) -> Any:
  """Gradients of ``loss_fn(variables, batch)`` summed over ``batches`` (the official code
  accumulates 5 training batches of 128 without zeroing)."""
  grad_fn = jax.jit(jax.grad(loss_fn))
  total, count = None, 0
  for batch in progress(batches, desc="taylor grads", disable=not show_progress):
    g = grad_fn(variables, batch)
    total = g if total is None else jax.tree_util.tree_map(jnp.add, total, g)
    count += 1
  if total is None:
    raise ValueError("batches: no batch was given")
  return total
