"""Channel groups from the jaxpr: the JAX counterpart of Torch-Pruning's dependency graph.

Every array axis in the traced computation is described by a list of *factors*, each a node of
a union-find over index spaces. An op that makes two axes share an index (a conv's input
features and its kernel's input axis, the operands of a residual add, a bias broadcast onto
a feature map) unifies their nodes; a reshape splits or merges factors (so a flatten of
``(H, W, C)`` keeps ``C`` as the innermost factor of the flat axis), and a concatenation or a
slice gives a node *parts* at offsets. After the walk, the classes that hold a kernel's output
axis are the channel groups; the parameter axes in a class are its members, and their positions
along the leaf axis come from the factor/part structure. Classes touched by an op this module
does not understand, or that meet the model's inputs or outputs, are marked unprunable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend as jex
import numpy as np

from jaxprune.channel_groups import CONSUMER, PRODUCER, ChannelGroups, Group, Member, NormLink
from jaxprune.trees import leaves_with_paths


class _Node:
  __slots__ = ("parent", "size", "split", "parts", "reasons")

  def __init__(self, size: int):
    self.parent = None
    self.size = size
    self.split = None   # tuple of nodes: this index space is their product (major first)
    self.parts = None   # tuple of factor tuples: this index space is their concatenation
    self.reasons = set()


class _Classes:
  """Union-find over index spaces with product (split) and sum (parts) structure."""

  def new(self, size: int) -> _Node:
    return _Node(int(size))

  def axis(self, size: int) -> tuple:
    return () if size == 1 else (self.new(size),)

  def find(self, x: _Node) -> _Node:
    root = x
    while root.parent is not None:
      root = root.parent
    while x.parent is not None and x.parent is not root:
      x.parent, x = root, x.parent
    return root

  def expand(self, axis: Sequence[_Node]) -> list:
    """Roots of an axis's factors, major first; splits resolved, parts kept as one node."""
    out = []
    for node in axis:
      root = self.find(node)
      if root.split is not None:
        out.extend(self.expand(root.split))
      else:
        out.append(root)
    return out

  def leaves(self, axis: Sequence[_Node]) -> list:
    """All leaf classes under an axis (recursing into parts)."""
    out = []
    for root in self.expand(axis):
      if root.parts is not None:
        for part in root.parts:
          out.extend(self.leaves(part))
      else:
        out.append(root)
    return out

  def mark(self, axes: Sequence[Sequence[_Node]], reason: str) -> None:
    for axis in axes:
      for leaf in self.leaves(axis):
        leaf.reasons.add(reason)

  def _split(self, node: _Node, sizes: Sequence[int]) -> bool:
    if node.parts is not None:
      return False
    node.split = tuple(self.new(s) for s in sizes)
    for child in node.split:
      child.reasons |= node.reasons
    return True

  def refine(self, nodes: list, bounds: Sequence[int]) -> Optional[list]:
    """Splits nodes so that the cumulative sizes (major first) hit every boundary in ``bounds``."""
    bounds = sorted(set(int(b) for b in bounds))
    lo = 1
    for node in nodes:
      hi = lo * node.size
      inner = [b for b in bounds if lo < b < hi]
      if inner:
        chain = [lo] + inner + [hi]
        if any(b % a for a, b in zip(chain, chain[1:])):
          return None
        if not self._split(node, [b // a for a, b in zip(chain, chain[1:])]):
          return None
      lo = hi
    return self.expand(nodes)

  def unify(self, a: Sequence[_Node], b: Sequence[_Node], where: str) -> None:
    """Makes two axes (factor lists) the same index space."""
    A, B = self.expand(a), self.expand(b)
    if math.prod(n.size for n in A) != math.prod(n.size for n in B):
      self.mark([a, b], f"{where}: axes of different sizes were combined")
      return
    if [n.size for n in A] != [n.size for n in B]:
      bounds = list(np.cumprod([n.size for n in A])) + list(np.cumprod([n.size for n in B]))
      A2, B2 = self.refine(A, bounds), self.refine(B, bounds)
      if A2 is None or B2 is None or [n.size for n in A2] != [n.size for n in B2]:
        self.mark([a, b], f"{where}: a reshape mixes channels with other axes")
        return
      A, B = A2, B2
    for x, y in zip(A, B):
      self._union(x, y, where)

  def _union(self, x: _Node, y: _Node, where: str) -> None:
    x, y = self.find(x), self.find(y)
    if x is y:
      return
    if x.parts is not None and y.parts is not None:
      if [math.prod(n.size for n in p) for p in x.parts] != [math.prod(n.size for n in p) for p in y.parts]:
        self.mark([(x,), (y,)], f"{where}: concatenations with different offsets meet")
        return
      y.parent = x
      x.reasons |= y.reasons
      for p, q in zip(x.parts, y.parts):
        self.unify(p, q, where)
      return
    y.parent = x
    if x.parts is None:
      x.parts = y.parts
    x.reasons |= y.reasons
    if x.parts is not None and x.reasons:
      for reason in list(x.reasons):
        self.mark(x.parts, reason)

  def coords(self, axis: Sequence[_Node]) -> dict:
    """``{leaf class: (L,) int array}``: each position's channel in that class, or -1."""
    roots = self.expand(axis)
    sizes = [r.size for r in roots]
    length = math.prod(sizes)
    out: dict = {}
    for i, root in enumerate(roots):
      if root.parts is not None:
        sub, offset = {}, 0
        for part in root.parts:
          plen = math.prod(n.size for n in self.expand(part))
          for cls, c in self.coords(part).items():
            arr = sub.setdefault(cls, np.full(root.size, -1, np.int64))
            arr[offset:offset + plen] = np.where(c >= 0, c, arr[offset:offset + plen])
          offset += plen
      else:
        sub = {root: np.arange(root.size)}
      for cls, c in sub.items():
        shape = [1] * len(sizes)
        shape[i] = sizes[i]
        full = np.broadcast_to(c.reshape(shape), sizes).reshape(length)
        if cls in out:  # the same channel on two factors of a product: no per-channel slice
          out[cls] = None
        else:
          out[cls] = full.copy()
    return out


@dataclasses.dataclass
class _Info:
  axes: tuple                      # one factor tuple per array axis
  data: bool = False               # depends on the model's (non-parameter) inputs
  prov: Optional[tuple] = None     # (leaf id, per-axis tuple of leaf axes): a re-laid-out parameter
  deps: frozenset = frozenset()    # parameter leaves a non-data value is computed from
  affine: Optional[int] = None     # kernel leaf whose output this is, up to per-channel affine ops


_ELEMENTWISE = set("""
neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan
sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs not integer_pow erf erfc erf_inv lgamma digamma
convert_element_type copy copy_p real imag conj square reduce_precision population_count clz
add sub mul div rem pow max min atan2 nextafter and or xor eq ne lt le gt ge select_n clamp
shift_left shift_right_logical shift_right_arithmetic add_any igamma igammac polygamma zeta
random_gamma_grad bessel_i0e bessel_i1e regularized_incomplete_beta
""".split())
_LAYOUT = {"convert_element_type", "copy", "copy_p", "reduce_precision"}
_AFFINE = {"add", "sub", "mul", "div", "convert_element_type", "copy", "copy_p", "neg"}
_IDENTITY = {"device_put", "optimization_barrier", "sharding_constraint", "mesh_cast", "reshard"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort"}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
_SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _shape(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))


class _Tracer:
  """Walks a jaxpr and records index classes, kernel roles and per-channel affine chains."""

  def __init__(self):
    self.cls = _Classes()
    self.roles: dict = {}         # (leaf, axis) -> set of "out" / "in" / "depthwise"
    self.order: dict = {}         # kernel leaf -> index of the op where it is last used
    self.attached: dict = {}      # kernel leaf -> parameter leaves applied per channel after it
    self.eps: dict = {}           # leaf -> scalar added to it (a norm's epsilon)
    self.step = 0

  # -- helpers ---------------------------------------------------------------------------------
  def fresh(self, shape) -> tuple:
    return tuple(self.cls.axis(d) for d in shape)

  def literal(self, v) -> _Info:
    return _Info(axes=self.fresh(_shape(v)))

  def read(self, env, v) -> _Info:
    if isinstance(v, jex.core.Literal):
      return self.literal(v)
    return env[v]

  def opaque(self, infos, outs, reason) -> None:
    self.cls.mark([a for info in list(infos) + list(outs) for a in info.axes], reason)

  # -- the walk ------------------------------------------------------------------------------------
  def run(self, jaxpr, consts_infos, in_infos) -> list:
    env = {}
    for v, info in zip(jaxpr.constvars, consts_infos):
      env[v] = info
    for v, info in zip(jaxpr.invars, in_infos):
      env[v] = info
    for eqn in jaxpr.eqns:
      self.step += 1
      infos = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, infos)
      for v, info in zip(eqn.outvars, outs):
        env[v] = info
    return [self.read(env, v) for v in jaxpr.outvars]

  def eqn(self, eqn, infos) -> list:
    name = eqn.primitive.name
    out_shapes = [_shape(v) for v in eqn.outvars]
    data = any(i.data for i in infos)
    deps = frozenset() if data else frozenset().union(*[i.deps for i in infos]) if infos else frozenset()
    sub = self._subjaxpr(eqn)
    if sub is not None:
      jaxpr, consts = sub
      consts_infos = [_Info(axes=self.fresh(np.shape(c))) for c in consts]
      return self.run(jaxpr, consts_infos, infos)
    if name in _ELEMENTWISE:
      return [self.elementwise(name, eqn, infos, out_shapes[0], data, deps)]
    if name in _IDENTITY:
      return [dataclasses.replace(i) for i in infos[:len(out_shapes)]]
    handler = getattr(self, "op_" + name, None)
    if handler is not None:
      outs = handler(eqn, infos, out_shapes)
      for o in outs:
        o.data = data
        o.deps = deps if not data else frozenset()
      return outs
    outs = [_Info(axes=self.fresh(s), data=data, deps=deps) for s in out_shapes]
    self.opaque(infos, outs, f"unsupported operation '{name}'")
    return outs

  def _subjaxpr(self, eqn):
    for key in _SUBJAXPR_KEYS:
      j = eqn.params.get(key)
      if isinstance(j, jex.core.ClosedJaxpr) and len(j.jaxpr.invars) == len(eqn.invars):
        return j.jaxpr, j.consts
      if isinstance(j, jex.core.Jaxpr) and len(j.invars) == len(eqn.invars) and not j.constvars:
        return j, ()
    return None

  # -- element-wise ops (with size-1 broadcasting) ------------------------------------------------
  def elementwise(self, name, eqn, infos, shape, data, deps) -> _Info:
    axes = []
    for i, d in enumerate(shape):
      same = [info.axes[i] for info, v in zip(infos, eqn.invars)
              if len(_shape(v)) == len(shape) and _shape(v)[i] == d]
      if d == 1 or not same:
        axes.append(self.cls.axis(d))
        continue
      for other in same[1:]:
        self.cls.unify(same[0], other, name)
      axes.append(same[0])
    out = _Info(axes=tuple(axes), data=data, deps=deps if not data else frozenset())
    provs = [i for i in infos if i.prov is not None]
    scalars_only = all(i.prov is not None or (isinstance(v, jex.core.Literal) and not _shape(v))
                       for i, v in zip(infos, eqn.invars))
    if len(provs) == 1 and scalars_only and (name in _LAYOUT or name in ("mul", "div", "neg")):
      leaf, amap = provs[0].prov
      if len(amap) == len(shape):
        out.prov = (leaf, amap)
    if name == "add" and not data:
      lits = [v for v in eqn.invars if isinstance(v, jex.core.Literal) and not _shape(v)]
      others = [i for i, v in zip(infos, eqn.invars) if not isinstance(v, jex.core.Literal)]
      if len(lits) == 1 and len(others) == 1 and len(others[0].deps) == 1:
        self.eps[next(iter(others[0].deps))] = float(lits[0].val)
    if data and name in _AFFINE:
      carriers = [i for i in infos if i.data]
      if len(carriers) == 1 and carriers[0].affine is not None:
        kernel = carriers[0].affine
        out.affine = kernel
        extra = frozenset().union(*[i.deps for i in infos if not i.data])
        self.attached.setdefault(kernel, [])
        for leaf in sorted(extra):
          if leaf not in self.attached[kernel]:
            self.attached[kernel].append(leaf)
    return out

  # -- layout ops ---------------------------------------------------------------------------------
  def op_broadcast_in_dim(self, eqn, infos, out_shapes):
    (x,), shape = infos, out_shapes[0]
    bdims = eqn.params["broadcast_dimensions"]
    in_shape = _shape(eqn.invars[0])
    axes, amap = [], []
    for i, d in enumerate(shape):
      if i in bdims and in_shape[bdims.index(i)] == d:
        j = bdims.index(i)
        axes.append(x.axes[j])
        amap.append(x.prov[1][j] if x.prov else ())
      else:
        axes.append(self.cls.axis(d))
        amap.append(())
    return [_Info(axes=tuple(axes), prov=(x.prov[0], tuple(amap)) if x.prov else None, affine=x.affine)]

  def op_transpose(self, eqn, infos, out_shapes):
    (x,), perm = infos, eqn.params["permutation"]
    prov = (x.prov[0], tuple(x.prov[1][p] for p in perm)) if x.prov else None
    return [_Info(axes=tuple(x.axes[p] for p in perm), prov=prov)]

  def op_squeeze(self, eqn, infos, out_shapes):
    (x,) = infos
    drop = {d % len(x.axes) for d in eqn.params["dimensions"]}
    keep = [i for i in range(len(x.axes)) if i not in drop]
    prov = (x.prov[0], tuple(x.prov[1][i] for i in keep)) if x.prov else None
    return [_Info(axes=tuple(x.axes[i] for i in keep), prov=prov, affine=x.affine)]

  def op_reshape(self, eqn, infos, out_shapes):
    x = infos[0]
    shape = out_shapes[0]
    in_axes = list(x.axes)
    src_amap = list(x.prov[1]) if x.prov else [()] * len(in_axes)
    if eqn.params.get("dimensions") is not None:
      perm = eqn.params["dimensions"]
      in_axes, src_amap = [in_axes[p] for p in perm], [src_amap[p] for p in perm]
    flat, owner = [], []
    for i, axis in enumerate(in_axes):
      for node in self.cls.expand(axis):
        flat.append(node)
        owner.append(i)
    bounds = list(np.cumprod([d for d in shape if d != 1]))
    if self.cls.refine(flat, bounds) is None:
      out = _Info(axes=self.fresh(shape))
      self.opaque([x], [out], "reshape: a reshape mixes channels with other axes")
      return [out]
    refined, refined_owner = [], []
    for node, o in zip(flat, owner):
      pieces = self.cls.expand([node])
      refined.extend(pieces)
      refined_owner.extend([o] * len(pieces))
    axes, amap, k = [], [], 0
    for d in shape:
      if d == 1:
        axes.append(())
        amap.append(())
        continue
      take, owners, prod = [], set(), 1
      while prod < d and k < len(refined):
        take.append(refined[k])
        owners.add(refined_owner[k])
        prod *= refined[k].size
        k += 1
      if prod != d:
        out = _Info(axes=self.fresh(shape))
        self.opaque([x], [out], "reshape: a reshape mixes channels with other axes")
        return [out]
      axes.append(tuple(take))
      amap.append(tuple(sorted(set().union(*[set(src_amap[o]) for o in owners]))))
    prov = (x.prov[0], tuple(amap)) if x.prov else None
    return [_Info(axes=tuple(axes), prov=prov)]

  def op_concatenate(self, eqn, infos, out_shapes):
    dim, shape = eqn.params["dimension"], out_shapes[0]
    axes = []
    for i, d in enumerate(shape):
      if i == dim:
        node = self.cls.new(d)
        node.parts = tuple(info.axes[i] for info, v in zip(infos, eqn.invars) if _shape(v)[i] > 0)
        axes.append((node,))
      else:
        same = [info.axes[i] for info in infos if d != 1]
        for other in same[1:]:
          self.cls.unify(same[0], other, "concatenate")
        axes.append(same[0] if same else ())
    return [_Info(axes=tuple(axes))]

  def _cut(self, axis, cuts: Sequence[int], where: str):
    """Pieces of an axis between consecutive offsets ``cuts`` (first 0, last its size)."""
    roots = self.cls.expand(axis)
    sizes = [b - a for a, b in zip(cuts, cuts[1:])]
    if len(roots) != 1:
      return None
    root = roots[0]
    if root.parts is None:
      root.parts = tuple(self.cls.axis(s) if s > 0 else () for s in sizes)
      if root.reasons:
        for reason in list(root.reasons):
          self.cls.mark(root.parts, reason)
      return list(root.parts)
    offsets = np.cumsum([0] + [math.prod(n.size for n in self.cls.expand(p)) for p in root.parts])
    pieces = []
    for a, b in zip(cuts, cuts[1:]):
      if a not in offsets or b not in offsets:
        return None
      i, j = list(offsets).index(a), list(offsets).index(b)
      if j - i == 1:
        pieces.append(root.parts[i])
      else:
        node = self.cls.new(b - a)
        node.parts = root.parts[i:j]
        pieces.append((node,))
    return pieces

  def op_slice(self, eqn, infos, out_shapes):
    (x,), shape = infos, out_shapes[0]
    in_shape = _shape(eqn.invars[0])
    strides = eqn.params.get("strides") or (1,) * len(shape)
    axes = []
    for i, d in enumerate(shape):
      start, limit = eqn.params["start_indices"][i], eqn.params["limit_indices"][i]
      if start == 0 and limit == in_shape[i] and strides[i] == 1:
        axes.append(x.axes[i])
        continue
      pieces = None
      if strides[i] == 1 and in_shape[i] > 1:
        cuts = sorted({0, start, limit, in_shape[i]})
        pieces = self._cut(x.axes[i], cuts, "slice")
      if pieces is None:
        self.cls.mark([x.axes[i]], "slice: strided or structured slice of a channel axis")
        axes.append(self.cls.axis(d))
      else:
        axes.append(pieces[sorted({0, start, limit, in_shape[i]}).index(start)] if d > 1 else ())
    return [_Info(axes=tuple(axes))]

  def op_split(self, eqn, infos, out_shapes):
    (x,) = infos
    axis = eqn.params["axis"] % len(x.axes)
    sizes = [int(s) for s in eqn.params["sizes"]]
    cuts = list(np.cumsum([0] + sizes))
    pieces = self._cut(x.axes[axis], cuts, "split") if _shape(eqn.invars[0])[axis] > 1 else None
    if pieces is None:
      self.cls.mark([x.axes[axis]], "split: structured split of a channel axis")
      pieces = [self.cls.axis(s) for s in sizes]
    outs = []
    for shape, piece in zip(out_shapes, pieces):
      axes = list(x.axes)
      axes[axis] = piece if shape[axis] > 1 else ()
      outs.append(_Info(axes=tuple(axes)))
    return outs

  def op_pad(self, eqn, infos, out_shapes):
    x, shape = infos[0], out_shapes[0]
    axes = []
    for i, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
      if (lo, hi, interior) == (0, 0, 0):
        axes.append(x.axes[i])
      elif interior == 0 and lo >= 0 and hi >= 0 and _shape(eqn.invars[0])[i] > 1:
        node = self.cls.new(shape[i])
        node.parts = tuple(p for p in (self.cls.axis(lo) if lo else None, x.axes[i],
                                       self.cls.axis(hi) if hi else None) if p is not None)
        axes.append((node,))
      else:
        self.cls.mark([x.axes[i]], "pad: negative or interior padding of an axis")
        axes.append(self.cls.axis(shape[i]))
    return [_Info(axes=tuple(axes))]

  def op_rev(self, eqn, infos, out_shapes):
    (x,) = infos
    dims = set(eqn.params["dimensions"])
    axes = []
    for i, d in enumerate(out_shapes[0]):
      if i in dims:
        self.cls.mark([x.axes[i]], "rev: reversed axis")
        axes.append(self.cls.axis(d))
      else:
        axes.append(x.axes[i])
    # a transposed conv flips its kernel's spatial axes: the kernel stays a kernel
    return [_Info(axes=tuple(axes), prov=x.prov)]

  # -- reductions and pooling ---------------------------------------------------------------------
  def _reduce(self, eqn, infos, out_shapes):
    x = infos[0]
    red = {a % max(len(x.axes), 1) for a in eqn.params["axes"]}
    return [_Info(axes=tuple(a for i, a in enumerate(x.axes) if i not in red))]

  def _window(self, eqn, infos, out_shapes):
    n_ops = len(out_shapes)
    outs = []
    p = eqn.params
    for op in range(n_ops):
      x, shape = infos[op], out_shapes[op]
      axes = []
      for i, d in enumerate(shape):
        trivial = (p["window_dimensions"][i] == 1 and p["window_strides"][i] == 1
                   and tuple(p["padding"][i]) == (0, 0) and p["base_dilation"][i] == 1
                   and p["window_dilation"][i] == 1)
        axes.append(x.axes[i] if trivial else self.cls.axis(d))
      outs.append(_Info(axes=tuple(axes)))
    return outs

  def _along_axis(self, eqn, infos, out_shapes):
    # cumulative ops and sort mix the entries along one axis: that axis is not per-channel
    axis = eqn.params.get("axis", eqn.params.get("dimension", -1))
    outs = []
    for info in infos[:len(out_shapes)]:
      self.cls.mark([info.axes[axis]], f"{eqn.primitive.name} mixes entries along an axis")
      outs.append(_Info(axes=info.axes))
    return outs

  # -- contractions ----------------------------------------------------------------------------------
  def _role(self, info: _Info, axis: int, role: str) -> bool:
    if info.prov is None:
      return False
    leaf, amap = info.prov
    for a in amap[axis]:
      self.roles.setdefault((leaf, a), set()).add(role)
    self.order[leaf] = self.step
    return True

  def _kernel_check(self, infos, where):
    lhs, rhs = infos
    for op in (lhs, rhs):
      if not op.data and op.prov is None and op.deps:
        self.cls.mark(op.axes, f"{where}: kernel computed from parameters before use")

  def op_dot_general(self, eqn, infos, out_shapes):
    lhs, rhs = infos
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc):
      self.cls.unify(lhs.axes[a], rhs.axes[b], "dot_general")
    for a, b in zip(lb, rb):
      self.cls.unify(lhs.axes[a], rhs.axes[b], "dot_general")
    lfree = [i for i in range(len(lhs.axes)) if i not in lc and i not in lb]
    rfree = [i for i in range(len(rhs.axes)) if i not in rc and i not in rb]
    axes = [lhs.axes[a] for a in lb] + [lhs.axes[a] for a in lfree] + [rhs.axes[a] for a in rfree]
    out = _Info(axes=tuple(axes))
    self._kernel_check(infos, "dot_general")
    for kernel, act, contract, free in ((rhs, lhs, rc, rfree), (lhs, rhs, lc, lfree)):
      if kernel.prov is not None and act.data:
        for a in contract:
          self._role(kernel, a, "in")
        for a in free:
          self._role(kernel, a, "out")
        outs_leaf = [x for a in free for x in kernel.prov[1][a]]
        if outs_leaf:
          out.affine = kernel.prov[0]
    return [out]

  def op_conv_general_dilated(self, eqn, infos, out_shapes):
    lhs, rhs = infos
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    shape = out_shapes[0]
    if p.get("batch_group_count", 1) != 1:
      out = _Info(axes=self.fresh(shape))
      self.opaque(infos, [out], "conv_general_dilated with batch_group_count > 1")
      return [out]
    axes = [None] * len(shape)
    axes[out_spec[0]] = lhs.axes[lhs_spec[0]]
    for d in out_spec[2:]:
      axes[d] = self.cls.axis(shape[d])
    groups = p["feature_group_count"]
    rhs_shape = _shape(eqn.invars[1])
    c_in_per_group = rhs_shape[rhs_spec[1]]
    c_out = rhs_shape[rhs_spec[0]]
    g_axis = self.cls.axis(groups)
    in_per = rhs.axes[rhs_spec[1]]
    out_per = self.cls.axis(c_out // groups)
    self.cls.unify(lhs.axes[lhs_spec[1]], g_axis + in_per, "conv_general_dilated")
    self.cls.unify(rhs.axes[rhs_spec[0]], g_axis + out_per, "conv_general_dilated")
    axes[out_spec[1]] = rhs.axes[rhs_spec[0]]
    out = _Info(axes=tuple(axes))
    self._kernel_check(infos, "conv_general_dilated")
    if rhs.prov is not None and lhs.data:
      depthwise = groups > 1 and c_in_per_group == 1
      self._role(rhs, rhs_spec[0], "depthwise" if depthwise else "out")
      if not depthwise:
        self._role(rhs, rhs_spec[1], "in")
      out.affine = rhs.prov[0]
    return [out]


for _name in _REDUCE:
  setattr(_Tracer, "op_" + _name, _Tracer._reduce)
for _name in _CUMULATIVE:
  setattr(_Tracer, "op_" + _name, _Tracer._along_axis)
for _name in _WINDOW:
  setattr(_Tracer, "op_" + _name, _Tracer._window)


def _module_of(path: str, linen: bool) -> str:
  parts = path.split("/")[:-1]
  return "/".join(parts[1:] if linen else parts)


def _norm_modules(paths: Sequence[str], linen: bool) -> dict:
  """``{module: {leaf name: path}}`` for modules holding running ``mean`` and ``var``."""
  by_module: dict = {}
  for p in paths:
    by_module.setdefault(_module_of(p, linen), {})[p.rsplit("/", 1)[-1]] = p
  return {m: leaves for m, leaves in by_module.items() if "mean" in leaves and "var" in leaves}


def groups(apply_fn: Callable[..., Any], variables: Any, *example_args: Any, exclude: Sequence[str] = (),
           **example_kwargs: Any) -> ChannelGroups:
  """The channel groups of a model, found by tracing ``apply_fn(variables, *args, **kwargs)``.

  The model is traced once with :func:`jax.make_jaxpr` (nothing runs; example inputs may be
  :class:`jax.ShapeDtypeStruct`). Index spaces are propagated through ``dot_general``,
  ``conv_general_dilated`` (grouped and depthwise), element-wise ops with broadcasting,
  reductions and pooling, reshape/flatten, transpose, concatenate/slice/split/pad and the
  sub-jaxprs that Flax and JAX create (``jit``, ``custom_jvp``/``custom_vjp`` calls, ``remat``).
  Channels that reach the model output or come from its input are not prunable; neither are
  those touched by an op this tracer does not understand (``unprunable`` says which and why).

  Trace the *inference* call (BatchNorm on running statistics): a training call that returns
  updated statistics would make every normalised channel reach the output.

  Args:
    apply_fn: ``apply_fn(variables, *example_args, **example_kwargs) -> outputs``, e.g.
      ``model.apply`` (linen) or ``lambda state, x: nnx.merge(graphdef, state)(x)`` (NNX).
    variables: the parameter tree (linen ``variables`` dict or ``nnx.State``); member paths refer
      to its leaves.
    *example_args, **example_kwargs: example inputs. Array leaves are traced; other values
      (``train=False``) are passed as they are.
    exclude: glob patterns on leaf paths; groups with a matching member are not prunable.

  Returns:
    :class:`ChannelGroups`: prunable groups ordered output to input (group 0 nearest the output),
    the unprunable ones with reasons, and the norm layers that follow a kernel.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
  leaves = leaves_with_paths(variables)
  if not leaves:
    raise ValueError("variables: the tree has no leaves")
  paths = [p for p, _ in leaves]
  linen = hasattr(variables, "keys") and "params" in variables.keys()
  flat_in, in_tree = jax.tree_util.tree_flatten((example_args, example_kwargs))
  is_array = [hasattr(x, "shape") and hasattr(x, "dtype") for x in flat_in]
  dynamic = [x for x, a in zip(flat_in, is_array) if a]

  def fun(v, dyn):
    it = iter(dyn)
    full = [next(it) if a else x for x, a in zip(flat_in, is_array)]
    args, kwargs = jax.tree_util.tree_unflatten(in_tree, full)
    return apply_fn(v, *args, **kwargs)

  closed = jax.make_jaxpr(fun)(variables, dynamic)
  jaxpr = closed.jaxpr
  n = len(leaves)
  if len(jaxpr.invars) < n:
    raise ValueError("variables: the traced function has fewer inputs than the tree has leaves")
  tr = _Tracer()
  in_infos = []
  for i, v in enumerate(jaxpr.invars):
    shape = _shape(v)
    info = _Info(axes=tr.fresh(shape))
    if i < n:
      info.prov = (i, tuple((a,) for a in range(len(shape))))
      info.deps = frozenset((i,))
    else:
      info.data = True
    in_infos.append(info)
  const_infos = [_Info(axes=tr.fresh(np.shape(c))) for c in closed.consts]
  outs = tr.run(jaxpr, const_infos, in_infos)
  tr.cls.mark([a for info in in_infos[n:] for a in info.axes], "comes from the model input")
  tr.cls.mark([a for info in outs for a in info.axes], "reaches the model output")
  result = _collect(tr, in_infos[:n], paths, linen)
  return result.exclude(exclude) if exclude else result


def _collect(tr: _Tracer, param_infos, paths, linen: bool) -> ChannelGroups:
  norms = _norm_modules(paths, linen)
  norm_kind = {}
  for leaves in norms.values():
    for name, p in leaves.items():
      norm_kind[p] = "stat" if name in ("mean", "var") else "norm"
  members: dict = {}   # class root -> list of (order, Member)
  conflicts: dict = {}
  for leaf, info in enumerate(param_infos):
    for axis, factors in enumerate(info.axes):
      if not factors:
        continue
      roles = tr.roles.get((leaf, axis), set())
      for cls, coord in tr.cls.coords(factors).items():
        if coord is None:
          tr.cls.mark([(cls,)], f"{paths[leaf]} carries the same channel on two factors of one axis")
          continue
        n = cls.size
        counts = np.bincount(coord[coord >= 0], minlength=n)
        if counts.min() != counts.max() or counts.min() == 0:
          tr.cls.mark([(cls,)], f"{paths[leaf]}: channels occupy uneven numbers of positions")
          continue
        identity = len(coord) == n and np.array_equal(coord, np.arange(n))
        index = None
        if not identity:
          positions = np.nonzero(coord >= 0)[0]
          index = positions[np.argsort(coord[positions], kind="stable")].reshape(n, -1)
        if {"out", "in"} <= roles or {"depthwise", "in"} <= roles:
          conflicts[cls] = paths[leaf]
        if "depthwise" in roles:
          role, kind = PRODUCER, "depthwise"
        elif "out" in roles:
          role, kind = PRODUCER, "kernel"
        elif "in" in roles:
          role, kind = CONSUMER, "kernel"
        else:
          role, kind = PRODUCER, norm_kind.get(paths[leaf], "bias")
        order = tr.order.get(leaf, -1)
        members.setdefault(cls, []).append((order, Member(paths[leaf], axis, role, kind, index)))
  for cls, path in conflicts.items():
    tr.cls.mark([(cls,)], f"{path} reads and writes the same channels")
  prunable, unprunable = [], []
  for cls, entries in members.items():
    cls = tr.cls.find(cls)
    kernels = [(o, m) for o, m in entries if m.role == PRODUCER and m.kind in ("kernel", "depthwise")]
    if not kernels:
      continue
    kind_rank = {"kernel": 0, "depthwise": 0, "bias": 1, "norm": 2, "stat": 3}
    prods = sorted((e for e in entries if e[1].role == PRODUCER),
                   key=lambda e: (kind_rank[e[1].kind], -e[0], e[1].path))
    cons = sorted((e for e in entries if e[1].role == CONSUMER), key=lambda e: (-e[0], e[1].path))
    reasons = sorted(cls.reasons)
    g = Group(size=cls.size, producers=tuple(m for _, m in prods), consumers=tuple(m for _, m in cons),
              prunable=not reasons, reason="; ".join(reasons))
    last = max(o for o, _ in kernels)
    (prunable if g.prunable else unprunable).append((last, g))
  prunable.sort(key=lambda e: -e[0])
  unprunable.sort(key=lambda e: -e[0])
  return ChannelGroups(groups=tuple(g for _, g in prunable), unprunable=tuple(g for _, g in unprunable),
                       norms=_norm_links(tr, param_infos, paths, norms, linen))


def _norm_links(tr: _Tracer, param_infos, paths, norms: dict, linen: bool) -> tuple:
  index = {p: i for i, p in enumerate(paths)}
  links = []
  for kernel, attached in tr.attached.items():
    found = [m for m, leaves in norms.items()
             if index[leaves["mean"]] in attached or index[leaves["var"]] in attached]
    if len(found) != 1:
      continue
    leaves = norms[found[0]]
    out_axes = [a for (leaf, a), r in tr.roles.items() if leaf == kernel and r & {"out", "depthwise"}]
    if len(out_axes) != 1:
      continue
    kmod = _module_of(paths[kernel], linen)
    bias = [paths[i] for i in attached
            if _module_of(paths[i], linen) == kmod and paths[i].rsplit("/", 1)[-1] == "bias"]
    links.append(NormLink(kernel=paths[kernel], axis=out_axes[0], kernel_bias=bias[0] if bias else None,
                          scale=leaves.get("scale"), offset=leaves.get("bias"), mean=leaves["mean"],
                          var=leaves["var"], eps=tr.eps.get(index[leaves["var"]])))
  return tuple(sorted(links, key=lambda l: l.kernel))
