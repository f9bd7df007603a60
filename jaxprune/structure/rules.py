"""Per-primitive rules of the channel tracer, in explicit tables that users can extend.

A rule is ``rule(walker, eqn, infos, out_shapes) -> [AxisInfo per output]``: it says how the
index spaces of an equation's outputs relate to its inputs (unifying axes that share an index)
and records kernel roles on ``walker``. Element-wise primitives (``ELEMENTWISE``) and identities
(``IDENTITY``) need no rule of their own. A primitive with no entry anywhere makes every axis it
touches unprunable, with its name as the reason, so an unknown op never yields a wrong group.

Extend the tables for your own primitives::

    jaxprune.structure.rules.register_rule("my_op", my_rule)
    jaxprune.structure.rules.register_elementwise("my_activation")
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from jaxprune.structure.index_space import AxisInfo, shape_of

ELEMENTWISE = set("""
neg sign floor ceil round is_finite complex exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan
sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs not integer_pow erf erfc erf_inv lgamma digamma
convert_element_type copy copy_p real imag conj square reduce_precision population_count clz
add sub mul div rem pow max min atan2 nextafter and or xor eq ne lt le gt ge select_n clamp
shift_left shift_right_logical shift_right_arithmetic add_any igamma igammac polygamma zeta
random_gamma_grad bessel_i0e bessel_i1e regularized_incomplete_beta
""".split())
LAYOUT = {"convert_element_type", "copy", "copy_p", "reduce_precision"}
AFFINE = {"add", "sub", "mul", "div", "convert_element_type", "copy", "copy_p", "neg"}
IDENTITY = {"device_put", "optimization_barrier", "sharding_constraint", "mesh_cast", "reshard", "stop_gradient"}
REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin"}
CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort"}
WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"}
NEW_ARRAYS = {"iota", "random_seed", "random_bits", "random_wrap", "random_unwrap", "random_split", "random_fold_in",
              "threefry2x32"}
SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def broadcast_in_dim(w, eqn, infos, out_shapes):
  (x,), shape = infos, out_shapes[0]
  bdims = eqn.params["broadcast_dimensions"]
  in_shape = shape_of(eqn.invars[0])
  axes, amap = [], []
  for i, d in enumerate(shape):
    if i in bdims and in_shape[bdims.index(i)] == d:
      j = bdims.index(i)
      axes.append(x.axes[j])
      amap.append(x.prov[1][j] if x.prov else ())
    else:
      axes.append(w.cls.axis(d))
      amap.append(())
  return [AxisInfo(axes=tuple(axes), prov=(x.prov[0], tuple(amap)) if x.prov else None, affine=x.affine)]


def tile(w, eqn, infos, out_shapes):
  """``jnp.tile`` (a class token copied over the batch): an axis tiled once keeps its index, and a
  size-1 axis tiled ``r`` times is a new axis, as a broadcast makes it. Copies of an axis of more
  than one entry repeat its channels: opaque."""
  (x,), reps = infos, tuple(eqn.params["reps"])
  in_shape = shape_of(eqn.invars[0])
  if len(reps) != len(in_shape) or any(r != 1 and d != 1 for r, d in zip(reps, in_shape)):
    out = AxisInfo(axes=w.fresh(out_shapes[0]))
    w.opaque([x], [out], "tile: copies of an axis repeat its channels")
    return [out]
  axes = tuple(a if r == 1 else w.cls.axis(d) for a, r, d in zip(x.axes, reps, out_shapes[0]))
  amap = tuple(m if r == 1 else () for m, r in zip(x.prov[1], reps)) if x.prov else None
  return [AxisInfo(axes=axes, prov=(x.prov[0], amap) if x.prov else None, affine=x.affine)]


def gather(w, eqn, infos, out_shapes):
  """Lookups (an ``nn.Embed`` table read by tokens, a nearest-neighbour resize): an operand axis
  taken whole and not indexed passes to its output axis with its channels; the axes it indexes
  are opaque; the output's other axes are the indices'. A parameter table read at data indices
  is a producer kernel along its passed axes, as ``one_hot(tokens) @ table`` would make it."""
  (x, idx), shape = infos, out_shapes[0]
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  in_shape = shape_of(eqn.invars[0])
  dropped = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
  indexed = set(dn.collapsed_slice_dims) | set(dn.start_index_map)
  for od, i in zip(dn.operand_batching_dims, dn.start_indices_batching_dims):   # take_along_axis: entry for entry
    w.cls.unify(x.axes[od], idx.axes[i], "gather")
  axes, amap = [None] * len(shape), [()] * len(shape)
  passed = [d for d in range(len(in_shape)) if d not in dropped]
  whole = {d for d in passed if d not in indexed and sizes[d] == in_shape[d]}
  for d, o in zip(passed, dn.offset_dims):
    axes[o] = x.axes[d] if d in whole else w.cls.axis(shape[o])
    amap[o] = x.prov[1][d] if d in whole and x.prov else ()
  batch = [o for o in range(len(shape)) if o not in dn.offset_dims]
  for o, a, d in zip(batch, idx.axes[:-1], shape_of(eqn.invars[1])[:-1]):   # the last is the index vector
    axes[o] = a if d == shape[o] else w.cls.axis(shape[o])
  w.cls.mark([x.axes[d] for d in sorted(indexed)], "gather: rows are looked up along this axis")
  if x.prov is not None and idx.data:   # the rows read are data: the table is a kernel, its output is not it
    for d in sorted(whole):
      w.role(x, d, "out")
    return [AxisInfo(axes=tuple(axes))]
  return [AxisInfo(axes=tuple(axes), prov=(x.prov[0], tuple(amap)) if x.prov else None)]


def bitcast_convert_type(w, eqn, infos, out_shapes):
  """Element-wise between types of one width (random bits made floats, as dropout does); a change
  of width adds or drops a trailing axis: opaque."""
  if shape_of(eqn.invars[0]) == out_shapes[0]:
    return [w.elementwise("bitcast_convert_type", eqn, infos, out_shapes[0], any(i.data for i in infos),
                          frozenset().union(*[i.deps for i in infos]))]
  out = AxisInfo(axes=w.fresh(out_shapes[0]))
  w.opaque(infos, [out], "bitcast_convert_type between types of different widths")
  return [out]


def new_arrays(w, eqn, infos, out_shapes):
  """``iota`` and the PRNG primitives (the bits of a dropout mask): their outputs are new arrays
  whose axes carry no channel, so multiplying activations by one (``h * mask``) stays
  element-wise."""
  return [AxisInfo(axes=w.fresh(s)) for s in out_shapes]


def dynamic_slice(w, eqn, infos, out_shapes):
  """A slice at traced offsets (a window of a cache): axes taken whole keep their index; the
  sliced ones are opaque, since the rows kept are known only at run time."""
  x, shape = infos[0], out_shapes[0]
  in_shape = shape_of(eqn.invars[0])
  whole = [d == e for d, e in zip(in_shape, shape)]
  w.cls.mark([a for a, keep in zip(x.axes, whole) if not keep], "dynamic_slice: rows picked at run time")
  axes = tuple(a if keep else w.cls.axis(d) for a, keep, d in zip(x.axes, whole, shape))
  # one layer of a stacked kernel (a fori_loop over layers) is still that kernel along its whole axes
  prov = (x.prov[0], tuple(m if keep else () for m, keep in zip(x.prov[1], whole))) if x.prov else None
  return [AxisInfo(axes=axes, prov=prov)]


def dynamic_update_slice(w, eqn, infos, out_shapes):
  """An update written at traced offsets: the output has the operand's axes; the update shares
  those it covers whole, and the others are opaque."""
  x, update = infos[0], infos[1]
  for a, b, d, e in zip(x.axes, update.axes, shape_of(eqn.invars[0]), shape_of(eqn.invars[1])):
    if d == e:
      w.cls.unify(a, b, "dynamic_update_slice")
    else:
      w.cls.mark([a, b], "dynamic_update_slice: rows written at run time")
  return [AxisInfo(axes=x.axes)]


def top_k(w, eqn, infos, out_shapes):
  """The ``k`` largest entries along the last axis (values and indices): that axis is opaque."""
  (x,) = infos
  w.cls.mark([x.axes[-1]], "top_k ranks entries along this axis")
  return [AxisInfo(axes=x.axes[:-1] + (w.cls.axis(s[-1]),)) for s in out_shapes]


def scan(w, eqn, infos, out_shapes):
  """``lax.scan`` (``nn.scan`` layer stacks, recurrent cells): the body is walked once on the
  per-step slices of the scanned inputs, and each carry's axes are unified with the body's new
  carry, so a channel is one group across every step (a stacked kernel ``(L, d, h)`` loses the
  same channels in every layer). A carry depends on the inputs when any scan input does. Kernel
  reads inside the body are not kept: i-SpaSP cannot capture one step's activation."""
  p = eqn.params
  consts, carry, xs = (infos[:p["num_consts"]], infos[p["num_consts"]:p["num_consts"] + p["num_carry"]],
                       infos[p["num_consts"] + p["num_carry"]:])
  data = any(i.data for i in infos)
  carry = [dataclasses.replace(c, data=data, prov=None) for c in carry]
  slices = [AxisInfo(axes=x.axes[1:], data=x.data, deps=x.deps,
                     prov=(x.prov[0], x.prov[1][1:]) if x.prov else None) for x in xs]
  reads = len(w.reads)
  body = p["jaxpr"]
  outs = w.run(body.jaxpr, [AxisInfo(axes=w.fresh(np.shape(c))) for c in body.consts],
               list(consts) + carry + slices, w.address)
  del w.reads[reads:]
  for before, after in zip(carry, outs[:len(carry)]):
    for a, b in zip(before.axes, after.axes):
      w.cls.unify(a, b, "scan")
  ys = [AxisInfo(axes=(w.cls.axis(p["length"]),) + y.axes, data=data) for y in outs[len(carry):]]
  return carry + ys


