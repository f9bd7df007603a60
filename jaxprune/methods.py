"""Registry of unstructured methods for sweeps (the CLI, experiments): name -> pruner.

A registered pruner has the signature ``fn(params, k, *, key, context) -> PruneResult``;
``context`` carries what data-driven methods need (``apply_fn``, ``batch``, ``loss_fn``).
Method issues add their entry with :func:`register`.
"""
from __future__ import annotations

from typing import Callable

from jaxprune import baselines

UNSTRUCTURED: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
  UNSTRUCTURED[name] = fn


register("magnitude", lambda params, k, *, key, context: baselines.magnitude(params, k))
register("magnitude_layer", lambda params, k, *, key, context: baselines.magnitude(params, k, scope="layer"))
register("random", lambda params, k, *, key, context: baselines.random(params, k, key))
