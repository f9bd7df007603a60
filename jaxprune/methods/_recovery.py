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
PROXIES = ("examples", "reduced")
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
    proxy: ``"examples"``: the official computation, every example through the second layer in
      chunks, any ``output_fn``; ``"reduced"``: the same proxy from the summed activations
      ``sum_b H_b`` through the layer once (exact when ``output_fn`` is affine and ``bn_mode`` is
      ``"eval"``, since the support is shared by all examples; the brief's section 7.1).
    unroll: unroll the ``T`` iterations in the compiled program. ``None`` (default): only for the
      per-example proxy on CPU, where XLA ran the convolutions inside a loop body about 8x slower
      than unrolled (measured on ResNet20 blocks). Results are identical either way.
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


def _chunk_proxy(output_fn, params, norm, bn_mode, mask, h):
  """``sum_{examples, positions} dR/dH`` on one chunk: ``(C,)``."""
  dense = lambda x: norm_eval(output_fn(params, x), norm)
  u, pullback = jax.vjp(dense, h)
  z = output_fn(params, h * mask.astype(h.dtype))
  u_hat = _norm_batch(z, norm) if (bn_mode == "train" and norm is not None) else norm_eval(z, norm)
  u_hat = jnp.where(jnp.any(mask), u_hat, 0.0)   # the official pruned output is 0 before any channel is chosen
  (grad,) = pullback(u - jax.lax.stop_gradient(u_hat))
  return jnp.sum(grad, axis=tuple(range(grad.ndim - 1)))


def proxy(output_fn: Callable, params: Any, hidden: jax.Array, mask: jax.Array, norm: Optional[OutputNorm] = None,
          *, chunk_size: Optional[int] = 256, bn_mode: str = "eval") -> jax.Array:
  """The signed proxy ``g: (C,)`` for a support ``mask: (C,)``: the gradient of
  ``1/2 ||U - U_hat||^2`` with respect to ``hidden: (N, ..., C)``, summed over all but channels.

  Chunks of ``chunk_size`` examples run one after another (unrolled up to
  ``MAX_UNROLLED_CHUNKS``, else in ``lax.map``), a last partial chunk on its own, so that
  train-mode statistics are per chunk as in the official loader.
  """
  fn = functools.partial(_chunk_proxy, output_fn, params, norm, bn_mode, mask)
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


def reduced_proxy(output_fn: Callable, params: Any, summed: jax.Array, n: Any, mask: jax.Array,
                  norm: Optional[OutputNorm] = None) -> jax.Array:
  """:func:`proxy` for an affine ``output_fn`` with the norm in inference mode, from
  ``summed = sum_b H_b: (1, ..., C)`` over ``n`` examples.

  With ``f(x) = L x + c``: for a non-empty support ``sum_b V_b = L(summed * (1 - m))``; for the
  empty one (pruned output 0, as the official code) ``sum_b V_b = L summed + n c``. The proxy is
  ``L^T`` of that sum, summed over positions: two passes of the layer over one example.
  """
  dense = lambda x: norm_eval(output_fn(params, x), norm)
  offset = dense(jnp.zeros_like(summed))
  removed, pullback = jax.vjp(dense, summed * (1 - mask.astype(summed.dtype)))
  v_sum = removed - offset + jnp.where(jnp.any(mask), 0.0, n * offset)
  (grad,) = pullback(v_sum)
  return jnp.sum(grad, axis=tuple(range(grad.ndim - 1)))


def recover_support(output_fn: Callable, params: Any, hidden: jax.Array, k: Any, norm: Optional[OutputNorm] = None,
                    options: RecoveryOptions = RecoveryOptions()) -> Support:
  """Runs the i-SpaSP loop on one unit.

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
  check_budget(k, hidden.shape[-1], "k")   # a concrete k; a traced one (vmap over budgets) is the caller's
  if not isinstance(k, jax.core.Tracer) and int(k) < 1:
    raise ValueError(f"k must keep at least one of the {hidden.shape[-1]} channels, got {int(k)}")
  a = aggregate_activations(hidden, options.aggregate)
  neg_inf = jnp.asarray(-jnp.inf, a.dtype)
  summed = jnp.sum(hidden, axis=0, keepdims=True)

  def step(mask):
    if options.proxy == "reduced":
      g = reduced_proxy(output_fn, params, summed, hidden.shape[0], mask, norm)
    else:
      g = proxy(output_fn, params, hidden, mask, norm, chunk_size=options.chunk_size, bn_mode=options.bn_mode)
    if options.exclude_support:
      g = jnp.where(mask, neg_inf, g)
    merged = topk_mask(g, jnp.minimum(2 * k, g.size)) | mask   # the official top-2s, at most every channel
    return topk_mask(jnp.where(merged, a, neg_inf), k)

  empty = jnp.zeros(hidden.shape[-1], bool)
  if not options.stop_at_fixed_point:
    def body(_, carry):
      mask, _changed = carry
      new = step(mask)
      return new, jnp.any(new != mask)
    unroll = options.unroll
    if unroll is None:
      unroll = options.proxy == "examples" and jax.default_backend() == "cpu"
    mask, changed = jax.lax.fori_loop(0, options.iterations, body, (empty, jnp.asarray(True)), unroll=bool(unroll) or 1)
    return Support(mask, jnp.asarray(options.iterations), changed)

  def cond(carry):
    t, _mask, changed = carry
    return (t < options.iterations) & changed

  def wbody(carry):
    t, mask, _changed = carry
    new = step(mask)
    return t + 1, new, jnp.any(new != mask)

  t, mask, changed = jax.lax.while_loop(cond, wbody, (jnp.asarray(0), empty, jnp.asarray(True)))
  return Support(mask, t, changed)