def cond(w, eqn, infos, out_shapes):
  """``lax.cond``/``lax.switch``: every branch is walked on the operands and their outputs are
  unified, since any of them may run. Kernel reads inside a branch are not kept (i-SpaSP needs an
  activation every call computes)."""
  reads, outs = len(w.reads), None
  for branch in eqn.params["branches"]:
    got = w.run(branch.jaxpr, [AxisInfo(axes=w.fresh(np.shape(c))) for c in branch.consts], list(infos[1:]),
                w.address)
    if outs is None:
      outs = got
    for first, other in zip(outs, got):
      for a, b in zip(first.axes, other.axes):
        w.cls.unify(a, b, "cond")
  del w.reads[reads:]
  return [AxisInfo(axes=o.axes) for o in outs]


def fft(w, eqn, infos, out_shapes):
  """``fft`` over the last ``len(fft_lengths)`` axes (spatial axes of a Fourier layer): those are
  opaque, the axes before them keep their index."""
  (x,), k = infos, len(eqn.params["fft_lengths"])
  w.cls.mark(list(x.axes[-k:]), "fft mixes entries along this axis")
  return [AxisInfo(axes=x.axes[:-k] + w.fresh(out_shapes[0][-k:]))]


def transpose(w, eqn, infos, out_shapes):
  (x,), perm = infos, eqn.params["permutation"]
  prov = (x.prov[0], tuple(x.prov[1][p] for p in perm)) if x.prov else None
  return [AxisInfo(axes=tuple(x.axes[p] for p in perm), prov=prov)]


