"""The i-SpaSP loop: sparse recovery of a hidden layer's support (CoSaMP without least squares).

One *two-layer unit* maps hidden activations ``H: (N, ..., C)`` (channels last) to an output
through ``output_fn(params, H)`` and an optional per-channel norm. Given the dense ``H``, the
loop finds ``k`` hidden channels whose restriction reproduces the dense output, exactly as the
official ``prune_basic_block`` does (``../shared/research/ispasp.md`` section 2):

1. residual ``V = U - U_hat``: ``U`` the dense output (norm in inference mode), ``U_hat`` the
   output from ``H`` restricted to the support (zero while the support is empty);
2. signed proxy ``g = sum over examples and positions of dR/dH``, ``R = 1/2 ||V||^2``,
   ``U_hat`` held constant; computed in chunks of examples;
3. the ``2k`` largest ``g`` (signed, the current support not excluded) merged with the support;
4. the ``k`` merged channels with the largest aggregated dense activation ``a`` become the support.

For an affine second layer every example's pullback has the same Jacobian ``J``, so the proxy is
``J^T sum_b V_b``: the ``"residual_sum"`` proxy runs only the pruned branch per example (its
train-mode statistics need them) and one pullback; ``"reduced"`` (inference-mode norm) needs no
per-example pass at all.

The support is a bool mask and top-k works by rank, so ``k`` may be traced: ``jax.vmap`` over
``k`` solves many keep ratios in one compiled call, and over stacked ``params``/``hidden``/``norm``
it solves same-shaped units together.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxprune.core.checks import check_budget
from jaxprune.core.masks import topk_mask
from jaxprune.structure.units import OutputNorm, norm_eval

AGGREGATES = ("signed_sum", "abs_sum", "l2")
BN_MODES = ("eval", "train")
PROXIES = ("examples", "residual_sum", "reduced")
MAX_UNROLLED_CHUNKS = 32   # more chunks than this run in a lax.map loop (compile time stays bounded)


class RecoveryOptions(NamedTuple):
  """Static settings of the loop (the defaults are the official code's).

  Attributes:
    iterations: ``T``, the number of iterations (official 20).
    chunk_size: examples per chunk for the proxy (official 256); ``None``: all at once.
    bn_mode: ``"eval"``: the pruned branch's norm in inference mode, like the dense one
      (default); ``"train"``: the official code's fresh pruned block, whose norm normalises each
      chunk with its own batch statistics.
    aggregate: how ``a`` (the thresholding score) reduces ``H`` per channel: ``"signed_sum"``
      (official), ``"abs_sum"`` or ``"l2"`` (for hidden layers that are not non-negative).
    stop_at_fixed_point: stop once the support repeats. The update is deterministic, so the
      result equals the full ``T`` iterations; only the work is saved.
    exclude_support: rank the proxy over channels outside the support only (CR-Sparse's CoSaMP;
      the official code does not).
    proxy: ``"examples"``: the official computation, every example forward and backward through
      the second layer in chunks, any ``output_fn``; ``"residual_sum"``: the pruned branch per
      example, then one pullback of the summed residual ``sum_b V_b`` (exact for an affine
      ``output_fn``, either ``bn_mode``; the dense branch enters only through its precomputed sum);
      ``"reduced"``: the same proxy from the summed activations ``sum_b H_b`` through the layer
      once (exact when ``output_fn`` is affine and ``bn_mode`` is ``"eval"``, since the support is
      shared by all examples; the brief's section 7.1). The three differ only in rounding.
    unroll: unroll the ``T`` iterations in the compiled program. ``None`` (default): only for the
      per-example proxies on CPU, where XLA ran the convolutions inside a loop body about 8x slower
      than unrolled (measured on ResNet20 blocks). ``stop_at_fixed_point`` uses a ``while_loop``
      instead. Results are identical either way.
  """
  iterations: int = 20
  chunk_size: Optional[int] = 256
  bn_mode: str = "eval"
  aggregate: str = "signed_sum"
  stop_at_fixed_point: bool = False
  exclude_support: bool = False
  proxy: str = "examples"
  unroll: Optional[bool] = None


class Support(NamedTuple):
  """Output of :func:`recover_support`.

  Attributes:
    mask: ``(C,)`` bool, exactly ``k`` True (``(..., C)`` under vmap).
    iterations: iterations run (``T`` unless stopped at the fixed point).
    changed: whether the last iteration changed the support (False means a fixed point).
  """
  mask: jax.Array
  iterations: jax.Array
  changed: jax.Array


def check_options(options: RecoveryOptions) -> RecoveryOptions:
  if not isinstance(options, RecoveryOptions):
    raise TypeError(f"options must be a RecoveryOptions, got {type(options).__name__}")
  if isinstance(options.iterations, bool) or not isinstance(options.iterations, int) or options.iterations < 1:
    raise ValueError(f"iterations must be a positive int, got {options.iterations!r}")
  if options.chunk_size is not None and (isinstance(options.chunk_size, bool) or not isinstance(options.chunk_size, int)
                                         or options.chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {options.chunk_size!r}")
  if options.bn_mode not in BN_MODES:
    raise ValueError(f"bn_mode must be one of {BN_MODES}, got {options.bn_mode!r}")
  if options.proxy not in PROXIES:
    raise ValueError(f"proxy must be one of {PROXIES}, got {options.proxy!r}")
  if options.proxy == "reduced" and options.bn_mode == "train":
    raise ValueError("proxy='reduced' is exact only with bn_mode='eval' (train-mode statistics are per chunk)")
  if options.aggregate not in AGGREGATES:
    raise ValueError(f"aggregate must be one of {AGGREGATES}, got {options.aggregate!r}")
  return options


def aggregate_activations(hidden: jax.Array, how: str = "signed_sum") -> jax.Array:
  """``a: (C,)``, the per-channel activation mass of ``hidden: (N, ..., C)`` that thresholds."""
  axes = tuple(range(hidden.ndim - 1))
  if how == "signed_sum":
    return jnp.sum(hidden, axis=axes)
  if how == "abs_sum":
    return jnp.sum(jnp.abs(hidden), axis=axes)
  if how == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(hidden), axis=axes))
  raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")


def _norm_batch(z, norm):
  # PyTorch training-mode BatchNorm: this chunk's mean and biased variance per channel.
  axes = tuple(range(z.ndim - 1))
  mean = jnp.mean(z, axis=axes)
  var = jnp.mean(jnp.square(z - mean), axis=axes)
  return (z - mean) * jax.lax.rsqrt(var + norm.eps) * norm.scale + norm.offset


def _dense_output(output_fn, params, norm):
  """``H -> U``: the unit's second layer, then its norm in inference mode (the dense branch)."""
  return lambda x: norm_eval(output_fn(params, x), norm)


def _chunk_proxy(output_fn, params, norm, bn_mode, mask, h):
  """``sum_{examples, positions} dR/dH`` on one chunk: ``(C,)``."""
  dense = _dense_output(output_fn, params, norm)
  u, pullback = jax.vjp(dense, h)
  z = output_fn(params, h * mask.astype(h.dtype))
  u_hat = _norm_batch(z, norm) if (bn_mode == "train" and norm is not None) else norm_eval(z, norm)
  u_hat = jnp.where(jnp.any(mask), u_hat, 0.0)   # the official pruned output is 0 before any channel is chosen
  (grad,) = pullback(u - jax.lax.stop_gradient(u_hat))
  return jnp.sum(grad, axis=tuple(range(grad.ndim - 1)))


def _over_chunks(fn: Callable, hidden: jax.Array, chunk_size: Optional[int]) -> Any:
  """``sum`` of ``fn`` over chunks of ``chunk_size`` examples, one after another (unrolled up to
  ``MAX_UNROLLED_CHUNKS``, else in ``lax.map``), a last partial chunk on its own, so that
  train-mode statistics are per chunk as in the official loader."""
  n = hidden.shape[0]
  c = n if chunk_size is None else min(chunk_size, n)
  full, rest = divmod(n, c)
  if full <= MAX_UNROLLED_CHUNKS:
    # Static slices: on XLA:CPU a convolution inside lax.map's loop ran 4-5x slower than unrolled.
    g = sum(fn(hidden[i * c:(i + 1) * c]) for i in range(full))
  else:
    head = hidden[: full * c].reshape((full, c) + hidden.shape[1:])
    g = jnp.sum(jax.lax.map(fn, head), axis=0)
  if rest:
    g = g + fn(hidden[full * c:])
  return g


def proxy(output_fn: Callable, params: Any, hidden: jax.Array, mask: jax.Array, norm: Optional[OutputNorm] = None,
          *, chunk_size: Optional[int] = 256, bn_mode: str = "eval") -> jax.Array:
  """The signed proxy ``g: (C,)`` for a support ``mask: (C,)``: the gradient of
  ``1/2 ||U - U_hat||^2`` with respect to ``hidden: (N, ..., C)``, summed over all but channels,
  every example forward and backward in chunks (see :func:`_over_chunks`).
  """
  fn = functools.partial(_chunk_proxy, output_fn, params, norm, bn_mode, mask)
  return _over_chunks(fn, hidden, chunk_size)


def dense_sum(output_fn: Callable, params: Any, summed: jax.Array, n: Any, norm: Optional[OutputNorm] = None):
  """``sum_b U_b: (1, ..., C_out)`` of an affine unit from ``summed = sum_b H_b`` over ``n``
  examples: ``f(summed) + (n - 1) f(0)``."""
  dense = _dense_output(output_fn, params, norm)
  return dense(summed) + (n - 1) * dense(jnp.zeros_like(summed))


def _chunk_pruned_sum(output_fn, params, norm, bn_mode, mask, h):
  """``sum_b U_hat_b`` over one chunk: ``(1, ..., C_out)``."""
  z = output_fn(params, h * mask.astype(h.dtype))
  u_hat = _norm_batch(z, norm) if (bn_mode == "train" and norm is not None) else norm_eval(z, norm)
  return jnp.sum(u_hat, axis=0, keepdims=True)


def _pullback_sum(output_fn, params, norm, v_sum, like):
  """``J^T v_sum`` summed over positions: ``(C,)``; ``J`` the affine unit's Jacobian, the same at
  every point, taken at zero activations shaped ``like: (1, ..., C)``."""
  dense = _dense_output(output_fn, params, norm)
  _, pullback = jax.vjp(dense, jnp.zeros_like(like))
  (grad,) = pullback(v_sum)
  return jnp.sum(grad, axis=tuple(range(grad.ndim - 1)))


def residual_sum_proxy(output_fn: Callable, params: Any, hidden: jax.Array, mask: jax.Array,
                       norm: Optional[OutputNorm] = None, *, dense: jax.Array, chunk_size: Optional[int] = 256,
                       bn_mode: str = "eval") -> jax.Array:
  """:func:`proxy` for an affine ``output_fn``, from ``dense = sum_b U_b`` (:func:`dense_sum`).

  The pruned branch runs per example in chunks (train-mode statistics are per chunk); its
  outputs are summed and ``g = J^T (dense - sum_b U_hat_b)``: one pullback of one example's shape
  instead of a forward and a backward pass of the dense branch per example. Before any channel is
  chosen the pruned output is 0, as in the official code.
  """
  fn = functools.partial(_chunk_pruned_sum, output_fn, params, norm, bn_mode, mask)
  pruned = jax.lax.cond(jnp.any(mask), lambda: _over_chunks(fn, hidden, chunk_size), lambda: jnp.zeros_like(dense))
  v_sum = dense - pruned
  return _pullback_sum(output_fn, params, norm, v_sum, hidden[:1])


def reduced_proxy(output_fn: Callable, params: Any, summed: jax.Array, n: Any, mask: jax.Array,
                  norm: Optional[OutputNorm] = None) -> jax.Array:
  """:func:`proxy` for an affine ``output_fn`` with the norm in inference mode, from
  ``summed = sum_b H_b: (1, ..., C)`` over ``n`` examples.

  With ``f(x) = L x + c``: for a non-empty support ``sum_b V_b = L(summed * (1 - m))``; for the
  empty one (pruned output 0, as the official code) ``sum_b V_b = L summed + n c``. The proxy is
  ``L^T`` of that sum, summed over positions: two passes of the layer over one example.
  """
  dense = _dense_output(output_fn, params, norm)
  offset = dense(jnp.zeros_like(summed))
  removed, pullback = jax.vjp(dense, summed * (1 - mask.astype(summed.dtype)))
  v_sum = removed - offset + jnp.where(jnp.any(mask), 0.0, n * offset)
  (grad,) = pullback(v_sum)
  return jnp.sum(grad, axis=tuple(range(grad.ndim - 1)))


class LoopInputs(NamedTuple):
  """What every iteration reads, computed once: ``a: (C,)`` the thresholding scores,
  ``summed = sum_b H_b: (1, ..., C)``, ``dense``: :func:`dense_sum` (``"residual_sum"`` only)."""
  a: jax.Array
  summed: jax.Array
  dense: Optional[jax.Array]


def loop_inputs(output_fn: Callable, params: Any, hidden: jax.Array, norm: Optional[OutputNorm],
                options: RecoveryOptions) -> LoopInputs:
  summed = jnp.sum(hidden, axis=0, keepdims=True)
  dense = None
  if options.proxy == "residual_sum":
    dense = dense_sum(output_fn, params, summed, hidden.shape[0], norm)
  return LoopInputs(aggregate_activations(hidden, options.aggregate), summed, dense)


def next_support(output_fn: Callable, params: Any, hidden: jax.Array, k: Any, norm: Optional[OutputNorm],
                 options: RecoveryOptions, inputs: LoopInputs, mask: jax.Array) -> jax.Array:
  """One iteration: proxy, the top ``2k`` merged with ``mask``, the top ``k`` of them by ``a``."""
  if options.proxy == "reduced":
    g = reduced_proxy(output_fn, params, inputs.summed, hidden.shape[0], mask, norm)
  elif options.proxy == "residual_sum":
    g = residual_sum_proxy(output_fn, params, hidden, mask, norm, dense=inputs.dense, chunk_size=options.chunk_size,
                           bn_mode=options.bn_mode)
  else:
    g = proxy(output_fn, params, hidden, mask, norm, chunk_size=options.chunk_size, bn_mode=options.bn_mode)
  neg_inf = jnp.asarray(-jnp.inf, inputs.a.dtype)
  if options.exclude_support:
    g = jnp.where(mask, neg_inf, g)
  merged = topk_mask(g, jnp.minimum(2 * k, g.size)) | mask   # the official top-2s, at most every channel
  return topk_mask(jnp.where(merged, inputs.a, neg_inf), k)


def check_support_size(k: Any, c: int) -> None:
  check_budget(k, c, "k")   # a concrete k; a traced one (vmap over budgets) is the caller's
  if not isinstance(k, jax.core.Tracer) and int(k) < 1:
    raise ValueError(f"k must keep at least one of the {c} channels, got {int(k)}")


def recover_support(output_fn: Callable, params: Any, hidden: jax.Array, k: Any, norm: Optional[OutputNorm] = None,
                    options: RecoveryOptions = RecoveryOptions()) -> Support:
  """Runs the i-SpaSP loop on one unit, traceable (``jax.jit``, ``jax.vmap`` over ``k`` or units).

  Args:
    output_fn: ``output_fn(params, H) -> Z``, the unit's second layer before its norm
      (``Z: (N, ..., C_out)``); it must act on each example independently.
    params: what ``output_fn`` reads (traced; stack them to vmap over units).
    hidden: ``H: (N, ..., C)``, the dense hidden activations, channels last.
    k: the support size, ``1 <= k <= C``; may be traced (``jax.vmap`` over an int array).
    norm: the BatchNorm after the second layer, or ``None``.
    options: static :class:`RecoveryOptions`.

  Returns:
    :class:`Support` with ``mask: (C,)``.
  """
  options = check_options(options)
  check_support_size(k, hidden.shape[-1])
  inputs = loop_inputs(output_fn, params, hidden, norm, options)
  step = lambda mask: next_support(output_fn, params, hidden, k, norm, options, inputs, mask)
  empty = jnp.zeros(hidden.shape[-1], bool)
  if not options.stop_at_fixed_point:
    unroll = options.unroll
    if unroll is None:
      unroll = options.proxy != "reduced" and jax.default_backend() == "cpu"

    def body(_, carry):
      mask, _changed = carry
      new = step(mask)
      return new, jnp.any(new != mask)
    mask, changed = jax.lax.fori_loop(0, options.iterations, body, (empty, jnp.asarray(True)), unroll=bool(unroll) or 1)
    return Support(mask, jnp.asarray(options.iterations), changed)

  def wbody(carry):
    t, mask, _changed = carry
    new = step(mask)
    return t + 1, new, jnp.any(new != mask)

  def cond(carry):
    t, _mask, changed = carry
    return (t < options.iterations) & changed

  t, mask, changed = jax.lax.while_loop(cond, wbody, (jnp.asarray(0), empty, jnp.asarray(True)))
  return Support(mask, t, changed)
