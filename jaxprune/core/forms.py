"""Model forms: every method takes the tree the user has and gives back the same kind.

Accepted as ``params``:

* a params dict of a pure-JAX model, with ``apply_fn(params, x)``;
* a Flax linen ``variables`` dict (``{"params": ..., "batch_stats": ...}``), with ``model.apply``;
* an ``nnx.State`` (from ``nnx.split``), with ``apply_fn(state, x)`` (e.g. via ``nnx.merge``);
* an ``nnx.Module``: its own apply function. Methods work on its ``nnx.State`` and return that
  state pruned, for ``nnx.update(module, result.params)``; the user's ``loss_fn`` receives a
  module (``nnx.merge`` of the graph and the current state), as it would in a training loop.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Model(NamedTuple):
  """A model as the methods see it.

  Attributes:
    tree: the pytree methods prune (the user's tree; an NNX module's ``nnx.State``).
    apply_fn: ``apply_fn(tree, *inputs) -> outputs``, or ``None`` when the user gave none.
    view: ``tree -> `` what the user's ``loss_fn`` receives (the tree itself, or a module).
    is_module: the user passed an ``nnx.Module``.
  """
  tree: Any
  apply_fn: Optional[Callable]
  view: Callable[[Any], Any]
  is_module: bool = False


MODULE_AS_APPLY_FN = ("apply_fn: an nnx.Module is not called with a state; pass the module itself as params "
                      "(after nnx.update(module, state), or jp.resized_module for a shrunk state) with apply_fn=None")


def is_state(obj: Any) -> bool:
  """Whether ``obj`` is an ``nnx.State`` (without importing ``flax.nnx``, as :func:`is_module`)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.State)


