"""Masks: bool pytrees shaped like the params, ``None`` where a leaf is not prunable."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.checks import check_budget
from jaxprune.core.trees import (FlatSpec, PrunableSpec, PyTree, leaves_with_paths, map_with_paths,
                            on_host_numeric, path_str, prunable_paths, to_device)


def topk_mask(scores: jax.Array, k) -> jax.Array:
  """Bool mask with exactly ``k`` True entries at the largest ``scores``.

  Ties are broken deterministically: among equal scores the lower flat index is kept (``-0.0``
  equals ``0.0``; NaN ranks below every number). ``scores`` may have any shape. Rank-based, so
  ``k`` may be a traced integer: one compilation serves every budget (stages, sweeps, ``vmap``
  over ``k``). A concrete ``k`` is checked (an integer in ``[0, scores.size]``); a traced one
  cannot be, and is the caller's to check.

  The k-th largest score is found by a 32-step radix search over the scores' order-preserving
  ``uint32`` keys (32 counting passes, ``O(32 p)``), not a sort: a sort of ``p`` floats is the
  slowest op of an IHT step on CPU (7.5 ms against under 1 ms at ``p = 32K``). Scores in host
  memory with a concrete ``k`` take the same keys through numpy's partition instead (same
  result; nothing to compile, where the radix program costs ~0.2 s to compile).
  """
  check_budget(k, int(np.size(scores)), "k")
  if on_host_numeric(scores) and not isinstance(k, jax.core.Tracer):
    return to_device(_topk_mask_host(np.asarray(scores), int(k)), scores)
  keys = _order_keys(jnp.ravel(scores))
  kth = _kth_largest_key(keys, k)
  above = keys > kth
  ties = keys == kth
  tie_rank = jnp.cumsum(ties.astype(jnp.int32))               # 1-based rank among the ties, by index
  keep = above | (ties & (tie_rank <= k - jnp.sum(above, dtype=jnp.int32)))
  return keep.reshape(jnp.shape(scores))


def _order_keys(flat: jax.Array) -> jax.Array:
  """``uint32`` keys with the order of the float32 values (``-0.0`` as ``0.0``, NaN lowest)."""
  x = flat.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  signed = jnp.where(bits < 0, -(bits & jnp.int32(0x7FFFFFFF)), bits)   # monotone in the float's value
  signed = jnp.where(jnp.isnan(x), jnp.iinfo(jnp.int32).min, signed)
  return jax.lax.bitcast_convert_type(signed ^ jnp.int32(-2 ** 31), jnp.uint32)  # flip the sign bit: unsigned order


def _topk_mask_host(scores: np.ndarray, k: int) -> np.ndarray:
  """:func:`topk_mask` in numpy: the k-th largest key by ``np.partition``, then the same ties rule."""
  flat = scores.astype(np.float32).ravel()
  bits = flat.view(np.int32)
  signed = np.where(bits < 0, -(bits & np.int32(0x7FFFFFFF)), bits)
  signed = np.where(np.isnan(flat), np.iinfo(np.int32).min, signed).astype(np.int32)
  keys = (signed ^ np.int32(-2 ** 31)).view(np.uint32)
  if k == 0:
    return np.zeros(scores.shape, bool)
  kth = np.partition(keys, keys.size - k)[keys.size - k]
  above, ties = keys > kth, keys == kth
  keep = above | (ties & (np.cumsum(ties) <= k - int(above.sum())))
  return keep.reshape(scores.shape)


def _kth_largest_key(keys: jax.Array, k) -> jax.Array:
  """The largest ``t`` with at least ``k`` keys ``>= t``, built bit by bit from the top
  (``k = 0`` gives the largest key value, so nothing is above it)."""
  def bit(i, t):
    candidate = t | jnp.left_shift(jnp.uint32(1), jnp.uint32(31 - i))
    return jnp.where(jnp.sum(keys >= candidate, dtype=jnp.int32) >= k, candidate, t)
  return jax.lax.fori_loop(0, 32, bit, jnp.uint32(0))


def masks_from_flat(keep: jax.Array, params: PyTree, spec: FlatSpec) -> PyTree:
  """Splits a flat ``keep: (p,)`` bool vector into a mask tree (``None`` off the prunable set)."""
  where = dict(zip(spec.paths, zip(spec.offsets, spec.shapes)))
  host = on_host_numeric(keep)
  flat = np.asarray(keep) if host else keep    # numpy slices of a host vector compile nothing

  def leaf_mask(path, leaf):
    if path not in where:
      return None
    off, shape = where[path]
    part = flat[off:off + int(np.prod(shape))].reshape(shape)
    return to_device(part, keep) if host else part

  return map_with_paths(leaf_mask, params)


def mask_leaves(masks: PyTree) -> list[tuple[str, Any]]:
  """``[(path, mask_or_None), ...]`` keeping the ``None`` entries."""
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  return [(path_str(p), m) for p, m in flat]


def check_masks(params: PyTree, masks: PyTree, name: str = "masks") -> None:
  """Raises ``ValueError`` unless ``masks`` mirrors ``params`` (same paths, same shapes, bool).
  A ``None`` in ``params`` (a tree split into its trainable part) takes a ``None`` mask."""
  mask_items = mask_leaves(masks)
  param_items = mask_leaves(params)
  mp = [p for p, _ in mask_items]
  pp = [p for p, _ in param_items]
  if mp != pp:
    missing = sorted(set(pp) - set(mp))[:5]
    extra = sorted(set(mp) - set(pp))[:5]
    raise ValueError(f"{name} do not match params: missing paths {missing}, unexpected paths {extra}")
  for (path, m), (_, leaf) in zip(mask_items, param_items):
    if leaf is None and m is not None:
      raise ValueError(f"{name} at {path!r} masks a leaf that params leaves out (None)")
    if m is None:
      continue
    if np.shape(m) != np.shape(leaf):
      hint = ("; a shrunk structured result's masks are shaped like the dense tree: pass the dense params "
              "(or use size_report for the shrunk model)" if np.size(leaf) < np.size(m) else "")
      raise ValueError(f"{name} at {path!r} has shape {np.shape(m)}, params has {np.shape(leaf)}{hint}")
    if jnp.asarray(m).dtype != jnp.bool_:
      raise ValueError(f"{name} at {path!r} has dtype {jnp.asarray(m).dtype}, expected bool")
  if all(m is None for _, m in mask_items):
    raise ValueError(f"{name} has no mask leaf (all None)")


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the pruned weights: ``params * mask`` where a mask exists, unchanged where ``None``."""
  check_masks(params, masks)
  return jax.tree.map(lambda m, x: x if m is None else where_kept(m, x), masks, params, is_leaf=lambda x: x is None)