def squeeze(w, eqn, infos, out_shapes):
  (x,) = infos
  drop = {d % len(x.axes) for d in eqn.params["dimensions"]}
  keep = [i for i in range(len(x.axes)) if i not in drop]
  prov = (x.prov[0], tuple(x.prov[1][i] for i in keep)) if x.prov else None
  return [AxisInfo(axes=tuple(x.axes[i] for i in keep), prov=prov, affine=x.affine)]


def reshape(w, eqn, infos, out_shapes):
  x = infos[0]
  shape = out_shapes[0]
  in_axes = list(x.axes)
  src_amap = list(x.prov[1]) if x.prov else [()] * len(in_axes)
  if eqn.params.get("dimensions") is not None:
    perm = eqn.params["dimensions"]
    in_axes, src_amap = [in_axes[p] for p in perm], [src_amap[p] for p in perm]
  flat, owner = [], []
  for i, axis in enumerate(in_axes):
    for node in w.cls.expand(axis):
      flat.append(node)
      owner.append(i)
  bounds = list(np.cumprod([d for d in shape if d != 1]))
  if w.cls.refine(flat, bounds) is None:
    out = AxisInfo(axes=w.fresh(shape))
    w.opaque([x], [out], "reshape: a reshape mixes channels with other axes")
    return [out]
  refined, refined_owner = [], []
  for node, o in zip(flat, owner):
    pieces = w.cls.expand([node])
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
      out = AxisInfo(axes=w.fresh(shape))
      w.opaque([x], [out], "reshape: a reshape mixes channels with other axes")
      return [out]
    axes.append(tuple(take))
    amap.append(tuple(sorted(set().union(*[set(src_amap[o]) for o in owners]))))
  prov = (x.prov[0], tuple(amap)) if x.prov else None
  return [AxisInfo(axes=tuple(axes), prov=prov)]


