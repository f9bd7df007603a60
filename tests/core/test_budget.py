import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

PARAMS = {"fc1": {"kernel": np.zeros((784, 40))}, "fc2": {"kernel": np.zeros((40, 20))},
          "fc3": {"kernel": np.zeros((20, 10))}}   # MLPNet: p = 32360


def test_k_from_sparsity_is_exact_where_the_product_is_an_integer():
  # 0.9 * 32360 = 29124.000000000004 and (1 - 0.9) * 32360 = 3235.99...: neither may shift k.
  assert jp.k_from_sparsity(PARAMS, 0.9) == 3236
  assert jp.k_from_sparsity(PARAMS, 0.5) == 16180
  assert jp.k_from_sparsity(PARAMS, 0.0) == 32360


def test_k_from_sparsity_rounding_modes():
  # 0.98 * 32360 = 31712.8 pruned
  assert jp.k_from_sparsity(PARAMS, 0.98) == 648
  assert jp.k_from_sparsity(PARAMS, 0.98, rounding="ceil") == 647
  assert jp.k_from_sparsity(PARAMS, 0.98, rounding="nearest") == 647
  # CHITA's int((1 - s) * p), float truncation included
  assert [jp.k_from_sparsity(PARAMS, s, rounding="chita") for s in (0.8, 0.9, 0.98)] == [6471, 3235, 647]
  with pytest.raises(ValueError, match="rounding"):
    jp.k_from_sparsity(PARAMS, 0.98, rounding="up")


@pytest.mark.parametrize("s", [0.0, 0.13, 0.5, 0.9, 0.95, 0.999])
def test_sparsity_from_k_inverts(s):
  k = jp.k_from_sparsity(PARAMS, s)
  back = jp.sparsity_from_k(PARAMS, k)
  assert abs(back - s) < 1.0 / 32360
  assert jp.k_from_sparsity(PARAMS, back) == k


@pytest.mark.parametrize("bad, err, match", [
    (1.0, ValueError, r"\[0, 1\)"), (-0.1, ValueError, r"\[0, 1\)"), ("0.5", TypeError, "float"),
    (True, TypeError, "float"), (np.ones(2) / 2, TypeError, "float"), (np.asarray(1.0), ValueError, r"\[0, 1\)")])
def test_bad_sparsity(bad, err, match):
  with pytest.raises(err, match=match):
    jp.k_from_sparsity(PARAMS, bad)


def test_sparsity_given_as_a_0d_array():
  assert jp.k_from_sparsity(PARAMS, np.asarray(0.9)) == jp.k_from_sparsity(PARAMS, 0.9)
  assert jp.k_from_sparsity(PARAMS, jnp.asarray(0.5)) == jp.k_from_sparsity(PARAMS, 0.5)


def test_sparsity_that_keeps_nothing():
  tiny = {"a": {"kernel": np.zeros((2, 2))}}
  with pytest.raises(ValueError, match="keeps no weight"):
    jp.k_from_sparsity(tiny, 0.9, rounding="nearest")   # 3.6 -> 4 pruned of 4


@pytest.mark.parametrize("k, err", [(0, ValueError), (-3, ValueError), (32361, ValueError), (10.0, TypeError),
                                    (True, TypeError)])
def test_sparsity_from_k_bad_k(k, err):
  with pytest.raises(err, match="k"):
    jp.sparsity_from_k(PARAMS, k)
