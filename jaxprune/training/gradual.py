"""The gradual driver: stages of (prune, then fine-tune with the pruned weights held at zero).

EWR's Table-1 protocol: a cubic schedule of sparsities, fresh examples for every pruning step,
one pruning call per stage and masked fine-tuning between stages.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.core.budget import check_sparsity, n_pruned_from_sparsity
from jaxprune.core.checks import check_finite, check_key, check_positive_int
from jaxprune.core.forms import as_model, join_trainable, split_trainable, user_loss
from jaxprune.core.progress import progress
from jaxprune.core.schedules import sparsity_schedule
from jaxprune.core.trees import PrunableSpec, PyTree, count_prunable, leaves_with_paths, map_with_paths
from jaxprune.training.batches import Dataset, batches
from jaxprune.training.masking import MaskedState, keep_pruned_at_zero, set_masks
from jaxprune.training.registry import Pruner, pruner_for


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


def gradual_prune(params: PyTree, data: Dataset, *, pruner: Union[str, Pruner],
                  loss_fn: Optional[Callable[[PyTree, Any], jax.Array]], target_sparsity: float, key: jax.Array,
                  apply_fn: Optional[Callable] = None, stages: int = 14, schedule: str = "cubic",
                  include_initial: bool = True, n_examples: int = 1000,
                  optimizer: optax.GradientTransformation = optax.sgd(1e-3, momentum=0.5), batch_size: int = 64,
                  finetune_epochs: int = 1, evaluate_fn: Optional[Callable[[PyTree], dict]] = None,
                  prunable: PrunableSpec = None, checkpoint_dir: Optional[str] = None,
                  show_progress: bool = True) -> GradualResult:
  """Gradual pruning (the protocol of EWR's Table 1): for each stage, prune then fine-tune.

  Stage ``t`` has the sparsity ``sparsity_schedule(target, stages, schedule, include_initial)``
  (cubic with the first stage at 0, as in the official code). It draws ``n_examples`` fresh
  training examples, calls ``pruner(params, (x, y), k_t, key=..., loss_fn=..., w_ref=dense)``
  once, then trains ``finetune_epochs`` epochs of ``optimizer`` wrapped in
  :func:`keep_pruned_at_zero`. The reference weights ``w_ref`` stay the dense input ``params``.
  Only the trainable leaves are differentiated and updated (an NNX state's ``nnx.Param``, a linen
  tree's ``"params"``, other trees' floating-point leaves): batch statistics and random-number
  state stay as they are, whatever the optimiser's weight decay.

  Args:
    params: the model's tree (or an ``nnx.Module``; the result is then its ``nnx.State``).
    data: the training :class:`~jaxprune.data.Dataset`.
    pruner: a method name (``"magnitude"``, ``"random"``, ``"lr"``, ``"ewr"``, ...; see
      :func:`jaxprune.pruner_for`) or a callable of the one pruner protocol.
    loss_fn: training loss ``loss_fn(params, (x, y)) -> scalar``, for fine-tuning and the
      data-driven pruners; ``None`` with ``apply_fn`` is softmax cross-entropy.
    target_sparsity: the final sparsity of the prunable weights.
    key: ``jax.random`` key: example draws, shuffles and the pruner's randomness.
    evaluate_fn: ``params -> dict`` of metrics, recorded after each prune and fine-tune.
    checkpoint_dir: a folder for a resumable run. After every stage the params, the optimiser
      state (with the masks), the random key and the history are saved there; calling again with
      the same arguments resumes after the last finished stage and gives the same result as an
      uninterrupted run. A checkpoint of a run with other arguments is an error, not a resume.

  Returns:
    :class:`GradualResult` (final params and masks, and one :class:`Stage` per stage).
  """
  target_sparsity = check_sparsity(target_sparsity, "target_sparsity")
  check_key(key)
  train = data
  for name, value in (("stages", stages), ("n_examples", n_examples), ("batch_size", batch_size),
                      ("finetune_epochs", finetune_epochs)):
    check_positive_int(value, name)
  if n_examples > len(train):
    raise ValueError(f"n_examples={n_examples} exceeds the {len(train)} training examples")
  check_finite({"x": train.x}, "data")   # a NaN row would silently turn every weight into NaN
  model = as_model(params, apply_fn)
  params = model.tree
  loss_fn = user_loss(model, loss_fn)
  prune = pruner_for(pruner) if isinstance(pruner, str) else pruner
  if not callable(prune):
    raise TypeError(f"pruner must be a method name or a callable pruner, got {type(pruner).__name__}")
  p = count_prunable(params, prunable)
  sparsities = sparsity_schedule(target_sparsity, stages, schedule, include_initial=include_initial)
  tx = keep_pruned_at_zero(optimizer)
  grad_fn = jax.value_and_grad(lambda trained, frozen, batch: loss_fn(join_trainable(trained, frozen), batch))

  @jax.jit
  def train_step(params, state, batch):   # only the trainable leaves: no batch statistics, no RNG state
    trained, frozen = split_trainable(params)
    loss, grads = grad_fn(trained, frozen, batch)
    updates, state = tx.update(grads, state, trained)
    return join_trainable(optax.apply_updates(trained, updates), frozen), state, loss

  dense, current, masks, state, history = params, params, None, None, []
  evaluate_fn = evaluate_fn or (lambda _: {})
  store = None
  if checkpoint_dir is not None:
    signature = _signature(params, key, pruner, target_sparsity, stages, schedule, include_initial, n_examples,
                           batch_size, finetune_epochs)
    store = _Checkpoints(checkpoint_dir, signature)
    resumed = store.load(current, optimizer.init(split_trainable(current)[0]), key)
    if resumed is not None:
      current, state, key, history = resumed
      masks = state.masks
  for t, s in enumerate(progress(sparsities, desc="gradual stages", disable=not show_progress)):
    if t < len(history):   # finished before an interruption
      continue
    key, k_pick, k_prune, k_shuffle = jax.random.split(key, 4)
    k_t = p - n_pruned_from_sparsity(p, target_sparsity if t == stages - 1 else s)
    t0 = time.perf_counter()
    if k_t < p:
      idx = np.asarray(jax.random.choice(k_pick, len(train), (n_examples,), replace=False))
      result = prune(current, (train.x[idx], train.y[idx]), k_t, key=k_prune, loss_fn=loss_fn, w_ref=dense)
      current, masks = result.params, result.masks
    jax.block_until_ready(current)
    prune_seconds = time.perf_counter() - t0
    after_prune = evaluate_fn(current)
    if state is None:
      state = tx.init(split_trainable(current)[0])   # the optimiser (and its momentum) lives across stages
    if masks is not None:
      state = set_masks(state, split_trainable(masks, like=current)[0])
    t0 = time.perf_counter()
    seed = int(jax.random.randint(k_shuffle, (), 0, 2**31 - 1))
    for epoch in range(finetune_epochs):
      for xb, yb in batches(train, batch_size, shuffle=True, seed=seed + epoch):
        current, state, _ = train_step(current, state, (xb, yb))
    jax.block_until_ready(current)
    history.append(Stage(t + 1, s, k_t, after_prune, evaluate_fn(current), prune_seconds, time.perf_counter() - t0))
    if store is not None:
      store.save(current, state, key, history)
  frozen = jax.tree.map(lambda _: None, split_trainable(current)[1])   # no mask on batch statistics, RNG state
  return GradualResult(current, join_trainable(state.masks, frozen), history)


def _signature(params, key, pruner, *settings) -> str:
  """What a checkpoint must match to be resumed: the settings, the tree's layout and the key."""
  import hashlib
  layout = [(p, tuple(np.shape(x)), str(x.dtype)) for p, x in leaves_with_paths(params)]
  name = pruner if isinstance(pruner, str) else getattr(pruner, "__qualname__", type(pruner).__name__)
  text = repr((layout, name, settings, np.asarray(_key_data(key)).tolist()))
  return hashlib.sha256(text.encode()).hexdigest()


def _is_typed_key(key) -> bool:
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_data(key):
  return jax.random.key_data(key) if _is_typed_key(key) else key


class _Checkpoints:
  """One run's state after its last finished stage: arrays in a ``.npz``, the rest in JSON.

  The params and the inner optimiser state are stored leaf by leaf in their tree order, the masks
  by leaf path (``None`` where a leaf is not pruned), the key as its raw data. Each file is
  written to a temporary name and renamed, so an interruption never leaves a half-written stage.
  """

  def __init__(self, folder: str, signature: str):
    self.folder = Path(folder)
    self.folder.mkdir(parents=True, exist_ok=True)
    self.signature = signature
    self.arrays, self.meta = self.folder / "gradual_state.npz", self.folder / "gradual_state.json"

  def save(self, params, state, key, history) -> None:
    arrays = {f"params_{i}": np.asarray(_key_data(x)) for i, x in enumerate(jax.tree_util.tree_leaves(params))}
    arrays.update({f"inner_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(state.inner_state))})
    arrays.update({f"mask:{p}": np.asarray(m) for p, m in leaves_with_paths(state.masks)})
    arrays["key"] = np.asarray(_key_data(key))
    tmp = self.folder / "gradual_state.tmp.npz"
    np.savez(tmp, **arrays)
    tmp_meta = self.folder / "gradual_state.tmp.json"
    tmp_meta.write_text(json.dumps({"signature": self.signature, "history": [s._asdict() for s in history]},
                                   default=float))
    os.replace(tmp, self.arrays)
    os.replace(tmp_meta, self.meta)

  def load(self, params, inner_template, key):
    """``(params, state, key, history)`` of the last finished stage, or ``None`` for a fresh run."""
    if not (self.arrays.exists() and self.meta.exists()):
      return None
    meta = json.loads(self.meta.read_text())
    if meta.get("signature") != self.signature:
      raise ValueError(f"checkpoint_dir={str(self.folder)!r} holds a gradual run with other arguments (or another "
                       "key or model); give an empty folder or the same arguments to resume")
    with np.load(self.arrays) as f:
      saved = {name: f[name] for name in f.files}
    params = _restore(params, "params", saved)
    inner = _restore(inner_template, "inner", saved)
    masks = map_with_paths(lambda p, x: jnp.asarray(saved[f"mask:{p}"]) if f"mask:{p}" in saved else None, params)
    masks = split_trainable(masks, like=params)[0]   # the optimiser's masks cover the trainable leaves
    data = saved["key"]
    key = jax.random.wrap_key_data(data) if _is_typed_key(key) else jnp.asarray(data)
    return params, MaskedState(masks, inner), key, [Stage(**s) for s in meta["history"]]


def _restore(template, prefix: str, saved: dict):
  """``template``'s tree with the saved leaves (random keys, such as an NNX module's, from their data)."""
  leaves, treedef = jax.tree_util.tree_flatten(template)

  def leaf(i, t):
    data = saved[f"{prefix}_{i}"]
    if _is_typed_key(t):
      return jax.random.wrap_key_data(jnp.asarray(data), impl=jax.random.key_impl(t))
    return jnp.asarray(data, dtype=t.dtype)

  return jax.tree_util.tree_unflatten(treedef, [leaf(i, t) for i, t in enumerate(leaves)])
