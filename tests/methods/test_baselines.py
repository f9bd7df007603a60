import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from helpers import NNXNet, linen_variables, nnx_split


def _kernels(tree):
  return [np.asarray(x) for p, x in jp.leaves_with_paths(tree) if p.endswith("kernel")]


@pytest.mark.parametrize("k", [1, 10, 33, 68, 69])
def test_global_magnitude_matches_numpy_reference(k):
  params = linen_variables(seed=3)["params"]
  res = jp.magnitude(params, k)
  assert jp.count_kept(res.masks) == k
  w = np.concatenate([x.ravel() for x in _kernels(params)])
  ref = np.zeros(w.size, bool)
  ref[np.argsort(-np.abs(w), kind="stable")[:k]] = True
  got = np.concatenate([np.asarray(m).ravel() for p, m in jp.masks.mask_leaves(res.masks) if m is not None])
  np.testing.assert_array_equal(got, ref)
  pruned = np.concatenate([x.ravel() for x in _kernels(res.params)])
  np.testing.assert_array_equal(pruned, np.where(ref, w, 0.0))
  assert res.info["k"] == k and res.info["p"] == w.size and res.info["method"] == "magnitude"


def test_ties_are_broken_deterministically():
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((2, 2))}}
  res = jp.magnitude(params, 5)
  assert jp.count_kept(res.masks) == 5
  np.testing.assert_array_equal(np.asarray(res.masks["a"]["kernel"]).ravel()[:6], [1, 1, 1, 1, 1, 0])
  assert jp.count_kept(jp.magnitude(params, 5).masks) == 5


def test_layer_scope_uniform_allocation_exact():
  params = linen_variables(seed=1)["params"]
  p = jp.count_prunable(params)
  for k in (1, 17, 35, p):
    res = jp.magnitude(params, k, scope="layer")
    rep = jp.sparsity_report(res.params, res.masks)
    assert rep.nonzero == k
    kept = [r[3] for r in rep.rows]
    assert kept == jp.uniform_allocation(k, [r[2] for r in rep.rows])
  assert jp.uniform_allocation(10, [5, 5, 5]) == [4, 3, 3]
  assert sum(jp.uniform_allocation(1234, [31360, 800, 200])) == 1234


def test_full_budget_changes_nothing():
  v = linen_variables()
  params = v["params"]
  for res in (jp.magnitude(params, jp.count_prunable(params)),
              jp.random(params, jp.count_prunable(params), key=jax.random.key(0))):
    for (_, a), (_, b) in zip(jp.leaves_with_paths(params), jp.leaves_with_paths(res.params)):
      np.testing.assert_array_equal(a, b)


def test_random_is_exact_seeded_and_layer_scoped():
  params = linen_variables()["params"]
  a = jp.random(params, 30, key=jax.random.key(1))
  b = jp.random(params, 30, key=jax.random.key(1))
  c = jp.random(params, 30, key=jax.random.key(2))
  assert jp.count_kept(a.masks) == 30
  flat = lambda r: np.concatenate([np.asarray(m).ravel() for _, m in jp.masks.mask_leaves(r.masks) if m is not None])
  np.testing.assert_array_equal(flat(a), flat(b))
  assert not np.array_equal(flat(a), flat(c))
  rl = jp.random(params, 30, key=jax.random.key(1), scope="layer")
  assert [r[3] for r in jp.sparsity_report(rl.params, rl.masks).rows] == jp.uniform_allocation(30, [24, 30, 15])
  assert jp.count_kept(jp.random(params, 30, key=jax.random.PRNGKey(0)).masks) == 30


def test_works_on_full_linen_variables_and_nnx_state():
  v = linen_variables()
  res = jp.magnitude(v, 20)   # batch_stats and BN params are not kernels: left untouched
  np.testing.assert_array_equal(res.params["batch_stats"]["BatchNorm_0"]["mean"], v["batch_stats"]["BatchNorm_0"]["mean"])
  graphdef, params, rest = nnx_split()
  res = jp.magnitude(params, 20)
  model = nnx.merge(graphdef, res.params, rest)
  assert isinstance(model, NNXNet)
  assert int(jnp.count_nonzero(model.fc1.kernel[...])) + int(jnp.count_nonzero(model.fc2.kernel[...])) \
      + int(jnp.count_nonzero(model.fc3.kernel[...])) == 20


@pytest.mark.parametrize("k, err, match", [
    (0, ValueError, "k must be > 0"), (-1, ValueError, "k must be > 0"), (70, ValueError, "exceeds"),
    (5.0, TypeError, "k_from_sparsity"), (0.5, TypeError, "must be an int"), (True, TypeError, "must be an int"),
    (np.int64(5), None, None), (jnp.asarray(5), None, None), (np.asarray(5), None, None),
    (jnp.asarray([5]), TypeError, "must be an int"), (jnp.asarray(5.0), TypeError, "k_from_sparsity")])
def test_bad_budgets(k, err, match):
  params = linen_variables()["params"]   # p = 69
  for fn in (lambda: jp.magnitude(params, k), lambda: jp.random(params, k, key=jax.random.key(0))):
    if err is None:
      assert jp.count_kept(fn().masks) == 5
    else:
      with pytest.raises(err, match=match):
        fn()


def test_traced_budget_says_to_make_it_static():
  params = linen_variables()["params"]
  with pytest.raises(TypeError, match="k must be a concrete int: under jax.jit, make it static"):
    jax.jit(lambda p, k: jp.magnitude(p, k).masks)(params, 5)


def test_other_bad_input():
  with pytest.raises(ValueError, match="no prunable leaves"):
    jp.magnitude({"bn": {"scale": jnp.ones(4)}}, 1)
  with pytest.raises(ValueError, match="scope"):
    jp.magnitude(linen_variables()["params"], 3, scope="block")
  with pytest.raises(TypeError, match="key"):
    jp.random(linen_variables()["params"], 3, key=0)


def test_magnitude_is_jittable_inside_a_user_function():
  params = linen_variables()["params"]
  out = jax.jit(lambda p: jp.magnitude(p, 11).params)(params)
  assert sum(int(np.count_nonzero(k)) for k in _kernels(out)) == 11