def where_kept(mask: Any, x: Any) -> Any:
  """``x`` where ``mask``, else 0 (in ``x``'s dtype); numpy for host arrays (an eager ``where``
  compiles once per shape)."""
  if on_host_numeric(mask, x):      # numpy: nothing to compile per leaf shape
    return to_device(np.where(np.asarray(mask), np.asarray(x), np.zeros((), x.dtype)), x)
  return jnp.where(mask, x, jnp.zeros((), x.dtype))


def masks_like(params: PyTree, prunable: PrunableSpec = None, value: bool = True) -> PyTree:
  """All-``value`` masks on the prunable leaves, ``None`` elsewhere."""
  paths = set(prunable_paths(params, prunable))
  return map_with_paths(lambda p, x: jnp.full(np.shape(x), value) if p in paths else None, params)


def count_kept(masks: PyTree) -> int:
  """Total True entries over all mask leaves."""
  return int(sum(int(jnp.sum(m)) for _, m in mask_leaves(masks) if m is not None))


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """Per-leaf and global sparsity of the prunable set; ``str()`` prints a table."""
  rows: tuple[tuple[str, tuple[int, ...], int, int], ...]   # (path, shape, size, nonzero)

  @property
  def size(self) -> int:
    return sum(r[2] for r in self.rows)

  @property
  def nonzero(self) -> int:
    return sum(r[3] for r in self.rows)

  @property
  def sparsity(self) -> float:
    return 1.0 - self.nonzero / self.size

  def per_leaf(self) -> dict[str, float]:
    return {path: 1.0 - nz / size for path, _, size, nz in self.rows}

  def __str__(self) -> str:
    width = max([len("leaf"), len("global")] + [len(r[0]) for r in self.rows])
    head = f"{'leaf':<{width}}  {'shape':>18}  {'size':>10}  {'kept':>10}  {'sparsity':>8}"
    lines = [head, "-" * len(head)]
    for path, shape, size, nz in self.rows:
      lines.append(f"{path:<{width}}  {str(shape):>18}  {size:>10}  {nz:>10}  {1 - nz / size:>8.4f}")
    lines.append("-" * len(head))
    lines.append(f"{'global':<{width}}  {'':>18}  {self.size:>10}  {self.nonzero:>10}  {self.sparsity:>8.4f}")
    return "\n".join(lines)


def sparsity_report(params: PyTree, masks: PyTree | None = None, prunable: PrunableSpec = None) -> SparsityReport:
  """Sparsity of each prunable leaf and of the whole prunable set.

  With ``masks``, counts kept entries of the masks (their non-``None`` leaves define the
  set); without, counts non-zero weights of the leaves selected by ``prunable``.
  """
  rows = []
  if masks is not None:
    check_masks(params, masks)
    for path, m in mask_leaves(masks):
      if m is not None:
        rows.append((path, tuple(np.shape(m)), int(np.size(m)), int(jnp.sum(m))))
  else:
    paths = set(prunable_paths(params, prunable))
    for path, leaf in leaves_with_paths(params):
      if path in paths:
        rows.append((path, tuple(np.shape(leaf)), int(np.size(leaf)), int(jnp.count_nonzero(leaf))))
  return SparsityReport(tuple(rows))
