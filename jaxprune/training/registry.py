"""Registries of methods for sweeps (the CLI, experiments): name -> pruner.

An unstructured pruner has the signature ``fn(params, k, *, key, context) -> PruneResult``;
``context`` carries what data-driven methods need: ``batch`` (N examples) and
``loss_fn(params, batch)`` over the same params tree the pruner receives.
A structured pruner has the signature ``fn(variables, groups, sparsity, *, key, context) ->
ChannelResult`` (``sparsity`` per group, every prunable group, mask mode); ``context`` also
carries ``apply_fn`` (i-SpaSP runs the model to read hidden activations).
Method issues add their entry with :func:`register` / :func:`register_structured`.
"""
from __future__ import annotations

from typing import Callable

from jaxprune.methods import _baselines as baselines

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
    from jaxprune.methods._ewr import ewr, lr
    fn = ewr if name == "ewr" else lr
    return fn(params, context["batch"], k, loss_fn=context["loss_fn"], key=key, show_progress=False, **ONE_SHOT)
  return run


register("lr", _ewr_like("lr"))
register("ewr", _ewr_like("ewr"))


STRUCTURED: dict[str, Callable] = {}


def register_structured(name: str, fn: Callable) -> None:
  STRUCTURED[name] = fn


def _channels(variables, groups, sparsity, *, key, context):
  from jaxprune.methods._channels import prune_channels
  return prune_channels(variables, groups, sparsity, importance="l1", mode="mask", show_progress=False)


def _intra_fusion(variables, groups, sparsity, *, key, context):
  from jaxprune.methods._intrafusion import intra_fusion
  return intra_fusion(variables, groups, sparsity, importance="l1", mode="mask", show_progress=False)


def _ispasp(variables, groups, sparsity, *, key, context):
  # i-SpaSP prunes the two-layer units (every hidden layer of an MLP) to int(n (1 - sparsity))
  # channels, the same count as the others; it needs the model and a batch of inputs.
  from jaxprune.methods._ispasp import ispasp
  return ispasp(context["apply_fn"], variables, context["batch"], 1.0 - sparsity, groups=groups, mode="mask",
                show_progress=False)


register_structured("channels_l1", _channels)
register_structured("intra_fusion", _intra_fusion)
register_structured("ispasp", _ispasp)