def is_module(obj: Any) -> bool:
  """Whether ``obj`` is an ``nnx.Module``. Nothing can be one before ``flax.nnx`` is imported, and
  importing it costs a linen user's first call about 0.15 s, so it is not imported here."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def as_model(params: Any, apply_fn: Optional[Callable] = None) -> Model:
  """Normalises the ``params`` argument of every method (see the module docstring)."""
  if apply_fn is not None and not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable (e.g. model.apply), got {type(apply_fn).__name__}")
  if is_module(apply_fn) and not is_module(params):   # it would be called as module(state, x)
    raise TypeError(MODULE_AS_APPLY_FN)
  if is_module(params):
    from flax import nnx
    if apply_fn is not None:
      raise ValueError("apply_fn: an nnx.Module is its own apply function; leave apply_fn=None")
    graphdef, state = nnx.split(params)
    return Model(state, ModuleCall(graphdef), ModuleView(graphdef), True)
  if apply_fn is not None and not isinstance(apply_fn, _ByKey):
    apply_fn = UserApply(apply_fn)
  return Model(params, apply_fn, _same_tree, False)


def require_apply_fn(model: Model, what: str, slot: str = "params") -> Callable:
  """``model.apply_fn``, or a ``TypeError`` naming ``apply_fn`` for a call that runs the model
  (``what``) and got none; ``slot`` is the argument an NNX module goes in."""
  if model.apply_fn is None:
    raise TypeError(f"apply_fn: {what} runs the model; pass apply_fn=model.apply (or an nnx.Module as {slot})")
  return model.apply_fn


def _same_tree(tree: Any) -> Any:
  return tree


class _ByKey:
  """Equal and hashed by ``_key()``, so that the callables built for a model in one call equal
  those built for it in the next: jitted functions that take them as static arguments (or in a
  pytree's metadata) then hit their caches instead of compiling again on every call. A key that
  cannot be hashed (an unhashable ``apply_fn`` or keyword value) falls back to identity."""

  def _key(self) -> tuple:
    raise NotImplementedError

  def _hashable_key(self) -> Any:
    """The key and its hash, computed once (jit hashes and compares static arguments on every
    call; a 100-layer NNX module's graph takes 1.7 ms to hash)."""
    if "_cached" not in self.__dict__:
      key = (type(self),) + tuple(_method_key(part) for part in self._key())
      try:
        self._cached = (key, hash(key))
      except TypeError:
        self._cached = (id(self), hash(id(self)))
    return self._cached

  def __eq__(self, other: Any) -> bool:
    return type(other) is type(self) and self._hashable_key()[0] == other._hashable_key()[0]

  def __hash__(self) -> int:
    return self._hashable_key()[1]


def _method_key(fn: Any) -> Any:
  """A bound method as ``(function, instance)``: ``model.apply`` of two equal linen modules (equal
  by their fields) are then equal, where Python compares bound methods' instances by identity."""
  return (fn.__func__, fn.__self__) if inspect.ismethod(fn) else fn


class ModuleView(_ByKey):
  """``state -> nnx.merge(graphdef, state)``: the module a user's ``loss_fn`` receives."""

  def __init__(self, graphdef: Any):
    self.graphdef = graphdef

  def _key(self) -> tuple:
    return (self.graphdef,)

  def __call__(self, state: Any) -> Any:
    from flax import nnx
    return nnx.merge(self.graphdef, state)


class ModuleCall(ModuleView):
  """``(state, *inputs) -> module(*inputs)``: an NNX module as an apply function over its state."""

  def __call__(self, state: Any, *args, **kwargs) -> Any:
    return super().__call__(state)(*args, **kwargs)


class UserApply(_ByKey):
  """The user's ``apply_fn``, equal to another built from the same function, or from
  ``model.apply`` of an equal linen module (``Net().apply`` written in each call): the jitted
  programs that take it as a static argument compile once."""

  def __init__(self, apply_fn: Callable):
    self.apply_fn = apply_fn

  def _key(self) -> tuple:
    return (self.apply_fn,)

  def __call__(self, *args, **kwargs) -> Any:
    return self.apply_fn(*args, **kwargs)


class ViewedLoss(_ByKey):
  """``(tree, batch) -> loss_fn(view(tree), batch)``: the user's loss over the method's tree."""

  def __init__(self, loss_fn: Callable, view: Callable):
    self.loss_fn, self.view = loss_fn, view

  def _key(self) -> tuple:
    return (self.loss_fn, self.view)

  def __call__(self, tree: Any, batch: Any) -> Any:
    return self.loss_fn(self.view(tree), batch)


def user_loss(model: Model, loss_fn: Optional[Callable]) -> Callable[[Any, Any], Any]:
  """``loss(tree, batch) -> scalar`` over the method's tree, from the user's ``loss_fn`` or the default.

  Without a ``loss_fn`` the loss is the mean softmax cross-entropy of ``apply_fn(params, x)``
  on integer labels, ``batch = (x, y)``.
  """
  if loss_fn is not None:
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable loss_fn(params, batch) -> scalar, got {type(loss_fn).__name__}")
    return loss_fn if not model.is_module else ViewedLoss(loss_fn, model.view)
  if model.apply_fn is None:
    raise TypeError("loss_fn: give loss_fn(params, batch) -> scalar, or apply_fn(params, x) -> logits "
                    "(then the loss is softmax cross-entropy on integer labels, batch = (x, y))")
  return classification_loss(model.apply_fn)


def split_trainable(tree: Any, like: Any = None) -> tuple[Any, Any]:
  """``(trainable, frozen)``: ``tree`` twice, each with ``None`` where the other holds a leaf.
  ``like``: the tree whose leaves decide (default ``tree``), to split its masks the same way.

  Trainable are an NNX state's ``nnx.Param`` variables, a linen ``variables`` dict's ``"params"``
  collection, and otherwise every floating-point leaf. The rest (batch statistics, random-number
  state, integer leaves) a fine-tuning step must neither differentiate (``jax.grad`` refuses
  integers) nor update (an optimiser's weight decay would shrink running statistics).
  """
  like = tree if like is None else like
  if is_state(like):
    from flax import nnx
    flags = jax.tree.map(lambda v: isinstance(v, nnx.Param), like, is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    flags = _path_flags(like, hasattr(like, "keys") and "params" in like.keys())
  return (jax.tree.map(lambda f, x: x if f else None, flags, tree),
          jax.tree.map(lambda f, x: None if f else x, flags, tree))


def _path_flags(tree: Any, linen: bool) -> Any:
  """Per leaf: trainable (a linen tree's ``"params"`` collection, else floating-point leaves)."""
  from jaxprune.core.trees import map_with_paths
  if linen:
    return map_with_paths(lambda p, _: p.split("/", 1)[0] == "params", tree)
  return map_with_paths(lambda _, x: bool(jnp.issubdtype(x.dtype, jnp.inexact)), tree)   # key dtypes: False


def join_trainable(trainable: Any, frozen: Any) -> Any:
  """The inverse of :func:`split_trainable`."""
  nnx = sys.modules.get("flax.nnx")
  is_var = (lambda x: x is None or (nnx is not None and isinstance(x, nnx.Variable)))   # noqa: E731
  return jax.tree.map(lambda t, z: z if t is None else t, trainable, frozen, is_leaf=is_var)


def labelled_batch(batch: Any) -> tuple:
  """``(x, y)`` of the default loss's batch, or a ``TypeError`` that says what came instead."""
  if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
    got = f"an array of shape {np.shape(batch)}" if hasattr(batch, "shape") else type(batch).__name__
    raise TypeError(f"batch: the default loss needs batch = (x, y) with integer labels y, got {got}; "
                    "for other batches pass loss_fn(params, batch) -> scalar")
  return tuple(batch)


def classification_loss(apply_fn: Callable, **apply_kwargs) -> Callable[[Any, Any], Any]:
  """``loss_fn(params, (x, y)) -> mean softmax cross-entropy`` of ``apply_fn(params, x, **kw)``.

  ``params`` is whatever ``apply_fn`` takes (a linen ``variables`` dict for ``model.apply``).
  Call BatchNorm models in inference mode (``train=False``, the reference models' default).
  """
  return ClassificationLoss(apply_fn, apply_kwargs)


class ClassificationLoss(_ByKey):
  """The loss :func:`classification_loss` returns; two built from the same ``apply_fn`` and
  keywords are equal (one compilation serves every call that builds it again)."""

  def __init__(self, apply_fn: Callable, apply_kwargs: dict):
    self.apply_fn, self.apply_kwargs = apply_fn, dict(apply_kwargs)

  def _key(self) -> tuple:
    return (self.apply_fn, tuple(sorted(self.apply_kwargs.items())))

  def __call__(self, params: Any, batch: Any) -> Any:
    x, y = labelled_batch(batch)
    logits = self.apply_fn(params, x, **self.apply_kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --- NNX modules with shrunk arrays ------------------------------------------------------------
# Per-class rules that set a module's width attributes from its arrays (Torch-Pruning keeps the
# same kind of table for nn.Module attributes). Extend with register_resize_rule.
RESIZE_RULES: dict = {}


def register_resize_rule(cls: type, rule: Callable[[Any], None]) -> None:
  """``rule(module)`` sets ``module``'s width attributes from its (already replaced) arrays."""
  RESIZE_RULES[cls] = rule


def _resize_linear(m) -> None:
  m.in_features, m.out_features = m.kernel.get_value().shape[-2], m.kernel.get_value().shape[-1]


def _resize_conv(m) -> None:
  depthwise = m.feature_group_count > 1 and m.feature_group_count == m.in_features
  per_group, out = m.kernel.get_value().shape[-2], m.kernel.get_value().shape[-1]
  if depthwise:   # one group per input channel, a fixed channel multiplier
    m.feature_group_count = m.in_features = out // (m.out_features // m.in_features)
  else:
    m.in_features = per_group * m.feature_group_count
  m.out_features = out


def _resize_norm(m) -> None:
  from flax import nnx
  arrays = [getattr(m, name).get_value() for name in ("scale", "bias", "mean", "var")
            if isinstance(getattr(m, name, None), nnx.Variable)]
  if arrays:
    m.num_features = arrays[0].shape[-1]


def _resize_embed(m) -> None:
  m.num_embeddings, m.features = m.embedding.get_value().shape


def _resize_linear_general(m) -> None:
  shape = m.kernel.get_value().shape
  n_batch, n_in = len(m.batch_axis), len(m.axis)
  m.in_features = tuple(shape[n_batch:n_batch + n_in])
  m.out_features = tuple(shape[n_batch + n_in:])


def _resize_attention(m) -> None:
  """``nnx.MultiHeadAttention``: heads, key/value heads and head size from the projections
  (after removing heads, or the residual channels it reads and writes)."""
  query, key = m.query.kernel.get_value().shape, m.key.kernel.get_value().shape
  m.in_features, m.in_kv_features = query[0], key[0]
  m.num_heads, m.head_dim = query[-2], query[-1]
  m.qkv_features = m.num_heads * m.head_dim
  if hasattr(m, "num_kv_heads"):
    m.num_kv_heads = key[-2]
  m.out_features = m.out.kernel.get_value().shape[-1]


def _default_rules() -> None:
  from flax import nnx
  for cls, rule in ((nnx.Linear, _resize_linear), (nnx.Conv, _resize_conv), (nnx.BatchNorm, _resize_norm),
                    (nnx.LayerNorm, _resize_norm), (nnx.RMSNorm, _resize_norm),
                    (nnx.LinearGeneral, _resize_linear_general), (nnx.MultiHeadAttention, _resize_attention),
                    (nnx.Embed, _resize_embed)):
    RESIZE_RULES.setdefault(cls, rule)


def resized_module(module: Any, params: Any, *, plans: Any = None) -> Any:
  """A copy of the ``nnx.Module`` holding ``params`` (e.g. a shrunk result's ``nnx.State``), with its
  width attributes (``in_features``, ``out_features``, ``num_features``, an embedding's
  ``features``, a depthwise conv's ``feature_group_count``, an attention layer's ``num_heads``,
  ``num_kv_heads``, ``head_dim`` and ``qkv_features``, a GroupNorm's ``num_groups`` and
  ``group_size``) set from the arrays, so that the module describes what it computes.

  ``nnx.update(module, result.params)`` alone already runs (NNX layers read their arrays), but
  leaves the attributes at the dense widths. Layers without a rule (:data:`RESIZE_RULES`,
  :func:`register_resize_rule`) keep their attributes; the input module is not changed.

  Args:
    module: the dense ``nnx.Module``.
    params: its pruned state.
    plans: ``result.info["plans"]``, the ``(group, keep)`` pairs of the result. Needed only when a
      ``nnx.GroupNorm`` changed width: its arrays do not say how many groups are left (8 channels
      may be 2 groups of 4 or 4 groups of 2), the plans do (:func:`jaxprune.groups` gives one group
      for its group count and one for the channels within each group).
  """
  from flax import nnx
  if not is_module(module):
    raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
  _default_rules()
  graphdef, _ = nnx.split(module)
  out = nnx.merge(graphdef, params)
  for path, sub in nnx.iter_modules(out):
    rule = next((r for cls, r in RESIZE_RULES.items() if type(sub) is cls), None)
    if rule is not None:
      rule(sub)
    elif type(sub) is nnx.GroupNorm:
      _resize_group_norm(sub, "/".join(map(str, path)), plans)
  return out


def _resize_group_norm(m, path: str, plans: Any) -> None:
  """``num_groups`` from the plan that prunes the group count (its members' rows are whole groups
  of ``group_size`` channels), ``group_size`` from the arrays."""
  from flax import nnx
  arrays = [getattr(m, name).get_value() for name in ("scale", "bias") if isinstance(getattr(m, name, None), nnx.Variable)]
  if not arrays or arrays[0].shape[-1] == m.num_groups * m.group_size:
    return
  width = arrays[0].shape[-1]
  if plans is None:
    raise ValueError(f"plans: the GroupNorm at {path!r} went from {m.num_groups * m.group_size} to {width} "
                     "channels and its arrays do not say how many groups are left; pass plans=result.info['plans']")
  groups = m.num_groups
  for group, keep in plans:
    for mem in group.members:
      if mem.path in (f"{path}/scale", f"{path}/bias") and _whole_groups(mem.positions(group.size), m.group_size):
        groups = len(keep)
  if width % groups:
    raise ValueError(f"plans: the GroupNorm at {path!r} keeps {groups} groups, which do not divide its {width} channels")
  m.num_groups, m.group_size = groups, width // groups


def _whole_groups(positions: Any, group_size: int) -> bool:
  """Whether channel ``i`` of a group is the ``i``-th block of ``group_size`` rows: ``(n, r)``."""
  n = positions.shape[0]
  return positions.shape[1] == group_size and np.array_equal(
      positions, np.arange(n)[:, None] * group_size + np.arange(group_size))
