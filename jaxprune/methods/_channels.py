"""Default structured pruning: keep each group's most important channels, delete the rest."""
from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np

from jaxprune.structure.channel_groups import ChannelGroups, Group
from jaxprune.structure.importance import magnitude_importance, random_importance, taylor_grads, taylor_importance
from jaxprune.structure.surgery import MODES, channel_masks, fold_batchnorm, shrink_channels, write_channels

IMPORTANCES = ("l1", "l2", "taylor", "random")
Importance = Union[str, Callable[[Any, Group], Any]]


class ChannelResult(NamedTuple):
  """Output of a structured pruning method.

  Attributes:
    variables: the pruned tree: smaller arrays (``mode="shrink"``; rebuild the model with
      ``from_params``) or the original shapes with removed channels zeroed (``mode="mask"``).
    kept: ``{group index: sorted kept channel indices}`` for every pruned group.
    masks: bool tree shaped like the *input* variables (True = kept) on the pruned groups'
      parameter members, ``None`` elsewhere.
    info: ``method``, ``importance``, ``mode``, ``fold_bn``, per group ``n``/``m``/``sparsity``.
  """
  variables: Any
  kept: dict
  masks: Any
  info: dict


def n_kept_channels(n: int, sparsity: float) -> int:
  """``m = floor(n * (1 - sparsity))`` as the official code (``int(n * (1 - s))``)."""
  return int(n * (1 - sparsity))


def _as_groups(groups: Union[ChannelGroups, Sequence[Group]]) -> tuple[tuple[Group, ...], tuple]:
  if isinstance(groups, ChannelGroups):
    return tuple(groups.groups), groups.norms
  if isinstance(groups, Group):
    return (groups,), ()
  groups = tuple(groups)
  if not all(isinstance(g, Group) for g in groups):
    raise TypeError("groups must be a ChannelGroups (from jaxprune.groups) or a sequence of Group")
  return groups, ()


def plan_budgets(groups: Sequence[Group], sparsity: Union[float, Mapping[int, float]],
                 which: Optional[Union[int, Iterable[int]]] = None) -> dict:
  """``{group index: (sparsity, m)}`` for the groups to prune; validates every budget first."""
  if isinstance(sparsity, Mapping):
    if which is not None:
      raise ValueError("which: give either a {group: sparsity} dict or `which`, not both")
    chosen = dict(sparsity)
  else:
    if which is None:
      idx = range(len(groups))
    elif isinstance(which, numbers.Integral):
      idx = [int(which)]
    else:
      idx = [int(i) for i in which]
    chosen = {i: sparsity for i in idx}
  out = {}
  for i, s in chosen.items():
    if not 0 <= i < len(groups):
      raise IndexError(f"which: group {i} does not exist ({len(groups)} prunable groups)")
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0.0 <= float(s) < 1.0:
      raise ValueError(f"sparsity for group {i} must be a float in [0, 1), got {s!r}")
    g = groups[i]
    if not g.prunable:
      raise ValueError(f"group {i} ({g.name}) is not prunable: {g.reason}")
    m = n_kept_channels(g.size, float(s))
    if m < 1:
      raise ValueError(f"sparsity {s} keeps no channel of group {i} (n={g.size})")
    out[i] = (float(s), m)
  return dict(sorted(out.items()))


def keep_top(scores: Any, m: int) -> np.ndarray:
  """Sorted indices of the ``m`` highest scores; the official ``argsort(imp)[:n-m]`` are dropped."""
  scores = np.asarray(scores, np.float64)
  if not np.all(np.isfinite(scores)):
    raise ValueError("importance returned non-finite scores")
  order = np.argsort(scores, kind="stable")
  return np.sort(order[scores.size - m:])


