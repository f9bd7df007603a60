"""Parameter pytrees: leaf paths, prunable selection, flattening.

Works on any pytree of arrays: Flax linen ``variables``/``params`` dicts, NNX
``nnx.State`` (from ``nnx.split``/``nnx.state``) and plain nested dicts. Paths are
normalised to strings such as ``"fc1/kernel"`` (NNX's trailing ``.value`` is dropped),
so the same selection works for linen and NNX trees.
"""
from __future__ import annotations

import dataclasses
import functools
import fnmatch
import re
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Predicate = Callable[[str, Any], bool]


def path_str(path: tuple) -> str:
  """Turns a jax key path into ``"a/b/c"``; NNX's trailing ``value`` attribute is dropped."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  if len(parts) > 1 and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
  """``[(path, leaf), ...]`` in the tree's flatten order."""
  return _flatten_with_paths(tree)[0]


def _flatten_with_paths(tree: PyTree) -> tuple[list[tuple[str, Any]], Any]:
  """``([(path, leaf), ...], treedef)``; the path strings are cached per tree structure."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  try:
    return list(zip(_paths_of(treedef), leaves)), treedef
  except (TypeError, ValueError):   # unhashable static data, or a node that cannot hold placeholders
    return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]], treedef


@functools.lru_cache(maxsize=64)
def _paths_of(treedef) -> tuple[str, ...]:
  """The path strings of a tree structure's leaves, computed once per structure (the surgery
  walks the same tree once per group, and the strings cost more than the flatten)."""
  dummy = jax.tree_util.tree_unflatten(treedef, range(treedef.num_leaves))
  keyed = jax.tree_util.tree_flatten_with_path(dummy)[0]
  if [leaf for _, leaf in keyed] != list(range(treedef.num_leaves)):
    raise ValueError("the structure does not round-trip through unflatten")   # -> the uncached walk
  return tuple(path_str(p) for p, _ in keyed)


def is_kernel(path: str, leaf: Any) -> bool:
  """Default prunable predicate: Dense/Conv kernels (leaf named ``kernel``, ndim >= 2)."""
  return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) >= 2


def _natural_key(path: str):
  # "Dense_10" sorts after "Dense_2": layer order for skip_first / skip_last.
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


@dataclasses.dataclass(frozen=True)
class Prunable:
  """Which leaves a method may prune.

  Attributes:
    where: predicate ``(path, leaf) -> bool``; default :func:`is_kernel`.
    exclude: glob patterns on the path (``"fc3/*"``, ``"*downsample*"``) of leaves to leave dense.
    skip_first: leave the first selected leaf dense (in natural order of the paths, so
      ``layer10`` follows ``layer9``; name layers so that this is execution order).
    skip_last: leave the last selected leaf dense.
  """
  where: Predicate = is_kernel
  exclude: tuple[str, ...] = ()
  skip_first: bool = False
  skip_last: bool = False

  def paths(self, tree: PyTree) -> tuple[str, ...]:
    """The selected leaf paths, in the tree's flatten order."""
    exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
    chosen = [p for p, leaf in leaves_with_paths(tree)
              if self.where(p, leaf) and not any(fnmatch.fnmatchcase(p, pat) for pat in exclude)]
    ordered = sorted(chosen, key=_natural_key)
    drop = set()
    if self.skip_first and ordered:
      drop.add(ordered[0])
    if self.skip_last and ordered:
      drop.add(ordered[-1])
    return tuple(p for p in chosen if p not in drop)


PrunableSpec = Union[None, Prunable, Predicate, Sequence[str]]


def as_prunable(prunable: PrunableSpec) -> Prunable:
  """Normalises ``None`` (kernels), a predicate, a list of paths or a :class:`Prunable`."""
  if prunable is None:
    return Prunable()
  if isinstance(prunable, Prunable):
    return prunable
  if callable(prunable):
    return Prunable(where=prunable)
  if isinstance(prunable, (list, tuple)) and all(isinstance(p, str) for p in prunable):
    wanted = frozenset(prunable)
    return Prunable(where=lambda path, leaf: path in wanted)
  raise TypeError(
      f"prunable must be None, a jaxprune.Prunable, a predicate (path, leaf) -> bool or a "
      f"list of leaf paths; got {type(prunable).__name__}")


