"""i-SpaSP (Wolfe & Kyrillidis, L4DC 2022): structured pruning by sparse signal recovery.

:func:`ispasp` prunes the hidden group of each two-layer unit with the loop of
:mod:`jaxprune.recovery`, block by block as the official code (``order="sequential"``: each unit
sees the already pruned network's activations, shallow to deep) or all units from the dense
network's activations at once (``order="parallel"``: same-shaped units are solved in one vmapped
call). Kept channels reuse the dense weights (no refit), as in the official code; BatchNorm
running statistics are kept too (the official code resets them to 0/1 and relies on the
fine-tuning after each block to re-estimate them).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.budget import CHANNEL_ROUNDINGS, check_channel_sparsity, check_round_to, n_kept_channels
from jaxprune.core.checks import check_choice, check_concrete, check_positive_int
from jaxprune.core.forms import as_model
from jaxprune.core.options import Options, resolve
from jaxprune.core.results import ChannelResult, make_info
from jaxprune.core.trees import join_rows, take_rows
from jaxprune.methods._repair import RepairOptions, check_repair_request, repair_if_asked
from jaxprune.methods._channels import model_inputs
from jaxprune.structure.channel_groups import ChannelGroups, check_groups_fit
from jaxprune.core.progress import progress
from jaxprune.methods._recovery import (PROXIES, RecoveryOptions, Support, aggregate_activations, check_options,
                                        loop_inputs, next_support, recover_support)
from jaxprune.structure.surgery import MODES, channel_masks, shrink_channels, write_channels
from jaxprune.structure.units import Unit, capture_at, derive_units, norm_eval

ORDERS = ("sequential", "parallel")
Sparsity = Union[float, Mapping[Any, float]]


@functools.partial(jax.jit, static_argnums=0)
def _hidden(hidden_fn, variables, x):
  """``(H, all finite)``: the check is taken in the same program (eager checks compile per shape)."""
  h = hidden_fn(variables, x)
  return h, jnp.all(jnp.isfinite(h))


@functools.partial(jax.jit, static_argnames=("output_fn", "options"))
def _loop_inputs(output_fn, params, hidden, norm, options):
  return loop_inputs(output_fn, params, hidden, norm, options)


@functools.partial(jax.jit, static_argnames=("output_fn", "options"))
def _iteration(output_fn, params, hidden, k, norm, inputs, mask, options):
  """One compiled iteration for every ``k`` (traced) and support: ``(new mask, changed)``."""
  new = next_support(output_fn, params, hidden, k, norm, options, inputs, mask)
  return new, jnp.any(new != mask)


@functools.partial(jax.jit, static_argnames=("output_fn", "examples"))
def _unit_error(output_fn, params, hidden, norm, mask, examples):
  return _output_error(output_fn, params, norm, hidden[:examples], mask)


def _solve(output_fn, params, hidden, k, norm, options, error_examples):
  """The support and its relative output error on the first ``error_examples``, traced."""
  support = recover_support(output_fn, params, hidden, k, norm, options)
  return support, _output_error(output_fn, params, norm, hidden[:error_examples], support.mask)


_recover_traced = jax.jit(_solve, static_argnames=("output_fn", "options", "error_examples"))


def _recover(output_fn, params, hidden, k, norm, options, error_examples):
  """The support and its relative output error.

  With a per-example proxy and the fixed-point stop, the loop is driven from the host over one
  compiled iteration, and the fixed point ends it. On XLA:CPU a ``while_loop`` ran the
  convolutions about 3x slower, a ``lax.cond`` per unrolled iteration no faster, and T unrolled
  copies took long to compile. The reduced proxy's iterations are small and run as one program.
  So does the full T (``stop_at_fixed_point=False``): its unrolled iterations share the dense
  branch's forward pass.
  """
  if options.proxy == "reduced" or not options.stop_at_fixed_point:
    return _recover_traced(output_fn, params, hidden, k, norm, options, error_examples)
  inputs = _loop_inputs(output_fn, params, hidden, norm, options)
  mask, changed, t = jnp.zeros(hidden.shape[-1], bool), True, 0
  while t < options.iterations and changed:
    mask, changed = _iteration(output_fn, params, hidden, k, norm, inputs, mask, options)
    changed, t = bool(changed), t + 1   # one scalar to the host per iteration
  err = _unit_error(output_fn, params, hidden, norm, mask, error_examples)
  return Support(mask, jnp.asarray(t), jnp.asarray(changed)), err


def _vmapped(options: RecoveryOptions) -> RecoveryOptions:
  """Options for a vmapped loop: the per-example proxies on CPU run all T iterations unrolled
  (same supports), since a ``while_loop`` ran their convolutions about 3x slower (a vmapped
  8-ratio sweep took 6.8 s against 4.2 s for 8 unrolled calls)."""
  per_example = options.proxy != "reduced" and jax.default_backend() == "cpu"
  return options._replace(stop_at_fixed_point=False) if per_example and options.unroll is not False else options


@functools.partial(jax.jit, static_argnames=("output_fn", "options", "error_examples"))
def _recover_stacked(output_fn, params, hidden, k, norm, options, error_examples):
  solve = lambda p, h, kk, nn: _solve(output_fn, p, h, kk, nn, options, error_examples)
  return jax.vmap(solve)(params, hidden, k, norm)


def unit_labels(units: Sequence[Unit]) -> list:
  """How results and ``keep`` dicts name units: the group index (derived units), else the name."""
  labels = [u.group_index if u.group_index is not None else (u.name or i) for i, u in enumerate(units)]
  if len(set(labels)) != len(labels):
    raise ValueError("units: give hand-made units distinct names")
  return labels


def plan_units(units: Sequence[Unit], sparsity: Sparsity, rounding: str = "floor", round_to: int = 1) -> dict:
  """``{unit position: (sparsity, m)}``; validates every budget before any work.

  ``sparsity`` is one channel sparsity for every unit or a dict keyed by :func:`unit_labels`
  (group indices for derived units, names for hand-made ones); ``m`` follows
  :func:`jaxprune.n_kept_channels`.
  """
  labels = unit_labels(units)
  if isinstance(sparsity, Mapping):
    chosen = {}
    for key, r in sparsity.items():
      if key not in labels:
        raise IndexError(f"sparsity: unit {key!r} does not exist; the units are {labels}")
      chosen[labels.index(key)] = r
  else:
    chosen = {i: sparsity for i in range(len(units))}
  out = {}
  for i, r in chosen.items():
    r = check_channel_sparsity(r, f"sparsity of unit {labels[i]!r}")
    m = n_kept_channels(units[i].size, r, rounding, round_to)
    if m < 1:
      raise ValueError(f"sparsity {r} keeps no channel of unit {labels[i]!r} ({units[i].name}, "
                       f"{units[i].size} channels)")
    out[int(i)] = (r, m)
  return dict(sorted(out.items()))


def _chunked(fn: Callable, x: Any, chunk: Optional[int]) -> Any:
  """``fn`` over chunks of ``x``'s examples; array outputs concatenated, scalars stacked. Host
  arrays are sliced and joined in numpy (eager jax slices compile once per shape)."""
  n = x.shape[0]
  if chunk is None or chunk >= n:
    return fn(x)
  parts = [fn(take_rows(x, i, i + chunk)) for i in range(0, n, chunk)]
  return jax.tree_util.tree_map(lambda *a: join_rows(list(a)), *parts)


def _unit_hidden(unit: Unit, variables: Any, x: Any, chunk: Optional[int]) -> jax.Array:
  """``H`` of ``unit`` on ``x`` in chunks, checked (shape, finite)."""
  hidden, finite = _chunked(lambda xx: _hidden(unit.hidden_fn, variables, xx), x, chunk)
  _check_hidden(unit, hidden, finite)
  return hidden


def _check_hidden(unit: Unit, hidden: jax.Array, finite: Any) -> None:
  """``finite``: the per-chunk flags from :func:`_hidden` (any array of bools)."""
  if hidden.ndim < 2 or hidden.shape[-1] != unit.size:
    raise ValueError(f"unit {unit.name}: hidden_fn returned shape {hidden.shape}; expected (N, ..., {unit.size})")
  if not bool(np.all(np.asarray(finite))):
    raise ValueError(f"unit {unit.name}: the hidden activations contain NaN or inf")


_all_finite = jax.jit(lambda h: jnp.all(jnp.isfinite(h)))


def _output_error(output_fn, params, norm, hidden, mask):
  """``||U - U_pruned|| / ||U||`` on the batch (inference-mode norm), traced inside :func:`_recover`."""
  dense = norm_eval(output_fn(params, hidden), norm)
  pruned = norm_eval(output_fn(params, hidden * mask.astype(hidden.dtype)), norm)
  return jnp.linalg.norm(dense - pruned) / jnp.maximum(jnp.linalg.norm(dense), 1e-30)


@dataclasses.dataclass(frozen=True)
class ISpaSPOptions(Options):
  """Options of :func:`ispasp`.

  Attributes:
    order: ``"sequential"`` (official: units shallow to deep, each on the activations of the
      network pruned so far) or ``"parallel"`` (every unit on the dense network's activations;
      same-shaped units are solved in one vmapped call).
    iterations: ``T`` (official 20).
    chunk_size: examples per chunk for the proxy and the forward passes (official 256).
    bn_mode: ``"eval"`` (default; the pruned branch's norm in inference mode, so the loop
      compares like with like) or ``"train"`` (official: the pruned branch normalises each chunk
      with its batch statistics).
    aggregate: the activation score that thresholds the merged set: ``"l2"`` (default),
      ``"signed_sum"`` (official) or ``"abs_sum"``. Measured with repair after pruning, l2 kept
      better channels: a held-out conv-BN CNN at 30/50/70% 89.0/87.8/78.0 against 85.2/79.4/74.7;
      ResNet20, each of the 12 groups alone at 50%, mean 85.85 against 85.17
      (``experiments/README.md``, repair section)
    stop_at_fixed_point: stop a unit's loop once its support repeats (default True, with
      ``official=True`` too). The update is deterministic, so the support is the one the official
      code's full ``T`` iterations reach (tested); only the work is saved. ``False`` runs all ``T``.
    exclude_support: rank the proxy outside the support only (not the official code).
    proxy: ``"examples"`` (the official computation: every example forward and backward through
      the second layer, in chunks), ``"residual_sum"`` (the pruned branch per example, one
      pullback of the summed residual; exact for an affine second layer), ``"reduced"`` (the same
      proxy from the summed activations; exact for an affine second layer in inference mode) or
      ``"auto"`` (default, also with ``official=True``): the cheapest exact one, so reduced with
      ``bn_mode="eval"``, residual_sum with ``"train"``, examples for a second layer that is not
      affine. They differ in rounding only (the supports are tested equal to a float64 port of
      the official loop); ``proxy="examples"`` is the official computation step by step.
    mode: ``"shrink"`` (smaller arrays; rebuild the model with ``from_params``) or ``"mask"``.
    rounding: ``"floor"`` or ``"truncate"`` (official ``int(C keep)``), see
      :func:`jaxprune.n_kept_channels`.
    round_to: keep a multiple of this many channels per unit (see :class:`ChannelOptions`).
    error_examples: how many examples (the first ones) the reported ``relative_error`` is
      measured on; ``None``: all. A diagnostic: over N = 1280 examples of a ResNet34 block it cost
      two passes of the second layer, more than the rest of a default call.
  """
  order: str = "sequential"
  iterations: int = 20
  chunk_size: Optional[int] = 256
  bn_mode: str = "eval"
  aggregate: str = "l2"
  stop_at_fixed_point: bool = True
  exclude_support: bool = False
  proxy: str = "auto"
  mode: str = "shrink"
  rounding: str = "floor"
  round_to: int = 1
  error_examples: Optional[int] = 256

  OFFICIAL = {"bn_mode": "train", "rounding": "truncate", "aggregate": "signed_sum"}

  def check(self) -> None:
    check_choice(self.proxy, ("auto",) + PROXIES, "proxy")
    check_choice(self.order, ORDERS, "order")
    check_choice(self.mode, MODES, "mode")
    check_choice(self.rounding, CHANNEL_ROUNDINGS, "rounding")
    check_round_to(self.round_to)
    if self.error_examples is not None:
      check_positive_int(self.error_examples, "error_examples")
    self.recovery()

  def recovery(self) -> RecoveryOptions:
    """The loop's static settings (``proxy="auto"`` is resolved per unit)."""
    shared = {f: getattr(self, f) for f in RecoveryOptions._fields if hasattr(self, f)}
    return check_options(RecoveryOptions(**dict(shared, proxy="examples" if self.proxy == "auto" else self.proxy)))