def importance_fn(importance: Importance, *, key: Optional[jax.Array] = None, grads: Any = None,
                  loss_fn: Optional[Callable] = None, batches: Optional[Iterable] = None,
                  show_progress: bool = True) -> Callable[[Any, Group], Any]:
  """Resolves an importance name (``"l1"``, ``"l2"``, ``"taylor"``, ``"random"``) or callable."""
  if callable(importance):
    return importance
  if importance == "l1":
    return lambda v, g: magnitude_importance(v, g, 1)
  if importance == "l2":
    return lambda v, g: magnitude_importance(v, g, 2)
  if importance == "random":
    if key is None:
      raise ValueError("key: importance='random' needs a jax.random key")
    calls = iter(range(2**31 - 1))   # a fresh key for every group scored
    return lambda v, g: random_importance(jax.random.fold_in(key, next(calls)), g)
  if importance == "taylor":
    if grads is None:
      if loss_fn is None or batches is None:
        raise ValueError("importance='taylor' needs grads=, or loss_fn= and batches=")
      state = {}

      def taylor(v, g):
        if "grads" not in state:
          state["grads"] = taylor_grads(loss_fn, v, batches, show_progress=show_progress)
        return taylor_importance(v, state["grads"], g)
      return taylor
    return lambda v, g: taylor_importance(v, grads, g)
  raise ValueError(f"importance must be one of {IMPORTANCES} or a callable (variables, group) -> (n,), "
                   f"got {importance!r}")


def prune_channels(variables: Any, groups: Union[ChannelGroups, Sequence[Group]],
                   sparsity: Union[float, Mapping[int, float]], *, importance: Importance = "l1",
                   which: Optional[Union[int, Iterable[int]]] = None, mode: str = "shrink",
                   fold_bn: bool = True, include_eps: bool = True, key: Optional[jax.Array] = None,
                   grads: Any = None, loss_fn: Optional[Callable] = None, batches: Optional[Iterable] = None,
                   show_progress: bool = True) -> ChannelResult:
  """Default structured pruning ("Algorithm 1" of Intra-Fusion): keep the top channels per group.

  Groups are processed in order (group 0, nearest the output, first, as the official code does),
  each scored on the current tree, so a group's consumers are scored after the groups nearer the
  output were pruned.

  Args:
    variables: the model's tree (linen ``variables`` or ``nnx.State``).
    groups: from :func:`jaxprune.groups` (or a list of hand-made groups).
    sparsity: per-group channel sparsity ``s`` in ``[0, 1)``: each group keeps
      ``m = floor(n (1 - s))`` channels; or ``{group index: s}``.
    importance: ``"l1"``, ``"l2"`` (Torch-Pruning's group-mean ``MagnitudeImportance``),
      ``"taylor"`` (needs ``grads`` or ``loss_fn`` and ``batches``), ``"random"`` (needs ``key``),
      or ``fn(variables, group) -> (n,)``.
    which: group index or indices to prune (default: all); ignored with a dict ``sparsity``.
    mode: ``"shrink"`` (smaller arrays) or ``"mask"`` (same shapes, removed channels zeroed).
    fold_bn: fold BatchNorms into their kernels first (the official MetaPruner does, for the
      default baseline and Intra-Fusion alike, so importances see folded weights).
    include_eps: exact folding (default) or the official eps-free ``merge_bn``.
    key, grads, loss_fn, batches: inputs of the random and Taylor importances.
    show_progress: progress bar over groups (and Taylor batches).

  Returns:
    :class:`ChannelResult`.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  group_list, norms = _as_groups(groups)
  budgets = plan_budgets(group_list, sparsity, which)
  score = importance_fn(importance, key=key, grads=grads, loss_fn=loss_fn, batches=batches,
                        show_progress=show_progress)
  original = variables
  if fold_bn and norms:
    variables = fold_batchnorm(variables, norms, include_eps=include_eps)
  from jaxprune.core.progress import progress
  kept, plans, per_group = {}, [], {}
  for i in progress(list(budgets), desc="groups", disable=not show_progress):
    s, m = budgets[i]
    g = group_list[i]
    scores = np.asarray(score(variables, g))
    if scores.shape != (g.size,):
      raise ValueError(f"importance returned shape {scores.shape} for group {i}, expected ({g.size},)")
    keep = keep_top(scores, m)
    variables = write_channels(variables, g, keep)
    kept[i] = keep
    plans.append((g, keep))
    per_group[i] = {"n": g.size, "m": m, "sparsity": s}
  masks = channel_masks(original, plans)
  if mode == "shrink":
    variables = shrink_channels(variables, plans)
  info = {"method": "prune_channels", "importance": importance if isinstance(importance, str) else "callable",
          "mode": mode, "fold_bn": bool(fold_bn and norms), "groups": per_group}
  return ChannelResult(variables=variables, kept=kept, masks=masks, info=info)