def prunable_paths(tree: PyTree, prunable: PrunableSpec = None) -> tuple[str, ...]:
  """Paths of the prunable leaves; raises ``ValueError`` if there are none."""
  paths = as_prunable(prunable).paths(tree)
  if not paths:
    available = ", ".join(p for p, _ in leaves_with_paths(tree)[:8]) or "<empty tree>"
    raise ValueError(
        "params has no prunable leaves under the given `prunable` selection "
        f"(default: leaves named 'kernel' with ndim >= 2). Leaves seen: {available}")
  return paths


def on_host(*arrays: Any) -> bool:
  """Whether every array is in host memory: numpy, or a jax array on one CPU device (not sharded,
  not traced). Small one-shot array work on such arrays is faster in numpy than compiled."""
  for a in arrays:
    if a is None or isinstance(a, (np.ndarray, np.generic)):
      continue
    if not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer):
      return False
    devices = a.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
      return False
  return True


def on_host_numeric(*arrays: Any) -> bool:
  """:func:`on_host`, and every dtype a plain numpy number or bool (``bfloat16`` and PRNG keys
  stay with jax, whose promotion rules numpy does not share)."""
  return on_host(*arrays) and all(a is None or _numpy_number(a.dtype) for a in arrays)


def _numpy_number(dtype: Any) -> bool:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):   # numpy cannot read a key dtype
    return False
  return np.dtype(dtype).kind in "biuf"


def to_device(value: np.ndarray, like: Any = None) -> jax.Array:
  """A host result as a jax array placed as ``like`` is: on its device when ``like`` is committed
  to one, else uncommitted on the default device, as a jnp result of uncommitted inputs would be
  (so it still combines with arrays sharded over a mesh)."""
  if isinstance(like, jax.Array) and like.committed:
    return jax.device_put(value, next(iter(like.devices())))
  return jax.device_put(value)


def to_devices(values: Sequence[np.ndarray], likes: Sequence[Any]) -> list:
  """:func:`to_device` of each ``value`` placed as its ``like``; the uncommitted ones in one
  transfer call (a call per small leaf costs more than its copy)."""
  out = list(values)
  free = [i for i, like in enumerate(likes) if not (isinstance(like, jax.Array) and like.committed)]
  for i, placed in zip(free, jax.device_put([values[i] for i in free])):
    out[i] = placed
  for i in set(range(len(out))) - set(free):
    out[i] = to_device(values[i], likes[i])
  return out


def take_rows(x: Any, start: int, stop: int) -> Any:
  """Rows ``[start, stop)`` of ``x``: a numpy slice for host arrays (an eager jax slice compiles
  once per shape), the jax slice otherwise."""
  return np.asarray(x)[start:stop] if on_host_numeric(x) else x[start:stop]


def join_rows(parts: list) -> Any:
  """``parts`` joined along their first axis (scalars stacked): in numpy for host arrays, placed
  as :func:`to_device` places them; by jnp otherwise."""
  if len(parts) == 1:
    return parts[0]
  stack = np.ndim(parts[0]) == 0
  if on_host_numeric(*parts):
    host = [np.asarray(p) for p in parts]
    return to_device(np.stack(host) if stack else np.concatenate(host), parts[0])
  return jnp.stack(parts) if stack else jnp.concatenate(parts)


def host_like(value: np.ndarray, like: Any) -> Any:
  """``value`` as the same kind of array as ``like``: numpy stays numpy, a jax array is placed
  as :func:`to_device` places it."""
  return to_device(value, like) if isinstance(like, jax.Array) else value


def as_numpy_tree(tree: PyTree) -> PyTree:
  """``tree`` with numpy leaves (read-only views, no copy) when every leaf is in host memory
  (:func:`on_host_numeric`), else ``tree`` itself. A method that rewrites many leaves one group
  at a time works on these and places its result once (:func:`placed_like`), instead of placing
  every written leaf on the device."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves or not on_host_numeric(*leaves):
    return tree
  return jax.tree_util.tree_map(np.asarray, tree)


def placed_like(tree: PyTree, like: PyTree) -> PyTree:
  """``tree`` (of :func:`as_numpy_tree`, same structure as ``like``) with each numpy leaf whose
  counterpart in ``like`` is a jax array placed as that one is, in one transfer call."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return jax.tree_util.tree_unflatten(treedef, host_likes(leaves, treedef.flatten_up_to(like)))