def ispasp(params: Any, groups: Optional[Union[ChannelGroups, Sequence[Unit]]], sparsity: Sparsity, *,
           apply_fn: Optional[Callable] = None, batch: Any = None, apply_kwargs: Optional[dict] = None,
           options: Optional[ISpaSPOptions] = None, official: bool = False, show_progress: bool = True,
           repair: Any = None, repair_options: Optional[RepairOptions] = None, **overrides) -> ChannelResult:
  """Prunes the hidden channels of two-layer units with i-SpaSP.

  Args:
    params: the model's tree (linen ``variables``).
    groups: the model's :class:`~jaxprune.ChannelGroups` (units derived with
      :func:`jaxprune.two_layer_units`), ``None`` (traced from ``apply_fn``), or a sequence of
      hand-made :class:`~jaxprune.structure.units.Unit` (pruned in the given order, shallow first).
    sparsity: channel sparsity of every unit, or ``{unit: s}`` keyed by group index (derived
      units) or name (hand-made units); each keeps :func:`jaxprune.n_kept_channels` channels.
    apply_fn: the model's apply function (``model.apply``); not needed with hand-made units.
    batch: model inputs ``(N, ...)`` (or ``(x, y)``); the official code uses N = 1280 training
      images per unit.
    apply_kwargs: extra keyword arguments for ``apply_fn``.
    options: :class:`ISpaSPOptions`; official: its official preset; ``**overrides`` single fields.
    repair, repair_options: examples ``x`` (a few hundred training inputs) to correct the pruned
      network's statistics with :func:`jaxprune.repair` before returning (recommended: it is what
      makes the pruned model usable without fine-tuning), and its :class:`RepairOptions`.
    show_progress: a progress bar over units.

  Returns:
    :class:`~jaxprune.ChannelResult`: ``kept`` maps each pruned unit's group index (derived
    units) or name (hand-made units) to its sorted kept channels; ``info["units"]`` holds per unit
    ``n``, ``m``, ``sparsity``, ``iterations``, ``converged`` (the support reached a fixed point),
    ``relative_error`` (``||U - U_pruned|| / ||U||`` on the first ``error_examples`` examples of
    the batch, inference-mode norm), ``error_examples`` (how many) and
    ``seconds``.
  """
  started = time.perf_counter()
  opts = resolve(ISpaSPOptions, options, official, overrides)
  options, proxy, order, chunk_size, mode = opts.recovery(), opts.proxy, opts.order, opts.chunk_size, opts.mode
  model = as_model(params, apply_fn)
  check_concrete("ispasp", params=model.tree, batch=batch, repair=repair)
  check_repair_request(repair, repair_options, model.apply_fn)
  variables = model.tree
  x = model_inputs(batch)
  apply_kwargs = dict(apply_kwargs or {})
  hand_made = groups is not None and not isinstance(groups, ChannelGroups)
  skipped = {}
  if hand_made:
    units = tuple(groups)
    if not units or not all(isinstance(u, Unit) for u in units):
      raise TypeError("groups must be ChannelGroups, None, or a non-empty sequence of Unit")
  else:
    if model.apply_fn is None:
      raise TypeError("apply_fn: i-SpaSP runs the model to read hidden activations; pass apply_fn=model.apply")
    if groups is not None:
      check_groups_fit(variables, groups.groups)
    units, skipped = derive_units(model.apply_fn, variables,
                                  jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype), groups, **apply_kwargs)
    if not units:
      reasons = "; ".join(f"group {i}: {why}" for i, why in skipped.items()) or "no prunable group"
      raise ValueError(f"groups: no two-layer unit found ({reasons}); give units by hand with jaxprune.make_unit")
    units = units[::-1]   # groups run output to input; the official loop goes shallow to deep
  apply_fn = None if hand_made else model.apply_fn
  budgets = plan_units(units, sparsity, opts.rounding, opts.round_to)
  labels = unit_labels(units)
  for i in budgets:   # fail before any work
    _resolve(options, proxy, units[i])

  original, v = variables, variables
  kept, plans, per_unit = {}, [], {}
  error_examples = min(int(x.shape[0]), opts.error_examples or int(x.shape[0]))

  def finish(i, support, err, t0):
    nonlocal v
    keep_idx = np.flatnonzero(np.asarray(support.mask))
    unit = units[i]
    v = write_channels(v, unit.group, keep_idx)
    kept[labels[i]] = keep_idx
    plans.append((unit.group, keep_idx))
    per_unit[labels[i]] = {"name": unit.name, "n": unit.size, "m": int(keep_idx.size), "sparsity": budgets[i][0],
                           "iterations": int(support.iterations), "converged": not bool(support.changed),
                           "proxy": _resolve(options, proxy, unit).proxy,
                           "relative_error": float(err), "error_examples": error_examples,
                           "seconds": round(time.perf_counter() - t0, 4)}

  if order == "sequential":
    for i in progress(list(budgets), desc="i-SpaSP units", disable=not show_progress):
      t0 = time.perf_counter()
      unit = units[i]
      hidden = _unit_hidden(unit, v, x, chunk_size)
      sup, err = _recover(unit.output_fn, unit.params_fn(v), hidden, budgets[i][1], unit.output_norm(v),
                          _resolve(options, proxy, unit), error_examples)
      finish(i, sup, err, t0)
  else:
    t0 = time.perf_counter()
    hiddens = _dense_hiddens(units, list(budgets), variables, x, chunk_size, apply_kwargs, apply_fn)
    batches = {}
    for i in budgets:
      u = units[i]
      sig = (u.output_fn, u.affine, hiddens[i].shape, u.norm is not None,
             jax.tree_util.tree_structure(u.params_fn(variables)),
             tuple(np.shape(a) for a in jax.tree_util.tree_leaves(u.params_fn(variables))))
      batches.setdefault(sig, []).append(i)
    for idx in progress(list(batches.values()), desc="i-SpaSP unit batches", disable=not show_progress):
      u0 = units[idx[0]]
      stack = lambda trees: jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)
      params = stack([units[i].params_fn(variables) for i in idx])
      norms = None if u0.norm is None else stack([units[i].output_norm(variables) for i in idx])
      ks = jnp.asarray([budgets[i][1] for i in idx])
      sups, errs = _recover_stacked(u0.output_fn, params, jnp.stack([hiddens[i] for i in idx]), ks, norms,
                                    _vmapped(_resolve(options, proxy, u0)), error_examples)
      for j, i in enumerate(idx):
        finish(i, jax.tree_util.tree_map(lambda a: a[j], sups), errs[j], t0)

  masks = channel_masks(original, plans)
  if mode == "shrink":
    v = shrink_channels(v, plans)
  info = make_info("ispasp", opts, started, units=per_unit, skipped=skipped, plans=tuple(plans))
  result = ChannelResult(v, masks, info, kept)
  return repair_if_asked(result, model, repair, repair_options, groups, started, show_progress)


