"""Two-layer units: the hidden channels of one group, and the layer that reads them.

i-SpaSP prunes a unit's hidden group so that the unit's output stays close to the dense one.
A :class:`Unit` says how to get the hidden activations ``H: (N, ..., C)`` from the model input
(``hidden_fn``) and how the second layer maps them to the unit output (``output_fn``, plus the
BatchNorm after it, if any). The residual is taken at that norm's output: for a ResNet
BasicBlock after ``bn2``, before the skip addition.

:func:`two_layer_units` derives units from any model (pure JAX, linen, NNX) and its channel
groups: every prunable group read by exactly one layer (MLP hidden layers, a BasicBlock's
``conv1`` channels, a MobileNet block's depthwise channels read by its pointwise conv, VGG convs),
by several (a residual stream: the unit's output is every reading layer's), or among the other
channels of a concatenation (U-Nets, DenseNets: the output is the reading layer's share from the
group's channels, :class:`ShareOutput`).
``H`` is the activation operand of the equation that reads the layer's kernel, captured by
evaluating the jaxpr (:func:`capture_at`). :func:`make_unit` builds one by hand, for layers that
tracing does not see.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structure.channel_groups import ChannelGroups, Group, NormLink, module_path
from jaxprune.structure.interpret import evaluate
from jaxprune.core.checks import traced_call_note
from jaxprune.core.trees import get_leaf, leaves_with_paths


class OutputNorm(NamedTuple):
  """A BatchNorm after the unit's second layer, as arrays: ``(C_out,)`` each, ``eps`` a scalar."""
  scale: jax.Array
  offset: jax.Array
  mean: jax.Array
  var: jax.Array
  eps: jax.Array


def norm_eval(z: jax.Array, norm: Optional[OutputNorm]) -> jax.Array:
  """The norm in inference mode (running statistics); identity for ``None``."""
  if norm is None:
    return z
  return (z - norm.mean) * jax.lax.rsqrt(norm.var + norm.eps) * norm.scale + norm.offset


