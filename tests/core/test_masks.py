import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from helpers import linen_variables, nnx_split


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_topk_mask_exact_k_and_lowest_index_wins_ties(k):
  scores = jnp.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 0.0, 2.0, 3.0, 1.0, 1.0, 2.0])
  keep = np.asarray(jp.topk_mask(scores, k))
  assert keep.sum() == k
  # Reference: sort by (-score, index).
  order = sorted(range(12), key=lambda i: (-float(scores[i]), i))
  np.testing.assert_array_equal(np.flatnonzero(keep), np.sort(order[:k]))


@pytest.mark.parametrize("path", ["host", "compiled"])
def test_topk_mask_matches_a_stable_sort_on_signed_tied_and_nan_scores(path):
  """Both implementations against ``argsort`` of ``(-score, index)`` (NaN last, -0.0 == 0.0):
  numpy's partition for host scores with a concrete k, the radix search otherwise (here under jit)."""
  topk = jp.topk_mask if path == "host" else jax.jit(jp.topk_mask)
  rng = np.random.default_rng(1)
  for trial in range(20):
    scores = rng.choice([-2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 3.0, np.inf, -np.inf], size=37).astype(np.float32)
    normal = rng.random(37) < 0.3
    scores[normal] = rng.normal(size=int(normal.sum()))
    scores[rng.integers(0, 37, 3)] = np.nan if trial % 3 == 0 else 7.0
    nan = np.isnan(scores)
    order = np.lexsort((np.arange(37), -np.where(nan, 0.0, scores), nan))   # numbers first, by -score, then index
    for k in (0, 1, 5, 18, 36, 37):
      np.testing.assert_array_equal(np.flatnonzero(np.asarray(topk(jnp.asarray(scores), k))),
                                    np.sort(order[:k]), err_msg=f"trial {trial}, k {k}")
  big = rng.normal(size=100_000).astype(np.float32)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(topk(jnp.asarray(big), 777))),
                                np.sort(np.argsort(-big, kind="stable")[:777]))


def test_topk_mask_takes_a_traced_budget_and_vmaps_over_it():
  scores = jnp.asarray(np.random.default_rng(0).normal(size=50))
  ks = jnp.array([1, 7, 25, 50])
  many = jax.vmap(lambda k: jp.topk_mask(scores, k))(ks)
  for row, k in zip(np.asarray(many), [1, 7, 25, 50]):
    np.testing.assert_array_equal(row, np.asarray(jp.topk_mask(scores, k)))
    assert row.sum() == k


def test_apply_masks_zeroes_only_masked_entries_linen_and_nnx():
  for tree in (linen_variables()["params"], nnx_split()[1]):
    masks = jp.masks_like(tree, value=False)
    out = jp.apply_masks(tree, masks)
    assert type(out) is type(tree)
    for (p, a), (_, b) in zip(jp.leaves_with_paths(tree), jp.leaves_with_paths(out)):
      if p.endswith("kernel"):
        assert float(jnp.abs(b).sum()) == 0.0
      else:
        np.testing.assert_array_equal(a, b)
    keep_all = jp.apply_masks(tree, jp.masks_like(tree, value=True))
    for (_, a), (_, b) in zip(jp.leaves_with_paths(tree), jp.leaves_with_paths(keep_all)):
      np.testing.assert_array_equal(a, b)


def test_mismatched_masks_are_rejected():
  params = linen_variables()["params"]
  masks = jp.masks_like(params)
  wrong_shape = jax.tree.map(lambda m: None if m is None else m[:1], masks, is_leaf=lambda x: x is None)
  with pytest.raises(ValueError, match="has shape") as raised:
    jp.apply_masks(params, wrong_shape)
  assert "shrunk" not in str(raised.value)
  # a shrunk structured result's masks with its own (smaller) params: the message says what to pass
  small = jax.tree.map(lambda x: x[:1], params)
  with pytest.raises(ValueError, match="masks are shaped like the dense tree: pass the dense params"):
    jp.sparsity_report(small, masks)
  missing = {k: v for k, v in masks.items() if k != "Dense_2"}
  with pytest.raises(ValueError, match="missing paths"):
    jp.apply_masks(params, missing)
  wrong_dtype = jax.tree.map(lambda m: None if m is None else m.astype(jnp.float32), masks,
                             is_leaf=lambda x: x is None)
  with pytest.raises(ValueError, match="dtype"):
    jp.apply_masks(params, wrong_dtype)
  all_none = jax.tree.map(lambda m: None, masks, is_leaf=lambda x: x is None)
  with pytest.raises(ValueError, match="no mask leaf"):
    jp.apply_masks(params, all_none)


def test_sparsity_report_counts_and_prints():
  params = {"a": {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0]])}, "b": {"kernel": jnp.zeros((2, 3)),
                                                                        "bias": jnp.ones(3)}}
  rep = jp.sparsity_report(params)
  assert (rep.size, rep.nonzero) == (10, 2)
  assert rep.per_leaf() == {"a/kernel": 0.5, "b/kernel": 1.0}
  assert rep.sparsity == pytest.approx(0.8)
  text = str(rep)
  assert "a/kernel" in text and "global" in text and "0.8000" in text
  masks = jp.masks_like(params)
  assert jp.sparsity_report(params, masks).sparsity == 0.0
  assert jp.count_kept(masks) == 10


def test_sparsity_report_on_nnx_state():
  _, params, _ = nnx_split()
  res = jp.magnitude(params, 20)
  assert isinstance(res.params, nnx.State) and isinstance(res.masks, nnx.State)
  rep = jp.sparsity_report(res.params, res.masks)
  assert rep.nonzero == 20 and rep.size == jp.count_prunable(params)
