"""Property-based fuzz of the public API (hypothesis): every generated call, bad or edge, either raises
a clear error (ValueError/TypeError/IndexError naming what is wrong) or returns a valid result: exact
budgets, finite plans with the right marginals. Never a NaN and never a broken budget.

The default suite runs a short profile; ``-m slow`` runs the long one. Counts of outcomes per
function are printed (``pytest -s``).
"""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxprune as jp
from jaxprune import ot

CLEAR = (ValueError, TypeError, IndexError)
COUNTS = collections.Counter()
NUMBERS = st.one_of(st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                    st.text(max_size=3))
PARAMS = {"a": {"kernel": jnp.arange(12.0).reshape(3, 4) - 5.0}, "b": {"kernel": jnp.linspace(-1, 1, 8).reshape(4, 2)}}


def _outcome(name, fn):
  try:
    out = fn()
  except CLEAR as err:
    assert str(err), f"{name}: an error without a message"
    COUNTS[(name, "clear error")] += 1
    return None
  COUNTS[(name, "valid result")] += 1
  return out


def topk_case(scores, k):
  mask = _outcome("topk_mask", lambda: jp.topk_mask(jnp.asarray(scores, jnp.float32), k))
  if mask is not None:
    assert int(mask.sum()) == int(k) and 0 <= int(k) <= len(scores)


def budget_case(sparsity, rounding):
  k = _outcome("k_from_sparsity", lambda: jp.k_from_sparsity(PARAMS, sparsity, rounding=rounding))
  if k is not None:
    assert isinstance(k, int) and 1 <= k <= 20


def channels_case(n, sparsity, rounding):
  m = _outcome("n_kept_channels", lambda: jp.n_kept_channels(n, sparsity, rounding))
  if m is not None:
    assert 0 <= m <= n and m >= n - math.floor(sparsity * n + 1e-6) - 1


def magnitude_case(k, poison):
  params = PARAMS if poison is None else jax.tree.map(lambda a: a.at[0, 0].set(poison), PARAMS)
  result = _outcome("magnitude", lambda: jp.magnitude(params, k))
  if result is not None:
    assert jp.count_kept(result.masks) == k
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(result.params))


def allocation_case(k, sizes):
  parts = _outcome("uniform_allocation", lambda: jp.uniform_allocation(k, sizes))
  if parts is not None:
    assert sum(parts) == k and all(0 <= p <= s for p, s in zip(parts, sizes))


def plan_case(y, z, eps, relative):
  out = _outcome("entropic_plan_1d", lambda: ot.entropic_plan_1d(jnp.asarray(y), jnp.asarray(z), eps,
                                                                   relative=relative))
  if out is not None:
    plan, info = out
    assert bool(jnp.isfinite(plan).all()), (y, z, eps, relative)
    np.testing.assert_allclose(np.asarray(plan).sum(1), 1.0 / len(y), atol=1e-5)


VECTOR = st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(-1e3, 1e3, width=32)), min_size=4, max_size=4)
CASES = {
    "topk_mask": (topk_case, dict(scores=st.lists(st.floats(-10, 10, width=32), min_size=6, max_size=6),
                                  k=st.one_of(st.integers(-2, 8), NUMBERS))),
    "k_from_sparsity": (budget_case, dict(sparsity=st.one_of(st.floats(0, 1), NUMBERS), rounding=st.sampled_from(["floor", "ceil", "nearest",
                                                                                      "chita", "bogus", ""]))),
    "n_kept_channels": (channels_case, dict(n=st.integers(1, 64), sparsity=st.floats(0, 0.999),
                                            rounding=st.sampled_from(["floor", "truncate", "round"]))),
    "magnitude": (magnitude_case, dict(k=st.one_of(st.integers(-2, 22), NUMBERS), poison=st.sampled_from([None, float("nan"), float("inf")]))),
    "uniform_allocation": (allocation_case, dict(k=st.integers(-3, 40), sizes=st.lists(st.integers(-1, 12),
                                                                                       min_size=1, max_size=4))),
    "entropic_plan_1d": (plan_case, dict(y=VECTOR, z=VECTOR, eps=st.one_of(st.sampled_from([0.0, 1e-3, 1.0, math.inf]),
                                                                            st.floats(-1, 10)),
                                         relative=st.booleans())),
}


def _run(name, examples):
  case, strategies = CASES[name]
  fuzz = settings(max_examples=examples, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])(given(**strategies)(case))
  fuzz()
  print(f"\nfuzz {name}: " + ", ".join(f"{what} {n}" for (fn, what), n in sorted(COUNTS.items()) if fn == name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_short(name):
  _run(name, 15)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_long(name):
  _run(name, 200)
