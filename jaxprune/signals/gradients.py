"""Per-example gradients of a user's loss, materialised in chunks or as matrix-free operators.

The user's loss is their training loss, ``loss_fn(params, batch) -> scalar`` over a batch.
The per-example loss of example ``i`` is ``loss_fn(params, batch_i)`` where ``batch_i`` is
example ``i`` as a batch of one, so the rows of ``G: (N, p)`` are per-example gradients with
respect to the prunable leaves (flattened, see :func:`jaxprune.flatten`). Models with
BatchNorm should be called in inference mode inside ``loss_fn`` (running statistics), as the
official EWR code does; :func:`classification_loss` builds such a loss.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Union

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprune.core.forms import classification_loss  # noqa: F401  (re-exported: the signals face)
from jaxprune.core.progress import progress
from jaxprune.core.trees import (FlatSpec, PrunableSpec, PyTree, flat_spec, flatten, join_rows, on_host_numeric,
                                 take_rows, unflatten)

LossFn = Callable[[PyTree, Any], jax.Array]


def batch_size(batch: Any, name: str = "batch") -> int:
  """Number of examples ``N`` (the shared leading axis of every array in ``batch``)."""
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError(f"{name} holds no arrays")
  sizes = set()
  for leaf in leaves:
    if np.ndim(leaf) == 0:
      raise ValueError(f"{name} has a scalar leaf: every array needs a leading example axis (N, ...)")
    sizes.add(int(np.shape(leaf)[0]))
  if len(sizes) != 1:
    raise ValueError(f"{name} arrays disagree on the leading example axis: sizes {sorted(sizes)}")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{name} has no examples")
  return n


def _slice(batch, start, stop):
  """Examples ``[start, stop)``; host arrays are sliced in numpy (an eager jax slice compiles)."""
  return jax.tree.map(lambda x: take_rows(x, start, stop), batch)


def _example_loss_fn(loss_fn: LossFn, params: PyTree, spec: FlatSpec):
  """``w: (p,), example -> scalar``: one example's loss with the prunable leaves set to ``w``."""
  def one(w, example):
    as_batch = jax.tree.map(lambda x: x[None], example)
    return loss_fn(unflatten(w, params, spec), as_batch)
  return one


def _example_losses_fn(loss_fn: LossFn, params: PyTree, spec: FlatSpec):
  """``w: (p,), chunk -> (n,)`` per-example losses."""
  return jax.vmap(_example_loss_fn(loss_fn, params, spec), in_axes=(None, 0))


def _chunks(n: int, chunk_size: int):
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _pad(batch, start, stop, size):
  """Examples [start, stop) padded (by repeating the last one) to ``size`` so one compile serves all chunks."""
  part = _slice(batch, start, stop)
  m = stop - start
  if m <= 0:
    raise ValueError("empty chunk")
  if m == size:
    return part
  return jax.tree.map(lambda x: _xp(x).concatenate([x, _xp(x).repeat(x[-1:], size - m, axis=0)]), part)


def _xp(*arrays):
  """numpy for host arrays (nothing to compile), jax.numpy otherwise (device, sharded, traced)."""
  return np if on_host_numeric(*arrays) else jnp



def per_example_grads(loss_fn: LossFn, params: PyTree, batch: Any, *, prunable: PrunableSpec = None,
                      chunk_size: int = 256, dtype=jnp.float32, spec: FlatSpec | None = None,
                      show_progress: bool = True, check_finite: bool = True) -> jax.Array:
  """The per-example gradient matrix ``G: (N, p)``, built ``chunk_size`` examples at a time.

  Chunks are written into one preallocated buffer. A batch sharded along its example axis over a
  ``jax.sharding.Mesh`` gives a ``G`` whose rows are split the same way: each device computes and
  holds its examples' gradients, and the regression's products with ``G`` use collectives.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` (mean over the batch).
    params: the tree the gradient is taken at; only the ``prunable`` leaves are differentiated.
    batch: pytree of arrays with a leading example axis ``N``.
    chunk_size: examples per vmapped chunk (memory ~ chunk_size x activations).
    dtype: storage dtype of ``G`` (e.g. ``jnp.bfloat16`` halves memory).
    check_finite: raise ``ValueError`` if a gradient is NaN or infinite (read from each row's sum,
      computed with the gradients: no second pass over ``G``; a row sum that overflows float32 is
      reported too). Under a user's ``jax.jit`` it cannot raise and is skipped
      (:func:`grads_and_projections` returns the per-example flags instead).

  Returns:
    ``G: (N, p)``; row ``i`` is the gradient of example ``i``'s loss.
  """
  G, finite, _ = grads_and_projections(loss_fn, params, batch, prunable=prunable, chunk_size=chunk_size,
                                       dtype=dtype, spec=spec, show_progress=show_progress)
  if check_finite:
    raise_if_not_finite(finite)
  return G


