"""Surgery on channel groups: selection or fusion maps, shrink or mask, BatchNorm folding.

A map acts on a group of ``n`` channels and keeps ``m`` of them (``keep``). Kept channel ``keep[k]``
becomes ``sum_j T[k, j] * channel j`` (a 0/1 selection leaves it as it is): producers along their
output axis, consumers along their input axis (every row of a flatten mapping). Norm parameters
and statistics are selected, never mixed. Removed channels are then deleted (``mode="shrink"``)
or zeroed in place (``mode="mask"``; statistics are left as they are, the zeroed scale, offset and
kernels already silence the channel). Both modes give the same model outputs.

Several groups are pruned by :func:`write_channels` on each (same shapes, in order) and one
:func:`shrink_channels` at the end, so positions never go stale between groups; on host trees
:func:`write_kept` cuts the axes a group owns whole at once. Trees in host memory are computed in
numpy, which compiles nothing: numpy leaves come back as numpy, jax leaves as jax arrays.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structure.channel_groups import CONSUMER, ChannelGroups, Group, NormLink
from jaxprune.core.trees import host_like, host_likes, leaves_with_paths, map_with_paths, on_host, replace_leaves

MODES = ("shrink", "mask")


def check_keep(keep: Any, group: Group, name: str = "keep") -> np.ndarray:
  """Sorted unique int indices in ``[0, n)``; at least one."""
  arr = np.asarray(keep)
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
    raise TypeError(f"{name} must be a 1-D array of int channel indices, got dtype {arr.dtype} and shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name} is empty: a group must keep at least one channel")
  if arr.min() < 0 or arr.max() >= group.size:
    raise ValueError(f"{name} has indices outside [0, {group.size}) for group {group.name}")
  if np.unique(arr).size != arr.size:
    raise ValueError(f"{name} has repeated channel indices")
  return arr


def kept_flags(group: Group, keep: Any) -> np.ndarray:
  """``(n,)`` bool, True on the kept channels (``keep`` checked by :func:`check_keep`)."""
  return _flags(group.size, check_keep(keep, group))


def _flags(n: int, keep: np.ndarray) -> np.ndarray:
  flags = np.zeros(n, bool)
  flags[keep] = True
  return flags


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_map(fusion_map: Any, m: int, n: int, name: str) -> np.ndarray:
  t = np.asarray(fusion_map)   # on the host: an (m, n) check would compile for every new m
  if t.shape != (m, n):
    raise ValueError(f"{name} must have shape (m, n) = ({m}, {n}), got {t.shape}")
  if not np.all(np.isfinite(t)):
    raise ValueError(f"{name} has non-finite entries")
  return t


def write_channels(variables: Any, group: Group, keep: Any, fusion_map: Optional[Any] = None, *,
                   producer_map: Optional[Any] = None, zero: bool = True) -> Any:
  """Applies a map to one group without changing shapes.

  Args:
    variables: the tree the group's paths refer to.
    group: a :class:`~jaxprune.channel_groups.Group` of ``n`` channels.
    keep: ``(m,)`` int indices of the channels that stay (any order; row ``k`` of the maps
      belongs to ``keep[k]``).
    fusion_map: ``T: (m, n)``; ``None`` means a plain selection (kept channels unchanged).
    producer_map: a different ``(m, n)`` map for the producers' kernels and biases (e.g. a
      row-normalised one for averaging); defaults to ``fusion_map``.
    zero: zero the removed channels of every parameter member (not the statistics).

  Returns:
    the tree with kept channels rewritten and removed ones zeroed (same shapes).
  """
  keep = check_keep(keep, group)
  n, m = group.size, keep.size
  kept = _flags(n, keep)   # keep is checked already
  t_cons = None if fusion_map is None else _check_map(fusion_map, m, n, "fusion_map")
  t_prod = t_cons if producer_map is None else _check_map(producer_map, m, n, "producer_map")
  removed = np.flatnonzero(~kept)
  leaves = dict(leaves_with_paths(variables))
  new = {}
  for mem in group.members:
    leaf = new.get(mem.path, leaves[mem.path])
    if leaf.shape[mem.axis] < (mem.index.max() + 1 if mem.index is not None else n):
      raise ValueError(f"variables: {mem.path} has {leaf.shape[mem.axis]} entries on axis {mem.axis}; "
                       f"the group expects {n} channels (was the tree already shrunk?)")
    t = t_cons if mem.role == CONSUMER else t_prod
    mixes = t is not None and mem.kind in ("kernel", "depthwise", "bias")
    silence = zero and mem.kind != "stat" and removed.size > 0
    if mixes:
      full = np.zeros((n, n), np.float32)   # built on the host: its shape never depends on m
      full[keep] = np.asarray(t, np.float32)
      if not silence:
        full[removed, removed] = 1.0
      new[mem.path] = _apply_channel_map(leaf, mem, n, full=full)
    elif silence:
      new[mem.path] = _apply_channel_map(leaf, mem, n, scale=kept)
  return replace_leaves(variables, new)


def write_kept(variables: Any, group: Group, keep: Any, fusion_map: Optional[Any] = None, *,
               producer_map: Optional[Any] = None) -> tuple[Any, Group]:
  """:func:`write_channels`, then the removed channels deleted wherever the group owns a whole axis,
  for a tree in host memory.

  A plain member (channel ``j`` is row ``j`` of an axis of length ``n``) gets its ``m`` kept rows
  computed directly, ``T @ rows`` or a selection, with no zero-filled full-size copy to cut later.
  Other members (a flatten's rows, an offset into a concatenation: another group may own the rest
  of that axis; leaves that are not float32/float64) are written at full size by
  :func:`write_channels`; the returned group holds them, for one :func:`shrink_channels` at the
  end, so their positions never go stale.

  Returns:
    ``(tree, rest)``: ``rest`` is ``group`` with only the members still to be cut.
  """
  keep = check_keep(keep, group)
  n, m = group.size, keep.size
  order = np.argsort(keep)
  t_cons = None if fusion_map is None else _check_map(fusion_map, m, n, "fusion_map")[order]
  t_prod = t_cons if producer_map is None else _check_map(producer_map, m, n, "producer_map")[order]
  keep = keep[order]
  leaves = dict(leaves_with_paths(variables))
  whole = [mem for mem in group.members if mem.index is None and np.shape(leaves[mem.path])[mem.axis] == n
           and np.dtype(leaves[mem.path].dtype) in (np.float32, np.float64)]
  rest = dataclasses.replace(group, producers=tuple(mem for mem in group.producers if mem not in whole),
                             consumers=tuple(mem for mem in group.consumers if mem not in whole))
  if rest.members:
    variables = write_channels(variables, rest, keep, t_cons, producer_map=t_prod)
    leaves = dict(leaves_with_paths(variables))
  new = {}
  for mem in whole:
    leaf = np.asarray(new.get(mem.path, leaves[mem.path]))
    t = t_cons if mem.role == CONSUMER else t_prod
    if t is not None and mem.kind in ("kernel", "depthwise", "bias"):
      new[mem.path] = _kept_mix(leaf, t.astype(leaf.dtype), mem.axis % leaf.ndim)
    else:
      new[mem.path] = np.take(leaf, keep, axis=mem.axis)
  placed = host_likes([new[p] for p in new], [leaves[p] for p in new])
  return replace_leaves(variables, dict(zip(new, placed))), rest


def _kept_mix(w: np.ndarray, t: np.ndarray, axis: int) -> np.ndarray:
  """``t: (m, n)`` applied along ``axis`` of ``w``, giving ``m`` rows there: one GEMM on a view when
  the axis is last, one per leading block when there are few, else a ``tensordot``."""
  n, m = w.shape[axis], t.shape[0]
  if axis == w.ndim - 1:
    return (w.reshape(-1, n) @ t.T).reshape(w.shape[:-1] + (m,))
  pre = int(np.prod(w.shape[:axis]))
  if pre > 64:
    return np.ascontiguousarray(np.moveaxis(np.tensordot(t, w, axes=(1, axis)), 0, axis))
  x = w.reshape(pre, n, -1)
  out = np.empty((pre, m, x.shape[2]), w.dtype)
  for p in range(pre):
    np.matmul(t, x[p], out=out[p])
  return out.reshape(w.shape[:axis] + (m,) + w.shape[axis + 1:])


def _apply_channel_map(leaf: Any, mem, n: int, *, full: Optional[np.ndarray] = None,
                       scale: Optional[np.ndarray] = None) -> jax.Array:
  """``leaf`` with channel ``k`` of the member replaced by ``sum_j full[k, j] channel_j`` (or
  multiplied by ``scale[k]``). One jitted function per leaf shape and axis: every shape here is
  the dense one, whichever channels are kept, so a new sparsity compiles nothing."""
  pos = mem.positions(n).astype(np.int32)
  if full is None:
    return _scale_along(leaf, _axis_scale(scale, pos, np.shape(leaf)[mem.axis]), mem.axis)
  if on_host(leaf) and np.dtype(leaf.dtype) in (np.float32, np.float64):   # numpy: nothing to compile on CPU
    out = _channel_rows(np, np.asarray(leaf), full, pos, mem.axis, mem.index is None)
    return host_like(out, leaf)
  return _map_rows(leaf, full, pos, mem.axis, mem.index is None)


def _channel_rows(xp, leaf, coef, pos, axis: int, plain: bool):
  """``coef: (n, n)`` mixes the channels' rows ``pos: (n, r)`` of ``leaf`` along ``axis``. ``xp`` is
  numpy (trees in host memory) or ``jax.numpy`` (jitted: :data:`_map_rows`)."""
  n = pos.shape[0]
  if xp is np and plain and leaf.shape[axis] == n:
    return _mix_host(np.asarray(leaf), coef, axis % leaf.ndim)
  w = xp.moveaxis(xp.asarray(leaf), axis, 0)
  plain = plain and w.shape[0] == n
  rows = w[:, None] if plain else w[pos]                        # (n, r, ...)
  rows = xp.tensordot(coef.astype(w.dtype), rows, axes=(1, 0))
  flat_rows = rows.reshape((-1,) + rows.shape[2:])
  if plain:
    w = rows[:, 0]
  elif xp is np:
    w = w.copy()
    w[pos.ravel()] = flat_rows
  else:
    w = w.at[pos.ravel()].set(flat_rows)
  return xp.moveaxis(w, 0, axis)


_map_rows = jax.jit(functools.partial(_channel_rows, jnp), static_argnums=(3, 4))


def _mix_host(w: np.ndarray, coef: np.ndarray, axis: int) -> np.ndarray:
  """``coef: (n, n)`` applied along ``axis`` of a host leaf at its full size: the rows of ``coef``
  that are not zero (the removed channels' rows are, when they are silenced) computed by
  :func:`_kept_mix` and written into a zero leaf."""
  live = np.flatnonzero(np.any(coef != 0, axis=1))
  out = np.zeros_like(w)
  index = [slice(None)] * w.ndim
  index[axis] = live
  out[tuple(index)] = _kept_mix(w, coef[live].astype(w.dtype), axis)
  return out


def _axis_scale(scale: np.ndarray, pos: np.ndarray, length: int) -> np.ndarray:
  """``(length,)`` factors along the member's axis: ``scale[k]`` on channel ``k``'s rows ``pos[k]``,
  1 on rows no channel owns."""
  vec = np.ones(length, np.float32)
  vec[pos] = np.asarray(scale, np.float32)[:, None]
  return vec


def _scale_along(leaf: Any, vec: np.ndarray, axis: int) -> Any:
  """``leaf`` times ``vec`` broadcast along ``axis``: one pass, no gathered copy of the rows."""
  if on_host(leaf) and np.dtype(leaf.dtype) in (np.float32, np.float64):
    return host_like(_times_along(np, np.asarray(leaf), vec, axis), leaf)
  return _times_along_jit(leaf, vec, axis)


def _times_along(xp, leaf, vec, axis: int):
  shape = [1] * leaf.ndim
  shape[axis] = -1
  return leaf * xp.asarray(vec).astype(leaf.dtype).reshape(shape)


_times_along_jit = jax.jit(functools.partial(_times_along, jnp), static_argnums=2)


def removed_positions(group: Group, keep: Any) -> dict:
  """``{(path, axis): positions}`` that removing the other channels deletes."""
  removed = np.flatnonzero(~kept_flags(group, keep))
  out = {}
  for mem in group.members:
    out[(mem.path, mem.axis)] = mem.positions(group.size)[removed].ravel()
  return out


def shrink_channels(variables: Any, plans: Sequence[tuple[Group, Any]]) -> Any:
  """Deletes the removed channels of several groups at once.

  Args:
    variables: the tree (usually after :func:`write_channels` on each group).
    plans: ``[(group, keep), ...]``.

  Returns:
    the tree with smaller arrays. Build the model with the new widths (the reference models'
    ``from_params``) to run it.
  """
  leaves = dict(leaves_with_paths(variables))
  kept: dict = {}   # {path: [(axis, kept rows), ...]}
  for (path, axis), flags in _kept_rows(leaves, plans).items():
    kept.setdefault(path, []).append((axis, np.flatnonzero(flags)))
  paths = sorted(kept)
  axes = tuple(tuple(a for a, _ in kept[p]) for p in paths)
  arrays = [leaves[p] for p in paths]
  if on_host(*arrays):   # host memory already: numpy gathers, nothing to compile
    small = host_likes([_take_numpy(np.asarray(a), kept[p]) for a, p in zip(arrays, paths)], arrays)
  else:
    small = _gather_kept(axes, arrays, [[jnp.asarray(i, jnp.int32) for _, i in kept[p]] for p in paths])
  return replace_leaves(variables, dict(zip(paths, small)))


def _kept_rows(leaves: dict, plans: Sequence[tuple[Group, Any]], stats: bool = True) -> dict:
  """``{(path, axis): (length,) bool}``, False on the rows some plan removes (``stats``: also
  for the statistics' members)."""
  rows: dict = {}
  for group, keep in plans:
    removed = ~kept_flags(group, keep)
    for mem in group.members:
      if mem.kind == "stat" and not stats:
        continue
      flags = rows.setdefault((mem.path, mem.axis), np.ones(np.shape(leaves[mem.path])[mem.axis], bool))
      flags[mem.positions(group.size)[removed].ravel()] = False
  return rows


def _take_numpy(leaf: np.ndarray, cuts: tuple) -> np.ndarray:
  for axis, index in cuts:
    leaf = np.take(leaf, index, axis=axis)
  return leaf


@functools.partial(jax.jit, static_argnums=0)
def _gather_kept(axes: tuple, leaves: list, index: list) -> list:
  """Every shrunk leaf in one compiled program on an accelerator or a sharded tree (the only
  step whose shapes follow the widths)."""
  out = []
  for leaf_axes, leaf, idx in zip(axes, leaves, index):
    for axis, i in zip(leaf_axes, idx):
      leaf = jnp.take(leaf, i, axis=axis)
    out.append(leaf)
  return out


def select_channels(variables: Any, group: Group, keep: Any, *, mode: str = "shrink") -> Any:
  """Plain structured pruning of one group: keep the channels ``keep``.

  Returns:
    ``mode="shrink"``: smaller arrays; ``mode="mask"``: same shapes, removed channels zeroed.
  """
  _check_mode(mode)
  return _write_and_cut(variables, group, keep) if mode == "shrink" else write_channels(variables, group, keep)


def fuse_channels(variables: Any, group: Group, keep: Any, fusion_map: Any, *, mode: str = "shrink",
                  producer_map: Optional[Any] = None) -> Any:
  """Applies a fusion map ``T: (m, n)`` to one group (Intra-Fusion's surgery).

  Kept channel ``keep[k]`` of each producer becomes ``sum_j T[k, j] W[j]`` (kernel slices and
  biases), each consumer's input slice likewise; norm parameters and statistics are selected.
  """
  _check_mode(mode)
  if mode == "shrink":
    return _write_and_cut(variables, group, keep, fusion_map, producer_map)
  return write_channels(variables, group, keep, fusion_map, producer_map=producer_map)


def _write_and_cut(variables: Any, group: Group, keep: Any, fusion_map: Optional[Any] = None,
                   producer_map: Optional[Any] = None) -> Any:
  """One group written and cut: by :func:`write_kept` for host leaves (no full-size copy of the
  axes the group owns), else written at full size and cut by one compiled gather."""
  leaves = dict(leaves_with_paths(variables))
  if on_host(*(leaves[m.path] for m in group.members)):
    out, rest = write_kept(variables, group, keep, fusion_map, producer_map=producer_map)
    return shrink_channels(out, [(rest, keep)]) if rest.members else out
  out = write_channels(variables, group, keep, fusion_map, producer_map=producer_map)
  return shrink_channels(out, [(group, keep)])


def channel_masks(variables: Any, plans: Sequence[tuple[Group, Any]]) -> Any:
  """Bool masks shaped like ``variables`` (True = kept) for the parameter members of the plans.

  Leaves no plan touches, and statistics, are ``None``; use with :func:`jaxprune.apply_masks` or
  :func:`jaxprune.keep_pruned_at_zero` to keep a masked model structurally sparse while training.
  """
  leaves = dict(leaves_with_paths(variables))
  along: dict = {}   # {path: {axis: (length,) bool}}: a mask is the outer AND of its axes' flags
  for (path, axis), flags in _kept_rows(leaves, plans, stats=False).items():
    along.setdefault(path, {})[axis] = flags
  paths = list(along)
  placed = jax.device_put([_outer_mask(np.shape(leaves[p]), along[p]) for p in paths])   # one transfer call
  masks = dict(zip(paths, placed))
  return map_with_paths(lambda p, x: masks.get(p), variables)


def _outer_mask(shape: tuple, flags: dict) -> np.ndarray:
  mask = np.ones(shape, bool)
  for axis, along_axis in flags.items():
    view = [1] * len(shape)
    view[axis] = -1
    mask &= along_axis.reshape(view)
  return mask


def _fold_scale(xp, gamma, var, eps: float, include_eps: bool):
  """``s = gamma / sqrt(var + eps)`` (``gamma`` absent: 1; ``include_eps=False``: no eps), the
  factor a fold multiplies the kernel by; one formula for :func:`fold_batchnorm` and
  :func:`batchnorm_scales`, so the two agree bit for bit."""
  return (1.0 if gamma is None else gamma) / xp.sqrt(var + eps if include_eps else var)


def _fold_arrays(xp, kernel, bias, gamma, beta, mean, var, eps: float, include_eps: bool, axis: int):
  """The folded kernel ``W * s`` (``s`` along ``axis``) and shift ``(b - mu) * s + beta`` of one norm;
  absent ``bias``/``gamma``/``beta`` are 0/1/0. ``xp`` is numpy (host trees) or ``jax.numpy``. The
  shift has the dtype of the leaf it goes to (the bias, else ``beta``), not the statistics' (a
  bfloat16 model keeps float32 statistics)."""
  s = _fold_scale(xp, gamma, var, eps, include_eps)
  shape = [1] * kernel.ndim
  shape[axis] = -1
  shift = ((0.0 if bias is None else bias) - mean) * s + (0.0 if beta is None else beta)
  return kernel * s.reshape(shape).astype(kernel.dtype), shift.astype((beta if bias is None else bias).dtype)


_fold_jit = jax.jit(functools.partial(_fold_arrays, jnp), static_argnums=(7, 8))


def _full_like(host: bool, like: Any, value: float) -> jax.Array:
  if host:
    return host_like(np.full(np.shape(like), value, like.dtype), like)
  return jnp.full_like(like, value)


def _norm_links(norms: Union[ChannelGroups, Sequence[NormLink]]) -> tuple:
  return norms.norms if isinstance(norms, ChannelGroups) else tuple(norms)


def _link_eps(link: NormLink, eps: Optional[float]) -> float:
  """The epsilon to fold ``link`` with; errors for a norm that cannot be folded."""
  e = eps if eps is not None else link.eps
  if e is None:
    raise ValueError(f"eps: the epsilon of the norm after {link.kernel} was not found in the trace; pass eps=")
  if not (link.kernel_bias or link.offset):
    raise ValueError(f"norms: cannot fold the norm after {link.kernel}: neither it nor the kernel has a bias")
  return e


def batchnorm_scales(variables: Any, norms: Union[ChannelGroups, Sequence[NormLink]], *, include_eps: bool = True,
                     eps: Optional[float] = None) -> dict:
  """``{kernel path: (axis, s)}``: the factor ``s: (channels,)`` float32 that
  :func:`fold_batchnorm` multiplies each kernel by along ``axis``, without writing the kernels
  (same checks and errors). Magnitude scores of the folded tree follow from it:
  ``sum |W s|^p = |s|^p sum |W|^p`` per output channel, up to float32 rounding."""
  leaves = dict(leaves_with_paths(variables))
  scales = {}
  for link in _norm_links(norms):
    e = _link_eps(link, eps)
    gamma = None if link.scale is None else np.asarray(leaves[link.scale])
    s = _fold_scale(np, gamma, np.asarray(leaves[link.var]), e, include_eps)
    scales[link.kernel] = (link.axis, np.asarray(s, np.float32))
  return scales


def fold_batchnorm(variables: Any, norms: Union[ChannelGroups, Sequence[NormLink]], *, include_eps: bool = True,
                   eps: Optional[float] = None) -> Any:
  """Folds each BatchNorm into the kernel before it and turns the norm into an identity.

  For a kernel ``W`` (bias ``b``, 0 if none) followed by a norm ``(gamma, beta, mu, sigma2)``:
  ``s = gamma / sqrt(sigma2 + eps)``, ``W' = W * s`` along the output axis,
  ``b' = (b - mu) * s + beta``. The norm becomes scale 1, offset 0, mean 0 and variance ``1 - eps``,
  so that it is exactly the identity and the folded model equals the original in inference mode.
  ``b'`` goes to the kernel's bias when it has one, otherwise to the norm's offset.

  ``include_eps=False`` is the official Intra-Fusion ``merge_bn``: ``s = gamma / sqrt(sigma2)``
  (eps ignored) and the norm is left with variance 1, so each folded norm still divides by
  ``sqrt(1 + eps)``: outputs differ from the original by a relative ~1e-5 per norm.

  Args:
    variables: the tree (linen ``variables`` with ``batch_stats`` or an ``nnx.State``).
    norms: a :class:`ChannelGroups` (its ``norms``) or a list of :class:`NormLink`.
    include_eps: exact folding (default) or the official variant.
    eps: the norm's epsilon when the trace did not reveal it (overrides the traced value).

  Returns:
    the tree with folded kernels and identity norms (same shapes).
  """
  leaves = dict(leaves_with_paths(variables))
  new = {}
  for link in _norm_links(norms):
    e = _link_eps(link, eps)
    paths = (link.kernel, link.kernel_bias, link.scale, link.offset, link.mean, link.var)
    arrays = [new.get(p, leaves[p]) if p else None for p in paths]
    host = on_host(*arrays)
    if host:      # numpy: nothing to compile, and no per-shape compilation on a first call
      kernel, shift = _fold_arrays(np, *(None if a is None else np.asarray(a) for a in arrays),
                                   e, include_eps, link.axis)
      kernel, shift = (host_like(a, arrays[0]) for a in (kernel, shift))
    else:
      kernel, shift = _fold_jit(*arrays, e, include_eps, link.axis)
    full = functools.partial(_full_like, host)
    new[link.kernel] = kernel
    if link.kernel_bias:
      new[link.kernel_bias] = shift
      if link.offset:
        new[link.offset] = full(arrays[3], 0.0)
    else:
      new[link.offset] = shift
    if link.scale:
      new[link.scale] = full(arrays[2], 1.0)
    new[link.mean] = full(arrays[4], 0.0)
    new[link.var] = full(arrays[5], 1.0 - e if include_eps else 1.0)
  return replace_leaves(variables, new)
