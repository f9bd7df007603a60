"""The result container every pruning method returns."""
from __future__ import annotations

from typing import Any, NamedTuple


class PruneResult(NamedTuple):
  """Output of an unstructured pruning method.

  Attributes:
    params: the pruned parameter tree (same container type as the input; pruned weights are 0).
    masks: bool tree shaped like ``params``; ``None`` on leaves that were not prunable.
    info: diagnostics (``method``, ``k``, ``p``, ``sparsity`` and method-specific entries).
  """
  params: Any
  masks: Any
  info: dict