def _resolve(options: RecoveryOptions, proxy: str, unit: Unit) -> RecoveryOptions:
  """``proxy="auto"``: the cheapest exact proxy for ``unit`` (see :class:`ISpaSPOptions`)."""
  if proxy != "auto":
    if proxy in ("reduced", "residual_sum") and not unit.affine:
      raise ValueError(f"proxy={proxy!r} needs an affine second layer; unit {unit.name} is not marked affine")
    return options
  if not unit.affine:
    return options._replace(proxy="examples")
  return options._replace(proxy="reduced" if options.bn_mode == "eval" else "residual_sum")


def _arranged(unit: Unit, captured: jax.Array) -> jax.Array:
  """A captured activation in the unit's ``H: (N, ..., C)`` layout (a flatten's rows split off,
  the channel axis moved last)."""
  arrange = getattr(unit.hidden_fn, "arrange", None)
  return captured if arrange is None else arrange(captured)


def _dense_hiddens(units, indices, variables, x, chunk_size, apply_kwargs, apply_fn) -> dict:
  """Every unit's hidden activations from the dense network (one forward pass for derived units)."""
  derived = [i for i in indices if units[i].capture is not None and callable(apply_fn)]
  out = {}
  if derived:
    addresses = [units[i].capture[0] for i in derived]
    operands = [units[i].capture[1] for i in derived]
    fn = jax.jit(lambda vv, xx: capture_at(apply_fn, vv, xx, addresses, operands, **apply_kwargs))
    got = _chunked(lambda xx: fn(variables, xx), x, chunk_size)
    out.update({i: _arranged(units[i], got[units[i].capture[0]]) for i in derived})
    for i in derived:
      _check_hidden(units[i], out[i], _all_finite(out[i]))
  for i in indices:
    if i not in out:
      out[i] = _unit_hidden(units[i], variables, x, chunk_size)
  return out


