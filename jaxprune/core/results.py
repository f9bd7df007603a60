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

INFO_CORE = ("method", "options", "seconds")


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
  return {"method": method, "options": options, "seconds": round(time.perf_counter() - started, 4), **extra}
