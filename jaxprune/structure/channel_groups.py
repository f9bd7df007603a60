"""Channel groups: the (leaf path, axis) slices that share one channel index.

A :class:`Group` is the unit of structured pruning (Torch-Pruning's "dependency group"): removing
channel ``j`` of a group removes slice ``j`` of every member. Members are producers (a kernel's
output axis, biases, norm scales/offsets and statistics) and consumers (a kernel's input axis,
possibly with several rows per channel when a flatten or concatenation sits in between).

Groups come from :func:`jaxprune.groups` (tracing the model) or are built by hand with
:func:`make_group` for what tracing cannot see.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from jaxprune.core.trees import leaves_with_paths

PRODUCER, CONSUMER = "producer", "consumer"
# kernel: a Dense/Conv kernel; depthwise: a depthwise kernel's output axis (ties in and out);
# bias: a vector added or multiplied per channel (mapped like the kernel under a fusion);
# norm: a norm layer's scale/offset; stat: its running statistics (both selected, never mixed).
KINDS = ("kernel", "depthwise", "bias", "norm", "stat")


@dataclasses.dataclass(frozen=True)
class Member:
  """One slice of a group: ``leaf[path]`` along ``axis``.

  Attributes:
    path: leaf path (``"params/layer1_0/conv1/kernel"``; see :func:`jaxprune.trees.path_str`).
    axis: the leaf axis that carries the group's channels.
    role: ``"producer"`` (writes the channels) or ``"consumer"`` (reads them).
    kind: one of ``"kernel"``, ``"depthwise"``, ``"bias"``, ``"norm"``, ``"stat"``.
    index: ``(n, r)`` positions along ``axis`` of each channel's ``r`` rows, or ``None`` when
      channel ``j`` is position ``j`` (the common case). A Dense layer after an NHWC flatten of
      ``(H, W, C)`` has ``r = H * W`` rows per channel.
  """
  path: str
  axis: int
  role: str
  kind: str
  index: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)

  def positions(self, n: int) -> np.ndarray:
    """``(n, r)`` int positions along ``axis`` (``r = 1`` without a mapping)."""
    if self.index is None:
      return np.arange(n)[:, None]
    return self.index

  @property
  def mapped(self) -> bool:
    return self.index is not None

  def __str__(self) -> str:
    extra = f", {self.index.shape[1]} rows/channel" if self.index is not None and self.index.shape[1] > 1 else ""
    extra += ", offset" if self.index is not None and self.index.shape[1] == 1 else ""
    return f"{self.path}[{self.axis}] ({self.kind}{extra})"


def module_path(leaf_path: str) -> str:
  """The module that holds a leaf: ``"params/fc1/kernel"`` -> ``"params/fc1"``. A leaf at the top
  of its tree or of linen's ``params`` (``"w1"``, ``"params/w"``) is its own module."""
  parent, _, _ = leaf_path.rpartition("/")
  return leaf_path if parent in ("", "params") else parent


@dataclasses.dataclass(frozen=True)
class Group:
  """Slices that share one channel index of size ``size``.

  Attributes:
    size: number of channels ``n``.
    producers: producer members (kernels' output axes first, then biases and norms).
    consumers: consumer members (kernels' input axes).
    prunable: whether channels may be removed.
    reason: why not, when ``prunable`` is False.
    mask_note: why masking the channels (``mode="mask"``) only approximates removing them
      (``mode="shrink"``), e.g. a residual stream under LayerNorm or RMSNorm, whose statistics
      still count the zeros; empty when masking equals removal.
  """
  size: int
  producers: tuple[Member, ...]
  consumers: tuple[Member, ...]
  prunable: bool = True
  reason: str = ""
  mask_note: str = ""

  @property
  def members(self) -> tuple[Member, ...]:
    return self.producers + self.consumers

  @property
  def kernels(self) -> tuple[Member, ...]:
    """Producer and consumer kernels (what magnitude importances look at)."""
    return tuple(m for m in self.members if m.kind in ("kernel", "depthwise"))

  @property
  def name(self) -> str:
    """The first producer kernel's module path, e.g. ``"params/layer1_0/conv1"``."""
    for m in self.producers:
      if m.kind in ("kernel", "depthwise"):
        return module_path(m.path)
    return self.producers[0].path if self.producers else "<empty>"

  def modules(self, role: Optional[str] = None, kinds: Sequence[str] = ("kernel", "depthwise")) -> tuple[str, ...]:
    """Module paths of the kernels, optionally of one role."""
    return tuple(module_path(m.path) for m in self.members if m.kind in kinds and (role is None or m.role == role))

  def __str__(self) -> str:
    head = (f"Group(n={self.size}" + ("" if self.prunable else f", unprunable: {self.reason}")
            + (f", {self.mask_note}" if self.mask_note else "") + ")")
    lines = [head] + [f"  producer {m}" for m in self.producers] + [f"  consumer {m}" for m in self.consumers]
    return "\n".join(lines)


