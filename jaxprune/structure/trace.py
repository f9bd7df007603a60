"""Channel groups from the jaxpr: the JAX counterpart of Torch-Pruning's dependency graph.

The walk itself is in :mod:`~jaxprune.structure.walker`, the per-primitive rules in
:mod:`~jaxprune.structure.rules` and the union-find in :mod:`~jaxprune.structure.index_space`;
this module runs them on a model and collects the groups.

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

from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxprune.core.checks import traced_call_note
from jaxprune.core.forms import MODULE_AS_APPLY_FN, as_model, is_module, is_state
from jaxprune.core.trees import leaves_with_paths
from jaxprune.structure.channel_groups import (CONSUMER, PRODUCER, ChannelGroups, Group, KernelRead, Member,
                                              NormLink)
from jaxprune.structure.index_space import AxisInfo, shape_of
from jaxprune.structure.walker import Walker


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
  reductions and pooling, reshape/flatten, transpose, tile (a class token over the batch),
  concatenate/slice/split/pad, lookups (``gather``: an ``nn.Embed`` table is a producer kernel),
  ``scan`` (an ``nn.scan`` layer stack: a channel is one group across its layers), ``cond``
  (every branch) and the sub-jaxprs that Flax and JAX create (``jit``, ``custom_jvp``/``custom_vjp``
  calls, ``remat``).
  Channels that reach the model output or come from its input are not prunable; neither are
  those touched by an op this tracer does not understand (``unprunable`` says which and why).
  Identities such as ``stop_gradient`` (inside softmax) pass through, so attention gives whole-head
  groups (query, key and value heads with the output projection's rows), grouped-query
  key/value-head groups whose query heads are their rows, and per-head dimension groups. A group
  that some reduction runs over (a LayerNorm's or RMSNorm's statistics over a residual stream)
  carries a ``mask_note``: masking its channels only approximates removing them.

  Trace the *inference* call (BatchNorm on running statistics): a training call that returns
  updated statistics would make every normalised channel reach the output.

  Args:
    apply_fn: ``apply_fn(variables, *example_args, **example_kwargs) -> outputs``, e.g.
      ``model.apply`` (linen) or ``lambda state, x: nnx.merge(graphdef, state)(x)`` (NNX); ``None``
      when ``variables`` is an ``nnx.Module`` (member paths then refer to ``nnx.state(module)``).
      An ``nnx.Module`` here is the model itself: ``groups(module, x)`` is ``groups(None, module, x)``.
    variables: the parameter tree (linen ``variables`` dict or ``nnx.State``); member paths refer
      to its leaves.
    *example_args, **example_kwargs: example inputs. Array leaves are traced; other values
      (``train=False``) are passed as they are.
    exclude: glob patterns on leaf paths; groups with a matching member are not prunable.

  Returns:
    :class:`ChannelGroups`: prunable groups ordered output to input (group 0 nearest the output),
    the unprunable ones with reasons, and the norm layers that follow a kernel.
  """
  if is_module(apply_fn) and is_state(variables):   # groups(module, state, x) would call module(state, x)
    raise TypeError(MODULE_AS_APPLY_FN)
  if is_module(apply_fn):   # groups(module, x): the module came first, so there is no apply function
    apply_fn, variables, example_args = None, apply_fn, (variables,) + example_args
  if apply_fn is None and is_module(variables):   # an nnx.Module: its own apply function, paths into its state
    model = as_model(variables)
    apply_fn, variables = model.apply_fn, model.tree
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

  try:
    closed = jax.make_jaxpr(fun)(variables, dynamic)
  except Exception as error:
    traced_call_note(error, "apply_fn(variables, *example_args) for jaxprune.groups", dynamic)
    raise
  jaxpr = closed.jaxpr
  n = len(leaves)
  if len(jaxpr.invars) < n:
    raise ValueError("variables: the traced function has fewer inputs than the tree has leaves")
  tr = Walker()
  in_infos = []
  for i, v in enumerate(jaxpr.invars):
    shape = shape_of(v)
    info = AxisInfo(axes=tr.fresh(shape))
    if i < n:
      info.prov = (i, tuple((a,) for a in range(len(shape))))
      info.deps = frozenset((i,))
    else:
      info.data = True
    in_infos.append(info)
  const_infos = [AxisInfo(axes=tr.fresh(np.shape(c))) for c in closed.consts]
  outs = tr.run(jaxpr, const_infos, in_infos)
  tr.cls.mark([a for info in in_infos[n:] for a in info.axes], "comes from the model input")
  tr.cls.mark([a for info in outs for a in info.axes], "reaches the model output")
  result = _collect(tr, in_infos[:n], paths, linen)
  return result.exclude(exclude) if exclude else result


def _collect(tr: Walker, param_infos, paths, linen: bool) -> ChannelGroups:
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
  reduced = tr.reduced_classes()
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
    note = ""
    if cls in reduced:
      note = (f"mask mode only approximates removal: the model reduces over these channels "
              f"({', '.join(reduced[cls])}, e.g. a LayerNorm's statistics), where masked zeros still count")
    g = Group(size=cls.size, producers=tuple(m for _, m in prods), consumers=tuple(m for _, m in cons),
              prunable=not reasons, reason="; ".join(reasons), mask_note=note)
    last = max(o for o, _ in kernels)
    (prunable if g.prunable else unprunable).append((last, g))
  prunable.sort(key=lambda e: -e[0])
  unprunable.sort(key=lambda e: -e[0])
  reads = tuple(KernelRead(paths[leaf], address, operand, eqn.primitive, tuple(sorted(eqn.params.items())),
                           eqn.invars[operand].aval.dtype, as_stored, _bias_of(tr, leaf, paths, linen),
                           len(eqn.invars[1 - operand].aval.shape))
                for leaf, address, operand, eqn, as_stored in tr.reads)
  return ChannelGroups(groups=tuple(g for _, g in prunable), unprunable=tuple(g for _, g in unprunable),
                       norms=_norm_links(tr, param_infos, paths, norms, linen), reads=reads)


def _bias_of(tr: Walker, kernel: int, paths, linen: bool):
  """The ``bias`` leaf of the kernel's own layer, when it is added to the kernel's output."""
  kmod = _module_of(paths[kernel], linen)
  found = [paths[i] for i in tr.attached.get(kernel, ())
           if _module_of(paths[i], linen) == kmod and paths[i].rsplit("/", 1)[-1] == "bias"]
  return found[0] if len(found) == 1 else None


def _norm_links(tr: Walker, param_infos, paths, norms: dict, linen: bool) -> tuple:
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
    links.append(NormLink(kernel=paths[kernel], axis=out_axes[0], kernel_bias=_bias_of(tr, kernel, paths, linen),
                          scale=leaves.get("scale"), offset=leaves.get("bias"), mean=leaves["mean"],
                          var=leaves["var"], eps=tr.eps.get(index[leaves["var"]])))
  return tuple(sorted(links, key=lambda l: l.kernel))
