"""Two-layer units: the hidden channels of one group, and the layer that reads them.

i-SpaSP prunes a unit's hidden group so that the unit's output stays close to the dense one.
A :class:`Unit` says how to get the hidden activations ``H: (N, ..., C)`` from the model input
(``hidden_fn``) and how the second layer maps them to the unit output (``output_fn``, plus the
BatchNorm after it, if any). The residual is taken at that norm's output: for a ResNet
BasicBlock after ``bn2``, before the skip addition.

:func:`two_layer_units` derives units from a Flax linen model and its channel groups: every
prunable group read by exactly one layer (MLP hidden layers, a BasicBlock's ``conv1`` channels,
a MobileNet block's depthwise channels read by its pointwise conv, VGG convs). ``H`` is captured
as that layer's input with :func:`flax.linen.intercept_methods`. :func:`make_unit` builds one
by hand, e.g. for NNX models or layers that tracing does not see.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.structure.channel_groups import ChannelGroups, Group, NormLink
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


@dataclasses.dataclass(frozen=True)
class ModuleOutput:
  """``output_fn`` of a derived unit: a standalone copy of the linen layer, applied to its params.

  Equal layers compare equal, so units of the same configuration share one compilation.
  """
  module: nn.Module

  def __call__(self, params: Any, hidden: jax.Array) -> jax.Array:
    return self.module.apply({"params": params}, hidden)


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
    capture: the linen module path whose input is ``H`` (derived units; lets one forward pass
      capture the hidden activations of many units).
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
    if self.norm is None:
      return None
    nl = self.norm
    mean = jnp.asarray(get_leaf(variables, nl.mean), jnp.float32)
    scale = jnp.ones_like(mean) if nl.scale is None else jnp.asarray(get_leaf(variables, nl.scale), jnp.float32)
    offset = jnp.zeros_like(mean) if nl.offset is None else jnp.asarray(get_leaf(variables, nl.offset), jnp.float32)
    eps = 1e-5 if nl.eps is None else nl.eps
    return OutputNorm(scale, offset, mean, jnp.asarray(get_leaf(variables, nl.var), jnp.float32),
                      jnp.asarray(eps, jnp.float32))

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


def capture_inputs(apply_fn: Callable, variables: Any, x: Any, paths: Sequence[tuple], **apply_kwargs) -> dict:
  """``{module path: its input}`` for the linen modules at ``paths`` in one forward pass."""
  wanted = set(paths)
  out: dict = {}

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name == "__call__" and path in wanted:
      if path in out:
        raise ValueError(f"module {'/'.join(path)} is called more than once; give its unit by hand (make_unit)")
      out[path] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    apply_fn(variables, x, **apply_kwargs)
  missing = wanted - set(out)
  if missing:
    raise ValueError(f"modules {sorted('/'.join(p) for p in missing)} were not called; is apply_fn a linen "
                     "Module.apply? For other models give units with make_unit")
  return out


def _modules(apply_fn, variables, example, paths, apply_kwargs) -> dict:
  found: dict = {}

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    if context.method_name == "__call__" and path in paths:
      found.setdefault(path, (context.module.clone(parent=None, name=None), len(args), args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: apply_fn(v, x, **apply_kwargs), variables, example)
  return found


def _subtree(path: tuple):
  return lambda variables: _get(variables["params"], path)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


@dataclasses.dataclass(frozen=True)
class CapturedInput:
  """``hidden_fn`` of a derived unit: the input of the module at ``path`` in a forward pass.

  Hashable and compared by value, so that jitted captures are reused across calls.
  """
  apply_fn: Callable
  path: tuple
  apply_kwargs: tuple = ()

  def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
    return capture_inputs(self.apply_fn, variables, x, [self.path], **dict(self.apply_kwargs))[self.path]


def two_layer_units(apply_fn: Callable, variables: Any, example: Any, groups: Optional[ChannelGroups] = None,
                    **apply_kwargs) -> tuple[Unit, ...]:
  """The two-layer units of a Flax linen model, in group order (output to input).

  A prunable group is a unit when exactly one kernel reads it, on its input axis, one row per
  channel (a Dense after a flatten is not) and that layer is called once; its ``NormLink``
  (BatchNorm right after it) is the unit's norm.

  Args:
    apply_fn: the linen ``model.apply``.
    variables: the model's variables (``{"params": ..., "batch_stats": ...}``).
    example: an input batch or ``jax.ShapeDtypeStruct`` (for tracing the groups).
    groups: the model's groups (default: ``jaxprune.groups(apply_fn, variables, example)``).
    **apply_kwargs: passed to ``apply_fn`` (e.g. ``train=False``).

  Returns:
    a tuple of :class:`Unit` with ``group_index`` and ``capture`` set.
  """
  if groups is None:
    from jaxprune.structure.trace import groups as trace_groups
    groups = trace_groups(apply_fn, variables, example, **apply_kwargs)
  if not isinstance(groups, ChannelGroups):
    raise TypeError("groups must be the ChannelGroups of this model (jaxprune.groups)")
  shapes = {p: np.shape(leaf) for p, leaf in leaves_with_paths(variables)}
  norms = {nl.kernel: nl for nl in groups.norms}
  candidates = {}
  for i, g in enumerate(groups):
    readers = [m for m in g.consumers if m.kind == "kernel"]
    if len(readers) != 1 or len(g.consumers) != 1 or readers[0].mapped:
      continue
    r = readers[0]
    parts = r.path.split("/")
    if parts[0] != "params" or parts[-1] != "kernel" or r.axis != len(shapes[r.path]) - 2:
      continue
    candidates[i] = (r, tuple(parts[1:-1]))
  modules = _modules(apply_fn, variables, example, {p for _, p in candidates.values()}, apply_kwargs)
  units = []
  for i, (r, path) in candidates.items():
    if path not in modules:
      continue
    module, n_args, in_shape = modules[path]
    if n_args != 1 or in_shape[-1] != groups[i].size or getattr(module, "feature_group_count", 1) != 1:
      continue
    units.append(Unit(group=groups[i], hidden_fn=CapturedInput(apply_fn, path, tuple(sorted(apply_kwargs.items()))), output_fn=ModuleOutput(module),
                      params_fn=_subtree(path), norm=norms.get(r.path), name="/".join(path), group_index=i,
                      capture=path, affine=isinstance(module, (nn.Dense, nn.Conv))))
  if not units:
    raise ValueError("no two-layer unit found: no prunable group is read by exactly one layer; "
                     "give units by hand with jaxprune.make_unit")
  return tuple(units)
