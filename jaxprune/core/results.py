"""The one result family every pruning method returns, and the common core of ``info``.

Every result has ``params`` (the pruned tree, the same kind of tree the caller passed: a params
dict, a linen ``variables`` dict, an ``nnx.State``; an ``nnx.Module`` comes back as its pruned
``nnx.State``), ``masks`` (bool tree, ``None`` where nothing was pruned) and ``info``. ``info``
always holds :data:`INFO_CORE`: ``method`` (its name), ``options`` (the frozen options object
the method ran with, so a result says exactly how it was made) and ``seconds`` (wall time of
the call); each method adds its own entries. Structured results add ``kept``.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import numpy as np

INFO_CORE = ("method", "options", "seconds")


class Info(dict):
  """A result's ``info``: a plain ``dict`` that is also a pytree whose leaves are its arrays.

  Names, options and Python numbers are static (the pytree's auxiliary data), so a result can be
  returned from a user's ``jax.jit`` (``jax.jit(functools.partial(jp.lr, k=..., loss_fn=...))``):
  the diagnostics computed on device come back as arrays, the rest as they were.
  """


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def _flatten_info(info: Info):
  leaves, treedef = jax.tree_util.tree_flatten(list(info.values()))   # a list keeps the keys' order
  arrays = tuple(_is_array(leaf) for leaf in leaves)
  static = tuple(None if a else _Static(leaf) for leaf, a in zip(leaves, arrays))
  return [leaf for leaf, a in zip(leaves, arrays) if a], (tuple(info), treedef, static)


def _unflatten_info(aux, children) -> Info:
  keys, treedef, static = aux
  children = iter(children)
  values = jax.tree_util.tree_unflatten(treedef, [next(children) if s is None else s.value for s in static])
  return Info(zip(keys, values))


class _Static:
  """A static leaf of :class:`Info`, compared by identity when it is not hashable."""
  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def _key(self):
    try:
      hash(self.value)
      return (type(self.value), self.value)
    except TypeError:
      return (type(self.value), id(self.value))

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


jax.tree_util.register_pytree_node(Info, _flatten_info, _unflatten_info)


class PruneResult(NamedTuple):
  """Output of an unstructured method.

  Attributes:
    params: the pruned tree (same kind as the input; pruned weights are 0).
    masks: bool tree shaped like ``params``; ``None`` on leaves that were not prunable.
    info: :data:`INFO_CORE` plus ``k``, ``p``, ``sparsity`` and method-specific entries.
  """
  params: Any
  masks: Any
  info: dict


class ChannelResult(NamedTuple):
  """Output of a structured method.

  Attributes:
    params: the pruned tree: smaller arrays (``mode="shrink"``; rebuild the model with
      ``from_params``) or the original shapes with removed channels zeroed (``mode="mask"``).
    masks: bool tree shaped like the *input* tree (True = kept) on the pruned groups' parameter
      members, ``None`` elsewhere.
    info: :data:`INFO_CORE` plus per-group ``n``/``m``/``sparsity`` under ``info["groups"]``.
    kept: ``{group index: sorted kept channel indices}`` for every pruned group.
  """
  params: Any
  masks: Any
  info: dict
  kept: dict


def make_info(method: str, options: Any, started: float, **extra: Any) -> dict:
  """``info`` with the common core first: ``method``, ``options``, ``seconds`` since ``started``."""
  return Info({"method": method, "options": options, "seconds": round(time.perf_counter() - started, 4), **extra})
