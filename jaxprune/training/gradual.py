"""optax integration: keep pruned weights at zero while training, and the gradual driver.

``keep_pruned_at_zero(optax.sgd(...), masks)`` is an ``optax.GradientTransformationExtraArgs``
whose state carries the masks. Its updates land the pruned weights exactly on zero
(``update = -param`` there), so ``optax.apply_updates`` is all a training loop needs: there
is no separate "re-apply the masks" call to forget. Gradients of pruned weights are zeroed
before the inner optimiser, so its moments never see them.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core.budget import check_sparsity, n_pruned_from_sparsity
from jaxprune.training.batches import Dataset, batches
from jaxprune.core.masks import check_masks
from jaxprune.core.progress import progress
from jaxprune.core.results import PruneResult
from jaxprune.core.schedules import sparsity_schedule
from jaxprune.core.trees import PrunableSpec, PyTree, count_prunable, map_with_paths, prunable_paths

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


class Stage(NamedTuple):
  stage: int
  sparsity: float
  k: int
  after_prune: dict
  after_finetune: dict
  prune_seconds: float
  finetune_seconds: float


class GradualResult(NamedTuple):
  params: PyTree
  masks: PyTree
  history: list


Pruner = Callable[..., PruneResult]   # pruner(params, batch, k, *, w_ref, key) -> PruneResult


def gradual_prune(params: PyTree, train: Dataset, *, pruner: Pruner, loss_fn: Callable[[PyTree, Any], jax.Array],
                  target_sparsity: float, stages: int = 14, schedule: str = "cubic", include_initial: bool = True,
                  n_examples: int = 1000, optimizer: optax.GradientTransformation = optax.sgd(1e-3, momentum=0.5),
                  batch_size: int = 64, finetune_epochs: int = 1, key: jax.Array = None,
                  evaluate_fn: Optional[Callable[[PyTree], dict]] = None, prunable: PrunableSpec = None,
                  show_progress: bool = True) -> GradualResult:
  """Gradual pruning (the protocol of EWR's Table 1): for each stage, prune then fine-tune.

  Stage ``t`` has the sparsity ``sparsity_schedule(target, stages, schedule, include_initial)``
  (cubic with the first stage at 0, as in the official code). It draws ``n_examples`` fresh
  training examples, calls ``pruner(params, (x, y), k_t, w_ref=dense_params, key=...)`` once,
  then trains ``finetune_epochs`` epochs of ``optimizer`` wrapped in :func:`keep_pruned_at_zero`.
  The reference weights ``w_ref`` stay the dense input ``params``.

  Args:
    pruner: any unstructured method with that signature (see :func:`pruner_for`).
    loss_fn: training loss ``loss_fn(params, (x, y)) -> scalar``, differentiated w.r.t. ``params``.
    evaluate_fn: ``params -> dict`` of metrics, recorded after each prune and fine-tune.

  Returns:
    :class:`GradualResult` (final params and masks, and one :class:`Stage` per stage).
  """
  target_sparsity = check_sparsity(target_sparsity, "target_sparsity")
  if key is None:
    raise ValueError("gradual_prune needs a key (jax.random.key) to draw examples and shuffle")
  if n_examples > len(train):
    raise ValueError(f"n_examples={n_examples} exceeds the {len(train)} training examples")
  p = count_prunable(params, prunable)
  sparsities = sparsity_schedule(target_sparsity, stages, schedule, include_initial=include_initial)
  tx = keep_pruned_at_zero(optimizer)
  grad_fn = jax.jit(jax.value_and_grad(loss_fn))

  @jax.jit
  def train_step(params, state, batch):
    loss, grads = grad_fn(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  dense, current, masks, state, history = params, params, None, None, []
  evaluate_fn = evaluate_fn or (lambda _: {})
  for t, s in enumerate(progress(sparsities, desc="gradual stages", disable=not show_progress)):
    key, k_pick, k_prune, k_shuffle = jax.random.split(key, 4)
    k_t = p - n_pruned_from_sparsity(p, target_sparsity if t == stages - 1 else s)
    t0 = time.perf_counter()
    if k_t < p:
      idx = np.asarray(jax.random.choice(k_pick, len(train), (n_examples,), replace=False))
      result = pruner(current, (train.x[idx], train.y[idx]), k_t, w_ref=dense, key=k_prune)
      current, masks = result.params, result.masks
    jax.block_until_ready(current)
    prune_seconds = time.perf_counter() - t0
    after_prune = evaluate_fn(current)
    if state is None:
      state = tx.init(current)          # the optimiser (and its momentum) lives across stages
    if masks is not None:
      state = set_masks(state, masks)
    t0 = time.perf_counter()
    seed = int(jax.random.randint(k_shuffle, (), 0, 2**31 - 1))
    for epoch in range(finetune_epochs):
      for xb, yb in batches(train, batch_size, shuffle=True, seed=seed + epoch):
        current, state, _ = train_step(current, state, (xb, yb))
    jax.block_until_ready(current)
    history.append(Stage(t + 1, s, k_t, after_prune, evaluate_fn(current), prune_seconds, time.perf_counter() - t0))
  return GradualResult(current, state.masks, history)


def pruner_for(method: str, *, loss_fn: Optional[Callable] = None, **options) -> Pruner:
  """A :data:`Pruner` for :func:`gradual_prune` from a method name (``magnitude``, ``random``, ``ewr``, ``lr``)."""
  from jaxprune.methods import _baselines as baselines
  from jaxprune.methods._ewr import ewr, lr
  if method == "magnitude":
    return lambda params, batch, k, *, w_ref, key: baselines.magnitude(params, k, **options)
  if method == "random":
    return lambda params, batch, k, *, w_ref, key: baselines.random(params, k, key, **options)
  if method in ("ewr", "lr"):
    if loss_fn is None:
      raise ValueError(f"pruner_for({method!r}) needs loss_fn")
    fn = ewr if method == "ewr" else lr
    return lambda params, batch, k, *, w_ref, key: fn(params, batch, k, loss_fn=loss_fn, w_ref=w_ref,
                                                      key=key, **options)
  raise ValueError(f"unknown method {method!r}; expected magnitude, random, ewr or lr")