def norm_arrays(variables: Any, nl: NormLink) -> OutputNorm:
  """A norm's arrays (scale 1 and offset 0 where the norm has none)."""
  mean = jnp.asarray(get_leaf(variables, nl.mean), jnp.float32)
  scale = jnp.ones_like(mean) if nl.scale is None else jnp.asarray(get_leaf(variables, nl.scale), jnp.float32)
  offset = jnp.zeros_like(mean) if nl.offset is None else jnp.asarray(get_leaf(variables, nl.offset), jnp.float32)
  eps = 1e-5 if nl.eps is None else nl.eps
  return OutputNorm(scale, offset, mean, jnp.asarray(get_leaf(variables, nl.var), jnp.float32),
                    jnp.asarray(eps, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Unit:
  """A two-layer unit: ``f1`` (model input -> hidden channels of ``group``), ``f2`` (-> unit output).

  Attributes:
    group: the hidden channels (removing channel ``j`` removes slice ``j`` of every member).
    hidden_fn: ``hidden_fn(variables, x) -> H: (N, ..., C)``, channels last, for a batch of
      model inputs ``x``; run on the current (pruned) variables in sequential mode.
    output_fn: ``output_fn(params, H) -> Z: (N, ..., C_out)``, the second layer before its
      norm, per example.
    params_fn: ``params_fn(variables) -> params`` for ``output_fn`` (default: the whole tree).
    norm: the BatchNorm after the second layer (``NormLink`` paths into the variables), or None.
    name: a label (derived units: the second layer's module path).
    group_index: the group's index in its :class:`ChannelGroups`, for derived units.
    capture: ``(address, operand)`` of the equation whose activation is ``H`` (derived units;
      lets one forward pass capture the hidden activations of many units).
    affine: ``output_fn`` is affine in ``H`` (a Dense or Conv layer), which allows the exact
      reduced proxy (:func:`jaxprune.recovery.reduced_proxy`) in inference mode.
  """
  group: Group
  hidden_fn: Callable[[Any, jax.Array], jax.Array]
  output_fn: Callable[[Any, jax.Array], jax.Array]
  params_fn: Callable[[Any], Any] = lambda variables: variables
  norm: Optional[NormLink] = None
  name: str = ""
  group_index: Optional[int] = None
  capture: Optional[tuple] = None
  affine: bool = False

  @property
  def size(self) -> int:
    return self.group.size

  def output_norm(self, variables: Any) -> Optional[OutputNorm]:
    """The norm's arrays (scale 1 and offset 0 where the norm has none)."""
    return None if self.norm is None else norm_arrays(variables, self.norm)

  def output(self, variables: Any, hidden: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """The unit output ``U`` (norm in inference mode) from ``hidden``, restricted to ``mask``."""
    if mask is not None:
      hidden = hidden * jnp.asarray(mask, hidden.dtype)
    return norm_eval(self.output_fn(self.params_fn(variables), hidden), self.output_norm(variables))


def make_unit(group: Group, hidden_fn: Callable, output_fn: Callable, *, params_fn: Optional[Callable] = None,
              norm: Optional[NormLink] = None, name: str = "", affine: bool = False) -> Unit:
  """A unit given by hand (see :class:`Unit` for the arguments).

  Set ``affine=True`` only when ``output_fn`` is affine in ``H`` (e.g. a Dense or Conv layer);
  i-SpaSP then computes its proxy from the summed activations (much faster, same result).

  Example (a two-layer MLP ``fc1 -> relu -> fc2``)::

    g = jp.make_group(variables, producers=[("params/fc1/kernel", 1), ("params/fc1/bias", 0)],
                      consumers=[("params/fc2/kernel", 0)])
    unit = jp.make_unit(
        g,
        hidden_fn=lambda v, x: jax.nn.relu(x @ v["params"]["fc1"]["kernel"] + v["params"]["fc1"]["bias"]),
        output_fn=lambda p, h: h @ p["kernel"] + p["bias"],
        params_fn=lambda v: v["params"]["fc2"], affine=True)
  """
  if not isinstance(group, Group):
    raise TypeError(f"group must be a Group, got {type(group).__name__}")
  for arg, fn in (("hidden_fn", hidden_fn), ("output_fn", output_fn)):
    if not callable(fn):
      raise TypeError(f"{arg} must be callable")
  if norm is not None and not isinstance(norm, NormLink):
    raise TypeError(f"norm must be a NormLink or None, got {type(norm).__name__}")
  kw = {} if params_fn is None else {"params_fn": params_fn}
  return Unit(group=group, hidden_fn=hidden_fn, output_fn=output_fn, norm=norm, name=name or group.name,
              affine=bool(affine), **kw)


class _Captured(Exception):
  """Stops the forward pass once every requested activation is in hand."""


def capture_at(apply_fn: Callable, variables: Any, x: Any, addresses: Sequence[tuple], operands: Sequence[int],
               **apply_kwargs) -> dict:
  """``{address: the activation operand of that equation}`` for a batch ``x``, in one forward pass.

  The program ``apply_fn(variables, x)`` is traced to a jaxpr and evaluated equation by equation,
  into the sub-jaxprs that hold an address, until every requested value has been seen. Works the
  same for pure JAX functions, linen and NNX (jit- and vmap-safe: it only binds primitives).
  """
  wanted = {tuple(a): 1 - int(o) for a, o in zip(addresses, operands)}   # the activation operand
  try:
    closed = jax.make_jaxpr(lambda v, xx: apply_fn(v, xx, **apply_kwargs))(variables, x)
  except Exception as error:
    traced_call_note(error, "apply_fn(variables, batch) to read hidden activations", x)
    raise
  args = jax.tree_util.tree_leaves((variables, x))
  out: dict = {}

  def on_inputs(address, invals):
    out.setdefault(address, invals[wanted[address]])
    if len(out) == len(wanted):
      raise _Captured()

  try:
    evaluate(closed.jaxpr, closed.consts, args, frozenset(wanted), on_inputs=on_inputs)
  except _Captured:
    pass
  missing = set(wanted) - set(out)
  if missing:
    raise ValueError(f"equations {sorted(missing)} were not reached: the program differs from the one the units "
                     "were derived from (trace the groups with the same apply_fn and input shapes)")
  return out


@dataclasses.dataclass(frozen=True)
class CapturedInput:
  """``hidden_fn`` of a derived unit: the activation read by one equation of the traced program.

  Hashable and compared by value, so that jitted captures are reused across calls.
  """
  apply_fn: Callable
  address: tuple
  operand: int
  apply_kwargs: tuple = ()
  layout: Optional["ChannelLayout"] = None   # None: the channels are the activation's last axis

  def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
    return self.arrange(capture_at(self.apply_fn, variables, x, [self.address], [self.operand],
                                   **dict(self.apply_kwargs))[self.address])

  def arrange(self, h: jax.Array) -> jax.Array:
    """The captured activation as ``H: (N, ..., C)``, channels last."""
    return h if self.layout is None else self.layout.arrange(h)


class ChannelLayout(NamedTuple):
  """Where a group's channels sit in the activation a layer reads, when not simply on its last axis.

  Axis ``axis`` of the activation holds ``rows * C`` entries: the channels are its inner factor
  (``inner=True``: an NHWC flatten of ``(H, W, C)``, ``rows = H W``) or its outer factor
  (``inner=False``: query heads of one key/value head in grouped-query attention, ``rows`` each),
  or the whole axis (``rows = 1``: the head axis of an attention output projection).
  """
  axis: int
  rows: int = 1
  inner: bool = True

  def arrange(self, h: jax.Array) -> jax.Array:
    """``h`` with the channel factor split off and moved last: ``(N, ..., C)``."""
    a, shape = self.axis, h.shape
    if self.rows == 1:
      return jnp.moveaxis(h, a, -1)
    split = (self.rows, shape[a] // self.rows) if self.inner else (shape[a] // self.rows, self.rows)
    h = h.reshape(shape[:a] + split + shape[a + 1:])
    return jnp.moveaxis(h, a + 1 if self.inner else a, -1)

  def restore(self, hidden: jax.Array) -> jax.Array:
    """The inverse of :meth:`arrange`."""
    a = self.axis
    if self.rows == 1:
      return jnp.moveaxis(hidden, -1, a)
    h = jnp.moveaxis(hidden, -1, a + 1 if self.inner else a)
    return h.reshape(h.shape[:a] + (h.shape[a] * h.shape[a + 1],) + h.shape[a + 2:])


@dataclasses.dataclass(frozen=True)
class KernelOutput:
  """``output_fn`` of a derived unit: the reading equation itself (``dot_general`` or a conv),
  applied to ``H`` and ``params["kernel"]`` as the traced program applies it, plus
  ``params["bias"]`` (on the last axis) when the layer has one. The norm after it is the unit's
  ``norm``."""
  primitive: Any
  params: tuple
  operand: int
  kernel_dtype: Any
  layout: Optional[ChannelLayout] = None   # how ``H`` goes back to the activation's own layout

  def __call__(self, params: Any, hidden: jax.Array) -> jax.Array:
    kernel = jnp.asarray(params["kernel"], self.kernel_dtype)
    hidden = hidden if self.layout is None else self.layout.restore(hidden)
    operands = (hidden, kernel) if self.operand == 1 else (kernel, hidden)
    out = self.primitive.bind(*operands, **dict(self.params))
    return out + params["bias"] if "bias" in params else out


@dataclasses.dataclass(frozen=True)
class LayerParams:
  """``params_fn`` of a derived unit: ``{"kernel": ..., "bias": ...}`` of the reading layer."""
  kernel: str
  bias: Optional[str] = None

  def __call__(self, variables: Any) -> dict:
    out = {"kernel": get_leaf(variables, self.kernel)}
    if self.bias is not None:
      out["bias"] = get_leaf(variables, self.bias)
    return out


class ConcatShare(NamedTuple):
  """Where a group's channels sit among the other channels of a concatenation that one layer
  reads: ``positions`` on the activation's last axis (and the kernel's input axis)."""
  positions: tuple

  def arrange(self, h: jax.Array) -> jax.Array:
    """``H: (N, ..., C)``: the group's own channels of the joined activation."""
    return jnp.take(h, jnp.asarray(self.positions, jnp.int32), axis=-1)


@dataclasses.dataclass(frozen=True)
class ShareOutput:
  """``output_fn`` of a group read among the other channels of a concatenation: the reading
  equation on the group's channels and their kernel rows only, times the norm's ``scale /
  sqrt(var + eps)`` (``params["scale"]``, when a norm follows).

  The layer's output is this share plus the other channels' share and the bias. Those add the
  same to the dense and to the pruned output, and an inference-mode norm is affine, so the
  residual ``U - U_hat`` (what i-SpaSP reduces) is the residual of the share. Pruning with this
  unit is pruning the whole layer; its ``relative_error`` is relative to the share. The norm
  enters in inference mode also with ``bn_mode="train"``: batch statistics belong to the whole
  layer's output, which the share is not (the official code has no such units).
  """
  layer: KernelOutput

  def __call__(self, params: Any, hidden: jax.Array) -> jax.Array:
    out = self.layer({"kernel": params["kernel"]}, hidden)
    return out * params["scale"] if "scale" in params else out


@dataclasses.dataclass(frozen=True)
class ShareParams:
  """``params_fn`` of :class:`ShareOutput`: the kernel's rows at ``positions`` along ``axis`` and
  the norm's scale (inference mode)."""
  kernel: str
  axis: int
  positions: tuple
  norm: Optional[NormLink] = None

  def __call__(self, variables: Any) -> dict:
    out = {"kernel": jnp.take(get_leaf(variables, self.kernel), jnp.asarray(self.positions, jnp.int32), axis=self.axis)}
    if self.norm is not None:
      n = norm_arrays(variables, self.norm)
      out["scale"] = n.scale * jax.lax.rsqrt(n.var + n.eps)
    return out


def derive_units(apply_fn: Callable, variables: Any, example: Any, groups: Optional[ChannelGroups] = None,
                 **apply_kwargs) -> tuple[tuple[Unit, ...], dict]:
  """The two-layer units of any model (pure JAX, linen, NNX), and why other groups have none.

  A prunable group is a unit when exactly one kernel reads it, on its input axis (a Dense after
  an NHWC flatten too: its ``H`` is the flattened activation as ``(N, H W, C)``), and the program
  reads that kernel in one
  ``dot_general``/``conv_general_dilated`` (not grouped) whose activation has the channels last.
  ``H`` is that equation's activation operand (captured from the jaxpr); the output is the
  equation itself, followed by the group's ``NormLink`` (BatchNorm right after it). A group that a
  layer reads among the other channels of a concatenation (a U-Net's skip and upsampled features)
  gets :class:`ShareOutput`: that layer's output from the group's channels alone.

  Returns:
    ``(units, skipped)``: units in group order (output to input), and ``{group index: reason}``
    for every prunable group without one.
  """
  if groups is None:
    from jaxprune.structure.trace import groups as trace_groups
    groups = trace_groups(apply_fn, variables, example, **apply_kwargs)
  if not isinstance(groups, ChannelGroups):
    raise TypeError("groups must be the ChannelGroups of this model (jaxprune.groups)")
  shapes = {p: np.shape(leaf) for p, leaf in leaves_with_paths(variables)}
  norms = {nl.kernel: nl for nl in groups.norms}
  reads: dict = {}
  for r in groups.reads:
    reads.setdefault(r.path, []).append(r)
  kwargs = tuple(sorted(apply_kwargs.items()))
  units, skipped = [], {}
  for i, g in enumerate(groups):
    found = [_reader(m, g.size, reads, shapes) for m in g.consumers]
    why = next((f for f in found if isinstance(f, str)), "" if found else "read by no layer")
    if why:
      skipped[i] = why
      continue
    if len(found) > 1:
      if any(isinstance(lay, ChannelLayout) and (lay.axis != r.activation_ndim - 1 or not lay.inner)
             for _, r, lay in found):
        skipped[i] = "read by several layers, not all on the activation's last axis"
        continue
      units.append(_several_readers(apply_fn, variables, example, kwargs, g, i, found, norms))
      continue
    m, r, layout = found[0]
    output_fn, params_fn, norm = _reading_layer(m, r, layout, norms)
    units.append(Unit(group=g, hidden_fn=CapturedInput(apply_fn, r.address, r.operand, kwargs, layout),
                      output_fn=output_fn, params_fn=params_fn, norm=norm, name=_layer_name(m.path),
                      group_index=i, capture=(r.address, r.operand), affine=True))
  return tuple(units), skipped


def _reading_layer(m, r, layout, norms: dict) -> tuple:
  """``(output_fn, params_fn, norm)`` of the layer whose kernel ``m`` reads a group: the whole
  equation with its bias and norm, or, for a share of a concatenation, :class:`ShareOutput`."""
  kernel_output = KernelOutput(r.primitive, r.params, r.operand, r.kernel_dtype,
                               None if isinstance(layout, ConcatShare) else layout)
  if isinstance(layout, ConcatShare):
    return ShareOutput(kernel_output), ShareParams(m.path, m.axis, layout.positions, norms.get(m.path)), None
  return kernel_output, LayerParams(m.path, r.bias if r.operand == 1 else None), norms.get(m.path)


def _reader(m, n: int, reads: dict, shapes: dict):
  """``(member, read, layout)`` for a consumer a unit can use, or the reason it cannot."""
  if m.kind != "kernel":
    return f"read by {m.path} ({m.kind}), not a Dense/Conv kernel"
  sites = reads.get(m.path, [])
  if len(sites) != 1 or not sites[0].as_stored or _channel_axis(m, sites[0]) is None:
    return f"{m.path} is not read by one plain dot_general/conv on its input axis"
  r = sites[0]
  if dict(r.params).get("feature_group_count", 1) != 1:
    return f"{m.path} is a grouped convolution"
  rows = shapes[m.path][m.axis]
  if m.mapped and m.index.size != rows:   # an offset into a concatenation: the layer reads other channels too
    if m.index.shape[1] != 1 or _channel_axis(m, r) != r.activation_ndim - 1:
      return f"{m.path} reads these {n} channels among {rows} (a concatenation) not on the activation's last axis"
    return m, r, ConcatShare(tuple(int(p) for p in m.index[:, 0]))
  layout = _layout(m, n, _channel_axis(m, r), r.activation_ndim)
  if isinstance(layout, str):
    return f"read by {m.path} {layout}"
  return m, r, layout


def _channel_axis(member, read) -> Optional[int]:
  """The activation axis that the consumer kernel's group axis contracts with, or ``None`` when
  the kernel does not read the group on an input axis. A Dense reads its channels on the last
  axis; a ``DenseGeneral`` over ``(heads, head_dim)`` (an attention output projection) reads a
  head group on the activation's head axis."""
  params = dict(read.params)
  if read.primitive.name == "conv_general_dilated":
    dn = params["dimension_numbers"]
    if member.axis != dn.rhs_spec[1] or dn.lhs_spec[1] != len(dn.lhs_spec) - 1:
      return None
    return len(dn.lhs_spec) - 1
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  kernel_c, act_c = (rc, lc) if read.operand == 1 else (lc, rc)
  if lb or rb or member.axis not in kernel_c:
    return None
  return int(act_c[list(kernel_c).index(member.axis)])


@dataclasses.dataclass(frozen=True)
class CapturedInputs:
  """``hidden_fn`` of a group read by several layers: each reading equation's activation as
  ``(N, P_r, C)`` (positions flattened, channels innermost), concatenated along positions."""
  apply_fn: Callable
  addresses: tuple
  operands: tuple
  channels: int
  apply_kwargs: tuple = ()
  shares: tuple = ()   # per address: a ConcatShare, or None where the layer reads only the group

  def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
    got = capture_at(self.apply_fn, variables, x, list(self.addresses), list(self.operands), **dict(self.apply_kwargs))
    shares = self.shares or (None,) * len(self.addresses)
    return jnp.concatenate([(got[a] if s is None else s.arrange(got[a])).reshape(x.shape[0], -1, self.channels)
                            for a, s in zip(self.addresses, shares)], axis=1)


@dataclasses.dataclass(frozen=True)
class ReadersOutput:
  """``output_fn`` of a group read by several layers: every reading layer (its equation, bias and
  inference-mode norm) on its slice of ``H``, outputs flattened and concatenated: ``(N, sum Q_r)``."""
  layers: tuple         # (KernelOutput or ShareOutput, its H shape without the example axis) per reader

  def __call__(self, params: tuple, hidden: jax.Array) -> jax.Array:
    outs, start = [], 0
    for (layer, shape), p in zip(self.layers, params):
      size = int(np.prod(shape)) // hidden.shape[-1]
      h = hidden[:, start:start + size].reshape((hidden.shape[0],) + tuple(shape))
      start += size
      z = norm_eval(layer(p["layer"], h), p.get("norm"))
      outs.append(z.reshape(z.shape[0], -1))
    return jnp.concatenate(outs, axis=1)


@dataclasses.dataclass(frozen=True)
class ReadersParams:
  """``params_fn`` of :class:`ReadersOutput`: per reader its layer's kernel/bias and norm arrays."""
  layers: tuple         # (LayerParams or ShareParams, NormLink or None) per reader

  def __call__(self, variables: Any) -> tuple:
    out = []
    for layer, link in self.layers:
      p = {"layer": layer(variables)}
      if link is not None:
        p["norm"] = norm_arrays(variables, link)
      out.append(p)
    return tuple(out)


def _several_readers(apply_fn, variables, example, kwargs, g, i, found, norms) -> Unit:
  """A unit whose output is every reading layer's output, concatenated (residual streams, or a
  group read both by a layer and, through a flatten, by another)."""
  addresses = tuple(r.address for _, r, _ in found)
  operands = tuple(r.operand for _, r, _ in found)
  shares = tuple(lay if isinstance(lay, ConcatShare) else None for _, _, lay in found)
  shapes = jax.eval_shape(lambda v, xx: capture_at(apply_fn, v, xx, list(addresses), list(operands), **dict(kwargs)),
                          variables, example)
  readers = [_reading_layer(m, r, lay if isinstance(lay, ConcatShare) else None, norms) for m, r, lay in found]
  layers = tuple((output_fn, tuple(shapes[r.address].shape[1:-1]) + (g.size if s else shapes[r.address].shape[-1],))
                 for (output_fn, _, _), (_, r, _), s in zip(readers, found, shares))
  params = tuple((params_fn, norm) for _, params_fn, norm in readers)
  return Unit(group=g, hidden_fn=CapturedInputs(apply_fn, addresses, operands, g.size, kwargs, shares),
              output_fn=ReadersOutput(layers), params_fn=ReadersParams(params), norm=None,
              name=" + ".join(_layer_name(m.path) for m, _, _ in found), group_index=i, capture=None, affine=True)


def _layout(member, n: int, axis: int, ndim: int):
  """The :class:`ChannelLayout` of the channels on activation axis ``axis`` (``None``: plainly the
  last axis), or why they cannot be laid out as ``(N, ..., C)``."""
  if not member.mapped:
    return None if axis == ndim - 1 else ChannelLayout(axis)
  r = member.index.shape[1]
  if np.array_equal(member.index, np.arange(r)[None, :] * n + np.arange(n)[:, None]):
    return ChannelLayout(axis, r, inner=True)
  if np.array_equal(member.index, np.arange(n)[:, None] * r + np.arange(r)[None, :]):
    return ChannelLayout(axis, r, inner=False)
  return "through a reshape that splits its axis other than into (channels, rows) or (rows, channels)"


def _layer_name(kernel_path: str) -> str:
  """:func:`module_path` without linen's ``"params/"``: ``"params/layer1_0/conv2/kernel"`` ->
  ``"layer1_0/conv2"``, ``"params/w"`` -> ``"w"``; NNX paths lose the leaf name only."""
  path = module_path(kernel_path)
  return path[len("params/"):] if path.startswith("params/") else path


def two_layer_units(apply_fn: Callable, variables: Any, example: Any, groups: Optional[ChannelGroups] = None,
                    **apply_kwargs) -> tuple[Unit, ...]:
  """The two-layer units of a model (see :func:`derive_units`); raises if it has none."""
  units, skipped = derive_units(apply_fn, variables, example, groups, **apply_kwargs)
  if not units:
    reasons = "; ".join(f"group {i}: {why}" for i, why in skipped.items()) or "no prunable group"
    raise ValueError(f"no two-layer unit found ({reasons}); give units by hand with jaxprune.make_unit")
  return units
