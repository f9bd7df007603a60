"""Intra-Fusion (Theus et al., ICLR 2024): fuse every channel of a group into the kept ones by OT.

Per group (official code, brief ``intrafusion.md`` section 2.9):

1. BatchNorm is folded into its kernel and set to the identity (for the baseline too).
2. Importance ``i: (n,)``; the ``m = floor(n (1 - s))`` most important channels are the target.
3. Pairing vectors ``X: (n, D)``: each channel's producer-kernel rows and consumer-kernel
   columns, concatenated (weights only); rows are l2-normalised (zero rows stay zero).
4. Cost ``C[j, k] = ||x_j - x_keep[k]||_p``, ``(n, m)``: ``p=1`` in the official code, ``p=2``
   by default here (as good a model in our measurements, and one matrix product on the host).
5. Marginals uniform ``a = 1/n``, ``b = 1/m`` (or importance-weighted); exact OT plan ``P``.
   By default (``transport="removed"``) each kept channel's own mass stays in place and only the
   removed channels' rows of ``C`` are computed and solved: the same optimum for a metric cost,
   on an ``(n - m) x m`` problem (:func:`removed_mass_plan`); the official code solves ``n x m``.
6. Fusion map ``T = P^T diag(1/a): (m, n)``: each column sums to 1, each row to ``n/m`` (uniform):
   kept channels become *sums* of their clusters (official). ``semantics="average"`` instead
   uses the row-normalised ``T`` for the producers (barycentres) and ``T`` for the consumers, an
   explicit non-paper variant.
7. ``T`` is applied with the structured surgery: producer kernels and biases along the output
   axis, consumer kernels along the input axis, norms selected.

Several groups are processed in order (group 0, nearest the output, first), each on the weights
left by the previous ones, as the official ``MetaPruner`` does (``order="sequential"``).
``order="parallel"`` computes every map from the input weights and solves all groups of one
``(n, m)`` shape in one vmapped Sinkhorn call (the same result when groups do not share layers).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import ot
from jaxprune.structure.channel_groups import ChannelGroups, Group
from jaxprune.core.budget import CHANNEL_ROUNDINGS, check_round_to
from jaxprune.core.checks import check_choice, check_concrete
from jaxprune.core.forms import as_model, user_loss
from jaxprune.core.options import Options, resolve
from jaxprune.core.results import ChannelResult, make_info
from jaxprune.methods._repair import RepairOptions, check_repair_request, repair_if_asked
from jaxprune.methods._channels import (_as_groups, check_importance, importance_fn, keep_top, plan_budgets,
                                        resolve_groups)
from jaxprune.structure.importance import taylor_grads, taylor_importance
from jaxprune.core.progress import progress
from jaxprune.structure.surgery import MODES, channel_masks, fold_batchnorm, shrink_channels, write_channels, write_kept
from jaxprune.core.trees import as_numpy_tree, host_like, leaves_with_paths, on_host, placed_like

SOLVERS = ("exact", "entropic")
SEMANTICS = ("sum", "average")
MARGINALS = ("uniform", "importance")
ORDERS = ("sequential", "parallel")
TRANSPORTS = ("removed", "all")


def _numpy_tree(tree: Any) -> bool:
  return all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(tree))


class FusionMap(NamedTuple):
  """One group's fusion.

  Attributes:
    keep: ``(m,)`` sorted kept channel indices (row ``k`` of the maps belongs to ``keep[k]``).
    fusion_map: ``T: (m, n)``, applied to the consumers (and the producers with ``"sum"``).
    producer_map: the map applied to the producers (``T`` or its row-normalised form).
    plan: the OT plan ``P: (n, m)``.
    cost: the cost matrix ``C: (n, m)``.
  """
  keep: np.ndarray
  fusion_map: np.ndarray
  producer_map: np.ndarray
  plan: np.ndarray
  cost: np.ndarray


def pairing_vectors(variables: Any, group: Group, *, include_bias: bool = False, host_dtype: Any = np.float32) -> Any:
  """``X: (n, D)``: each channel's slices of the group's kernels, concatenated.

  Producers contribute their output slice, consumers their input slice (every row of a flatten
  mapping), in the group's member order. ``include_bias`` adds the producer biases (the paper's
  text; the official code leaves them out). Leaves in host memory give a numpy ``X`` of
  ``host_dtype`` (float64 for the host cost, which computes in float64), others a float32 jax array.
  """
  n = group.size
  members, arrays = _pairing_members(variables, group, include_bias)
  if on_host(*arrays):   # numpy in host memory: no compile per shape
    return _host_pairing_vectors([np.asarray(a) for a in arrays], members, n, host_dtype)
  parts = [jnp.moveaxis(jnp.asarray(a, jnp.float32), m.axis, 0)[m.positions(n)].reshape(n, -1)
           for a, m in zip(arrays, members)]
  return jnp.concatenate(parts, axis=1)


def _pairing_members(variables: Any, group: Group, include_bias: bool) -> tuple[list, list]:
  """The members whose slices make the pairing vectors, and their leaves."""
  leaves = dict(leaves_with_paths(variables))
  members = [m for m in group.members if m.kind in ("kernel", "depthwise") or (include_bias and m.kind == "bias")]
  if not members:
    raise ValueError(f"group {group.name} has no kernel members to build pairing vectors from")
  return members, [leaves[m.path] for m in members]


def group_pairing_cost(variables: Any, group: Group, keep: np.ndarray, p: float = 2, *,
                       include_bias: bool = False, rows: Optional[np.ndarray] = None) -> Any:
  """``C: (r, m)`` of :func:`pairing_cost` for ``group``'s pairing vectors, for the channels
  ``rows`` (default all ``n``). For host leaves and ``p=2`` it is built from each member's products
  (:func:`_member_views`), without the ``(n, D)`` matrix of pairing vectors, a transposed copy of
  every kernel."""
  members, arrays = _pairing_members(variables, group, include_bias)
  if p == 2 and on_host(*arrays):
    keep, rows = np.asarray(keep), None if rows is None else np.asarray(rows)
    views = _member_views([np.asarray(a) for a in arrays], members, group.size)
    sq = sum(np.einsum("pnq,pnq->n", x, x, dtype=np.float64) for x in views)
    gram = sum(_kept_products(x, keep, rows).astype(np.float64) for x in views)
    rows = np.arange(group.size) if rows is None else rows
    _refine_near_pairs(gram, sq, views, keep, rows)
    return host_like(_euclidean_from_gram(gram, np.sqrt(sq), keep, rows), arrays[0])
  x = pairing_vectors(variables, group, include_bias=include_bias, host_dtype=np.float64)
  return pairing_cost(x, keep, p, rows=rows)


def _member_views(arrays: list, members: list, n: int) -> list:
  """Each member's float32 leaf as ``(pre, n, post)`` (a view of a C-contiguous leaf); a mapped
  member (a flatten) or one with many leading blocks gathers its rows into ``(1, n, D)``."""
  views = []
  for a, m in zip(arrays, members):
    a = np.asarray(a, np.float32)
    axis = m.axis % a.ndim
    pre, post = int(np.prod(a.shape[:axis])), int(np.prod(a.shape[axis + 1:]))
    if m.index is not None or a.shape[axis] != n or (post > 1 and pre > 64):
      views.append(np.moveaxis(a, axis, 0)[m.positions(n)].reshape(1, n, -1))
    else:
      views.append(a.reshape(pre, n, post))
  return views


def _kept_products(x: np.ndarray, keep: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
  """``(r, m)`` products ``sum_{p, q} x[p, rows[i], q] x[p, keep[k], q]`` of ``x: (pre, n, post)``
  (``rows=None``: all ``n``): one product when ``post == 1`` (channels last), else one per leading
  block (float32 GEMMs)."""
  if x.shape[2] == 1:   # np.take: several times faster than fancy indexing along the last axis
    flat = x[:, :, 0]
    left = flat if rows is None else np.take(flat, rows, axis=1)
    return left.T @ np.take(flat, keep, axis=1)
  return sum((block if rows is None else block[rows]) @ block[keep].T for block in x)


def _refine_near_pairs(gram: np.ndarray, sq: np.ndarray, views: list, keep: np.ndarray, rows: np.ndarray,
                       near: float = 0.95, chunk: int = 256) -> None:
  """Recomputes in float64, in place, the products of pairs whose cosine exceeds ``near``: there
  ``|u - v|^2 = 2 - 2 cos`` cancels, and a float32 product's rounding (about 1e-7 of the cosine)
  would be a visible part of the distance. Elsewhere it is below 2e-6 of it. ``gram: (r, m)``
  holds the products of the channels ``rows`` with the kept ones. A channel and itself is its
  squared norm; other near pairs (near-duplicate channels, usually none) are summed from their
  slices, ``chunk`` pairs at a time."""
  safe = np.sqrt(np.where(sq > 0, sq, 1.0))
  at, cols = np.nonzero(gram / safe[rows, None] / safe[None, keep] > near)
  mine = keep[cols] == rows[at]
  gram[at[mine], cols[mine]] = sq[rows[at[mine]]]
  at, cols = at[~mine], cols[~mine]
  for s in range(0, at.size, chunk):
    i, j = rows[at[s:s + chunk]], keep[cols[s:s + chunk]]
    gram[at[s:s + chunk], cols[s:s + chunk]] = sum(
        np.einsum("pcq,pcq->c", x[:, i].astype(np.float64), x[:, j].astype(np.float64)) for x in views)


def _host_pairing_vectors(arrays: list, members: list, n: int, dtype: Any) -> np.ndarray:
  """Each member's view (:func:`_member_views`) written once into one ``(n, D)`` array of
  ``dtype``: no join, and the conversion done in the same pass."""
  views = _member_views(arrays, members, n)
  out = np.empty((n, sum(v.shape[0] * v.shape[2] for v in views)), dtype)
  start = 0
  for v in views:
    width = v.shape[0] * v.shape[2]
    out[:, start:start + width].reshape(n, v.shape[0], v.shape[2])[...] = v.transpose(1, 0, 2)
    start += width
  return out


def pairing_cost(x: jax.Array, keep: Any, p: float = 2, *, rows: Any = None, chunk: int = 32) -> jax.Array:
  """``C: (r, m)``: ``l_p`` distances between the l2-normalised rows ``rows`` of ``x: (n, D)``
  (default all: ``r = n``) and its kept rows.

  Rows with zero norm stay zero (the official code divides by zero and gets NaN). The distances
  between all ``n`` rows are computed by one jitted function per ``(n, D)`` shape, in chunks of
  ``chunk`` rows (memory ``O(chunk * n * D)``), and the kept columns taken after: a new sparsity
  changes ``m`` but compiles nothing. For ``x`` in host memory: ``p=2`` is one float64 matrix
  product, other ``p`` one compiled tile for every shape (:func:`_lp_distances_host`) on the
  ``(r, m)`` pairs.
  """
  keep = np.asarray(keep)
  rows = np.arange(np.shape(x)[0]) if rows is None else np.asarray(rows)
  if on_host(x):
    return host_like(_pairing_cost_host(np.asarray(x), keep, float(p), rows=rows), x)
  full = np.asarray(all_pairs_cost(jnp.asarray(x), float(p), int(chunk)))
  return jax.device_put(full[np.ix_(rows, keep)])   # device_put: jnp.asarray would compile per shape


def _pairing_cost_host(x: np.ndarray, keep: np.ndarray, p: float, *,
                       rows: Optional[np.ndarray] = None) -> np.ndarray:
  """``p=2``: :func:`_euclidean_host`. Otherwise :func:`_lp_distances_host` on the rows ``rows``
  (default all) and the kept ones, l2-normalised in float32 (norms in float64)."""
  rows = np.arange(np.shape(x)[0]) if rows is None else rows
  if p == 2:
    x = np.asarray(x, np.float64)
    return _euclidean_host(x, np.sqrt(np.einsum("nd,nd->n", x, x)), keep, rows)
  x = np.asarray(x, np.float32)
  norms = np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))
  scale = (1.0 / np.where(norms > 0, norms, 1.0)).astype(np.float32)[:, None]
  u, v = x[rows], x[keep]   # copies, scaled in place
  u *= scale[rows]
  v *= scale[keep]
  return _lp_distances_host(u, v, p)


_TILE_ROWS, _TILE_FEATURES = 256, 512


@functools.partial(jax.jit, static_argnums=2)
def _lp_tile(a: jax.Array, b_t: jax.Array, p: float) -> jax.Array:
  """``(T, T)``: ``sum_k |a[i, k] - b_t[k, j]|^p`` for the tiles ``a: (T, K)`` and ``b_t: (K, T)``.

  A loop over ``k`` adding ``|a[:, k] - b_t[k]|^p`` to one ``(T, T)`` accumulator: on 2 CPU cores
  3-4x the speed of one fused reduction over ``k`` (whose sums do not vectorise across ``j``).
  The sums are sequential in float32: relative error about 1.5e-6 for ``K = 512``.
  """
  def add(k, acc):
    d = jnp.abs(jax.lax.dynamic_slice_in_dim(a, k, 1, 1) - jax.lax.dynamic_slice_in_dim(b_t, k, 1, 0))
    return acc + (d if p == 1 else d ** p)

  return jax.lax.fori_loop(0, a.shape[1], add, jnp.zeros((a.shape[0], b_t.shape[1]), a.dtype), unroll=4)


def _lp_distances_host(u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
  """``(r, m)`` float32 ``l_p`` distances between the rows of ``u: (r, D)`` and ``v: (m, D)``.

  One compiled tile (:data:`_TILE_ROWS` x :data:`_TILE_FEATURES`, zero-padded: a zero feature adds
  ``|0 - 0|^p = 0``) on the CPU device serves every shape: the first call in a process compiles it
  (0.09 s on 2 CPU cores), and a new group or sparsity compiles nothing. Tiles sum in float32 (as the
  official ``torch.cdist``), the feature blocks in float64.
  """
  if not (u.shape[0] and v.shape[0]):
    return np.zeros((u.shape[0], v.shape[0]), np.float32)
  a, b = _device_tiles(u), _device_tiles(v, transpose=True)
  sums = np.zeros((len(a) * _TILE_ROWS, len(b) * _TILE_ROWS))
  blocks = {(i, j): [_lp_tile(x, y, p) for x, y in zip(a[i], b[j])] for i in range(len(a)) for j in range(len(b))}
  for (i, j), tiles in blocks.items():   # dispatched above, so the tiles overlap the transfers back
    sums[i * _TILE_ROWS:(i + 1) * _TILE_ROWS, j * _TILE_ROWS:(j + 1) * _TILE_ROWS] = np.sum(
        jax.device_get(tiles), axis=0, dtype=np.float64)
  sums = sums[:u.shape[0], :v.shape[0]]
  return (sums if p == 1 else sums ** (1.0 / p)).astype(np.float32)


def _device_tiles(z: np.ndarray, transpose: bool = False) -> list:
  """``z: (r, D)`` zero-padded and cut into ``[row block][feature block]`` tiles on the CPU device,
  each ``(T, K)`` (``(K, T)`` with ``transpose``)."""
  t, k = _TILE_ROWS, _TILE_FEATURES
  padded = np.zeros((-(-z.shape[0] // t) * t, -(-z.shape[1] // k) * k), np.float32)
  padded[:z.shape[0], :z.shape[1]] = z
  cpu = jax.devices("cpu")[0]
  tile = (lambda x: np.ascontiguousarray(x.T)) if transpose else (lambda x: x)  # noqa: E731
  return [[jax.device_put(tile(padded[i:i + t, f:f + k]), cpu) for f in range(0, padded.shape[1], k)]
          for i in range(0, padded.shape[0], t)]


def _euclidean_host(x: np.ndarray, norms: np.ndarray, keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """``(r, m)`` Euclidean distances between the l2-normalised float64 rows ``rows`` of ``x: (n, D)``
  and the kept ones, from one product: a GEMM, where ``cdist`` walks every pair, and no pass to
  normalise ``x``."""
  return _euclidean_from_gram(x[rows] @ x[keep].T, norms, keep, rows)


def _euclidean_from_gram(gram: np.ndarray, norms: np.ndarray, keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Distances of the l2-normalised rows from their products ``gram: (r, m)`` and ``norms: (n,)``:
  ``|u - v|^2 = |u|^2 + |v|^2 - 2 x.y / (|x| |y|)`` with ``|u|^2`` 1 (0 for a zero row). Near rows
  cancel, so their products must be float64-accurate (:func:`_refine_near_pairs`)."""
  safe = np.where(norms > 0, norms, 1.0)
  unit = (norms > 0).astype(np.float64)
  cos = gram / safe[rows, None] / safe[None, keep]
  d2 = unit[rows, None] + unit[None, keep] - 2.0 * cos
  return np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def all_pairs_cost(x: jax.Array, p: float, chunk: int) -> jax.Array:
  """``(n, n)`` ``l_p`` distances between the l2-normalised rows of ``x: (n, D)``."""
  norms = jnp.linalg.norm(x, axis=1, keepdims=True)
  xn = x / jnp.where(norms > 0, norms, 1.0)

  def row(v):
    d = jnp.abs(v[None, :] - xn)
    return jnp.sum(d, axis=1) if p == 1 else jnp.sum(d ** p, axis=1) ** (1.0 / p)

  return jax.lax.map(row, xn, batch_size=chunk)