def check_groups_fit(variables: Any, groups: Sequence[Group]) -> None:
  """Raises ``ValueError`` naming the member when a group refers to a leaf ``variables`` lacks, or
  to rows its axis does not have (groups traced from another tree, e.g. a linen ``variables``
  dict's groups given its ``["params"]``), before any work."""
  shapes = {path: np.shape(leaf) for path, leaf in leaves_with_paths(variables)}
  for i, g in enumerate(groups):
    for m in g.members:
      shape = shapes.get(m.path)
      if shape is None:
        close = [p for p in shapes if p.endswith("/" + m.path) or m.path.endswith("/" + p)]
        hint = f" (it has {close[0]!r}: were the groups traced from another form of the tree?)" if close else ""
        raise ValueError(f"groups: group {i} refers to {m.path!r}, which params does not have{hint}; "
                         "trace the groups from the tree you prune, jaxprune.groups(apply_fn, params, x)")
      rows = int(m.positions(g.size).max()) + 1 if g.size else 0
      fits = -len(shape) <= m.axis < len(shape) and (shape[m.axis] >= rows if m.mapped else shape[m.axis] == rows)
      if not fits:
        need = f"{rows} rows" if m.mapped else f"exactly {rows} rows (one per channel)"
        raise ValueError(f"groups: group {i} needs {need} on axis {m.axis} of {m.path!r}, whose shape is "
                         f"{shape}; trace the groups from the tree you prune")


@dataclasses.dataclass(frozen=True)
class NormLink:
  """A norm layer that acts per channel right after a kernel (what BatchNorm folding needs).

  Attributes:
    kernel: path of the producer kernel.
    axis: the kernel's output axis.
    kernel_bias: path of the kernel's own bias, or None.
    scale, offset: paths of the norm's scale and bias (None when the norm has none).
    mean, var: paths of the running statistics.
    eps: the epsilon added to ``var`` (read from the trace), or None if it was not found.
  """
  kernel: str
  axis: int
  kernel_bias: Optional[str]
  scale: Optional[str]
  offset: Optional[str]
  mean: str
  var: str
  eps: Optional[float]


class KernelRead(NamedTuple):
  """Where the traced program reads a kernel leaf: one ``dot_general`` or ``conv_general_dilated``.

  Attributes:
    path: the kernel leaf's path.
    address: the equation's position in the jaxpr (indices through nested sub-jaxprs).
    operand: the kernel's operand position (1: ``x @ W``; 0: ``W @ x``); the other is the activation.
    primitive: the JAX primitive, and params: its parameters as sorted ``(name, value)`` pairs.
    kernel_dtype: the dtype the kernel had at the equation.
    as_stored: the kernel enters the equation with the leaf's own axis order (no transpose/reshape).
    bias: the path of the same layer's ``bias`` leaf added to the equation's output, if any.
    activation_ndim: the rank of the other operand (the activation).
  """
  path: str
  address: tuple
  operand: int
  primitive: Any
  params: tuple
  kernel_dtype: Any
  as_stored: bool
  bias: Optional[str] = None
  activation_ndim: int = 0