def concatenate(w, eqn, infos, out_shapes):
  dim, shape = eqn.params["dimension"], out_shapes[0]
  axes = []
  for i, d in enumerate(shape):
    if i == dim:
      node = w.cls.new(d)
      node.parts = tuple(info.axes[i] for info, v in zip(infos, eqn.invars) if shape_of(v)[i] > 0)
      axes.append((node,))
    else:
      same = [info.axes[i] for info in infos if d != 1]
      for other in same[1:]:
        w.cls.unify(same[0], other, "concatenate")
      axes.append(same[0] if same else ())
  return [AxisInfo(axes=tuple(axes))]


def _cut(w, axis, cuts: Sequence[int], where: str):
  """Pieces of an axis between consecutive offsets ``cuts`` (first 0, last its size)."""
  roots = w.cls.expand(axis)
  sizes = [b - a for a, b in zip(cuts, cuts[1:])]
  if len(roots) != 1:
    return None
  root = roots[0]
  if root.parts is None:
    root.parts = tuple(w.cls.axis(s) if s > 0 else () for s in sizes)
    if root.reasons:
      for reason in list(root.reasons):
        w.cls.mark(root.parts, reason)
    return list(root.parts)
  offsets = np.cumsum([0] + [math.prod(n.size for n in w.cls.expand(p)) for p in root.parts])
  pieces = []
  for a, b in zip(cuts, cuts[1:]):
    if a not in offsets or b not in offsets:
      return None
    i, j = list(offsets).index(a), list(offsets).index(b)
    if j - i == 1:
      pieces.append(root.parts[i])
    else:
      node = w.cls.new(b - a)
      node.parts = root.parts[i:j]
      pieces.append((node,))
  return pieces


def slice(w, eqn, infos, out_shapes):
  (x,), shape = infos, out_shapes[0]
  in_shape = shape_of(eqn.invars[0])
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
      pieces = _cut(w, x.axes[i], cuts, "slice")
    if pieces is None:
      w.cls.mark([x.axes[i]], "slice: strided or structured slice of a channel axis")
      axes.append(w.cls.axis(d))
    else:
      axes.append(pieces[sorted({0, start, limit, in_shape[i]}).index(start)] if d > 1 else ())
  return [AxisInfo(axes=tuple(axes))]


