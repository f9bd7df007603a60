"""Registry of unstructured methods for sweeps (the CLI, experiments): name -> pruner.

A registered pruner has the signature ``fn(params, k, *, key, context) -> PruneResult``;
``context`` carries what data-driven methods need: ``batch`` (N examples) and
``loss_fn(params, batch)`` over the same params tree the pruner receives.
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

# One-shot EWR/LR as the CLI runs them: the official per-stage step (one IHT step, mask
# only) over several stages with G recomputed at the current weights. A single step from
# the dense point is magnitude pruning (the residual is zero there), hence the stages.
ONE_SHOT = dict(stages=10, iterations=1, update_weights=False)


def _ewr_like(name):
  def run(params, k, *, key, context):
    from jaxprune.ewr import ewr, lr
    fn = ewr if name == "ewr" else lr
    return fn(params, context["batch"], k, loss_fn=context["loss_fn"], key=key, show_progress=False, **ONE_SHOT)
  return run


register("lr", _ewr_like("lr"))
register("ewr", _ewr_like("ewr"))
