"""Default structured pruning: keep each group's most important channels, delete the rest."""
from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from jaxprune.core.budget import CHANNEL_ROUNDINGS, check_channel_sparsity, check_round_to, n_kept_channels
from jaxprune.core.checks import check_choice, check_concrete
from jaxprune.core.forms import Model, as_model, user_loss
from jaxprune.core.options import Options, resolve
from jaxprune.core.progress import progress
from jaxprune.core.results import ChannelResult, make_info
from jaxprune.methods._repair import RepairOptions, check_repair_request, repair_if_asked
from jaxprune.structure.channel_groups import ChannelGroups, Group, check_groups_fit
from jaxprune.structure.importance import (MagnitudeScores, magnitude_importance, random_importance, taylor_grads,
                                          taylor_importance)
from jaxprune.structure.surgery import (MODES, batchnorm_scales, channel_masks, fold_batchnorm, kept_flags,
                                       shrink_channels, write_channels)

IMPORTANCES = ("l1", "l2", "taylor", "random")
Importance = Union[str, Callable[[Any, Group], Any]]


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
                 rounding: str = "floor", round_to: int = 1) -> dict:
  """``{group index: (sparsity, m)}`` for the groups to prune; validates every budget first.

  ``sparsity`` is one channel sparsity for every prunable group, or ``{group index: sparsity}``;
  ``m`` follows :func:`jaxprune.n_kept_channels` with ``rounding`` and ``round_to``.
  """
  if isinstance(sparsity, Mapping):
    chosen = dict(sparsity)
  else:
    chosen = {i: sparsity for i, g in enumerate(groups) if g.prunable}
    if not chosen:
      why = "; ".join(f"group {i} ({g.name}) is not prunable: {g.reason}" for i, g in enumerate(groups))
      raise ValueError(f"groups: nothing to prune ({why or 'no groups'})")
  out = {}
  for i, s in chosen.items():
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(groups):
      raise IndexError(f"sparsity: group {i!r} does not exist ({len(groups)} groups)")
    s = check_channel_sparsity(s, f"sparsity for group {i}")
    g = groups[i]
    if not g.prunable:
      raise ValueError(f"sparsity: group {i} ({g.name}) is not prunable: {g.reason}")
    m = n_kept_channels(g.size, s, rounding, round_to)
    if m < 1:
      raise ValueError(f"sparsity {s} keeps no channel of group {i} (n={g.size})")
    out[int(i)] = (s, m)
  return dict(sorted(out.items()))


def resolve_groups(model: Model, groups: Any, batch: Any) -> Any:
  """``groups`` as given, or traced from ``apply_fn`` on the first example of ``batch`` when ``None``."""
  if groups is not None:
    check_groups_fit(model.tree, _as_groups(groups)[0])
    return groups
  if model.apply_fn is None:
    raise TypeError("groups: pass the model's groups (jaxprune.groups(apply_fn, params, x)), or groups=None "
                    "with apply_fn= and batch= to trace them here")
  x = model_inputs(batch)
  from jaxprune.structure.trace import groups as trace_groups
  return trace_groups(model.apply_fn, model.tree, jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype))


def model_inputs(batch: Any) -> Any:
  """The model inputs of ``batch``: ``x`` itself or the first element of ``(x, y)``."""
  x = batch[0] if isinstance(batch, (tuple, list)) else batch
  if not hasattr(x, "shape") or len(x.shape) < 1 or x.shape[0] < 1:
    raise ValueError("batch: expected model inputs with a leading example axis (or a tuple whose first "
                     "element is), got " + repr(getattr(x, "shape", type(x).__name__)))
  return x


def keep_top(scores: Any, m: int) -> np.ndarray:
  """Sorted indices of the ``m`` highest scores; the official ``argsort(imp)[:n-m]`` are dropped."""
  scores = np.asarray(scores, np.float64)
  if not np.all(np.isfinite(scores)):
    raise ValueError("importance returned non-finite scores (NaN or inf in params, or in the importance function)")
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


def _magnitude_scorer(importance: Any, variables: Any, groups: Sequence[Group],
                      scales: Optional[dict] = None) -> Optional[MagnitudeScores]:
  """:class:`MagnitudeScores` for ``"l1"``/``"l2"`` on concrete arrays (same scores without
  zeroing the tree group by group; with ``scales``, without folding it), else ``None``: score
  the written tree."""
  if importance not in ("l1", "l2") or not MagnitudeScores.applies(variables, groups, scales):
    return None
  return MagnitudeScores(variables, groups, 1 if importance == "l1" else 2, scales)


@dataclasses.dataclass(frozen=True)
class ChannelOptions(Options):
  """Options of :func:`prune_channels` (default structured pruning).

  Attributes:
    importance: ``"l1"``, ``"l2"`` (Torch-Pruning's group-mean ``MagnitudeImportance``),
      ``"taylor"`` (needs ``grads`` or ``loss_fn`` and ``batches``), ``"random"`` (needs ``key``),
      or a hashable ``fn(params, group) -> (n,)``.
    mode: ``"shrink"`` (smaller arrays) or ``"mask"`` (same shapes, removed channels zeroed).
    fold_bn: fold BatchNorms into their kernels first, so importances see folded weights (the
      official MetaPruner does; ``official=True``). Default ``False``: scoring the kernels as
      they are kept better channels on ResNet20, each group alone at 50% 69.35 against 67.77
      (with :func:`jaxprune.repair` 85.75 against 84.12), all 12 groups at 30% 16.7 against 9.8
      (with repair 59.3 against 48.9); ``experiments/README.md``, repair section.
    include_eps: exact folding (default) or the official eps-free ``merge_bn`` (``False``).
    rounding: ``"floor"`` (jaxprune's one budget rule) or ``"truncate"`` (official), see
      :func:`jaxprune.n_kept_channels`.
    round_to: keep a multiple of this many channels per group (the kept count rounded up, as
      Torch-Pruning's ``round_to``); 8 keeps shrunk widths fast on accelerators and CPUs.
  """
  importance: Any = "l1"
  mode: str = "shrink"
  fold_bn: bool = False
  include_eps: bool = True
  rounding: str = "floor"
  round_to: int = 1

  OFFICIAL = {"fold_bn": True, "include_eps": False, "rounding": "truncate"}

  def check(self) -> None:
    check_importance(self.importance)
    check_choice(self.mode, MODES, "mode")
    check_choice(self.rounding, CHANNEL_ROUNDINGS, "rounding")
    check_round_to(self.round_to)


