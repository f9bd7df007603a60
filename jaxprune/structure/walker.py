"""The walker: runs a jaxpr equation by equation over index spaces instead of values.

Each value gets an :class:`~jaxprune.structure.index_space.AxisInfo` (its axes' factors, whether
it depends on the model's inputs, which parameter leaf it re-lays out, which kernel output it is
an affine function of). Sub-jaxprs (``jit``, ``custom_jvp``/``custom_vjp`` calls, ``remat``) are
walked inline; every other equation goes to its rule in :mod:`jaxprune.structure.rules` (the
``scan`` rule walks its body on the per-step slices).
"""
from __future__ import annotations

import dataclasses

import jax.extend as jex
import numpy as np

from jaxprune.structure.index_space import AxisInfo, IndexSpaces, shape_of
from jaxprune.structure.rules import AFFINE, ELEMENTWISE, IDENTITY, LAYOUT, RULES, SUBJAXPR_KEYS


LOOPS = {"scan", "while"}


class Walker:
  """Walks a jaxpr and records index classes, kernel roles and per-channel affine chains."""

  def __init__(self):
    self.cls = IndexSpaces()
    self.roles: dict = {}         # (leaf, axis) -> set of "out" / "in" / "depthwise"
    self.order: dict = {}         # kernel leaf -> index of the op where it is last used
    self.attached: dict = {}      # kernel leaf -> parameter leaves applied per channel after it
    self.eps: dict = {}           # leaf -> scalar added to it (a norm's epsilon)
    self.reads: list = []         # (kernel leaf, address, operand, eqn, as stored) per kernel read
    self.address: tuple = ()      # the equation being walked: indices through nested sub-jaxprs
    self.reductions: list = []    # (axis, primitive) where an activation is reduced along an axis
    self.step = 0

  # -- helpers ---------------------------------------------------------------------------------
  def fresh(self, shape) -> tuple:
    return tuple(self.cls.axis(d) for d in shape)

  def literal(self, v) -> AxisInfo:
    return AxisInfo(axes=self.fresh(shape_of(v)))

  def read(self, env, v) -> AxisInfo:
    if isinstance(v, jex.core.Literal):
      return self.literal(v)
    return env[v]

  def opaque(self, infos, outs, reason) -> None:
    self.cls.mark([a for info in list(infos) + list(outs) for a in info.axes], reason)

  # -- the walk ------------------------------------------------------------------------------------
  def run(self, jaxpr, consts_infos, in_infos, prefix: tuple = ()) -> list:
    env = {}
    for v, info in zip(jaxpr.constvars, consts_infos):
      env[v] = info
    for v, info in zip(jaxpr.invars, in_infos):
      env[v] = info
    for i, eqn in enumerate(jaxpr.eqns):
      self.step += 1
      self.address = prefix + (i,)
      infos = [self.read(env, v) for v in eqn.invars]
      outs = self.eqn(eqn, infos)
      for v, info in zip(eqn.outvars, outs):
        env[v] = info
    return [self.read(env, v) for v in jaxpr.outvars]

  def eqn(self, eqn, infos) -> list:
    name = eqn.primitive.name
    out_shapes = [shape_of(v) for v in eqn.outvars]
    data = any(i.data for i in infos)
    deps = frozenset() if data else frozenset().union(*[i.deps for i in infos]) if infos else frozenset()
    sub = subjaxpr(eqn)
    if sub is not None:
      jaxpr, consts = sub
      consts_infos = [AxisInfo(axes=self.fresh(np.shape(c))) for c in consts]
      return self.run(jaxpr, consts_infos, infos, self.address)
    if name in ELEMENTWISE:
      return [self.elementwise(name, eqn, infos, out_shapes[0], data, deps)]
    if name in IDENTITY:
      return [dataclasses.replace(i) for i in infos[:len(out_shapes)]]
    handler = RULES.get(name)
    if handler is not None:
      outs = handler(self, eqn, infos, out_shapes)
      for o in outs:
        o.data = data
        o.deps = deps if not data else frozenset()
      return outs
    outs = [AxisInfo(axes=self.fresh(s), data=data, deps=deps) for s in out_shapes]
    self.opaque(infos, outs, f"unsupported operation '{name}'")
    return outs

  def elementwise(self, name, eqn, infos, shape, data, deps) -> AxisInfo:
    axes = []
    for i, d in enumerate(shape):
      same = [info.axes[i] for info, v in zip(infos, eqn.invars)
              if len(shape_of(v)) == len(shape) and shape_of(v)[i] == d]
      if d == 1 or not same:
        axes.append(self.cls.axis(d))
        continue
      for other in same[1:]:
        self.cls.unify(same[0], other, name)
      axes.append(same[0])
    out = AxisInfo(axes=tuple(axes), data=data, deps=deps if not data else frozenset())
    provs = [i for i in infos if i.prov is not None]
    scalars_only = all(i.prov is not None or (isinstance(v, jex.core.Literal) and not shape_of(v))
                       for i, v in zip(infos, eqn.invars))
    if len(provs) == 1 and scalars_only and (name in LAYOUT or name in ("mul", "div", "neg")):
      leaf, amap = provs[0].prov
      if len(amap) == len(shape):
        out.prov = (leaf, amap)
    if name == "add" and not data:
      lits = [v for v in eqn.invars if isinstance(v, jex.core.Literal) and not shape_of(v)]
      others = [i for i, v in zip(infos, eqn.invars) if not isinstance(v, jex.core.Literal)]
      if len(lits) == 1 and len(others) == 1 and len(others[0].deps) == 1:
        self.eps[next(iter(others[0].deps))] = float(lits[0].val)
    if data and name in AFFINE:
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
  def role(self, info: AxisInfo, axis: int, role: str) -> bool:
    if info.prov is None:
      return False
    leaf, amap = info.prov
    for a in amap[axis]:
      self.roles.setdefault((leaf, a), set()).add(role)
    self.order[leaf] = self.step
    return True

  def note_reduction(self, axes, primitive: str) -> None:
    """Notes activation axes reduced by ``primitive`` (a LayerNorm's mean over channels): masking
    such channels is not removing them, since the zeros still enter the reduction."""
    self.reductions.extend((axis, primitive) for axis in axes)

  def reduced_classes(self) -> dict:
    """``{class root: sorted primitive names}`` of the index classes some reduction ran over."""
    found: dict = {}
    for axis, primitive in self.reductions:
      for leaf in self.cls.leaves(axis):
        found.setdefault(self.cls.find(leaf), set()).add(primitive)
    return {root: sorted(names) for root, names in found.items()}

  def record_read(self, kernel: AxisInfo, operand: int, eqn) -> None:
    """Notes that this equation reads the kernel leaf behind ``kernel`` as operand ``operand``."""
    leaf, amap = kernel.prov
    as_stored = tuple(amap) == tuple((a,) for a in range(len(amap)))
    self.reads.append((leaf, self.address, operand, eqn, as_stored))

  def kernel_check(self, infos, where):
    lhs, rhs = infos
    for op in (lhs, rhs):
      if not op.data and op.prov is None and op.deps:
        self.cls.mark(op.axes, f"{where}: kernel computed from parameters before use")


def subjaxpr(eqn):
  """``(jaxpr, consts)`` of an equation that calls a sub-jaxpr with its own inputs (``jit``,
  ``custom_jvp``/``custom_vjp`` calls, ``remat``), else ``None``. A loop's body runs many times
  (a ``fori_loop`` body even has the loop's own shapes), so loops are left to the rules; a call's
  sub-jaxpr takes and gives the equation's shapes."""
  if eqn.primitive.name in LOOPS:
    return None
  for key in SUBJAXPR_KEYS:
    j = eqn.params.get(key)
    if isinstance(j, jex.core.ClosedJaxpr) and _same_shapes(j.jaxpr, eqn):
      return j.jaxpr, j.consts
    if isinstance(j, jex.core.Jaxpr) and _same_shapes(j, eqn) and not j.constvars:
      return j, ()
  return None


def _same_shapes(jaxpr, eqn) -> bool:
  def shapes(variables):
    return [shape_of(v) for v in variables]
  return (shapes(jaxpr.invars) == shapes(eqn.invars)) and (shapes(jaxpr.outvars) == shapes(eqn.outvars))