def ispasp_sweep(unit: Unit, params: Any, hidden: jax.Array, sparsities: Sequence[float], *,
                 options: Optional[ISpaSPOptions] = None, official: bool = False, **overrides) -> jax.Array:
  """Supports of one unit for many sparsities in one compiled, vmapped call.

  Args:
    unit: the unit.
    params: the tree its ``params_fn`` and norm read.
    hidden: ``H: (N, ..., C)`` (e.g. ``unit.hidden_fn(params, x)``).
    sparsities: channel sparsities in ``[0, 1)``.
    options, official, overrides: as :func:`ispasp` (``order`` and ``mode`` do not apply).

  Returns:
    ``(len(sparsities), C)`` bool masks, row ``i`` with :func:`jaxprune.n_kept_channels` channels.
  """
  opts = resolve(ISpaSPOptions, options, official, overrides)
  ks = jnp.asarray([plan_units([unit], s, opts.rounding, opts.round_to)[0][1] for s in sparsities])
  rec = _vmapped(_resolve(opts.recovery(), opts.proxy, unit))
  return _sweep(unit.output_fn, unit.params_fn(params), hidden, ks, unit.output_norm(params), rec)


@functools.partial(jax.jit, static_argnames=("output_fn", "options"))
def _sweep(output_fn, params, hidden, ks, norm, options):
  return jax.vmap(lambda k: recover_support(output_fn, params, hidden, k, norm, options).mask)(ks)


__all__ = ["ISpaSPOptions", "ispasp", "ispasp_sweep", "plan_units", "aggregate_activations"]