def check_importance(importance: Any) -> None:
  if not (callable(importance) or importance in IMPORTANCES):
    raise ValueError(f"importance must be one of {IMPORTANCES} or a callable (params, group) -> (n,), "
                     f"got {importance!r}")


def prune_channels(params: Any, groups: Optional[Union[ChannelGroups, Sequence[Group]]],
                   sparsity: Union[float, Mapping[int, float]], *, apply_fn: Optional[Callable] = None,
                   batch: Any = None, key: Optional[jax.Array] = None, grads: Any = None,
                   loss_fn: Optional[Callable] = None, batches: Optional[Iterable] = None,
                   options: Optional[ChannelOptions] = None, official: bool = False, show_progress: bool = True,
                   repair: Any = None, repair_options: Optional[RepairOptions] = None, **overrides) -> ChannelResult:
  """Default structured pruning ("Algorithm 1" of Intra-Fusion): keep the top channels per group.

  Groups are processed in order (group 0, nearest the output, first, as the official code does),
  each scored on the current tree, so a group's consumers are scored after the groups nearer the
  output were pruned.

  Args:
    params: the model's tree (params dict, linen ``variables``, ``nnx.State``) or an ``nnx.Module``.
    groups: from :func:`jaxprune.groups` (or a list of hand-made groups); ``None`` traces them
      from ``apply_fn`` and the first example of ``batch``.
    sparsity: channel sparsity in ``[0, 1)`` of every prunable group, or ``{group index: s}``;
      each group keeps :func:`jaxprune.n_kept_channels` channels.
    apply_fn, batch: the model and example inputs, only to trace ``groups=None``.
    key, grads, loss_fn, batches: inputs of the random and Taylor importances (``loss_fn`` receives
      the same kind of tree as ``params``).
    options: :class:`ChannelOptions`; official: its official preset; ``**overrides`` single fields.
    repair, repair_options: examples ``x`` (a few hundred training inputs) to correct the pruned
      network's statistics with :func:`jaxprune.repair` before returning (recommended: it is what
      makes the pruned model usable without fine-tuning), and its :class:`RepairOptions`.
    show_progress: progress bar over groups (and Taylor batches).

  Returns:
    :class:`ChannelResult` (``params``, ``masks``, ``info``, ``kept``).
  """
  started = time.perf_counter()
  opts = resolve(ChannelOptions, options, official, overrides)
  model = as_model(params, apply_fn)
  check_concrete("prune_channels", params=model.tree, batch=batch, grads=grads, repair=repair)
  check_repair_request(repair, repair_options, model.apply_fn)
  groups = resolve_groups(model, groups, batch)
  group_list, norms = _as_groups(groups)
  budgets = plan_budgets(group_list, sparsity, opts.rounding, opts.round_to)
  if loss_fn is not None:
    loss_fn = user_loss(model, loss_fn)
  score = importance_fn(opts.importance, key=key, grads=grads, loss_fn=loss_fn, batches=batches,
                        show_progress=show_progress)
  original = variables = model.tree
  fold = functools.partial(fold_batchnorm, norms=norms, include_eps=opts.include_eps) if opts.fold_bn and norms else None
  scales = batchnorm_scales(variables, norms, include_eps=opts.include_eps) if fold else None
  scorer = _magnitude_scorer(opts.importance, variables, [group_list[i] for i in budgets], scales)
  if fold and (scorer is None or opts.mode == "mask"):   # shrink folds the shrunk tree at the end
    variables = fold(variables)
  kept, plans, per_group = {}, [], {}
  for i in progress(list(budgets), desc="groups", disable=not show_progress):
    s, m = budgets[i]
    g = group_list[i]
    scores = np.asarray(score(variables, g) if scorer is None else scorer(g))
    if scores.shape != (g.size,):
      raise ValueError(f"importance returned shape {scores.shape} for group {i}, expected ({g.size},)")
    keep = keep_top(scores, m)
    if scorer is None:
      variables = write_channels(variables, g, keep)
    else:
      scorer.remove(g, kept_flags(g, keep))
    kept[i] = keep
    plans.append((g, keep))
    per_group[i] = {"n": g.size, "m": m, "sparsity": s}
  masks = channel_masks(original, plans)
  if scorer is not None and opts.mode == "mask":   # shrink deletes every row the zeroing would write
    for g, keep in plans:
      variables = write_channels(variables, g, keep)
  if opts.mode == "shrink":
    variables = shrink_channels(variables, plans)
    if fold and scorer is not None:   # folding commutes with cutting channels; a quarter of the writes
      variables = fold(variables)
  info = make_info("prune_channels", opts, started, fold_bn=bool(opts.fold_bn and norms), groups=per_group, plans=tuple(plans))
  result = ChannelResult(variables, masks, info, kept)
  return repair_if_asked(result, model, repair, repair_options, groups, started, show_progress)
