"""Budgets: ``k`` = number of prunable weights kept (an int), and conversions from a sparsity."""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.core.checks import as_real
from jaxprune.core.trees import PrunableSpec, PyTree, count_prunable


def check_k(k, p: int, name: str = "k") -> int:
  """Validates a kept-weight budget ``0 < k <= p``; returns it as a Python int (a concrete 0-d
  integer array counts as one; a traced ``k`` cannot size the masks)."""
  if isinstance(k, jax.core.Tracer):
    raise TypeError(f"{name} must be a concrete int: under jax.jit, make it static (functools.partial or "
                    f"static_argnames), since it fixes how many weights the masks keep")
  if isinstance(k, (np.ndarray, jax.Array)) and np.ndim(k) == 0 and jnp.issubdtype(k.dtype, jnp.integer):
    k = int(k)
  if isinstance(k, bool) or not isinstance(k, numbers.Integral):
    hint = " (use jaxprune.k_from_sparsity(params, sparsity) to convert a sparsity)" if as_real(k) is not None else ""
    raise TypeError(f"{name} must be an int (number of weights kept), got {type(k).__name__} {k!r}{hint}")
  k = int(k)
  if k <= 0:
    raise ValueError(f"{name} must be > 0 (number of weights kept), got {k}")
  if k > p:
    raise ValueError(f"{name}={k} exceeds the number of prunable weights ({p})")
  return k


def check_sparsity(sparsity, name: str = "sparsity") -> float:
  s = as_real(sparsity)
  if s is None:
    raise TypeError(f"{name} must be a float in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
  if not 0.0 <= s < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {s}")
  return s


def check_channel_sparsity(value, what: str) -> float:
  """A structured method's sparsity of one group or unit, in ``[0, 1)``, as a float (real numbers
  and concrete 0-d arrays); ``ValueError`` naming ``what`` otherwise."""
  s = as_real(value)
  if s is None or not 0.0 <= s < 1.0:
    raise ValueError(f"{what} must be a float in [0, 1), got {value!r}")
  return s


def n_pruned_from_sparsity(p: int, sparsity: float, rounding: str = "floor") -> int:
  """Weights to prune for a sparsity: ``floor``/``ceil``/``nearest`` of ``sparsity * p``.

  Products within 1e-9 of an integer count as that integer, so 0.9 * 32360 is 29124, not
  29124.000000000004 rounded up or (1 - 0.9) * 32360 = 3235.99... rounded down.
  """
  exact = sparsity * p
  near = round(exact)
  if abs(exact - near) <= 1e-9 * max(1.0, abs(exact)):
    return int(near)
  if rounding == "floor":
    return int(math.floor(exact))
  if rounding == "ceil":
    return int(math.ceil(exact))
  if rounding == "nearest":
    return int(math.floor(exact + 0.5))
  raise ValueError(f"rounding must be 'floor', 'ceil', 'nearest' or 'chita', got {rounding!r}")


ROUNDINGS = ("floor", "ceil", "nearest", "chita")


def k_from_sparsity(params: PyTree, sparsity: float, prunable: PrunableSpec = None, *,
                    rounding: str = "floor") -> int:
  """Number of weights kept at a given sparsity of the prunable set.

  ``k = p - round(sparsity * p)`` with ``rounding`` of the pruned count (``"floor"`` by
  default: never prune more than asked; ``"ceil"``, ``"nearest"``). ``rounding="chita"``
  reproduces the CHITA/CBS code's ``k = int((1 - sparsity) * p)`` literally, float truncation
  included (it keeps one weight fewer than ``"floor"`` at e.g. 0.8 and 0.9 on MLPNet); the
  published MP columns use it. Raises if the result keeps no weight.
  """
  s = check_sparsity(sparsity)
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
  p = count_prunable(params, prunable)
  k = int((1.0 - s) * p) if rounding == "chita" else p - n_pruned_from_sparsity(p, s, rounding)
  if k <= 0:
    raise ValueError(f"sparsity={s} keeps no weight of the {p} prunable weights")
  return k


def sparsity_from_k(params: PyTree, k: int, prunable: PrunableSpec = None) -> float:
  """Inverse of :func:`k_from_sparsity`: ``1 - k / p``."""
  p = count_prunable(params, prunable)
  k = check_k(k, p)
  return 1.0 - k / p


CHANNEL_ROUNDINGS = ("floor", "truncate")


def check_round_to(round_to) -> None:
  """``round_to`` (channels kept in multiples of it) must be a positive int."""
  if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
    raise ValueError(f"round_to must be a positive int, got {round_to!r}")


def n_kept_channels(n: int, sparsity: float, rounding: str = "floor", round_to: int = 1) -> int:
  """Channels a group of ``n`` keeps at a channel ``sparsity``: the one rule of every structured method.

  ``"floor"`` (default) is the rule of the weight budgets (:func:`k_from_sparsity`): prune
  ``floor(sparsity * n)`` channels, so never more than asked (0.3 of 16 keeps 12).
  ``"truncate"`` is the official codes' ``int(n * (1 - sparsity))`` (Intra-Fusion's MetaPruner;
  i-SpaSP's ``int(n * keep_ratio)``), which keeps one channel fewer whenever ``sparsity * n`` is
  not an integer (0.3 of 16 keeps 11). Both count products within 1e-9 of an integer as that
  integer, so 40 channels at 0.9 keep 4 under either rule, as ``int(40 * 0.1)`` does in the
  i-SpaSP code (the float ``int(40 * (1 - 0.9))`` would give 3).

  ``round_to > 1`` then rounds the kept count up to a multiple of ``round_to`` (at most ``n``), as
  Torch-Pruning's ``round_to`` does: widths such as 23 or 45 can run slower than the dense 32 or
  64 (ResNet20 on a CPU, ``experiments/README.md``, size report), multiples of 8 do not.
  """
  s = check_sparsity(sparsity)
  check_round_to(round_to)
  if rounding == "floor":
    m = n - n_pruned_from_sparsity(n, s, "floor")
  elif rounding == "truncate":
    exact = (1.0 - s) * n
    near = round(exact)
    m = int(near) if abs(exact - near) <= 1e-9 * max(1.0, exact) else int(math.floor(exact))
  else:
    raise ValueError(f"rounding must be one of {CHANNEL_ROUNDINGS}, got {rounding!r}")
  return m if round_to == 1 else min(n, -(-m // round_to) * round_to)