def split(w, eqn, infos, out_shapes):
  (x,) = infos
  axis = eqn.params["axis"] % len(x.axes)
  sizes = [int(s) for s in eqn.params["sizes"]]
  cuts = list(np.cumsum([0] + sizes))
  pieces = _cut(w, x.axes[axis], cuts, "split") if shape_of(eqn.invars[0])[axis] > 1 else None
  if pieces is None:
    w.cls.mark([x.axes[axis]], "split: structured split of a channel axis")
    pieces = [w.cls.axis(s) for s in sizes]
  outs = []
  for shape, piece in zip(out_shapes, pieces):
    axes = list(x.axes)
    axes[axis] = piece if shape[axis] > 1 else ()
    outs.append(AxisInfo(axes=tuple(axes)))
  return outs


def pad(w, eqn, infos, out_shapes):
  x, shape = infos[0], out_shapes[0]
  axes = []
  for i, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
    if (lo, hi, interior) == (0, 0, 0):
      axes.append(x.axes[i])
    elif interior == 0 and lo >= 0 and hi >= 0 and shape_of(eqn.invars[0])[i] > 1:
      node = w.cls.new(shape[i])
      node.parts = tuple(p for p in (w.cls.axis(lo) if lo else None, x.axes[i],
                                     w.cls.axis(hi) if hi else None) if p is not None)
      axes.append((node,))
    else:
      w.cls.mark([x.axes[i]], "pad: negative or interior padding of an axis")
      axes.append(w.cls.axis(shape[i]))
  return [AxisInfo(axes=tuple(axes))]


def rev(w, eqn, infos, out_shapes):
  (x,) = infos
  dims = set(eqn.params["dimensions"])
  axes = []
  for i, d in enumerate(out_shapes[0]):
    if i in dims:
      w.cls.mark([x.axes[i]], "rev: reversed axis")
      axes.append(w.cls.axis(d))
    else:
      axes.append(x.axes[i])
  # a transposed conv flips its kernel's spatial axes: the kernel stays a kernel
  return [AxisInfo(axes=tuple(axes), prov=x.prov)]


def reduce_axes(w, eqn, infos, out_shapes):
  x = infos[0]
  red = {a % max(len(x.axes), 1) for a in eqn.params["axes"]}
  if x.data:
    w.note_reduction([x.axes[a] for a in sorted(red)], eqn.primitive.name)
  return [AxisInfo(axes=tuple(a for i, a in enumerate(x.axes) if i not in red))]


def window(w, eqn, infos, out_shapes):
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
      axes.append(x.axes[i] if trivial else w.cls.axis(d))
    outs.append(AxisInfo(axes=tuple(axes)))
  return outs


def along_axis(w, eqn, infos, out_shapes):
  # cumulative ops and sort mix the entries along one axis: that axis is not per-channel
  axis = eqn.params.get("axis", eqn.params.get("dimension", -1))
  outs = []
  for info in infos[:len(out_shapes)]:
    w.cls.mark([info.axes[axis]], f"{eqn.primitive.name} mixes entries along an axis")
    outs.append(AxisInfo(axes=info.axes))
  return outs


def dot_general(w, eqn, infos, out_shapes):
  lhs, rhs = infos
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  for a, b in zip(lc, rc):
    w.cls.unify(lhs.axes[a], rhs.axes[b], "dot_general")
  for a, b in zip(lb, rb):
    w.cls.unify(lhs.axes[a], rhs.axes[b], "dot_general")
  lfree = [i for i in range(len(lhs.axes)) if i not in lc and i not in lb]
  rfree = [i for i in range(len(rhs.axes)) if i not in rc and i not in rb]
  axes = [lhs.axes[a] for a in lb] + [lhs.axes[a] for a in lfree] + [rhs.axes[a] for a in rfree]
  out = AxisInfo(axes=tuple(axes))
  w.kernel_check(infos, "dot_general")
  for operand, (kernel, act, contract, free) in ((1, (rhs, lhs, rc, rfree)), (0, (lhs, rhs, lc, lfree))):
    if kernel.prov is not None and act.data:
      w.record_read(kernel, operand, eqn)
      for a in contract:
        w.role(kernel, a, "in")
      for a in free:
        w.role(kernel, a, "out")
      outs_leaf = [x for a in free for x in kernel.prov[1][a]]
      if outs_leaf:
        out.affine = kernel.prov[0]
  return [out]


