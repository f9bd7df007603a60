"""Unstructured baselines: magnitude (global or per layer) and random pruning."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.budget import check_k
from jaxprune.core.checks import check_budget, check_finite, check_key
from jaxprune.core.forms import as_model
from jaxprune.core.options import Options, resolve
from jaxprune.core.masks import apply_masks, masks_from_flat, topk_mask
from jaxprune.core.results import PruneResult, make_info
from jaxprune.core.trees import FlatSpec, PrunableSpec, PyTree, flat_spec, flatten, on_host_numeric, to_device

SCOPES = ("global", "layer")


def uniform_allocation(k: int, sizes) -> list[int]:
  """Splits ``k`` over layers in proportion to their sizes, summing to exactly ``k``.

  Each layer gets ``floor(k * n_l / p)``; the remainder goes to the largest fractional parts
  (earlier layers first on ties).
  """
  sizes = [int(n) for n in sizes]
  if not sizes or any(n <= 0 for n in sizes):
    raise ValueError(f"sizes must be positive layer sizes, got {sizes}")
  p = sum(sizes)
  check_budget(k, p, "k")
  base = [k * n // p for n in sizes]
  frac = [(k * n) % p for n in sizes]
  for i in sorted(range(len(sizes)), key=lambda i: (-frac[i], i))[: k - sum(base)]:
    base[i] += 1
  return base


_global_keep = jax.jit(topk_mask)   # k traced: one compilation for every budget


@functools.partial(jax.jit, static_argnames=("k", "spec"))
def _layer_keep(scores, k, spec):
  sizes = [int(np.prod(s)) for s in spec.shapes]
  parts = [topk_mask(scores[off:off + n], kl)
           for off, n, kl in zip(spec.offsets, sizes, uniform_allocation(k, sizes))]
  return jnp.concatenate(parts)


def keep_from_scores(scores: jax.Array, k: int, spec: FlatSpec, scope: str = "global") -> jax.Array:
  """Flat ``keep: (p,)`` with exactly ``k`` True: top-``k`` of ``scores: (p,)`` globally, or per leaf
  with a uniform allocation (``scope="layer"``). Host scores are ranked in numpy (nothing to
  compile); device scores by one jitted program (per budget for ``"layer"``)."""
  if on_host_numeric(scores):
    if scope == "global":
      return topk_mask(scores, k)
    sizes = [int(np.prod(s)) for s in spec.shapes]
    host = np.asarray(scores)
    return to_device(np.concatenate([np.asarray(topk_mask(host[off:off + n], kl)) for off, n, kl in
                                     zip(spec.offsets, sizes, uniform_allocation(k, sizes))]), scores)
  return _global_keep(scores, k) if scope == "global" else _layer_keep(scores, k, spec)


@dataclasses.dataclass(frozen=True)
class MagnitudeOptions(Options):
  """Options of :func:`magnitude` and :func:`random`.

  Attributes:
    scope: ``"global"`` (one ranking over all leaves, the MP of the CBS/CHITA/EWR tables) or
      ``"layer"`` (each leaf keeps its proportional share of ``k``).
  """
  scope: str = "global"

  def check(self) -> None:
    if self.scope not in SCOPES:
      raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")


def _prune_by_scores(tree, scores, k, spec, opts, method, started):
  keep = keep_from_scores(scores, k, spec, opts.scope)
  masks = masks_from_flat(keep, tree, spec)
  info = make_info(method, opts, started, k=k, p=spec.size, sparsity=1.0 - k / spec.size)
  return PruneResult(apply_masks(tree, masks), masks, info)


def magnitude(params: PyTree, k: int, *, prunable: PrunableSpec = None, options: Optional[MagnitudeOptions] = None,
              official: bool = False, **overrides) -> PruneResult:
  """Magnitude pruning: keep the ``k`` weights of largest ``|w|``.

  Args:
    params: the model's tree (params dict, linen ``variables``, ``nnx.State``) or an ``nnx.Module``;
      only the ``prunable`` leaves are pruned.
    k: number of prunable weights kept (exactly; ties keep the lower flat index).
    prunable: leaf selection (default: Dense/Conv kernels); see :class:`jaxprune.Prunable`.
    options, official, overrides: :class:`MagnitudeOptions` (``scope="global" | "layer"``).

  Returns:
    :class:`PruneResult` with the pruned params, the masks and ``info``.
  """
  started = time.perf_counter()
  opts = resolve(MagnitudeOptions, options, official, overrides)
  tree = as_model(params).tree
  spec = flat_spec(tree, prunable)
  k = check_k(k, spec.size)
  check_finite(tree, "params")   # a NaN weight would rank arbitrarily
  w, _ = flatten(tree, spec=spec)
  scores = to_device(np.abs(np.asarray(w)), w) if on_host_numeric(w) else jnp.abs(w)
  return _prune_by_scores(tree, scores, k, spec, opts, "magnitude", started)


def random(params: PyTree, k: int, *, key: jax.Array, prunable: PrunableSpec = None,
           options: Optional[MagnitudeOptions] = None, official: bool = False, **overrides) -> PruneResult:
  """Random pruning: keep ``k`` prunable weights chosen uniformly at random with ``key``.

  Same arguments and result as :func:`magnitude`, plus a ``jax.random`` key.
  """
  started = time.perf_counter()
  opts = resolve(MagnitudeOptions, options, official, overrides)
  check_key(key)
  tree = as_model(params).tree
  spec = flat_spec(tree, prunable)
  k = check_k(k, spec.size)
  scores = jax.random.uniform(key, (spec.size,))
  return _prune_by_scores(tree, scores, k, spec, opts, "random", started)