@dataclasses.dataclass(frozen=True)
class ChannelGroups:
  """The channel groups of a model; iterating and indexing give the prunable groups.

  Attributes:
    groups: prunable groups, ordered output to input (group 0 is nearest the output, as in
      Torch-Pruning's backward order that the Intra-Fusion tables use).
    unprunable: groups that must keep all channels, each with its ``reason``.
    norms: per-channel norm layers following a kernel (for :func:`jaxprune.fold_batchnorm`).
    reads: every equation that reads a kernel (:class:`KernelRead`), for units from the jaxpr.
  """
  groups: tuple[Group, ...]
  unprunable: tuple[Group, ...] = ()
  norms: tuple[NormLink, ...] = ()
  reads: tuple = ()

  def __len__(self) -> int:
    return len(self.groups)

  def __iter__(self) -> Iterator[Group]:
    return iter(self.groups)

  def __getitem__(self, i: int) -> Group:
    return self.groups[i]

  def exclude(self, patterns: Union[str, Sequence[str]]) -> "ChannelGroups":
    """Moves groups with any member path matching a glob (``"*fc*"``) to ``unprunable``."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    keep, drop = [], []
    for g in self.groups:
      hit = [m.path for m in g.members if any(fnmatch.fnmatchcase(m.path, p) for p in patterns)]
      if hit:
        drop.append(dataclasses.replace(g, prunable=False, reason=f"excluded by the user ({hit[0]})"))
      else:
        keep.append(g)
    return dataclasses.replace(self, groups=tuple(keep), unprunable=self.unprunable + tuple(drop))

  def add(self, *groups: Group) -> "ChannelGroups":
    """Appends hand-made groups (see :func:`make_group`) after the traced ones."""
    return dataclasses.replace(self, groups=self.groups + tuple(groups))

  def describe(self) -> str:
    """A printable table: index, size, producers, consumers."""
    rows = []
    for i, g in enumerate(self.groups):
      prods = ", ".join(g.modules(PRODUCER))
      cons = ", ".join(g.modules(CONSUMER)) or "-"
      rows.append(f"{i:>3} {g.size:>5}  {prods}  ->  {cons}" + ("  (mask approximate)" if g.mask_note else ""))
    for g in self.unprunable:
      rows.append(f"  - {g.size:>5}  {', '.join(g.modules(PRODUCER)) or g.name}: {g.reason}")
    return "  #     n  producers  ->  consumers\n" + "\n".join(rows)

  def __str__(self) -> str:
    return self.describe()


MemberSpec = Union[Member, tuple]


def _leaf_shapes(variables: Any) -> dict[str, tuple[int, ...]]:
  return {p: tuple(np.shape(leaf)) for p, leaf in leaves_with_paths(variables)}


def _member(spec: MemberSpec, role: str, shapes: dict, arg: str) -> Member:
  if isinstance(spec, Member):
    m = dataclasses.replace(spec, role=role)
  else:
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
      raise TypeError(f"{arg}: each entry must be a Member or (path, axis[, kind]), got {spec!r}")
    path, axis = spec[0], spec[1]
    if path not in shapes:
      raise KeyError(f"{arg}: no leaf at path {path!r}; leaves are e.g. {sorted(shapes)[:5]}")
    ndim = len(shapes[path])
    kind = spec[2] if len(spec) == 3 else ("kernel" if ndim >= 2 else "bias")
    m = Member(path=path, axis=int(axis) % max(ndim, 1), role=role, kind=kind)
  if m.path not in shapes:
    raise KeyError(f"{arg}: no leaf at path {m.path!r}")
  if m.kind not in KINDS:
    raise ValueError(f"{arg}: kind must be one of {KINDS}, got {m.kind!r}")
  if not 0 <= m.axis < len(shapes[m.path]):
    raise ValueError(f"{arg}: axis {m.axis} out of range for {m.path} of shape {shapes[m.path]}")
  return m


def make_group(variables: Any, producers: Sequence[MemberSpec], consumers: Sequence[MemberSpec] = (),
               size: Optional[int] = None) -> Group:
  """A group built by hand, for couplings that tracing cannot see.

  Args:
    variables: the tree the paths refer to (shapes are checked against it).
    producers: ``(path, axis)`` or ``(path, axis, kind)`` entries, or :class:`Member` objects
      (use ``Member(..., index=...)`` for several rows per channel). Kind defaults to
      ``"kernel"`` for leaves with 2+ dims and ``"bias"`` for vectors; pass ``"norm"``/``"stat"``
      for norm parameters and statistics so that fusions select rather than mix them.
    consumers: the same for the layers that read the channels.
    size: number of channels; inferred from the first member when omitted.

  Returns:
    a :class:`Group`. Every member's axis (or index) must cover exactly ``size`` channels.

  Example::

    g = make_group(variables, producers=[("params/fc1/kernel", 1), ("params/fc1/bias", 0)],
                   consumers=[("params/fc2/kernel", 0)])
  """
  shapes = _leaf_shapes(variables)
  prods = [_member(p, PRODUCER, shapes, "producers") for p in producers]
  cons = [_member(c, CONSUMER, shapes, "consumers") for c in consumers]
  if not prods:
    raise ValueError("producers: a group needs at least one producer")
  first = prods[0]
  n = size if size is not None else (first.index.shape[0] if first.index is not None else shapes[first.path][first.axis])
  for m in prods + cons:
    length = shapes[m.path][m.axis]
    if m.index is None and length != n:
      raise ValueError(f"{m.role}s: {m.path} axis {m.axis} has {length} entries, the group has size {n}")
    if m.index is not None:
      idx = np.asarray(m.index)
      if idx.ndim != 2 or idx.shape[0] != n or idx.min() < 0 or idx.max() >= length:
        raise ValueError(f"{m.role}s: index of {m.path} must be (n={n}, r) positions below {length}")
  return Group(size=int(n), producers=tuple(prods), consumers=tuple(cons))
