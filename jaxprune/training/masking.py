"""optax integration: keep pruned weights at zero while training.

``keep_pruned_at_zero(optax.sgd(...), masks)`` is an ``optax.GradientTransformationExtraArgs``
whose state carries the masks. Its updates land the pruned weights exactly on zero
(``update = -param`` there), so ``optax.apply_updates`` is all a training loop needs: there
is no separate "re-apply the masks" call to forget. Gradients of pruned weights are zeroed
before the inner optimiser, so its moments never see them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxprune.core.masks import check_masks
from jaxprune.core.trees import PrunableSpec, PyTree, map_with_paths, prunable_paths

_is_none = lambda x: x is None


class MaskedState(NamedTuple):
  masks: PyTree             # bool tree shaped like the params, None where not prunable
  inner_state: optax.OptState


def masks_from_zeros(params: PyTree, prunable: PrunableSpec = None) -> PyTree:
  """Masks that keep the non-zero prunable weights (``params != 0``), ``None`` elsewhere."""
  paths = set(prunable_paths(params, prunable))
  return map_with_paths(lambda p, x: (x != 0) if p in paths else None, params)


def keep_pruned_at_zero(inner: optax.GradientTransformation, masks: Optional[PyTree] = None,
                        prunable: PrunableSpec = None) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that pruned weights stay exactly zero.

  Args:
    inner: any optax transformation (``optax.sgd(...)``, ``optax.adamw(...)``, a chain).
    masks: bool mask tree (``None`` leaves for dense leaves); default: ``params != 0`` on the
      ``prunable`` leaves at ``init``. Replace them later with :func:`set_masks`.

  Returns:
    ``(init, update)``; ``update(grads, state, params)`` requires ``params``.
  """
  def init(params):
    m = masks if masks is not None else masks_from_zeros(params, prunable)
    check_masks(params, m)
    return MaskedState(m, inner.init(params))

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("keep_pruned_at_zero needs params in update(grads, state, params)")
    updates = jax.tree.map(lambda m, g: g if m is None else jnp.where(m, g, 0), state.masks, updates,
                           is_leaf=_is_none)
    new, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    new = jax.tree.map(lambda m, u, p: u if m is None else jnp.where(m, u, -p), state.masks, new, params,
                       is_leaf=_is_none)
    return new, MaskedState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)


def set_masks(state: MaskedState, masks: PyTree) -> MaskedState:
  """The same optimiser state with new masks (e.g. after a pruning stage)."""
  return state._replace(masks=masks)