def marginals(n: int, keep: np.ndarray, kind: str = "uniform",
              scores: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
  """``(a: (n,), b: (m,))``: uniform, or importance-weighted (``i / sum i`` and ``i[keep] / sum``)."""
  if kind == "uniform":
    return np.full(n, 1.0 / n), np.full(keep.size, 1.0 / keep.size)
  if kind != "importance":
    raise ValueError(f"marginals must be one of {MARGINALS}, got {kind!r}")
  s = np.clip(np.asarray(scores, np.float64), 0.0, None)
  if s.sum() <= 0 or s[keep].sum() <= 0:
    raise ValueError("marginals='importance' needs positive importance scores on the kept channels")
  return s / s.sum(), s[keep] / s[keep].sum()


def fusion_from_plan(plan: Any, a: Any, semantics: str = "sum") -> tuple[np.ndarray, np.ndarray]:
  """``(T, T_producers)`` from a plan ``P: (n, m)``: ``T = P^T diag(1/a)`` (columns sum to 1).

  ``semantics="average"`` returns the row-normalised ``T`` for the producers (not in the paper).
  Sources with zero mass get a zero column.
  """
  if semantics not in SEMANTICS:
    raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
  plan = np.asarray(plan, np.float64)
  a = np.asarray(a, np.float64)
  t = np.where(a[None, :] > 0, plan.T / np.where(a > 0, a, 1.0)[None, :], 0.0)
  if semantics == "sum":
    return t, t
  rows = t.sum(axis=1, keepdims=True)
  return t, t / np.where(rows > 0, rows, 1.0)


def removed_mass_plan(cost: Any, a: np.ndarray, b: np.ndarray, keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """The exact plan ``P: (n, m)`` with each kept channel's own mass left in place: only the
  removed channels ``rows`` are transported, a network simplex on ``cost: (r, m)`` (their rows).

  For a metric cost (every ``l_p`` distance with ``p >= 1``) the optimal transport cost between
  ``a`` and ``b`` equals that between what is left of them after their common mass stays where it
  is (Kantorovich-Rubinstein), here ``min(a[keep], b)`` on the kept channels, at zero cost. So
  this plan is optimal for the whole ``(n, m)`` problem, and it is the plan of the whole problem
  when that optimum is unique (as on every ResNet20 group in the tests). It needs ``a[keep] <= b``
  (to rounding), which uniform and importance marginals satisfy, and solves ``(n - m) x m``
  instead of ``n x m``.
  """
  stay = np.minimum(a[keep], b)
  if np.any(a[keep] - stay > 1e-12):
    raise ValueError("transport='removed' needs a kept channel's source mass <= its target mass")
  plan = np.zeros((a.size, keep.size))
  plan[keep, np.arange(keep.size)] = stay
  moved = a[rows].sum()
  if rows.size and moved > 0:
    plan[rows] = ot.exact_plan(cost, a[rows], b - stay) * moved
  return plan


def _solve(problems: list, solver: str, eps: float, options: ot.SinkhornOptions) -> list:
  """Plans for a list of :class:`_Problem`; entropic ones of one shape in one vmapped call."""
  plans = [None] * len(problems)
  if solver == "exact":
    return [ot.exact_plan(q.cost, *q.ab) if q.rows is None else removed_mass_plan(q.cost, *q.ab, q.keep, q.rows)
            for q in problems]
  by_shape: dict = {}
  for i, q in enumerate(problems):
    by_shape.setdefault(tuple(np.shape(q.cost)), []).append(i)
  for idx in by_shape.values():
    c = jnp.stack([jnp.asarray(problems[i].cost, jnp.float32) for i in idx])
    a = jnp.stack([jnp.asarray(problems[i].ab[0], jnp.float32) for i in idx])
    b = jnp.stack([jnp.asarray(problems[i].ab[1], jnp.float32) for i in idx])
    out, info = _vmapped_entropic(c, a, b, eps, options)
    ot.report_convergence(info, options, f"Intra-Fusion groups of shape {tuple(c.shape[1:])}")
    for j, i in enumerate(idx):
      plans[i] = np.asarray(out[j], np.float64)
  return plans


class _Problem(NamedTuple):
  """One group's OT problem: ``cost: (r, m)`` of the sources ``rows`` (``None``: all ``n``, ``r = n``)."""
  keep: np.ndarray
  cost: np.ndarray
  rows: Optional[np.ndarray]
  ab: tuple

  def full_cost(self) -> np.ndarray:
    """``C: (n, m)``; rows not computed are NaN, but for each kept channel's zero to itself."""
    if self.rows is None:
      return self.cost
    full = np.full((self.ab[0].size, self.keep.size), np.nan)
    full[self.keep, np.arange(self.keep.size)] = 0.0
    full[self.rows] = self.cost
    return full


def _entropic(c, a, b, eps, options):
  return ot.entropic_plan(c, a, b, eps, relative=True, options=options)


_vmapped_entropic = jax.jit(jax.vmap(_entropic, in_axes=(0, 0, 0, None, None)), static_argnums=(3, 4))


@dataclasses.dataclass(frozen=True)
class IntraFusionOptions(Options):
  """Options of :func:`intra_fusion`.

  Attributes:
    importance: as :class:`~jaxprune.ChannelOptions` (``"l1"``, ``"l2"``, ``"taylor"``,
      ``"random"`` or a callable); it picks the target channels (and the masses with
      ``marginals="importance"``).
    mode: ``"shrink"`` or ``"mask"``.
    solver: ``"exact"`` (as the official code: POT's network simplex, float64, on the host) or
      ``"entropic"`` (ott-jax Sinkhorn, jitted; ``eps`` relative to the mean cost; 0.001 gives a
      transport cost within 1e-4 (relative) of the exact optimum on the ResNet20 groups).
    eps: the entropic regularisation (``solver="entropic"`` only).
    p: the ``l_p`` distance of the cost. Default 2 (Euclidean): on the ResNet20 and MLPNet
      checkpoints it gives models level with ``p=1`` (experiments README, "pairing cost"), and it
      is made of matrix products, where ``p=1`` is a pass over every pair: on VGG11-BN the call
      takes 0.14 s against 0.40 s (benchmarks README). Official: 1 (``torch.cdist(p=1)``).
    marginals: ``"uniform"`` (official) or ``"importance"``.
    semantics: ``"sum"`` (official ``T = P^T diag(1/a)`` everywhere) or ``"average"``
      (row-normalised ``T`` on the producers; not in the paper).
    include_bias: add producer biases to the pairing vectors (paper text; official: no).
    fold_bn, include_eps: fold BatchNorm first (official: always, eps-free: ``include_eps=False``).
    order: ``"sequential"`` (official: each group on the weights the previous ones left) or
      ``"parallel"`` (every map from the input weights; entropic plans of one shape in one call).
    transport: ``"removed"`` (default) or ``"all"`` (official). With the exact solver,
      ``"removed"`` leaves each kept channel's own mass in place and transports the removed
      channels' mass only: an ``(n - m) x m`` cost and network simplex instead of ``n x m``, the
      same optimum for these metric costs, and the same plan whenever the optimum is unique
      (:func:`removed_mass_plan`). ``FusionMap.cost`` then has NaN in the kept channels' rows,
      which carry no transport. The entropic solver always solves the whole problem.
    sinkhorn: static Sinkhorn settings.
    rounding: ``"floor"`` or ``"truncate"`` (official), see :func:`jaxprune.n_kept_channels`.
    round_to: keep a multiple of this many channels per group (see :class:`ChannelOptions`).
  """
  importance: Any = "l1"
  mode: str = "shrink"
  solver: str = "exact"
  eps: float = 0.001
  p: float = 2
  marginals: str = "uniform"
  semantics: str = "sum"
  include_bias: bool = False
  fold_bn: bool = True
  include_eps: bool = True
  order: str = "sequential"
  transport: str = "removed"
  sinkhorn: ot.SinkhornOptions = ot.SinkhornOptions(threshold=1e-5, max_iterations=20000)
  rounding: str = "floor"
  round_to: int = 1

  OFFICIAL = {"include_eps": False, "rounding": "truncate", "p": 1, "transport": "all"}

  def check(self) -> None:
    check_importance(self.importance)
    check_round_to(self.round_to)
    for value, allowed, name in ((self.solver, SOLVERS, "solver"), (self.semantics, SEMANTICS, "semantics"),
                                 (self.marginals, MARGINALS, "marginals"), (self.order, ORDERS, "order"),
                                 (self.transport, TRANSPORTS, "transport"),
                                 (self.mode, MODES, "mode"), (self.rounding, CHANNEL_ROUNDINGS, "rounding")):
      check_choice(value, allowed, name)
    if isinstance(self.p, bool) or not (isinstance(self.p, (int, float)) and 1 <= self.p < float("inf")):
      raise ValueError(f"p must be a finite number >= 1, got {self.p!r}")
    if self.solver == "entropic" and not (isinstance(self.eps, (int, float)) and 0 < self.eps < float("inf")):
      raise ValueError(f"eps must be a positive float for solver='entropic', got {self.eps!r}")


def intra_fusion(params: Any, groups: Optional[Union[ChannelGroups, Sequence[Group]]],
                 sparsity: Union[float, Mapping[int, float]], *, apply_fn: Optional[Callable] = None,
                 batch: Any = None, key: Optional[jax.Array] = None, grads: Any = None,
                 loss_fn: Optional[Callable] = None, batches: Optional[Iterable] = None,
                 options: Optional[IntraFusionOptions] = None, official: bool = False, show_progress: bool = True,
                 repair: Any = None, repair_options: Optional[RepairOptions] = None, **overrides) -> ChannelResult:
  """Intra-Fusion: keep the top channels of each group and fuse all channels into them with OT.

  Args:
    params: the model's tree (params dict, linen ``variables``, ``nnx.State``) or an ``nnx.Module``.
    groups: from :func:`jaxprune.groups` (BatchNorm links come with it) or a list of groups;
      ``None`` traces them from ``apply_fn`` and the first example of ``batch``.
    sparsity: channel sparsity of every prunable group, or ``{group index: s}``.
    apply_fn, batch: the model and example inputs, only to trace ``groups=None``.
    key, grads, loss_fn, batches: inputs of the random and Taylor importances. With Taylor the
      gradients are fused along with the weights, as the official code transforms ``.grad``.
    options: :class:`IntraFusionOptions`; official: its official preset; ``**overrides`` single fields.
    repair, repair_options: examples ``x`` (a few hundred training inputs) to correct the pruned
      network's statistics with :func:`jaxprune.repair` before returning (recommended: it is what
      makes the pruned model usable without fine-tuning), and its :class:`RepairOptions`.
    show_progress: progress bar over groups.

  Returns:
    :class:`~jaxprune.ChannelResult`; ``info["groups"][i]`` has ``n``, ``m``,
    ``transport_cost``, ``marginal_error`` and ``seconds``, and ``info["maps"][i]`` the
    :class:`FusionMap`.
  """
  started = time.perf_counter()
  opts = resolve(IntraFusionOptions, options, official, overrides)
  model = as_model(params, apply_fn)
  check_concrete("intra_fusion", params=model.tree, batch=batch, repair=repair)
  check_repair_request(repair, repair_options, model.apply_fn)
  groups = resolve_groups(model, groups, batch)
  variables = model.tree
  if loss_fn is not None:
    loss_fn = user_loss(model, loss_fn)
  group_list, norms = _as_groups(groups)
  budgets = plan_budgets(group_list, sparsity, opts.rounding, opts.round_to)
  taylor = isinstance(opts.importance, str) and opts.importance == "taylor"
  score = None if taylor else importance_fn(opts.importance, key=key)
  if taylor and grads is None and (loss_fn is None or batches is None):
    raise ValueError("importance='taylor' needs grads=, or loss_fn= and batches=")
  original = variables
  variables = as_numpy_tree(variables)   # host trees: written in numpy, placed once at the end
  if opts.fold_bn and norms:
    variables = fold_batchnorm(variables, norms, include_eps=opts.include_eps)
  if taylor and grads is None:
    grads = taylor_grads(loss_fn, variables, batches, show_progress=show_progress)
  grads = as_numpy_tree(grads) if taylor else grads
  # host trees in shrink mode: each group's own axes are cut as it goes (write_kept), the rest at the end
  cut_early = opts.mode == "shrink" and _numpy_tree(variables) and (not taylor or _numpy_tree(grads))

  removed_only = opts.solver == "exact" and opts.transport == "removed"

  def fusion_for(v, g_idx, grads_now):
    s, m = budgets[g_idx]
    g = group_list[g_idx]
    scores = np.asarray(taylor_importance(v, grads_now, g) if taylor else score(v, g), np.float64)
    if scores.shape != (g.size,):
      raise ValueError(f"importance returned shape {scores.shape} for group {g_idx}, expected ({g.size},)")
    keep = keep_top(scores, m)
    rows = np.flatnonzero(~np.isin(np.arange(g.size), keep)) if removed_only else None
    cost = np.asarray(group_pairing_cost(v, g, keep, opts.p, include_bias=opts.include_bias, rows=rows), np.float64)
    return _Problem(keep, cost, rows, marginals(g.size, keep, opts.marginals, scores))

  def finish(q, plan):
    t, t_prod = fusion_from_plan(plan, q.ab[0], opts.semantics)
    return FusionMap(q.keep, t, t_prod, plan, q.full_cost())

  maps, stats, plans, to_cut = {}, {}, [], []
  indices = list(budgets)
  if opts.order == "parallel":
    t0 = time.perf_counter()
    prepared = {i: fusion_for(variables, i, grads) for i in indices}
    solved = _solve([prepared[i] for i in indices], opts.solver, opts.eps, opts.sinkhorn)
    for i, plan in zip(indices, solved):
      maps[i] = finish(prepared[i], plan)
    per_group_s = (time.perf_counter() - t0) / max(len(indices), 1)
  for i in progress(indices, desc="intra-fusion", disable=not show_progress):
    t0 = time.perf_counter()
    g = group_list[i]
    if opts.order == "sequential":
      q = fusion_for(variables, i, grads)
      maps[i] = finish(q, _solve([q], opts.solver, opts.eps, opts.sinkhorn)[0])
    f = maps[i]
    write = write_kept if cut_early else write_channels
    written = write(variables, g, f.keep, f.fusion_map, producer_map=f.producer_map)
    variables, rest = written if cut_early else (written, g)
    if taylor:
      grads = write(grads, g, f.keep, f.fusion_map, producer_map=f.producer_map)
      grads = grads[0] if cut_early else grads
    plans.append((g, f.keep))
    to_cut.append((rest, f.keep))
    a, b = marginals(g.size, f.keep, opts.marginals, None) if opts.marginals == "uniform" else (f.plan.sum(1), f.plan.sum(0))
    stats[i] = {"n": g.size, "m": int(f.keep.size), "sparsity": budgets[i][0],
                "transport_cost": float(np.where(f.plan > 0, f.plan * f.cost, 0.0).sum()),
                "marginal_error": float(max(np.abs(f.plan.sum(1) - a).max(), np.abs(f.plan.sum(0) - b).max())),
                "seconds": round(time.perf_counter() - t0 + (per_group_s if opts.order == "parallel" else 0.0), 4)}
  masks = channel_masks(original, plans)
  if opts.mode == "shrink":
    variables = shrink_channels(variables, to_cut)
  variables = placed_like(variables, original)
  info = make_info("intra_fusion", opts, started, fold_bn=bool(opts.fold_bn and norms), groups=stats, maps=maps, plans=tuple(plans))
  result = ChannelResult(variables, masks, info, {i: maps[i].keep for i in indices})
  return repair_if_asked(result, model, repair, repair_options, groups, started, show_progress)
