"""Index spaces: a union-find over array axes with product (split) and sum (parts) structure.

Every axis of every value in a traced computation is a tuple of *factors*, each an
:class:`IndexNode`. Ops that make two axes share an index unify their nodes; a reshape splits or
merges factors, and a concatenation or slice gives a node *parts* at offsets. The walker
(:mod:`jaxprune.structure.walker`) drives these operations; the channel groups are the classes
that hold a kernel's output axis.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np


class IndexNode:
  __slots__ = ("parent", "size", "split", "parts", "reasons")

  def __init__(self, size: int):
    self.parent = None
    self.size = size
    self.split = None   # tuple of nodes: this index space is their product (major first)
    self.parts = None   # tuple of factor tuples: this index space is their concatenation
    self.reasons = set()


class IndexSpaces:
  """Union-find over index spaces with product (split) and sum (parts) structure."""

  def new(self, size: int) -> IndexNode:
    return IndexNode(int(size))

  def axis(self, size: int) -> tuple:
    return () if size == 1 else (self.new(size),)

  def find(self, x: IndexNode) -> IndexNode:
    root = x
    while root.parent is not None:
      root = root.parent
    while x.parent is not None and x.parent is not root:
      x.parent, x = root, x.parent
    return root

  def expand(self, axis: Sequence[IndexNode]) -> list:
    """Roots of an axis's factors, major first; splits resolved, parts kept as one node."""
    out = []
    for node in axis:
      root = self.find(node)
      if root.split is not None:
        out.extend(self.expand(root.split))
      else:
        out.append(root)
    return out

  def leaves(self, axis: Sequence[IndexNode]) -> list:
    """All leaf classes under an axis (recursing into parts)."""
    out = []
    for root in self.expand(axis):
      if root.parts is not None:
        for part in root.parts:
          out.extend(self.leaves(part))
      else:
        out.append(root)
    return out

  def mark(self, axes: Sequence[Sequence[IndexNode]], reason: str) -> None:
    for axis in axes:
      for leaf in self.leaves(axis):
        leaf.reasons.add(reason)

  def _split(self, node: IndexNode, sizes: Sequence[int]) -> bool:
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

  def unify(self, a: Sequence[IndexNode], b: Sequence[IndexNode], where: str) -> None:
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

  def _union(self, x: IndexNode, y: IndexNode, where: str) -> None:
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

  def coords(self, axis: Sequence[IndexNode]) -> dict:
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
class AxisInfo:
  axes: tuple                      # one factor tuple per array axis
  data: bool = False               # depends on the model's (non-parameter) inputs
  prov: Optional[tuple] = None     # (leaf id, per-axis tuple of leaf axes): a re-laid-out parameter
  deps: frozenset = frozenset()    # parameter leaves a non-data value is computed from
  affine: Optional[int] = None     # kernel leaf whose output this is, up to per-channel affine ops


def shape_of(v) -> tuple:
  return tuple(getattr(v.aval, "shape", ()))