def grads_and_projections(loss_fn: LossFn, params: PyTree, batch: Any, vectors: jax.Array | None = None, *,
                          prunable: PrunableSpec = None, chunk_size: int = 256, dtype=jnp.float32,
                          spec: FlatSpec | None = None, show_progress: bool = True):
  """``G: (N, p)`` with, computed in the same pass, ``finite: (N,)`` (row ``i`` of ``G`` is
  finite, read from its projections) and ``G @ vectors: (N, m)`` for ``vectors: (p, m)`` (``None`` if no vectors).

  The regression needs ``y = G w_ref`` and ``z = G w`` before anything else; taking them (and the
  finite check) while each chunk's rows are fresh saves two passes over ``G``, which is
  memory-bound. The projections are taken before the cast to ``dtype`` (in float32).
  """
  n = batch_size(batch)
  spec = flat_spec(params, prunable) if spec is None else spec
  w, _ = flatten(params, spec=spec)
  chunks = _chunks(n, chunk_size)
  size = min(chunk_size, n)
  G = None if len(chunks) == 1 else _buffer((n, w.size), dtype, _row_sharding(batch))
  finite, projections = [], []
  for s, e in progress(chunks, desc="per-example grads", disable=not show_progress):
    rows, ok, proj = _grads_chunk(w, params, _pad(batch, s, e, size), vectors, loss_fn=loss_fn, spec=spec, dtype=dtype)
    if e - s < size:   # the padded last chunk (a slice of a full chunk would copy it)
      rows, ok, proj = (None if a is None else take_rows(a, 0, e - s) for a in (rows, ok, proj))
    G = rows if G is None else _write_rows(G, rows, s)
    finite.append(ok)
    projections.append(proj)
  return G, join_rows(finite), None if vectors is None else join_rows(projections)


def raise_if_not_finite(finite: jax.Array) -> None:
  """``ValueError`` naming the examples whose gradients are NaN or infinite (``finite: (N,)``);
  nothing under a user's ``jit``, where the flags cannot be read."""
  if isinstance(finite, jax.core.Tracer):
    return
  finite = np.asarray(finite)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(f"per-example gradients are NaN or infinite (or their sums overflow float32) for examples "
                     f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}: check loss_fn and the batch")


