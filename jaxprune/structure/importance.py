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

import functools
import operator
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structure.channel_groups import Group
from jaxprune.structure.surgery import _axis_scale
from jaxprune.core.progress import progress
from jaxprune.core.trees import leaves_with_paths, on_host

REDUCTIONS = ("mean", "sum", "max")


def per_channel_sums(leaf: jax.Array, member, n: int) -> jax.Array:
  """``(n,)`` sums of ``leaf`` over each channel's slice (all rows of the member's mapping)."""
  return _sums(leaf, None, member.positions(n).astype(np.int32), member.axis, "sum")


def _sums(leaf: Any, grad: Any, pos: np.ndarray, axis: int, kind: Any) -> Any:
  """``(n,)`` per-channel sums of ``leaf`` (``kind="sum"``), ``|leaf|^p`` (``kind=p``, a number)
  or ``|leaf * grad|`` (``kind="taylor"``), in float32: in numpy for arrays in host memory (a
  one-shot score compiles nothing), else one compiled function per leaf shape."""
  if on_host(leaf, grad):
    return _channel_sums(np, leaf, grad, pos, axis, kind)
  return _sums_jit(leaf, grad, pos, axis, kind)


def _channel_sums(xp, leaf, grad, pos, axis, kind):
  w = xp.asarray(leaf, xp.float32)
  if kind == "taylor":
    w = xp.abs(w * xp.asarray(grad, xp.float32))
  elif kind != "sum":
    w = xp.abs(w) if kind == 1 else xp.abs(w) ** kind
  per_row = w.sum(axis=tuple(a for a in range(w.ndim) if a != axis))   # (rows,): no gathered copy of w
  return per_row[pos].sum(axis=1)                                      # pos: (n, r) rows of each channel


_sums_jit = jax.jit(functools.partial(_channel_sums, jnp), static_argnums=(3, 4))


def _reduce(per_member: list, reduction: str, normalize: bool, group: Group) -> np.ndarray:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if not per_member:
    raise ValueError(f"group {group.name} has no kernel members to score")
  stacked = np.stack([np.asarray(p, np.float32) for p in per_member])   # on the host: no compile per group
  imp = {"mean": np.mean, "sum": np.sum, "max": np.max}[reduction](stacked, axis=0)
  imp = np.asarray(imp, np.float64)
  if normalize and imp.mean() > 0:
    imp = imp / imp.mean()
  return imp


def magnitude_importance(variables: Any, group: Group, p: float = 1, *, reduction: str = "mean",
                         normalize: bool = True) -> np.ndarray:
  """``(n,)`` group-mean ``sum |w|^p`` of the group's kernels (``p=1``: l1, ``p=2``: l2)."""
  leaves = dict(leaves_with_paths(variables))
  kind = 1 if p == 1 else float(p)
  parts = [_sums(leaves[m.path], None, m.positions(group.size).astype(np.int32), m.axis, kind) for m in group.kernels]
  return _reduce(parts, reduction, normalize, group)


class MagnitudeScores:
  """Magnitude importances of groups pruned one after another, without writing the zeroed tree.

  :func:`jaxprune.prune_channels` scores each group on the tree in which the groups before it
  have their removed channels zeroed. For ``|w|^p`` that tree need not be written: each scored
  kernel is reduced once to its channel axes (``R: (I, O)`` for a conv kernel whose input and
  output axes carry channels), and removing channels multiplies their rows of ``R`` by zero. The
  scores are :func:`magnitude_importance` on the zeroed tree, summed in another order; each kernel
  is read once per call instead of once per member, and the zeroing pass is gone. Device and
  sharded kernels are reduced where they live and only ``R`` comes to the host; :meth:`applies`
  says when that pays.

  Args:
    variables: the tree the groups refer to.
    groups: every group that may be scored or removed from.
    p: 1 (l1) or 2 (l2).
    scales: ``{kernel path: (axis, s)}`` to score each such kernel as if multiplied by ``s``
      along ``axis`` (:func:`jaxprune.structure.surgery.batchnorm_scales`: the folded tree's
      scores without writing it): its reduction is multiplied by ``|s|^p``.
  """

  def __init__(self, variables: Any, groups: Sequence[Group], p: float = 1, scales: Optional[Mapping] = None):
    leaves = dict(leaves_with_paths(variables))
    scored = {m.path for g in groups for m in g.kernels}
    scales = scales or {}
    self.p = 1 if p == 1 else float(p)
    self.axes = _channel_axes(groups, scored, scales)
    self.reduced = {path: _scaled(_reduce_to(leaves[path], self.axes[path], self.p), self.axes[path],
                                  scales.get(path), self.p) for path in scored}
    self.factors: dict = {}   # {(path, axis): (length,) 0/1 factors of the channels removed so far}

  @staticmethod
  def applies(variables: Any, groups: Sequence[Group], scales: Optional[Mapping] = None) -> bool:
    """Whether the reductions pay: kernels in host memory, or concrete device arrays whose
    reductions hold at most a quarter of their entries (conv kernels; a Dense kernel pruned on
    both axes would come to the host whole, where writing the tree on the device moves nothing)."""
    leaves = dict(leaves_with_paths(variables))
    kernels = {m.path: leaves[m.path] for g in groups for m in g.kernels}
    if on_host(*kernels.values()):
      return True
    if any(not isinstance(k, (np.ndarray, jax.Array)) or isinstance(k, jax.core.Tracer) for k in kernels.values()):
      return False
    axes = _channel_axes(groups, set(kernels), scales)
    reduced = sum(int(np.prod([np.shape(k)[a] for a in axes[path]])) for path, k in kernels.items())
    return 4 * reduced <= sum(int(np.size(k)) for k in kernels.values())

  def __call__(self, group: Group, *, reduction: str = "mean", normalize: bool = True) -> np.ndarray:
    """``(n,)`` scores of ``group``, as :func:`magnitude_importance` on the zeroed tree."""
    parts = [self._rows(m)[m.positions(group.size)].sum(axis=1) for m in group.kernels]
    return _reduce(parts, reduction, normalize, group)

  def remove(self, group: Group, kept: np.ndarray) -> None:
    """Zeroes the channels of ``group`` outside ``kept`` (``(n,)`` bool) in the scores to come."""
    for m in group.members:
      if m.path in self.reduced and m.kind != "stat":
        length = self.reduced[m.path].shape[self.axes[m.path].index(m.axis)]
        key = (m.path, m.axis)
        self.factors[key] = self.factors.get(key, 1.0) * _axis_scale(kept, m.positions(group.size), length)

  def _rows(self, m) -> np.ndarray:
    """``(length,)`` sums of ``|w|^p`` per row of ``m``'s axis, removed channels zeroed."""
    axes, r = self.axes[m.path], self.reduced[m.path]
    for i, axis in enumerate(axes):
      if axis != m.axis and (m.path, axis) in self.factors:
        shape = [1] * r.ndim
        shape[i] = -1
        r = r * self.factors[(m.path, axis)].reshape(shape)
    return r.sum(axis=tuple(i for i, a in enumerate(axes) if a != m.axis))