def conv_general_dilated(w, eqn, infos, out_shapes):
  lhs, rhs = infos
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  shape = out_shapes[0]
  if p.get("batch_group_count", 1) != 1:
    out = AxisInfo(axes=w.fresh(shape))
    w.opaque(infos, [out], "conv_general_dilated with batch_group_count > 1")
    return [out]
  axes = [None] * len(shape)
  axes[out_spec[0]] = lhs.axes[lhs_spec[0]]
  for d in out_spec[2:]:
    axes[d] = w.cls.axis(shape[d])
  groups = p["feature_group_count"]
  rhs_shape = shape_of(eqn.invars[1])
  c_in_per_group = rhs_shape[rhs_spec[1]]
  c_out = rhs_shape[rhs_spec[0]]
  g_axis = w.cls.axis(groups)
  in_per = rhs.axes[rhs_spec[1]]
  out_per = w.cls.axis(c_out // groups)
  w.cls.unify(lhs.axes[lhs_spec[1]], g_axis + in_per, "conv_general_dilated")
  w.cls.unify(rhs.axes[rhs_spec[0]], g_axis + out_per, "conv_general_dilated")
  axes[out_spec[1]] = rhs.axes[rhs_spec[0]]
  out = AxisInfo(axes=tuple(axes))
  w.kernel_check(infos, "conv_general_dilated")
  if rhs.prov is not None and lhs.data:
    w.record_read(rhs, 1, eqn)
    depthwise = groups > 1 and c_in_per_group == 1
    w.role(rhs, rhs_spec[0], "depthwise" if depthwise else "out")
    if not depthwise:
      w.role(rhs, rhs_spec[1], "in")
    out.affine = rhs.prov[0]
  return [out]


Rule = Callable[..., list]

RULES: dict[str, Rule] = {
    "broadcast_in_dim": broadcast_in_dim,
    "transpose": transpose,
    "tile": tile,
    "gather": gather,
    "bitcast_convert_type": bitcast_convert_type,
    "dynamic_slice": dynamic_slice,
    "dynamic_update_slice": dynamic_update_slice,
    "top_k": top_k,
    "scan": scan,
    "cond": cond,
    "fft": fft,
    "squeeze": squeeze,
    "reshape": reshape,
    "concatenate": concatenate,
    "slice": slice,
    "split": split,
    "pad": pad,
    "rev": rev,
    "dot_general": dot_general,
    "conv_general_dilated": conv_general_dilated,
}
RULES.update({name: reduce_axes for name in REDUCE})
RULES.update({name: along_axis for name in CUMULATIVE})
RULES.update({name: window for name in WINDOW})
RULES.update({name: new_arrays for name in NEW_ARRAYS})


def register_rule(primitive: str, rule: Rule) -> None:
  """Adds or replaces the rule of ``primitive`` (its name in the jaxpr, e.g. ``"my_op"``)."""
  if not isinstance(primitive, str) or not callable(rule):
    raise TypeError("register_rule(primitive: str, rule: callable(walker, eqn, infos, out_shapes))")
  RULES[primitive] = rule


def register_elementwise(*primitives: str) -> None:
  """Marks primitives as element-wise (with size-1 broadcasting): their operands share every axis."""
  ELEMENTWISE.update(primitives)


def register_identity(*primitives: str) -> None:
  """Marks primitives whose outputs are their first inputs, unchanged (sharding hints, barriers)."""
  IDENTITY.update(primitives)
