"""Repair: a data-light statistics correction after structured pruning (the REPAIR idea).

Pruning or fusing channels shifts and rescales what the layers downstream see: a fused channel
is a weighted sum of several, a narrow residual branch carries less variance. Without training,
:func:`repair` puts the statistics back. A batch of inputs ``x`` goes through the dense and the
pruned network; at each *target* layer (a Dense/Conv, with the BatchNorm after it if any), every
kept output channel is rescaled and shifted so that its mean and standard deviation over the
batch (and positions) equal the dense network's:

    a = std_dense / std_pruned,   c = mean_dense - a * mean_pruned,   y <- a * y + c.

The correction is folded into the parameters (the norm's scale and offset; without a norm the
kernel's output slices and the bias; a layer with neither gets its root mean square matched by a
scale alone), so the repaired model is an ordinary tree of the same shapes. Targets are corrected in program order, each seeing the corrections upstream of it
(Jordan et al., "REPAIR", ICLR 2023, renormalise fused networks the same way).

:func:`reestimate_batchnorm` is the simpler alternative: every BatchNorm's running statistics
are recomputed from data on the pruned network (no dense reference).

Statistics are taken where the traced program computes a target's ``dot_general`` or
convolution (:mod:`jaxprune.structure.interpret`), so pure JAX, linen and NNX models are
handled alike. With the whole batch in one chunk, one jitted pass corrects every target in
order; with ``chunk_size``, each pass accumulates the statistics of all targets over the chunks
under the previous pass's corrections, and passes repeat until no correction changes (the
corrections are triangular: target ``t`` depends only on those upstream, so this ends with the
same result after at most one pass per level of depth).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.checks import check_choice, check_concrete
from jaxprune.core.forms import as_model, require_apply_fn
from jaxprune.core.options import Options, resolve
from jaxprune.core.progress import progress
from jaxprune.core.results import ChannelResult, make_info
from jaxprune.core.trees import get_leaf, leaves_with_paths, on_host_numeric, replace_leaves, to_device
from jaxprune.structure.channel_groups import CONSUMER, PRODUCER, ChannelGroups, Group, KernelRead, NormLink
from jaxprune.structure.interpret import evaluate
from jaxprune.structure.surgery import channel_masks, check_keep, removed_positions, shrink_channels
from jaxprune.structure.units import norm_arrays

WHERE = ("producers", "group", "all")


@dataclasses.dataclass(frozen=True)
class RepairOptions(Options):
  """Options of :func:`repair`.

  Attributes:
    where: the layers corrected. ``"producers"``: the pruned groups' own layers (their output
      channels are the group); ``"group"``: those and every layer that reads a pruned group;
      ``"all"``: every Dense/Conv layer of the model, the logits included.
    chunk_size: examples per chunk; ``None`` puts the whole batch in one jitted pass (one pass
      corrects every target in order). With chunks, passes repeat until the corrections stop
      changing (see the module docstring).
    max_passes: the most passes over the data with chunks (``None``: one per target, plus one).
    min_std_ratio: a channel whose pruned std is below this fraction of the dense std is only
      shifted, not rescaled (a silenced channel would otherwise be amplified without bound).
  """
  where: str = "all"
  chunk_size: Optional[int] = None
  max_passes: Optional[int] = None
  min_std_ratio: float = 1e-4

  def check(self) -> None:
    check_choice(self.where, WHERE, "where")
    if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
      raise ValueError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")
    if self.max_passes is not None and (not isinstance(self.max_passes, int) or self.max_passes < 1):
      raise ValueError(f"max_passes must be a positive int or None, got {self.max_passes!r}")
    if not 0.0 <= float(self.min_std_ratio) < 1.0:
      raise ValueError(f"min_std_ratio must be in [0, 1), got {self.min_std_ratio!r}")


@dataclasses.dataclass(frozen=True)
class Target:
  """A layer whose output channels are corrected: one ``dot_general``/conv of the traced program.

  Attributes:
    name: the layer's module path (``"layer1_0/conv2"``).
    kernel: the kernel leaf's path; its last axis is the output channel axis.
    address: the equation that reads the kernel (:mod:`jaxprune.structure.interpret`).
    bias: the layer's bias leaf added to the equation's output, or None.
    norm: the BatchNorm right after it, or None.
    out_axes: how many trailing axes of the kernel (and of the equation's output) are output
      channels: 1 for Dense and Conv; 2 for a ``DenseGeneral`` to ``(heads, head_dim)``, whose
      ``heads * head_dim`` channels are corrected one by one.
  """
  name: str
  kernel: str
  address: tuple
  bias: Optional[str] = None
  norm: Optional[NormLink] = None
  out_axes: int = 1

  def channels(self, kernel_shape: Sequence[int]) -> int:
    return int(np.prod(kernel_shape[len(kernel_shape) - self.out_axes:]))


class Moments(NamedTuple):
  """Per-channel moments of a layer output over examples and positions: ``(C,)`` each."""
  count: jax.Array
  mean: jax.Array
  m2: jax.Array   # sum of squared deviations from ``mean``

  @property
  def var(self) -> jax.Array:
    return self.m2 / self.count


def moments(z: jax.Array) -> Moments:
  """Moments of ``z: (N, ..., C)`` over every axis but the last, in float32."""
  z = z.astype(jnp.float32)
  axes = tuple(range(z.ndim - 1))
  mean = z.mean(axes)
  return Moments(jnp.full_like(mean, z.size // z.shape[-1]), mean, jnp.square(z - mean).sum(axes))


def combine(a: Moments, b: Moments) -> Moments:
  """Moments of two chunks together (Chan et al.'s pairwise update)."""
  count = a.count + b.count
  delta = b.mean - a.mean
  return Moments(count, a.mean + delta * b.count / count, a.m2 + b.m2 + delta ** 2 * a.count * b.count / count)


class Correction(NamedTuple):
  """``y <- scale * y + shift`` on a target's output channels (after its norm): ``(C,)`` each."""
  scale: jax.Array
  shift: jax.Array


class LayerArrays(NamedTuple):
  """A target's arrays in one tree: bias (0 if none) and norm (identity if none), ``(C,)`` each."""
  bias: jax.Array
  gain: jax.Array     # the norm's scale / sqrt(var + eps): y = gain * (z - mean) + offset
  mean: jax.Array
  offset: jax.Array


def layer_arrays(tree: Any, t: Target, channels: int) -> LayerArrays:
  zeros = jnp.zeros((channels,), jnp.float32)
  bias = zeros if t.bias is None else jnp.asarray(get_leaf(tree, t.bias), jnp.float32).reshape(-1)
  if t.norm is None:
    return LayerArrays(bias, jnp.ones_like(zeros), zeros, zeros)
  n = norm_arrays(tree, t.norm)
  return LayerArrays(bias, n.scale * jax.lax.rsqrt(n.var + n.eps), n.mean, n.offset)


def output_stats(m: Moments, arr: LayerArrays) -> tuple[jax.Array, jax.Array]:
  """Mean and std of the layer's output ``y`` (after bias and norm) from the equation's moments."""
  return arr.gain * (m.mean + arr.bias - arr.mean) + arr.offset, jnp.abs(arr.gain) * jnp.sqrt(m.var)


def apply_correction(z: jax.Array, c: Correction, arr: LayerArrays) -> jax.Array:
  """The equation output ``z`` that makes the unchanged layer emit ``scale * y + shift``.

  With ``y = g (z + b - mu) + beta``: ``z' = a z + (a - 1)(b - mu) + ((a - 1) beta + c) / g``;
  channels with ``g = 0`` are never corrected (``a = 1, c = 0``).
  """
  a, s = c.scale, c.shift
  g = jnp.where(arr.gain == 0, 1.0, arr.gain)
  out = a * z.astype(jnp.float32) + (a - 1) * (arr.bias - arr.mean) + ((a - 1) * arr.offset + s) / g
  return out.astype(z.dtype)


def match_stats(m: Moments, arr: LayerArrays, dense: tuple, kept: jax.Array, min_ratio: float,
                shift: bool = True) -> Correction:
  """The correction that gives each kept channel the dense mean and std.

  ``shift=False`` (a layer with neither bias nor norm, where a shift cannot be folded): scale
  only, matching the root mean square ``sqrt(mean^2 + std^2)`` instead.
  """
  mean_p, std_p = output_stats(m, arr)
  mean_d, std_d = dense
  if not shift:
    mean_p, std_p = jnp.zeros_like(mean_p), jnp.sqrt(mean_p ** 2 + std_p ** 2)
    mean_d, std_d = jnp.zeros_like(mean_d), jnp.sqrt(mean_d ** 2 + std_d ** 2)
  on = kept & (arr.gain != 0)
  scale = jnp.where(on & (std_p > min_ratio * std_d) & (std_p > 0), std_d / jnp.where(std_p > 0, std_p, 1.0), 1.0)
  return Correction(scale, jnp.where(on, mean_d - scale * mean_p, 0.0))


def batch_norm_stats(m: Moments, arr: LayerArrays, t: Target, tree: Any) -> Correction:
  """The change of ``y`` when the norm's running statistics become the batch's."""
  n = norm_arrays(tree, t.norm)
  new_mean, new_gain = m.mean + arr.bias, n.scale * jax.lax.rsqrt(m.var + n.eps)
  on = arr.gain != 0
  a = jnp.where(on, new_gain / jnp.where(on, arr.gain, 1.0), 1.0)
  return Correction(a, jnp.where(on, arr.offset * (1 - a) + new_gain * (arr.mean - new_mean), 0.0))


def _identity(channels: int) -> Correction:
  return Correction(jnp.ones((channels,), jnp.float32), jnp.zeros((channels,), jnp.float32))


def _flat_channels(z: jax.Array, t: Target) -> jax.Array:
  """A target's equation output with its ``out_axes`` channel axes flattened into the last."""
  return z if t.out_axes == 1 else z.reshape(z.shape[:z.ndim - t.out_axes] + (-1,))


def _run(apply_fn: Callable, tree: Any, x: Any, targets: Sequence[Target], hook: Callable) -> None:
  """Evaluates ``apply_fn(tree, x)``, calling ``hook(i, z) -> z`` at target ``i``'s equation."""
  closed = jax.make_jaxpr(apply_fn)(tree, x)
  index = {t.address: i for i, t in enumerate(targets)}
  on_outputs = lambda address, outs: [hook(index[address], outs[0])] + list(outs[1:])   # noqa: E731
  evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves((tree, x)), frozenset(index),
           on_outputs=on_outputs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def reference_pass(apply_fn: Callable, targets: tuple, tree: Any, x: Any) -> tuple:
  """Moments at every target of the unchanged network (the dense reference)."""
  out = [None] * len(targets)

  def hook(i, z):
    out[i] = moments(_flat_channels(z, targets[i]))
    return z
  _run(apply_fn, tree, x, targets, hook)
  return tuple(out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def correction_pass(apply_fn: Callable, targets: tuple, kind: str, min_ratio: float, tree: Any, x: Any,
                    dense: Optional[tuple], kept: tuple, fixed: Optional[tuple]) -> tuple:
  """One pass over ``x`` on the pruned ``tree``: ``(moments, corrections)`` per target.

  ``fixed=None`` corrects in flight: each target's correction comes from this batch's moments,
  with every correction upstream already applied. Otherwise the ``fixed`` corrections are
  applied and the moments returned for the next pass. ``kind`` is ``"repair"`` (match ``dense``)
  or ``"batchnorm"`` (the batch's own statistics).
  """
  found, made = [None] * len(targets), [None] * len(targets)

  def hook(i, z):
    t = targets[i]
    flat = _flat_channels(z, t)
    arr = layer_arrays(tree, t, flat.shape[-1])
    m = moments(flat)
    c = fixed[i] if fixed is not None else _solve(kind, m, arr, t, tree, None if dense is None else dense[i], kept[i],
                                                                 min_ratio)
    found[i], made[i] = m, c
    return apply_correction(flat, c, arr).reshape(z.shape)
  _run(apply_fn, tree, x, targets, hook)
  return tuple(found), tuple(made)


def _chunks(x: Any, size: Optional[int]) -> list:
  n = x.shape[0]
  size = n if size is None else size
  return [x[i:i + size] for i in range(0, n, size)]


def _accumulate(fn: Callable, chunks: list, show: bool, desc: str) -> Any:
  total = None
  for chunk in progress(chunks, desc=desc, disable=not show or len(chunks) == 1):
    out = fn(chunk)
    total = out if total is None else _combine_all(total, out)
  return total


@jax.jit
def _combine_all(total: tuple, out: tuple) -> tuple:
  return tuple(combine(p, q) for p, q in zip(total, out))


def find_corrections(apply_fn: Callable, targets: tuple, kind: str, tree: Any, x: Any, *, dense: Optional[tuple],
                     kept: tuple, chunk_size: Optional[int], max_passes: Optional[int], min_ratio: float = 1e-4,
                     show_progress: bool = True) -> tuple[tuple, tuple, int]:
  """``(moments, corrections, passes)`` of every target on the pruned ``tree`` (see the module docstring)."""
  chunks = _chunks(x, chunk_size)
  if len(chunks) == 1:
    found, made = correction_pass(apply_fn, targets, kind, min_ratio, tree, chunks[0], dense, kept, None)
    return found, made, 1
  fixed = tuple(_identity(int(np.shape(k)[0])) for k in kept)
  limit = max_passes or len(targets) + 1
  for p in progress(range(1, limit + 1), desc="repair passes", disable=not show_progress):
    found = _accumulate(lambda c: correction_pass(apply_fn, targets, kind, min_ratio, tree, c, None, kept, fixed)[0],
                        chunks, show_progress, "chunks")
    new = _solve_all(kind, targets, min_ratio, found, tree, dense, kept)
    done = all(np.array_equal(np.asarray(a.scale), np.asarray(b.scale))
               and np.array_equal(np.asarray(a.shift), np.asarray(b.shift)) for a, b in zip(new, fixed))
    fixed = new
    if done:
      return found, fixed, p
  return found, fixed, limit


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _solve_all(kind: str, targets: tuple, min_ratio: float, found: tuple, tree: Any, dense: Optional[tuple],
               kept: tuple) -> tuple:
  """Every target's correction from its moments, in one program."""
  return tuple(_solve(kind, m, layer_arrays(tree, t, m.mean.shape[0]), t, tree, None if dense is None else dense[i],
                      kept[i], min_ratio) for i, (t, m) in enumerate(zip(targets, found)))


def _solve(kind, m, arr, t, tree, dense, kept, min_ratio) -> Correction:
  if kind == "repair":
    return match_stats(m, arr, dense, kept, min_ratio, shift=t.bias is not None or t.norm is not None)
  return batch_norm_stats(m, arr, t, tree)


def dense_stats(apply_fn: Callable, targets: tuple, tree: Any, x: Any, chunk_size: Optional[int],
                show_progress: bool = True) -> tuple:
  """``(mean, std)`` of every target's output on the dense network."""
  found = _accumulate(lambda c: reference_pass(apply_fn, targets, tree, c), _chunks(x, chunk_size), show_progress,
                      "dense pass")
  return _output_stats_all(targets, tree, found)


@functools.partial(jax.jit, static_argnums=0)
def _output_stats_all(targets: tuple, tree: Any, found: tuple) -> tuple:
  """``(mean, std)`` of every target's output from its moments, in one program (eager, each small
  operation would compile once per channel count)."""
  return tuple(output_stats(m, layer_arrays(tree, t, m.mean.shape[0])) for t, m in zip(targets, found))


# --- targets ---------------------------------------------------------------------------------

def _reads_output_channels_last(read: KernelRead, kernel_ndim: int) -> str:
  """Why the equation's last output axis is not the kernel's last axis ("" when it is)."""
  if not read.as_stored:
    return "its kernel is transposed or reshaped before it is read"
  params = dict(read.params)
  if read.primitive.name == "conv_general_dilated":
    dn = params["dimension_numbers"]
    if dn.out_spec[1] != len(dn.out_spec) - 1 or dn.rhs_spec[0] != kernel_ndim - 1:
      return "the convolution's output channels are not the last axis"
    return ""
  if read.primitive.name == "dot_general":
    (_, rc), (lb, rb) = params["dimension_numbers"]
    if read.operand != 1 or lb or rb or tuple(rc) != tuple(range(len(rc))) or len(rc) >= kernel_ndim:
      return "not a plain x @ kernel product"
    return ""
  return f"read by {read.primitive.name}"


def _candidates(cg: ChannelGroups, plans: Sequence[tuple], where: str) -> list:
  """Kernel paths to correct, in a stable order."""
  if where == "all":
    paths = [r.path for r in cg.reads]
  else:
    roles = (PRODUCER,) if where == "producers" else (PRODUCER, CONSUMER)
    paths = [m.path for g, _ in plans for m in g.members if m.role in roles and m.kind in ("kernel", "depthwise")]
  return list(dict.fromkeys(paths))


def find_targets(cg: ChannelGroups, plans: Sequence[tuple], where: str, shapes: dict,
                 need_norm: bool = False) -> tuple[tuple, dict]:
  """``(targets in program order, {kernel path: why it is not a target})``."""
  reads: dict = {}
  for r in cg.reads:
    reads.setdefault(r.path, []).append(r)
  norms = {nl.kernel: nl for nl in cg.norms}
  targets, skipped = [], {}
  for path in _candidates(cg, plans, where):
    sites, norm = reads.get(path, []), norms.get(path)
    ndim = len(shapes[path])
    why = (f"read by {len(sites)} equations (one is needed)" if len(sites) != 1
           else _reads_output_channels_last(sites[0], ndim))
    if not why and norm is not None and (norm.scale is None or norm.offset is None or norm.axis != ndim - 1):
      why = "the norm after it has no scale or offset"
    bias = sites[0].bias if len(sites) == 1 else None
    if not why and norm is None and need_norm:
      why = "no BatchNorm after it"
    if why:
      skipped[path] = why
      continue
    name = "/".join(p for p in path.split("/")[:-1] if p != "params") or path   # a top-level kernel: its own name
    out_axes = 1
    if sites[0].primitive.name == "dot_general":
      out_axes = ndim - len(dict(sites[0].params)["dimension_numbers"][0][1])
    if out_axes > 1 and norm is not None:
      skipped[path] = "a norm after a layer with several output axes"
      continue
    targets.append(Target(name, path, sites[0].address, bias, norm, out_axes))
  return tuple(sorted(targets, key=lambda t: t.address)), skipped


def kept_channels(t: Target, plans: Sequence[tuple], kernel_shape: Sequence[int]) -> np.ndarray:
  """``(C,)`` bool: the target's output channels (its trailing ``out_axes`` flattened) that the
  plans keep."""
  out_shape = tuple(kernel_shape[len(kernel_shape) - t.out_axes:])
  kept = np.ones(out_shape, bool)
  for g, keep in plans:
    for m in g.producers:
      if m.path == t.kernel and m.kind in ("kernel", "depthwise"):
        mine = np.zeros(out_shape, bool)
        index = [slice(None)] * len(out_shape)
        index[m.axis - (len(kernel_shape) - t.out_axes)] = m.positions(g.size)[keep].ravel()
        mine[tuple(index)] = True
        kept &= mine
  return kept.reshape(-1)


# --- trees -----------------------------------------------------------------------------------

def expand_channels(dense: Any, pruned: Any, plans: Sequence[tuple]) -> tuple[Any, bool]:
  """``(tree, shrunk)``: the pruned tree at the dense shapes (removed channels silenced, as in
  mask mode), and whether ``pruned`` was shrunk. Checks that the shapes fit the plans."""
  cut: dict = {}
  zero: dict = {}
  for g, keep in plans:
    for (path, axis), pos in removed_positions(g, keep).items():
      cut.setdefault(path, {}).setdefault(axis, []).append(pos)
    for m in g.members:
      zero[m.path] = zero.get(m.path, False) or m.kind != "stat"
  full, small = dict(leaves_with_paths(dense)), dict(leaves_with_paths(pruned))
  if set(full) != set(small):
    raise ValueError("result: its tree has other leaves than dense_params (prune the same model)")
  mismatched = [p for p in full if np.shape(full[p]) != np.shape(small[p])]
  if not mismatched:
    return pruned, False
  new = {}
  for path, leaf in full.items():
    axes = cut.get(path, {})
    idx = [np.setdiff1d(np.arange(n), np.concatenate(axes[a]) if a in axes else []) for a, n in enumerate(np.shape(leaf))]
    if np.shape(small[path]) != tuple(i.size for i in idx):
      raise ValueError(f"result: {path} has shape {np.shape(small[path])}; the plans give "
                       f"{tuple(i.size for i in idx)} (shrunk) or {np.shape(leaf)} (masked)")
    if axes and on_host_numeric(leaf, small[path]):   # numpy: an eager scatter compiles per shape
      base = np.zeros_like(np.asarray(leaf)) if zero.get(path) else np.array(leaf)
      base[np.ix_(*idx)] = np.asarray(small[path], base.dtype)
      new[path] = to_device(base, leaf)
    elif axes:
      base = jnp.zeros_like(leaf) if zero.get(path) else jnp.asarray(leaf)
      new[path] = base.at[np.ix_(*idx)].set(jnp.asarray(small[path], base.dtype))
  return replace_leaves(pruned, new), True


def fold_corrections(tree: Any, targets: Sequence[Target], corrections: Sequence[Correction]) -> Any:
  """Folds ``y <- a y + c`` into each target's norm (scale, offset) or kernel and bias."""
  return replace_leaves(tree, _folded_corrections(tuple(targets), tree, tuple(corrections)))


@functools.partial(jax.jit, static_argnums=0)
def _folded_corrections(targets: tuple, tree: Any, corrections: tuple) -> dict:
  """The leaves :func:`fold_corrections` changes, ``{path: array}``, in one program."""
  leaves = dict(leaves_with_paths(tree))
  new = {}

  def put(path, value):
    new[path] = value.astype(jnp.asarray(leaves[path]).dtype)

  for t, c in zip(targets, corrections):
    a, s = c.scale, c.shift
    if t.norm is not None:
      put(t.norm.scale, a * jnp.asarray(leaves[t.norm.scale], jnp.float32))
      put(t.norm.offset, a * jnp.asarray(leaves[t.norm.offset], jnp.float32) + s)
    else:   # without a bias the shift is 0 (match_stats(shift=False))
      out_shape = np.shape(leaves[t.kernel])[np.ndim(leaves[t.kernel]) - t.out_axes:]
      a, s = a.reshape(out_shape), s.reshape(out_shape)
      put(t.kernel, jnp.asarray(leaves[t.kernel], jnp.float32) * a)
      if t.bias is not None:
        put(t.bias, a * jnp.asarray(leaves[t.bias], jnp.float32) + s)
  return new


def fold_statistics(tree: Any, targets: Sequence[Target], found: Sequence[Moments], preserve_function: bool) -> Any:
  """Sets each target norm's running mean and variance to the measured ones (where it acts).

  ``preserve_function``: also rescale the norm's scale and shift its offset so that its output
  is unchanged (``s' = g sqrt(var' + eps)``, ``b' = b + g (mean' - mean)``).
  """
  return replace_leaves(tree, _folded_statistics(tuple(targets), bool(preserve_function), tree, tuple(found)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _folded_statistics(targets: tuple, preserve_function: bool, tree: Any, found: tuple) -> dict:
  """The leaves :func:`fold_statistics` changes, ``{path: array}``, in one program."""
  new = {}
  for t, m in zip(targets, found):
    arr = layer_arrays(tree, t, m.mean.shape[0])
    on = arr.gain != 0
    mean, var = get_leaf(tree, t.norm.mean), get_leaf(tree, t.norm.var)
    new_mean, new_var = m.mean + arr.bias, m.var
    new[t.norm.mean] = jnp.where(on, new_mean, mean).astype(jnp.asarray(mean).dtype)
    new[t.norm.var] = jnp.where(on, new_var, var).astype(jnp.asarray(var).dtype)
    if preserve_function:
      eps = norm_arrays(tree, t.norm).eps
      scale, offset = get_leaf(tree, t.norm.scale), get_leaf(tree, t.norm.offset)
      new[t.norm.scale] = jnp.where(on, arr.gain * jnp.sqrt(new_var + eps), scale).astype(jnp.asarray(scale).dtype)
      new[t.norm.offset] = jnp.where(on, arr.offset + arr.gain * (new_mean - arr.mean),
                                     offset).astype(jnp.asarray(offset).dtype)
  return new


# --- the public calls ------------------------------------------------------------------------

class LayerReport(NamedTuple):
  """How far one corrected layer's output channels were off before repair: ``(C,)`` each.

  Attributes:
    corrected: the channels repair corrected (the kept ones).
    std_ratio: ``std_pruned / std_dense`` (1 where the pruned layer already matched).
    mean_offset: ``(mean_pruned - mean_dense) / std_dense``.
  """
  corrected: np.ndarray
  std_ratio: np.ndarray
  mean_offset: np.ndarray


def _inputs(x: Any) -> Any:
  x = x[0] if isinstance(x, (tuple, list)) else x
  if not hasattr(x, "shape") or len(x.shape) < 1 or x.shape[0] < 2:
    raise ValueError("x: expected a batch of model inputs with at least 2 examples on the leading axis (or "
                     f"(x, y)), got {getattr(x, 'shape', type(x).__name__)}")
  return x


def _plans_of(result: Any, plans: Optional[Sequence[tuple]]) -> tuple[Any, tuple, Optional[ChannelResult]]:
  """``(pruned tree, plans, the result or None)`` from a :class:`ChannelResult` or a tree and plans."""
  if isinstance(result, ChannelResult):
    found = plans if plans is not None else result.info.get("plans")
    if found is None:
      raise ValueError("result: it records no plans (info['plans']); pass plans=[(group, keep), ...]")
    tree, base = result.params, result
  else:
    if plans is None:
      raise TypeError("result: give a ChannelResult of prune_channels/intra_fusion/ispasp, or the pruned tree "
                      "with plans=[(group, keep), ...]")
    tree, base, found = result, None, plans
  checked = []
  for i, item in enumerate(found):
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Group)):
      raise TypeError(f"plans[{i}] must be a (Group, keep indices) pair")
    checked.append((item[0], check_keep(item[1], item[0], f"plans[{i}] keep")))
  return tree, tuple(checked), base


def _trace(model, x, groups):
  if groups is not None:
    if not isinstance(groups, ChannelGroups):
      raise TypeError("groups must be the model's ChannelGroups (jaxprune.groups), which hold its norms and reads")
    return groups
  from jaxprune.structure.trace import groups as trace_groups
  return trace_groups(model.apply_fn, model.tree, jax.ShapeDtypeStruct((1,) + tuple(x.shape[1:]), x.dtype))


def repair(apply_fn: Optional[Callable], dense_params: Any, result: Any, x: Any, *,
           plans: Optional[Sequence[tuple]] = None, groups: Optional[ChannelGroups] = None,
           options: Optional[RepairOptions] = None, show_progress: bool = True, **overrides) -> ChannelResult:
  """Corrects the statistics of a structurally pruned network so they match the dense one's.

  Each kept output channel of each target layer gets the dense channel's mean and std over the
  batch ``x`` (module docstring); the correction is folded into the parameters. Works after any
  structured method and in shrink or mask mode (a shrunk tree is repaired at the dense shapes and
  shrunk again, so channel indices match the dense network's).

  Args:
    apply_fn: ``apply_fn(params, x) -> outputs`` in inference mode (``None`` for an NNX module).
    dense_params: the unpruned tree (or ``nnx.Module``) the result was pruned from.
    result: a :class:`ChannelResult` of :func:`jaxprune.prune_channels`,
      :func:`jaxprune.intra_fusion` or :func:`jaxprune.ispasp`, or a pruned tree with ``plans``.
    x: model inputs ``(N, ...)`` (or ``(x, y)``); a few hundred training examples suffice.
    plans: ``[(group, kept channel indices), ...]`` for a hand-made pruning.
    groups: the model's :class:`ChannelGroups` (traced from ``apply_fn`` when ``None``).
    options: :class:`RepairOptions`; ``**overrides`` single fields.
    show_progress: progress over chunks and passes.

  Returns:
    the :class:`ChannelResult` with repaired ``params`` (same kind, mode and shapes as the
    result's) and ``info["repair"]``: ``options``, ``seconds``, ``examples``, ``passes``,
    ``layers`` (``{layer name: LayerReport}``) and ``skipped`` (``{kernel path: reason}``).
  """
  started = time.perf_counter()
  opts = resolve(RepairOptions, options, False, overrides)
  model = as_model(dense_params, apply_fn)
  check_concrete("repair", dense_params=model.tree, result=result, x=x)
  require_apply_fn(model, "repair", "dense_params")
  x = _inputs(x)
  tree, plans, base = _plans_of(result, plans)
  full, shrunk = expand_channels(model.tree, tree, plans)
  shapes = {p: np.shape(v) for p, v in leaves_with_paths(model.tree)}
  targets, skipped = find_targets(_trace(model, x, groups), plans, opts.where, shapes)
  if not targets:
    raise ValueError(f"result: no layer to correct ({'; '.join(f'{p}: {w}' for p, w in skipped.items()) or 'none'})")
  kept = tuple(jax.device_put(np.asarray(kept_channels(t, plans, shapes[t.kernel]))) for t in targets)
  dense = dense_stats(model.apply_fn, targets, model.tree, x, opts.chunk_size, show_progress)
  found, made, passes = find_corrections(model.apply_fn, targets, "repair", full, x, dense=dense, kept=kept,
                                         chunk_size=opts.chunk_size, max_passes=opts.max_passes,
                                         min_ratio=float(opts.min_std_ratio), show_progress=show_progress)
  out = fold_corrections(full, targets, made)
  if shrunk:
    out = shrink_channels(out, plans)
  layers = {t.name: LayerReport(*r) for t, r in zip(targets, jax.device_get(_reports(targets, full, found, dense, kept)))}
  record = {"options": opts, "seconds": round(time.perf_counter() - started, 4), "examples": int(x.shape[0]),
            "passes": passes, "layers": layers, "skipped": skipped}
  if base is None:
    masks = channel_masks(model.tree, plans)
    info = make_info("repair", opts, started, plans=plans, repair=record)
    return ChannelResult(out, masks, info, {i: keep for i, (_, keep) in enumerate(plans)})
  return base._replace(params=out, info={**base.info, "repair": record})


@functools.partial(jax.jit, static_argnums=0)
def _reports(targets: tuple, tree: Any, found: tuple, dense: tuple, kept: tuple) -> tuple:
  """Every target's :class:`LayerReport` fields, in one program."""
  return tuple(tuple(_report(m, layer_arrays(tree, t, m.mean.shape[0]), d, k))
               for t, m, d, k in zip(targets, found, dense, kept))   # device arrays; the caller reads them once


def _report(m: Moments, arr: LayerArrays, dense: tuple, kept: jax.Array) -> LayerReport:
  mean_p, std_p = output_stats(m, arr)
  mean_d, std_d = dense
  safe = jnp.where(std_d > 0, std_d, 1.0)
  return LayerReport(kept, jnp.where(std_d > 0, std_p / safe, 1.0), (mean_p - mean_d) / safe)


def reestimate_batchnorm(apply_fn: Optional[Callable], params: Any, x: Any, *, groups: Optional[ChannelGroups] = None,
                         chunk_size: Optional[int] = None, max_passes: Optional[int] = None,
                         preserve_function: bool = False, show_progress: bool = True) -> Any:
  """Recomputes every BatchNorm's running statistics on the network as it is now, from ``x``.

  The simpler alternative to :func:`repair` (no dense reference): a pruned network's norms are
  reset to the mean and variance their inputs have over ``x`` (population statistics, every norm
  seeing the ones upstream already re-estimated), as a pass of training-mode BatchNorm with
  momentum 0 would. Norms that act on nothing (zero scale, e.g. removed channels in mask mode)
  are left alone.

  Args:
    apply_fn: ``apply_fn(params, x)`` in inference mode (``None`` for an NNX module).
    params: the tree (any form; an ``nnx.Module`` gives back its ``nnx.State``) or a
      :class:`ChannelResult`, which comes back with its ``params`` re-estimated.
    x: model inputs ``(N, ...)`` (or ``(x, y)``).
    groups: the model's :class:`ChannelGroups` for these shapes (traced when ``None``).
    chunk_size, max_passes: as in :class:`RepairOptions`.
    preserve_function: keep the network's function: the statistics become the measured ones and
      each norm's scale and offset absorb the change. A model prepared so (after :func:`repair`,
      say) starts a training-mode fine-tune where it is, instead of being renormalised at step 1.

  Returns:
    the tree (or result) with new running statistics; nothing else changes.
  """
  result = params if isinstance(params, ChannelResult) else None
  model = as_model(params.params if result is not None else params, apply_fn)
  require_apply_fn(model, "re-estimation", "params")
  RepairOptions(chunk_size=chunk_size, max_passes=max_passes).check()
  x = _inputs(x)
  shapes = {p: np.shape(v) for p, v in leaves_with_paths(model.tree)}
  targets, skipped = find_targets(_trace(model, x, groups), (), "all", shapes, need_norm=True)
  if not targets:
    raise ValueError("params: the model has no BatchNorm after a Dense/Conv layer to re-estimate")
  kept = tuple(jnp.ones((t.channels(shapes[t.kernel]),), bool) for t in targets)
  if preserve_function:   # nothing changes on the way: one pass measures every norm's input
    found = _accumulate(lambda c: reference_pass(model.apply_fn, targets, model.tree, c), _chunks(x, chunk_size),
                        show_progress, "statistics")
  else:
    found, _, _ = find_corrections(model.apply_fn, targets, "batchnorm", model.tree, x, dense=None, kept=kept,
                                   chunk_size=chunk_size, max_passes=max_passes, show_progress=show_progress)
  out = fold_statistics(model.tree, targets, found, preserve_function)
  return out if result is None else result._replace(params=out)


def check_repair_request(x: Any, options: Optional[RepairOptions], apply_fn: Optional[Callable]) -> None:
  """Fails before a structured method's work when its ``repair=``/``repair_options=`` cannot run."""
  if x is None:
    if options is not None:
      raise ValueError("repair_options: given without repair=x (the examples repair runs on)")
    return
  _inputs(x)
  if apply_fn is None:
    raise TypeError("apply_fn: repair=x runs the model; pass apply_fn=model.apply (or an nnx.Module as params)")
  if options is not None:
    resolve(RepairOptions, options, False, {})


def repair_if_asked(result: ChannelResult, model: Any, x: Any, options: Optional[RepairOptions], groups: Any,
                    started: float, show_progress: bool) -> ChannelResult:
  """The structured methods' ``repair=x``: :func:`repair` of their own result."""
  if x is None:
    return result
  out = repair(model.apply_fn, model.tree, result, x, groups=groups if isinstance(groups, ChannelGroups) else None,
               options=options, show_progress=show_progress)
  return out._replace(info={**out.info, "seconds": round(time.perf_counter() - started, 4)})
