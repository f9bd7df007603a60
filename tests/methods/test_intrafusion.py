"""Intra-Fusion: fusion-map invariants, duplicates, the exact solver against scipy, real MLPNet accuracy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import jaxprune as jp
from jaxprune import models, ot
from jaxprune.methods._intrafusion import fusion_from_plan, pairing_cost, pairing_vectors

CIFAR = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


@pytest.fixture(scope="module")
def resnet20_checkpoint(checkpoint_dir):
  v = jp.load_resnet20(f"{checkpoint_dir}/resnet20_cifar10.npz")
  return v, jp.groups(models.resnet20().apply, v, CIFAR)


def test_fusion_map_columns_sum_to_one_and_rows_to_n_over_m(resnet20_checkpoint):
  v, groups = resnet20_checkpoint
  res = jp.intra_fusion(v, groups, {0: 0.7, 11: 0.7}, mode="mask", rounding="truncate", show_progress=False)
  for i in (0, 11):
    f = res.info["maps"][i]
    n, m = groups[i].size, int(groups[i].size * 0.3)
    assert f.fusion_map.shape == (m, n) and f.plan.shape == (n, m)
    np.testing.assert_allclose(f.fusion_map.sum(0), 1.0, atol=1e-9)
    np.testing.assert_allclose(f.fusion_map.sum(1), n / m, atol=1e-9)
    np.testing.assert_allclose(f.plan.sum(1), 1 / n, atol=1e-12)
    np.testing.assert_allclose(f.plan.sum(0), 1 / m, atol=1e-12)
    assert res.info["groups"][i]["marginal_error"] < 1e-12
  avg = jp.intra_fusion(v, groups, {0: 0.7}, mode="mask", semantics="average", show_progress=False)
  np.testing.assert_allclose(avg.info["maps"][0].producer_map.sum(1), 1.0, atol=1e-9)


def test_sparsity_zero_leaves_the_model_unchanged(resnet20_checkpoint, data_dir):
  v, groups = resnet20_checkpoint
  test = jp.data.load("cifar10_png5k", "test", data_dir=data_dir, source="local")
  x = jnp.asarray(test.x[:16])
  model = models.resnet20()
  res = jp.intra_fusion(v, groups, 0.0, show_progress=False)
  for i, g in enumerate(groups):
    np.testing.assert_allclose(res.info["maps"][i].fusion_map, np.eye(g.size), atol=1e-12)
  ref = model.apply(v, x)
  np.testing.assert_allclose(model.apply(res.params, x), ref, atol=1e-4 * float(jnp.abs(ref).max()))


def duplicated_mlp(n_kept=3, copies=2, seed=0):
  """A 2-layer MLP whose hidden channels come in exact duplicate clusters (producer rows and
  consumer columns identical within a cluster); the representatives are 0..n_kept-1."""
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(5, n_kept)).astype(np.float32)
  b1 = np.abs(rng.normal(size=n_kept)).astype(np.float32)
  w2 = rng.normal(size=(n_kept, 4)).astype(np.float32)
  tile = lambda a, axis: np.concatenate([a] * copies, axis=axis)
  params = {"fc1": {"kernel": tile(w1, 1), "bias": tile(b1, 0)},
            "fc2": {"kernel": tile(w2, 0), "bias": np.zeros(4, np.float32)}}
  return models.MLP(widths=(n_kept * copies,), num_classes=4), {"params": params}


def test_duplicates_sum_semantics_scales_by_n_over_m_and_average_is_exact():
  model, v = duplicated_mlp()
  x = jax.random.normal(jax.random.key(0), (7, 5))
  g = jp.groups(model.apply, v, x)
  representatives_first = lambda variables, group: -np.arange(group.size, dtype=float)   # keep 0, 1, 2
  dense = model.apply(v, x)
  kw = dict(importance=representatives_first, show_progress=False)
  fused = jp.intra_fusion(v, g, 0.5, **kw)
  small = models.MLP.from_params(fused.params)
  np.testing.assert_array_equal(fused.kept[0], [0, 1, 2])
  np.testing.assert_allclose(small.apply(fused.params, x), 2.0 * dense, rtol=1e-5, atol=1e-5)
  averaged = jp.intra_fusion(v, g, 0.5, semantics="average", **kw)
  np.testing.assert_allclose(small.apply(averaged.params, x), dense, rtol=1e-5, atol=1e-5)
  plain = jp.prune_channels(v, g, 0.5, **kw)
  out = small.apply(plain.params, x)
  np.testing.assert_allclose(out, 0.5 * dense, rtol=1e-5, atol=1e-5)   # half the mass is gone
  assert not np.allclose(out, dense, atol=1e-3) and not np.allclose(out, 2.0 * dense, atol=1e-3)


def scipy_ot(c, a, b):
  n, m = c.shape
  rows = np.kron(np.eye(n), np.ones((1, m)))
  cols = np.kron(np.ones((1, n)), np.eye(m))
  res = linprog(c.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None),
                method="highs")
  assert res.status == 0
  return res.x.reshape(n, m), res.fun


@pytest.mark.parametrize("n, m", [(7, 3), (12, 5), (9, 9)])
def test_exact_solver_matches_scipy_linear_programming(n, m):
  rng = np.random.default_rng(n * m)
  c = rng.uniform(size=(n, m))
  a, b = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(m))
  plan = ot.exact_plan(c, a, b)
  ref, value = scipy_ot(c, a, b)
  assert (plan * c).sum() == pytest.approx(value, abs=1e-12)
  np.testing.assert_allclose(plan, ref, atol=1e-9)   # continuous random costs: a unique optimum


def test_entropic_solver_is_close_to_exact_on_a_real_group(resnet20_checkpoint):
  v, groups = resnet20_checkpoint
  exact = jp.intra_fusion(v, groups, {4: 0.5}, mode="mask", show_progress=False)
  ent = jp.intra_fusion(v, groups, {4: 0.5}, mode="mask", solver="entropic", show_progress=False)
  ce, cs = exact.info["groups"][4]["transport_cost"], ent.info["groups"][4]["transport_cost"]
  assert ce <= cs <= ce * (1 + 1e-3)
  assert ent.info["groups"][4]["marginal_error"] < 1e-5
  np.testing.assert_array_equal(exact.kept[4], ent.kept[4])


def test_vmapped_parallel_solves_equal_separate_sequential_ones(resnet20_checkpoint):
  v, groups = resnet20_checkpoint
  which = [1, 2, 3]   # three inner groups of 64 channels: one (64, 32) size class, no shared layers
  par = jp.intra_fusion(v, groups, {i: 0.5 for i in which}, solver="entropic", order="parallel", mode="mask",
                        show_progress=False)
  for i in which:
    one = jp.intra_fusion(v, groups, {i: 0.5}, solver="entropic", mode="mask", show_progress=False)
    # a vmapped Sinkhorn loop runs until every member has converged, so plans agree to float32 noise
    np.testing.assert_allclose(par.info["maps"][i].plan, one.info["maps"][i].plan, atol=1e-5)
    assert par.info["groups"][i]["transport_cost"] == pytest.approx(one.info["groups"][i]["transport_cost"], rel=1e-5)


def test_zero_pairing_vectors_give_no_nan():
  model = models.MLP(widths=(6,), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  v["params"]["fc1"]["kernel"] = v["params"]["fc1"]["kernel"].at[:, 2].set(0.0)
  v["params"]["fc2"]["kernel"] = v["params"]["fc2"]["kernel"].at[2, :].set(0.0)
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))
  x = pairing_vectors(v, g[0])
  assert float(jnp.abs(x[2]).max()) == 0.0
  cost = pairing_cost(x, np.array([0, 1, 3]))
  assert bool(jnp.all(jnp.isfinite(cost)))
  for solver in ("exact", "entropic"):
    res = jp.intra_fusion(v, g, 0.5, solver=solver, show_progress=False)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for _, leaf in jp.trees.leaves_with_paths(res.params))


def test_fusion_from_plan_zero_mass_source():
  plan = np.array([[0.5, 0.0], [0.0, 0.5], [0.0, 0.0]])
  t, tp = fusion_from_plan(plan, np.array([0.5, 0.5, 0.0]))
  np.testing.assert_allclose(t, [[1, 0, 0], [0, 1, 0]])
  assert np.all(np.isfinite(tp))


def test_taylor_intra_fusion_fuses_the_gradients_too():
  model = models.MLP(widths=(8, 6), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  loss = jp.classification_loss(model.apply)
  rng = np.random.default_rng(0)
  batches = [(jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 16)))]
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))
  res = jp.intra_fusion(v, g, 0.5, importance="taylor", loss_fn=loss, batches=batches, show_progress=False)
  assert [k.size for k in res.kept.values()] == [3, 4]
  assert models.MLP.from_params(res.params).widths == (4, 3)


def test_intra_fusion_beats_default_pruning_on_mlpnets_first_hidden_group(checkpoint_dir, data_dir):
  """Real data, l1, no fine-tuning: fusing fc1's 40 channels (consumer fc2) beats dropping them at
  every sparsity from 0.4 on (experiment 5a has the full table, including group 0, where fusing the
  20 channels that feed the classifier loses)."""
  v = jp.load_mlpnet(f"{checkpoint_dir}/mlpnet_mnist.npz")
  test = jp.data.load("mnist", "test", data_dir=data_dir, source="local")
  model = models.mlpnet()
  g = jp.groups(model.apply, v, jnp.zeros((1, 28, 28, 1)))
  assert g[1].modules("producer") == ("params/fc1",)
  acc = lambda vv: jp.evaluate(model.apply, vv, test.x, test.y, batch_size=2000).accuracy
  for s in (0.4, 0.5, 0.6, 0.7):
    d = acc(jp.prune_channels(v, g, {1: s}, mode="mask", show_progress=False).params)
    f = acc(jp.intra_fusion(v, g, {1: s}, mode="mask", show_progress=False).params)
    assert f > d, (s, f, d)


def test_intra_fusion_bad_input():
  model = models.MLP(widths=(6,), num_classes=3)
  v = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  g = jp.groups(model.apply, v, jnp.zeros((1, 4)))
  for kw, match in ((dict(solver="sinkhorn"), "solver"), (dict(semantics="mean"), "semantics"),
                    (dict(marginals="softmax"), "marginals"), (dict(order="random"), "order"),
                    (dict(p=0.5), "p must be"), (dict(p=float("inf")), "p must be a finite number"),
                    (dict(solver="entropic", eps=0.0), "eps"),
                    (dict(mode="cut"), "mode"), (dict(transport="kept"), "transport")):
    with pytest.raises(ValueError, match=match):
      jp.intra_fusion(v, g, 0.5, show_progress=False, **kw)
  with pytest.raises(ValueError, match="sparsity"):
    jp.intra_fusion(v, g, 1.0, show_progress=False)
  with pytest.raises(ValueError, match="needs grads="):
    jp.intra_fusion(v, g, 0.5, importance="taylor", show_progress=False)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_host_pairing_cost_equals_the_compiled_one(p):
  """Host trees use the tiled kernel on the kept columns; device trees the jitted (n, n) cost. Both
  equal the l_p distances of the l2-normalised rows written out in numpy (a zero row stays zero)."""
  from jaxprune.methods._intrafusion import _pairing_cost_host, all_pairs_cost
  x = np.random.default_rng(p).normal(size=(9, 13)).astype(np.float32)
  x[4] = 0.0
  keep = np.array([0, 3, 4, 8])
  xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
  ref = (np.abs(xn[:, None, :] - xn[None, keep, :]) ** p).sum(-1) ** (1.0 / p)
  np.testing.assert_allclose(_pairing_cost_host(x, keep, float(p)), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(all_pairs_cost(jnp.asarray(x), float(p), 4))[:, keep], ref, rtol=1e-5,
                             atol=1e-6)
  host = pairing_cost(jnp.asarray(x), keep, p)                  # a CPU jax array: the host path, same kind out
  assert isinstance(host, jax.Array) and host.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(host), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1, 3])
def test_tiled_lp_distances_cross_tiles_and_compile_once(p):
  """Shapes that span several row and feature tiles, with padding on every side, give the float64
  distances to float32 rounding; a zero row stays zero; new shapes compile nothing."""
  from jaxprune.methods._intrafusion import _TILE_FEATURES, _TILE_ROWS, _lp_distances_host, _lp_tile
  rng = np.random.default_rng(p)
  u = rng.normal(size=(_TILE_ROWS + 3, 2 * _TILE_FEATURES + 5)).astype(np.float32)
  v = rng.normal(size=(7, u.shape[1])).astype(np.float32)
  v[2] = u[_TILE_ROWS + 1] = 0.0
  ref = (np.abs(u[:, None, :].astype(np.float64) - v[None]) ** p).sum(-1) ** (1.0 / p)
  got = _lp_distances_host(u, v, float(p))
  assert got.shape == (u.shape[0], 7) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref, rtol=5e-6)
  compiled = _lp_tile._cache_size()
  for shape in [(3, 9), (40, 700), (_TILE_ROWS, _TILE_FEATURES)]:
    w = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(_lp_distances_host(w, w[:2], float(p)),
                               (np.abs(w[:, None].astype(np.float64) - w[None, :2]) ** p).sum(-1) ** (1 / p),
                               rtol=5e-6, atol=1e-6)
  assert _lp_tile._cache_size() == compiled
  assert _lp_distances_host(u[:0], v, float(p)).shape == (0, 7)


def test_euclidean_pairing_cost_keeps_near_rows_apart():
  """``p=2`` on the host is one product ``|x|^2 + |y|^2 - 2 x.y``; near rows cancel almost all of
  it. It is taken in float64, so a distance of 1e-4 (a float32 product would give about 3e-4 or 0)
  is right to 1e-8 and a row's distance to itself is below float32's rounding of 1."""
  from jaxprune.methods._intrafusion import _pairing_cost_host
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 4608)).astype(np.float32)
  x[1] = x[0] + 1e-4 * np.linalg.norm(x[0]) / np.sqrt(4608) * rng.normal(size=4608).astype(np.float32)
  keep = np.array([0, 2, 5])
  x64 = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  ref = np.sqrt(((x64[:, None, :] - x64[None, keep, :]) ** 2).sum(-1))
  got = _pairing_cost_host(x, keep, 2.0)
  assert 5e-5 < ref[1, 0] < 2e-4
  assert abs(got[1, 0] - ref[1, 0]) < 1e-8
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=2e-7)
  assert max(got[0, 0], got[2, 1], got[5, 2]) < 2e-7


def test_official_preset_uses_the_l1_pairing_cost_and_the_default_l2(resnet20_checkpoint):
  """The default cost is Euclidean; ``official=True`` keeps the official ``l_1`` (the costs are
  checked against distances written out in numpy)."""
  v, groups = resnet20_checkpoint
  for official, p in ((False, 2), (True, 1)):
    res = jp.intra_fusion(v, groups, {1: 0.5}, mode="mask", official=official, show_progress=False)
    f = res.info["maps"][1]
    x = np.asarray(pairing_vectors(jp.fold_batchnorm(v, groups, include_eps=not official), groups[1]), np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = (np.abs(xn[:, None, :] - xn[None, f.keep, :]) ** p).sum(-1) ** (1.0 / p)
    if not official:   # transport="removed": the kept channels' rows are not computed, but for their zero self-cost
      removed = np.setdiff1d(np.arange(groups[1].size), f.keep)
      np.testing.assert_array_equal(f.cost[f.keep, np.arange(f.keep.size)], 0.0)
      assert np.isnan(f.cost[f.keep]).sum() == f.keep.size * (f.keep.size - 1)
      f, ref = f._replace(cost=f.cost[removed]), ref[removed]
    np.testing.assert_allclose(f.cost, ref, rtol=2e-5, atol=1e-6)


def test_host_pairing_vectors_equal_the_traced_ones(resnet20_checkpoint):
  """Host leaves are written into one preallocated array (of any dtype); device leaves are gathered
  and joined by jnp. Both give the same rows, also for members with mapped rows (a flatten)."""
  v, groups = resnet20_checkpoint
  host_tree = jax.tree.map(np.asarray, v)
  for g in (groups[0], groups[5]):
    host = pairing_vectors(host_tree, g, host_dtype=np.float64)
    traced = jax.jit(lambda t, g=g: pairing_vectors(t, g))(v)
    assert host.dtype == np.float64 and isinstance(traced, jax.Array)
    np.testing.assert_array_equal(host.astype(np.float32), np.asarray(traced))
  rows = np.random.default_rng(0).permutation(12).reshape(4, 3)   # 3 rows per channel, scattered
  tree = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 12)},
          "b": {"kernel": np.arange(36, dtype=np.float32).reshape(12, 3)}}
  flat = jp.make_group(tree, [jp.Member("a/kernel", 1, "producer", "kernel", rows)],
                       [jp.Member("b/kernel", 0, "consumer", "kernel", rows)], size=4)
  host = pairing_vectors(tree, flat)
  assert host.shape == (4, 2 * 3 + 3 * 3)
  np.testing.assert_array_equal(host, np.asarray(jax.jit(lambda t: pairing_vectors(t, flat))(tree)))
  np.testing.assert_array_equal(host[1, :6], tree["a"]["kernel"][:, rows[1]].T.ravel())


def test_group_pairing_cost_from_member_products_equals_the_pairing_vectors_cost(resnet20_checkpoint):
  """Host trees at ``p=2`` build the cost from each member's products, never the ``(n, D)``
  pairing vectors; it equals the distances of the written-out vectors (jitted, on the device path),
  for conv groups, a group whose members are read through a flatten (several rows per channel,
  as a Dense after a flatten) and a channel whose vectors are zero."""
  from jaxprune.methods._intrafusion import all_pairs_cost, group_pairing_cost
  v, groups = resnet20_checkpoint
  host_tree = jax.tree.map(np.asarray, v)
  cases = [(host_tree, groups[0]), (host_tree, groups[5])]
  rng = np.random.default_rng(1)
  rows = rng.permutation(12).reshape(4, 3)
  flat_tree = {"a": {"kernel": rng.normal(size=(2, 12)).astype(np.float32)},
               "b": {"kernel": rng.normal(size=(12, 3)).astype(np.float32)},
               "c": {"kernel": rng.normal(size=(3, 3, 5, 4)).astype(np.float32)}}
  flat_tree["c"]["kernel"][..., 2] = 0.0
  flat_tree["a"]["kernel"][:, rows[2]] = 0.0
  flat_tree["b"]["kernel"][rows[2]] = 0.0
  flat = jp.make_group(flat_tree, [jp.Member("a/kernel", 1, "producer", "kernel", rows), ("c/kernel", 3)],
                       [jp.Member("b/kernel", 0, "consumer", "kernel", rows)], size=4)
  cases.append((flat_tree, flat))
  for tree, g in cases:
    keep = np.sort(rng.permutation(g.size)[:max(1, g.size // 2)])
    keep = np.union1d(keep, [2]) if g is flat else keep
    x = jax.jit(lambda t, g=g: pairing_vectors(t, g))(tree)
    ref = np.asarray(all_pairs_cost(x, 2.0, 8))[:, keep]
    got = group_pairing_cost(tree, g, keep, 2)
    assert isinstance(got, np.ndarray) and got.shape == (g.size, keep.size)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    removed = np.setdiff1d(np.arange(g.size), keep)
    np.testing.assert_allclose(group_pairing_cost(tree, g, keep, 2, rows=removed), ref[removed], rtol=1e-5, atol=1e-5)
    order = rng.permutation(g.size)   # any rows, in any order
    np.testing.assert_allclose(group_pairing_cost(tree, g, keep, 2, rows=order), ref[order], rtol=1e-5, atol=1e-5)
  assert got[2, list(keep).index(2)] == 0.0 and np.all(np.isfinite(got))


def test_group_pairing_cost_recomputes_near_duplicate_channels_in_float64():
  """The member products are float32 GEMMs; pairs whose cosine exceeds 0.95 (a kept channel and
  itself, near-duplicate channels) are recomputed in float64, where ``2 - 2 cos`` cancels. A
  channel 1e-4 away from a kept one gets its distance right to 1e-8; from the float32 products
  alone it would be 3e-4."""
  from jaxprune.methods._intrafusion import (_euclidean_from_gram, _kept_products, _member_views,
                                             group_pairing_cost)
  rng = np.random.default_rng(0)
  tree = {"c1": {"kernel": rng.normal(size=(3, 3, 64, 8)).astype(np.float32)},
          "c2": {"kernel": rng.normal(size=(3, 3, 8, 16)).astype(np.float32)}}
  for name, axis in (("c1", 3), ("c2", 2)):
    w = np.moveaxis(tree[name]["kernel"], axis, 0)
    w[1] = w[0] * (1 + 1e-4 * rng.normal(size=w[0].shape)).astype(np.float32)
  g = jp.make_group(tree, [("c1/kernel", 3)], [("c2/kernel", 2)], size=8)
  keep = np.array([0, 3, 5, 6])
  x = np.concatenate([np.moveaxis(tree["c1"]["kernel"], 3, 0).reshape(8, -1),
                      np.moveaxis(tree["c2"]["kernel"], 2, 0).reshape(8, -1)], axis=1).astype(np.float64)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  ref = np.sqrt(((xn[:, None, :] - xn[None, keep, :]) ** 2).sum(-1))
  got = group_pairing_cost(tree, g, keep, 2)
  assert 1e-5 < ref[1, 0] < 1e-3
  assert abs(got[1, 0] - ref[1, 0]) < 1e-8 and got[0, 0] == 0.0
  np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
  views = _member_views([tree["c1"]["kernel"], tree["c2"]["kernel"]], list(g.members), 8)
  sq = sum(np.einsum("pnq,pnq->n", v, v, dtype=np.float64) for v in views)
  rows = np.arange(8)
  plain = _euclidean_from_gram(sum(_kept_products(v, keep, rows).astype(np.float64) for v in views), np.sqrt(sq),
                               keep, rows)
  assert abs(plain[1, 0] - ref[1, 0]) > 0.5 * ref[1, 0]


@pytest.mark.parametrize("p, seed", [(1, 0), (2, 1), (2, 2), (3, 3)])
def test_removed_mass_plan_is_the_optimal_plan_of_the_whole_problem(p, seed):
  """For an ``l_p`` distance cost (a metric), leaving each kept channel's own mass in place and
  transporting the removed channels' mass only is optimal for the whole ``(n, m)`` problem: the
  same value as linear programming on all of it, and the same plan (random points: a unique optimum).
  Also with importance marginals, where the kept channels' target mass is not uniform."""
  from jaxprune.methods._intrafusion import marginals, removed_mass_plan
  rng = np.random.default_rng(seed)
  n, m = 11, 4
  x = rng.normal(size=(n, 5))
  keep = np.sort(rng.permutation(n)[:m])
  removed = np.setdiff1d(np.arange(n), keep)
  c = (np.abs(x[:, None, :] - x[None, keep, :]) ** p).sum(-1) ** (1.0 / p)
  for a, b in (marginals(n, keep), marginals(n, keep, "importance", rng.uniform(0.1, 1.0, n))):
    plan = removed_mass_plan(c[removed], a, b, keep, removed)
    ref, value = scipy_ot(c, a, b)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-12)
    assert (plan * c).sum() == pytest.approx(value, abs=1e-12)
    np.testing.assert_allclose(plan, ref, atol=1e-9)
  with pytest.raises(ValueError, match="source mass"):
    removed_mass_plan(c[removed], np.full(n, 1.0 / n), np.full(m, 0.5 / n), keep, removed)


@pytest.mark.parametrize("official", [False, True])
def test_transport_removed_prunes_as_the_whole_problem_on_resnet20(resnet20_checkpoint, official):
  """On the ResNet20 checkpoint (every group at 0.5, the default l2 and the official l1 cost) the
  removed-channels problem gives the plans and pruned weights of the whole ``n x m`` problem (its
  costs, from float32 products of other shapes, agree to float32 rounding)."""
  v, groups = resnet20_checkpoint
  kw = dict(official=True) if official else {}
  whole = jp.intra_fusion(v, groups, 0.5, show_progress=False, **kw, transport="all")
  part = jp.intra_fusion(v, groups, 0.5, show_progress=False, **kw, transport="removed")
  assert part.info["options"].transport == "removed" and whole.info["options"].transport == "all"
  for i in range(len(groups)):
    np.testing.assert_array_equal(part.kept[i], whole.kept[i])
    np.testing.assert_allclose(part.info["maps"][i].plan, whole.info["maps"][i].plan, atol=1e-12)
    assert part.info["groups"][i]["transport_cost"] == pytest.approx(whole.info["groups"][i]["transport_cost"], rel=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(part.params), jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