def host_likes(values: Sequence[Any], likes: Sequence[Any]) -> list:
  """:func:`host_like` of each numpy ``value`` and its ``like`` (other values are kept); those to be
  placed go in one transfer call."""
  out = list(values)
  todo = [i for i, (x, y) in enumerate(zip(out, likes)) if isinstance(x, np.ndarray) and isinstance(y, jax.Array)]
  for i, placed in zip(todo, to_devices([out[i] for i in todo], [likes[i] for i in todo])):
    out[i] = placed
  return out


def get_leaf(tree: PyTree, path: str) -> Any:
  """The leaf at ``path`` (normalised path string)."""
  for p, leaf in leaves_with_paths(tree):
    if p == path:
      return leaf
  raise KeyError(f"no leaf at path {path!r}")


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
  """``jax.tree_util.tree_map_with_path`` with normalised string paths; keeps the container type."""
  pairs, treedef = _flatten_with_paths(tree)
  return jax.tree_util.tree_unflatten(treedef, [fn(p, x) for p, x in pairs])


def replace_leaves(tree: PyTree, new: dict[str, Any]) -> PyTree:
  """A copy of ``tree`` with the leaves at the given paths replaced (same container type)."""
  unknown = set(new) - {p for p, _ in leaves_with_paths(tree)}
  if unknown:
    raise KeyError(f"paths not in the tree: {sorted(unknown)}")
  return map_with_paths(lambda p, x: new.get(p, x), tree)


def count_prunable(tree: PyTree, prunable: PrunableSpec = None) -> int:
  """Number of prunable weights ``p``."""
  paths = set(prunable_paths(tree, prunable))
  return int(sum(np.size(leaf) for p, leaf in leaves_with_paths(tree) if p in paths))


class FlatSpec(NamedTuple):
  """Static layout of the prunable leaves inside the flat vector ``w: (p,)``."""
  paths: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  offsets: tuple[int, ...]   # start of each leaf in w
  size: int                  # p


def flat_spec(tree: PyTree, prunable: PrunableSpec = None) -> FlatSpec:
  paths = prunable_paths(tree, prunable)
  by_path = dict(leaves_with_paths(tree))
  shapes = tuple(tuple(np.shape(by_path[p])) for p in paths)
  sizes = [int(np.prod(s)) for s in shapes]
  offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
  return FlatSpec(paths, shapes, offsets, int(sum(sizes)))


def flatten(tree: PyTree, prunable: PrunableSpec = None, *, spec: FlatSpec | None = None) -> tuple[jax.Array, FlatSpec]:
  """Concatenates the prunable leaves into one vector.

  Returns:
    ``(w, spec)``: ``w: (p,)`` and the static :class:`FlatSpec` that :func:`unflatten` needs.
  """
  spec = flat_spec(tree, prunable) if spec is None else spec
  by_path = dict(leaves_with_paths(tree))
  leaves = [by_path[p] for p in spec.paths]
  if on_host_numeric(*leaves) and len({np.dtype(leaf.dtype) for leaf in leaves}) == 1:   # nothing to compile
    return to_device(np.concatenate([np.ravel(np.asarray(leaf)) for leaf in leaves]), leaves[0]), spec
  return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]), spec


def unflatten(w: jax.Array, tree: PyTree, spec: FlatSpec) -> PyTree:
  """Writes ``w: (p,)`` back into the prunable leaves of ``tree`` (other leaves unchanged)."""
  if w.shape != (spec.size,):
    raise ValueError(f"w has shape {w.shape}, expected ({spec.size},) for this FlatSpec")
  by_path = dict(leaves_with_paths(tree))
  host = on_host_numeric(w, *(by_path[p] for p in spec.paths))
  flat = np.asarray(w) if host else w      # numpy slices of a host vector compile nothing
  new = {}
  for path, shape, off in zip(spec.paths, spec.shapes, spec.offsets):
    n, dtype = int(np.prod(shape)), by_path[path].dtype
    part = flat[off:off + n].reshape(shape).astype(dtype)
    new[path] = to_device(part, w) if host else part
  return replace_leaves(tree, new)