def _channel_axes(groups: Sequence[Group], paths: set, scales: Optional[Mapping] = None) -> dict:
  """``{path: sorted axes}``: every axis of the leaves at ``paths`` that some group zeroes or
  scores, or that ``scales`` scales (its other paths are not scored and are left out)."""
  axes: dict = {path: set() for path in paths}
  for g in groups:
    for m in g.members:
      if m.path in axes and m.kind != "stat":
        axes[m.path].add(m.axis)
  for path, (axis, _) in (scales or {}).items():
    if path in axes:
      axes[path].add(axis)
  return {path: tuple(sorted(a)) for path, a in axes.items()}


def _scaled(r: np.ndarray, axes: tuple, scale: Optional[tuple], p: float) -> np.ndarray:
  """``r`` times ``|s|^p`` along the axis ``scale = (axis, s)`` names (``r`` unchanged if ``None``)."""
  if scale is None:
    return r
  axis, s = scale
  shape = [1] * r.ndim
  shape[axes.index(axis)] = -1
  s = np.abs(np.asarray(s, np.float32))
  return r * (s if p == 1 else s ** p).reshape(shape)


def _reduce_to(leaf: Any, axes: tuple, p: float) -> np.ndarray:
  """``sum |leaf|^p`` over every axis not in ``axes``, float32: in numpy for host arrays, else in
  one compiled function per leaf shape (only the small result comes to the host)."""
  if on_host(leaf):
    return _abs_sums(np, leaf, axes, p)
  return np.asarray(_abs_sums_jit(leaf, axes, p))


def _abs_sums(xp, leaf, axes: tuple, p: float):
  w = xp.abs(xp.asarray(leaf, xp.float32))
  if p != 1:
    w = w ** p
  other = tuple(a for a in range(w.ndim) if a not in axes)
  if xp is np or not other:
    return w.sum(axis=other)
  # XLA:CPU reduces leading axes into many outputs slowly (14.5 ms against 0.5 ms for a 3x3x512x512
  # kernel); a few slices added one by one fuse into one pass
  w = xp.moveaxis(w, other, tuple(range(len(other)))).reshape((-1,) + tuple(w.shape[a] for a in axes))
  return functools.reduce(operator.add, [w[i] for i in range(w.shape[0])]) if w.shape[0] <= 64 else w.sum(0)


_abs_sums_jit = jax.jit(functools.partial(_abs_sums, jnp), static_argnums=(1, 2))


def taylor_importance(variables: Any, grads: Any, group: Group, *, reduction: str = "mean",
                      normalize: bool = True) -> np.ndarray:
  """``(n,)`` group-mean ``sum |w * g|`` (first-order Taylor), ``grads`` shaped like ``variables``."""
  leaves = dict(leaves_with_paths(variables))
  gleaves = dict(leaves_with_paths(grads))
  missing = [m.path for m in group.kernels if m.path not in gleaves]
  if missing:
    raise KeyError(f"grads: no gradient for {missing[0]}; pass gradients shaped like variables")
  parts = [_sums(leaves[m.path], gleaves[m.path], m.positions(group.size).astype(np.int32), m.axis, "taylor")
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