def chunk_size_for(loss_fn: LossFn, params: PyTree, batch: Any, *, prunable: PrunableSpec = None,
                   spec: FlatSpec | None = None, memory_budget: float | None = None,
                   materialized: bool = True) -> int:
  """Examples per chunk so that one chunk fits in ``memory_budget`` bytes (``chunk_size="auto"``).

  One example costs its gradient row (``4 p`` bytes, when ``G`` is materialised) plus the
  intermediates of its backward pass, counted from the jaxpr of ``grad`` of one example's loss
  (every intermediate array summed: an upper bound, as XLA frees and fuses many of them). Nothing
  is compiled. ``memory_budget`` defaults to a quarter of the free memory of the default device
  (accelerators), or of the host's available memory (CPU).

  Returns:
    an int in ``[1, N]``.
  """
  n = batch_size(batch)
  spec = flat_spec(params, prunable) if spec is None else spec
  if memory_budget is None:
    memory_budget = default_memory_budget()
  if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
  w, _ = flatten(params, spec=spec)
  example = jax.tree.map(lambda x: x[0], batch)
  jaxpr = jax.make_jaxpr(jax.grad(_example_loss_fn(loss_fn, params, spec)))(w, example)
  per_example = _intermediate_bytes(jaxpr.jaxpr) + (4 * spec.size if materialized else 0)
  return int(max(1, min(n, memory_budget // max(per_example, 1))))


def weight_reuse(loss_fn: LossFn, params: PyTree, batch: Any, *, prunable: PrunableSpec = None,
                 spec: FlatSpec | None = None) -> float:
  """Multiply-adds of one example's forward pass per prunable weight, from its jaxpr (nothing is
  compiled): about 1 for dense layers (each weight used once per example), the number of output
  positions for a convolution or a Dense layer applied to every token.

  It says which signals are cheaper. A product ``G v`` or ``G^T u`` is a batched forward or
  backward pass, whose cost grows with the reuse; materialising ``G`` writes ``N p`` floats
  whatever the reuse. Measured on the 2-core CPU: MLPNet (reuse 1) an official LR stage 11 ms
  matrix-free against 107 ms with ``G``; ResNet20 (reuse in the hundreds) 2.3 s against 1.7 s.
  """
  spec = flat_spec(params, prunable) if spec is None else spec
  return _multiply_adds(_example_jaxpr(loss_fn, params, batch, spec)) / max(spec.size, 1)


_EXAMPLE_JAXPRS: dict = {}


def _example_jaxpr(loss_fn: LossFn, params: PyTree, batch: Any, spec: FlatSpec):
  """The jaxpr of one example's loss, cached by ``loss_fn``, ``spec`` and the shapes and dtypes
  of ``params`` and one example (what the counts read): tracing a linen model took about 12 ms
  per call of an eager MLPNet stage, which is otherwise a few ms."""
  example = jax.tree.map(lambda x: x[0], batch)
  leaves, treedef = jax.tree.flatten((params, example))
  key = (loss_fn, spec, treedef, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
  try:
    hit = _EXAMPLE_JAXPRS.get(key)
  except TypeError:   # an unhashable loss_fn: traced every time
    key, hit = None, None
  if hit is None:
    w, _ = flatten(params, spec=spec)
    hit = jax.make_jaxpr(_example_loss_fn(loss_fn, params, spec))(w, example).jaxpr
    if key is not None:
      if len(_EXAMPLE_JAXPRS) >= 32:
        _EXAMPLE_JAXPRS.clear()
      _EXAMPLE_JAXPRS[key] = hit
  return hit


def _multiply_adds(jaxpr) -> int:
  """Multiply-adds of the ``dot_general`` and ``conv_general_dilated`` equations of ``jaxpr`` and
  its sub-jaxprs (a loop body counted once)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      out = int(np.prod(eqn.outvars[0].aval.shape, dtype=np.int64))
      rhs = eqn.invars[1].aval.shape
      if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += out * int(np.prod([lhs[d] for d in lhs_contract], dtype=np.int64))
      else:   # each output element reads one filter: the kernel's size over its output features
        out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        total += out * int(np.prod(rhs, dtype=np.int64)) // max(out_features, 1)
    for sub in _subjaxprs(eqn.params):
      total += _multiply_adds(sub)
  return total


def _intermediate_bytes(jaxpr) -> int:
  """Bytes of every array an equation of ``jaxpr`` (and its sub-jaxprs) writes."""
  total = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = var.aval
      if hasattr(aval, "shape") and hasattr(aval, "dtype"):
        total += int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize   # key dtypes are not numpy's
    for sub in _subjaxprs(eqn.params):
      total += _intermediate_bytes(sub)
  return total


def _subjaxprs(params: dict):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jex.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jex.core.Jaxpr):
        yield v


def default_memory_budget() -> int:
  """A quarter of the default device's free memory (accelerators report it) or, on CPU, of the
  host's available memory."""
  import os
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return int(max(stats["bytes_limit"] - stats.get("bytes_in_use", 0), 1) // 4)
  try:
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
  except (ValueError, OSError, AttributeError):
    return 1 << 30


def _row_sharding(batch: Any) -> Any:
  """Rows of ``G`` live where the batch's examples do: a batch sharded along its example axis
  over a mesh gives ``G`` the same split of rows (``None``: the default device)."""
  sharding = getattr(jax.tree_util.tree_leaves(batch)[0], "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) and sharding.spec[0] is not None:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0], None))
  return None


def _buffer(shape: tuple, dtype, sharding: Any) -> jax.Array:
  """A preallocated ``G`` that the chunks are written into (placed by ``sharding``)."""
  return jnp.zeros(shape, dtype, device=sharding)   # created in place on each device


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(G: jax.Array, rows: jax.Array, start: int) -> jax.Array:
  # In place (the buffer is donated), keeping the buffer's sharding.
  return jax.lax.dynamic_update_slice_in_dim(G, rows.astype(G.dtype), start, axis=0)


@functools.partial(jax.jit, static_argnames=("loss_fn", "spec", "dtype"))
def _grads_chunk(w, params, chunk, vectors=None, *, loss_fn, spec, dtype):
  """``(rows: (n, p) in dtype, finite: (n,), rows @ vectors: (n, m) or None)`` of one chunk.

  ``finite`` is read from the projections (row sums without ``vectors``): ``0 x NaN`` and
  ``0 x inf`` are NaN, so a non-finite gradient always shows, and an elementwise ``isfinite`` over
  the rows (a second full read of them) is not needed. A projection that overflows float32 is
  reported too: the regression could not use it.
  """
  # vmap of the per-example gradient: each example's backward pass sees only that example.
  # Module-level jit: repeated calls (stages, sweeps) with the same loss_fn reuse the compilation.
  one = _example_loss_fn(loss_fn, params, spec)
  rows = jax.vmap(jax.grad(one), in_axes=(None, 0))(w, chunk)
  proj = jnp.dot(rows, jnp.ones((rows.shape[1], 1), rows.dtype) if vectors is None else vectors.astype(rows.dtype))
  return rows.astype(dtype), jnp.isfinite(proj).all(axis=1), None if vectors is None else proj


@struct.dataclass
class DenseOperator:
  """A materialised ``G: (N, p)`` as an operator: ``matvec(v) = G v``, ``rmatvec(u) = G^T u``."""
  G: jax.Array

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.G.shape)

  def matvec(self, v: jax.Array) -> jax.Array:
    return jnp.dot(self.G, v.astype(self.G.dtype), preferred_element_type=jnp.float32)

  def rmatvec(self, u: jax.Array) -> jax.Array:
    return jnp.dot(u.astype(self.G.dtype), self.G, preferred_element_type=jnp.float32)

  def matmat(self, V: jax.Array) -> jax.Array:
    """``G V: (N, m)`` for ``V: (p, m)`` in one pass over ``G``."""
    return jnp.dot(self.G, V.astype(self.G.dtype), preferred_element_type=jnp.float32)


MAX_UNROLLED_CHUNKS = 16   # more chunks than this run in a lax.map loop (compile time stays bounded)


def _map_chunks(fn: Callable, xs: Any, unroll: bool) -> Any:
  """``lax.map(fn, xs)`` over the leading (chunk) axis, unrolled (``unroll``, up to
  ``MAX_UNROLLED_CHUNKS``): on XLA:CPU a convolution's backward pass inside a loop body ran
  30-45x slower than the same program unrolled (ResNet20, N = 200: ``G^T u`` 27-38 s in
  ``lax.map`` against 0.84 s). Dense layers are not slowed, and unrolling costs compile time."""
  n_chunks = jax.tree.leaves(xs)[0].shape[0]
  if not unroll or n_chunks > MAX_UNROLLED_CHUNKS:
    return jax.lax.map(fn, xs)
  outs = [fn(jax.tree.map(lambda a: a[i], xs)) for i in range(n_chunks)]
  return jax.tree.map(lambda *o: jnp.stack(o), *outs)


@struct.dataclass
class MatrixFreeOperator:
  """Matrix-free ``G`` at ``w0``: ``G v`` by forward mode (JVP of the per-example losses),
  ``G^T u`` by one backward pass of ``sum_i u_i loss_i``; ``G`` is never formed.

  A pytree (jit it, pass it to jitted functions): the examples are stored in chunks of
  ``chunk_size`` (the last padded, with weight 0), processed one chunk at a time
  (:func:`_map_chunks`) so memory stays at O(p + N) plus one chunk of activations.
  """
  w0: jax.Array                 # (p,) point the gradients are taken at
  params: Any                   # the tree (non-prunable leaves such as batch_stats are read from it)
  chunks: Any                   # batch with leading axes (n_chunks, chunk_size)
  valid: jax.Array              # (n_chunks, chunk_size) 1 for real examples, 0 for padding
  n: int = struct.field(pytree_node=False)
  spec: FlatSpec = struct.field(pytree_node=False)
  loss_fn: Callable = struct.field(pytree_node=False)
  unroll: bool = struct.field(pytree_node=False, default=False)   # see _map_chunks

  @property
  def shape(self) -> tuple[int, int]:
    return (self.n, self.spec.size)

  def _losses(self, w, chunk):
    return _example_losses_fn(self.loss_fn, self.params, self.spec)(w, chunk)

  def matvec(self, v: jax.Array) -> jax.Array:
    out = _map_chunks(lambda c: jax.jvp(lambda w: self._losses(w, c), (self.w0,), (v,))[1], self.chunks,
                      self.unroll)
    return out.reshape(-1)[: self.n]

  def matmat(self, V: jax.Array) -> jax.Array:
    """``G V: (N, m)`` for ``V: (p, m)``: the JVPs of all ``m`` tangents share each chunk's forward pass."""
    return jax.vmap(self.matvec, in_axes=1, out_axes=1)(V)

  def rmatvec(self, u: jax.Array) -> jax.Array:
    n_chunks, size = self.valid.shape
    u = jnp.zeros(n_chunks * size, self.w0.dtype).at[: self.n].set(u).reshape(n_chunks, size) * self.valid
    def one(args):
      c, uc = args
      return jax.vjp(lambda w: self._losses(w, c), self.w0)[1](uc)[0]
    return _map_chunks(one, (self.chunks, u), self.unroll).sum(0)


GradientOperator = Union[DenseOperator, MatrixFreeOperator]


def gradient_operator(loss_fn: LossFn, params: PyTree, batch: Any, *, prunable: PrunableSpec = None,
                      chunk_size: int = 256, spec: FlatSpec | None = None) -> MatrixFreeOperator:
  """Matrix-free per-example gradient operator at ``params`` (same rows as :func:`per_example_grads`)."""
  n = batch_size(batch)
  spec = flat_spec(params, prunable) if spec is None else spec
  w0, _ = flatten(params, spec=spec)
  size = min(chunk_size, n)
  n_chunks = len(_chunks(n, chunk_size))
  padded = _pad(batch, 0, n, n_chunks * size)
  chunks = jax.tree.map(lambda x: jnp.reshape(x, (n_chunks, size) + x.shape[1:]), padded)
  valid = (jnp.arange(n_chunks * size) < n).astype(w0.dtype).reshape(n_chunks, size)
  unroll = (jax.default_backend() == "cpu"
            and _has_primitive(_example_jaxpr(loss_fn, params, batch, spec), "conv_general_dilated"))
  return MatrixFreeOperator(w0, params, chunks, valid, n, spec, loss_fn, unroll)


def _has_primitive(jaxpr, name: str) -> bool:
  return any(eqn.primitive.name == name or any(_has_primitive(sub, name) for sub in _subjaxprs(eqn.params))
             for eqn in jaxpr.eqns)


def dense_operator(G: jax.Array) -> DenseOperator:
  """Wraps a materialised ``G: (N, p)`` in the operator interface."""
  return DenseOperator(G)


def add_gradient_noise(G: jax.Array, key: jax.Array, scale: float, fraction: float) -> jax.Array:
  """Gradient noise as the official EWR code injects it (brief section 5).

  For each row ``g`` of ``G: (N, p)``: pick ``int(p * fraction)`` coordinates uniformly at
  random (without replacement) and add ``N(0, (scale * std(g))^2)`` to them.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"noise fraction must be in [0, 1], got {fraction}")
  if scale < 0:
    raise ValueError(f"noise scale must be >= 0, got {scale}")
  n, p = G.shape
  m = int(p * fraction)
  if m == 0 or scale == 0:
    return G
  return _noise_rows(G, jax.random.split(key, n), float(scale), m)


@functools.partial(jax.jit, static_argnames=("scale", "m"))
def _noise_rows(G, keys, scale, m):
  def row(g, key):
    k_idx, k_val = jax.random.split(key)
    # m distinct coordinates, uniformly: the top m of i.i.d. uniforms (top_k is ~6x faster than
    # a full permutation on CPU).
    idx = jax.lax.top_k(jax.random.uniform(k_idx, g.shape), m)[1]
    sigma = jnp.std(g.astype(jnp.float32))
    noise = scale * sigma * jax.random.normal(k_val, (m,), jnp.float32)
    return g.at[idx].add(noise.astype(g.dtype))
  return jax.vmap(row)(G, keys)
