import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import nnx
from scipy.optimize import minimize_scalar

import jaxprune as jp
from jaxprune import ot, signals
from jaxprune.methods import _ewr
from jaxprune.methods._ewr import StepConfig, iht_step
from helpers import NNXNet, classification_problem


def _problem(n=30, p=60, seed=0):
  rng = np.random.default_rng(seed)
  G = rng.normal(size=(n, p)).astype(np.float32)
  w_ref = rng.normal(size=p).astype(np.float32)
  w = (w_ref + 0.3 * rng.normal(size=p)).astype(np.float32)
  return G, w_ref, w


def _reference_step(G, w, w_ref, plan, k, lam, direction="official"):
  """float64 numpy re-implementation of the official IHT step (brief 3, items 6-8)."""
  G, w, w_ref, plan = (np.asarray(a, np.float64) for a in (G, w, w_ref, plan))
  n = G.shape[0]
  y, z = G @ w_ref, G @ w
  if direction == "official":
    d = n * (G.T @ (plan @ (z - y)) + lam * (w - w_ref))
  else:
    d = G.T @ (z - n * plan.T @ y) + n * lam * (w - w_ref)
  top = lambda v: set(np.argsort(-np.abs(v), kind="stable")[:k])
  support = top(w)
  lo, hi = 0.0, min(np.max(w / (d + 1e-16)), 100.0)
  if hi > 0:
    for _ in range(50):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if top(w - mid * d) == support else (lo, mid)
  tau_c = lo if hi > 0 else 0.0

  def Q(v):
    zz = G @ v
    return 0.5 * n * np.sum(plan * (y[:, None] - zz[None, :]) ** 2) + 0.5 * n * lam * np.sum((v - w_ref) ** 2)

  keep = np.zeros(w.size, bool)
  keep[list(support)] = True
  a, b = np.where(keep, w, 0), np.where(keep, d, 0)
  tau_star = minimize_scalar(lambda t: Q(a - t * b), bounds=(0, max(tau_c, 1e-30)), method="bounded",
                             options={"xatol": 1e-14}).x if tau_c > 0 else 0.0
  if tau_star < tau_c * (1 - 1e-6):
    tau = tau_star
  else:
    tau = tau_c
    while Q(w - 1.05 * tau * d) < Q(w - tau * d):
      tau *= 1.05
  w_step = w - tau * d
  keep = np.zeros(w.size, bool)
  keep[np.argsort(-np.abs(w_step), kind="stable")[:k]] = True
  return np.where(keep, w_step, 0), keep, tau


@pytest.mark.parametrize("coupling", ["identity", "entropic"])
@pytest.mark.parametrize("direction", ["official", "exact"])
@pytest.mark.parametrize("k", [10, 35])
def test_iht_step_matches_numpy_reference(coupling, direction, k):
  G, w_ref, w = _problem(seed=k)
  op = signals.dense_operator(jnp.asarray(G))
  y = op.matvec(jnp.asarray(w_ref))
  cfg = StepConfig(coupling, 0.5, False, 0.01, direction, True, ot.SinkhornOptions(threshold=1e-6))
  w_next, keep, info = iht_step(op, jnp.asarray(w), jnp.asarray(w_ref), y, k, cfg)
  plan = np.eye(30) / 30 if coupling == "identity" else np.asarray(ot.entropic_plan_1d(y, op.matvec(jnp.asarray(w)), 0.5, options=cfg.sinkhorn)[0])
  ref_w, ref_keep, ref_tau = _reference_step(G, w, w_ref, plan, k, 0.01, direction)
  assert int(keep.sum()) == k
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  assert float(info.tau) == pytest.approx(ref_tau, rel=2e-3, abs=1e-9)
  np.testing.assert_allclose(np.asarray(w_next), ref_w, rtol=2e-3, atol=1e-4)
  Gd, yd = np.asarray(G, np.float64), np.asarray(G, np.float64) @ np.asarray(w_ref, np.float64)
  q = lambda v: 0.5 * 30 * np.sum(plan * (yd[:, None] - (Gd @ v)[None, :]) ** 2) + 0.5 * 30 * 0.01 * np.sum((v - w_ref) ** 2)
  assert float(info.objective_before) == pytest.approx(q(np.asarray(w, np.float64)), rel=1e-3)
  assert float(info.objective_after) == pytest.approx(q(ref_w), rel=1e-3)


def test_lipschitz_step_is_one_over_l():
  G, w_ref, w = _problem(seed=1)
  op = signals.dense_operator(jnp.asarray(G))
  L = _ewr.lipschitz_constant(op, 30, 60, 0.01, True)
  sigma = np.linalg.svd(G.astype(np.float64), compute_uv=False)[0]
  assert float(L) == pytest.approx(1.05 * (sigma ** 2 + 30 * 0.01), rel=1e-3)
  y = op.matvec(jnp.asarray(w_ref))
  cfg = StepConfig("identity", 0.0, False, 0.01, "official", True, ot.SinkhornOptions(), "lipschitz")
  w_next, keep, info = iht_step(op, jnp.asarray(w), jnp.asarray(w_ref), y, 12, cfg, L)
  Gd = G.astype(np.float64)
  d = Gd.T @ (Gd @ (w - w_ref)) + 30 * 0.01 * (w - w_ref)
  step = w - d / float(L)
  ref = np.zeros(60, bool)
  ref[np.argsort(-np.abs(step), kind="stable")[:12]] = True
  np.testing.assert_array_equal(np.asarray(keep), ref)
  np.testing.assert_allclose(np.asarray(w_next), np.where(ref, step, 0), rtol=1e-4, atol=1e-5)


def _mlp_setup(n=40, seed=0):
  return classification_problem(n, seed)[1:]


def _identity_plan(y, z):
  return jnp.eye(y.shape[0], dtype=y.dtype) / y.shape[0]


@pytest.mark.parametrize("update", [False, True])
def test_lr_equals_ewr_with_the_identity_plan(update):
  v, batch, loss = _mlp_setup()
  kw = dict(loss_fn=loss, iterations=3, stages=2, update_weights=update, official=True, show_progress=False)
  a = jp.lr(v, batch, 30, **kw)
  b = jp.ewr(v, batch, 30, coupling=_identity_plan, **kw)
  for (_, x), (_, y) in zip(jp.leaves_with_paths(a.params), jp.leaves_with_paths(b.params)):
    np.testing.assert_array_equal(x, y)
  assert [s["objective_after"] for s in a.info["steps"]] == [s["objective_after"] for s in b.info["steps"]]


@pytest.mark.parametrize("method", ["ewr", "lr"])
@pytest.mark.parametrize("k", [1, 17, 50, 69])
def test_exactly_k_kept_and_masks_consistent(method, k):
  v, batch, loss = _mlp_setup()
  res = getattr(jp, method)(v, batch, k, loss_fn=loss, iterations=2, update_weights=True, official=True,
                            show_progress=False)
  assert jp.count_kept(res.masks) == k
  assert jp.sparsity_report(res.params, res.masks).nonzero <= k
  for path, leaf in jp.leaves_with_paths(res.params):
    if not path.endswith("kernel"):
      np.testing.assert_array_equal(leaf, jp.trees.get_leaf(v, path))   # BN, biases, batch_stats untouched
  assert res.info["k"] == k and len(res.info["steps"]) == 2


def test_full_budget_and_mask_only_keep_the_original_values():
  v, batch, loss = _mlp_setup()
  p = jp.count_prunable(v)
  res = jp.ewr(v, batch, p, loss_fn=loss, official=True, show_progress=False)
  for (_, a), (_, b) in zip(jp.leaves_with_paths(v), jp.leaves_with_paths(res.params)):
    np.testing.assert_array_equal(a, b)
  res = jp.ewr(v, batch, 20, loss_fn=loss, iterations=3, official=True, show_progress=False)   # mask only
  w, _ = jp.flatten(v)
  wp, _ = jp.flatten(res.params)
  kept = np.asarray(wp) != 0
  np.testing.assert_array_equal(np.asarray(wp)[kept], np.asarray(w)[kept])


def test_single_step_from_the_dense_point_is_magnitude():
  """At w = w_ref the residual and the ridge term vanish (d = 0): one step keeps the top-|w| support."""
  v, batch, loss = _mlp_setup()
  a = jp.lr(v, batch, 25, loss_fn=loss, official=True, show_progress=False)
  b = jp.magnitude(v, 25)
  for (_, x), (_, y) in zip(jp.leaves_with_paths(a.params), jp.leaves_with_paths(b.params)):
    np.testing.assert_array_equal(x, y)


def test_matrix_free_equals_materialised():
  v, batch, loss = _mlp_setup()
  kw = dict(loss_fn=loss, iterations=3, update_weights=True, official=True, show_progress=False, chunk_size=16)
  a = jp.ewr(v, batch, 30, **kw)
  b = jp.ewr(v, batch, 30, signals="matrix_free", **kw)
  np.testing.assert_array_equal(jp.masks.mask_leaves(a.masks)[1][1], jp.masks.mask_leaves(b.masks)[1][1])
  wa, _ = jp.flatten(a.params)
  wb, _ = jp.flatten(b.params)
  np.testing.assert_allclose(wa, wb, rtol=1e-3, atol=1e-5)


def test_eps_limits_and_no_nan_for_tiny_eps():
  v, batch, loss = _mlp_setup()
  for eps in (0.0, 1e-4, math.inf):
    res = jp.ewr(v, batch, 30, loss_fn=loss, eps=eps, stages=2, refits=2, show_progress=False)
    w, _ = jp.flatten(res.params)
    assert bool(jnp.isfinite(w).all()) and jp.count_kept(res.masks) == 30
    assert all(math.isfinite(s["objective_after"]) for s in res.info["steps"])


def test_multistage_budgets_and_noise_reproducibility():
  v, batch, loss = _mlp_setup()
  res = jp.ewr(v, batch, 10, loss_fn=loss, stages=4, show_progress=False)
  b = res.info["budgets"]
  assert b[-1] == 10 and all(x > y for x, y in zip(b, b[1:])) and len(b) == 4
  kw = dict(loss_fn=loss, noise=(2.0, 0.25), refits=2, show_progress=False)
  n1 = jp.ewr(v, batch, 30, key=jax.random.key(0), **kw)
  n2 = jp.ewr(v, batch, 30, key=jax.random.key(0), **kw)
  assert n1.info["steps"] == n2.info["steps"]
  clean = jp.ewr(v, batch, 30, **{**kw, "noise": None})
  assert clean.info["steps"] != n1.info["steps"]


def test_nnx_state():
  graphdef, params, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(12, 4)), jnp.float32)
  y = jnp.arange(12) % 3

  def loss(p, batch):
    model = nnx.merge(graphdef, p, rest)
    model.eval()
    logits = model(batch[0])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[1][:, None], 1)[:, 0])

  res = jp.ewr(params, (x, y), 20, loss_fn=loss, refits=2, show_progress=False)
  assert isinstance(res.params, nnx.State) and jp.count_kept(res.masks) == 20
  assert nnx.merge(graphdef, res.params, rest)(x).shape == (12, 3)


def test_bad_input_fails_before_work():
  v, batch, loss = _mlp_setup()
  cases = [
      (dict(k=0), ValueError, "k must be > 0"), (dict(k=10_000), ValueError, "exceeds"),
      (dict(k=3.0), TypeError, "must be an int"), (dict(eps=-1.0), ValueError, "eps"),
      (dict(direction="steepest"), ValueError, "direction"), (dict(signals="gpu"), ValueError, "signals"),
      (dict(iterations=0), ValueError, "iterations"), (dict(noise=(1.0, 0.1)), ValueError, "key"),
      (dict(batch=(batch[0][0, 0], batch[1][0])), ValueError, "leading example axis"),
      (dict(loss_fn=lambda p, b: loss(p, b) * jnp.nan), ValueError, "NaN"),
      (dict(coupling="sinkhorn"), ValueError, "coupling"), (dict(lam=-1.0), ValueError, "lam"),
      (dict(iterations=3), ValueError, "support='iht'"), (dict(support="gradient"), ValueError, "support"),
      (dict(update_weights=False), ValueError, "refit='none'"), (dict(solver="qr"), ValueError, "solver"),
      (dict(initial_sparsity=1.0), ValueError, "initial_sparsity"), (dict(jitter=-1e-6), ValueError, "jitter"),
      (dict(signals="matrix_free", support="obs"), ValueError, "materialised")]
  for override, err, match in cases:
    kw = dict(batch=batch, k=20, loss_fn=loss, show_progress=False)
    kw.update(override)
    with pytest.raises(err, match=match):
      jp.ewr(v, kw.pop("batch"), kw.pop("k"), **kw)
  with pytest.raises(ValueError, match="no prunable leaves"):
    jp.ewr({"bn": {"scale": jnp.ones(3)}}, batch, 1, loss_fn=loss, show_progress=False)
  with pytest.raises(TypeError, match="eps"):
    jp.lr(v, batch, 20, loss_fn=loss, eps=1.0)


@pytest.mark.parametrize("method", ["lr", "ewr"])
def test_official_single_step_on_mlpnet_is_magnitude_with_tau_zero(method, mlpnet_variables, mnist_test):
  """official=True is the official code: from the dense point at 0.9, tau = 0 and the magnitude support."""
  from jaxprune.models import mlpnet
  loss = jp.classification_loss(mlpnet().apply)
  batch = (mnist_test.x[:200], mnist_test.y[:200])
  k = jp.k_from_sparsity(mlpnet_variables, 0.9)
  res = getattr(jp, method)(mlpnet_variables, batch, k, loss_fn=loss, official=True, show_progress=False)
  (step,) = res.info["steps"]
  assert step["kind"] == "iht" and step["tau"] == 0.0
  assert res.info["options"].replace(coupling="entropic") == jp.EWROptions.official().replace(signals="matrix_free")
  mag = jp.magnitude(mlpnet_variables, k)
  for (_, a), (_, b) in zip(jp.leaves_with_paths(res.params), jp.leaves_with_paths(mag.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method", ["lr", "ewr"])
@pytest.mark.parametrize("official", [True, False])
def test_a_users_jit_of_the_method_gives_the_eager_result(method, official):
  """``jax.jit(functools.partial(jp.lr, k=..., ...))`` traces the whole call into one program; the
  result (params, masks, diagnostics as arrays, names and options static) equals the eager call."""
  import functools
  v, batch, loss = _mlp_setup()
  kw = dict(k=30, loss_fn=loss, official=official, show_progress=False, **({"stages": 2} if not official else {}))
  eager = getattr(jp, method)(v, batch, **kw)
  jitted = jax.jit(functools.partial(getattr(jp, method), **kw))(v, batch)
  assert jp.count_kept(jitted.masks) == 30
  for (pa, a), (_, b) in zip(jp.leaves_with_paths(eager.params), jp.leaves_with_paths(jitted.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6, err_msg=pa)
  for (_, a), (_, b) in zip(jp.leaves_with_paths(eager.masks), jp.leaves_with_paths(jitted.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jitted.info["method"] == method and jitted.info["options"] == eager.info["options"]
  assert list(jitted.info) == list(eager.info) and jitted.info["k"] == 30
  assert [s["kind"] for s in jitted.info["steps"]] == [s["kind"] for s in eager.info["steps"]]
  assert isinstance(jitted.info["objective"], jax.Array)
  np.testing.assert_allclose(float(jitted.info["objective"]), eager.info["objective"], rtol=1e-3)


def test_the_regression_reads_its_projections_from_the_gradient_pass():
  """``y = G w_ref`` and ``z = G w`` taken with the gradients equal the products with the built ``G``."""
  v, batch, loss = _mlp_setup()
  spec = jp.trees.flat_spec(v)
  w, _ = jp.flatten(v, spec=spec)
  ref = w * 0.5
  G, finite, proj = signals.grads_and_projections(loss, v, batch, jnp.stack([w, ref], 1), chunk_size=16,
                                                   show_progress=False)
  np.testing.assert_allclose(np.asarray(proj), np.asarray(G) @ np.stack([w, ref], 1), rtol=1e-4, atol=1e-5)
  assert finite.shape == (G.shape[0],) and bool(finite.all())


def test_warm_started_plans_keep_the_support_and_need_fewer_sinkhorn_iterations():
  """Each IHT step's Sinkhorn starts from the previous step's potentials (default); the official
  reading starts from zero. Same plans to the threshold, so the same support; fewer iterations."""
  v, batch, loss = _mlp_setup(n=60)
  kw = dict(loss_fn=loss, official=True, show_progress=False, iterations=4, stages=2, update_weights=True, eps=0.05)
  cold = jp.ewr(v, batch, 30, **kw)
  warm = jp.ewr(v, batch, 30, **kw, warm_start=True)
  assert jp.ewr(v, batch, 30, official=True, loss_fn=loss, show_progress=False).info["options"].warm_start is False
  for (_, a), (_, b) in zip(jp.leaves_with_paths(cold.masks), jp.leaves_with_paths(warm.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  its = lambda r: [int(s["sinkhorn_iterations"]) for s in r.info["steps"]]   # noqa: E731
  assert its(warm)[0] == its(cold)[0]                  # the first plan has nothing to start from
  assert sum(its(warm)) < sum(its(cold)), (its(warm), its(cold))
  np.testing.assert_allclose(warm.info["objective"], cold.info["objective"], rtol=1e-2)
  with pytest.raises(TypeError, match="warm_start"):
    jp.ewr(v, batch, 30, loss_fn=loss, warm_start=1, show_progress=False)


def test_auto_chunk_size_from_a_memory_budget_gives_the_same_result():
  v, batch, loss = _mlp_setup()
  kw = dict(loss_fn=loss, official=True, signals="materialized", show_progress=False)
  one_example = signals.chunk_size_for(loss, v, batch, memory_budget=1.0)
  per_example = next(b for b in (2 ** i for i in range(10, 40))
                     if signals.chunk_size_for(loss, v, batch, memory_budget=b) > 1)
  assert one_example == 1
  fixed = jp.lr(v, batch, 30, chunk_size=7, **kw)
  auto = jp.lr(v, batch, 30, chunk_size="auto", memory_budget=6.0 * per_example, **kw)
  expected = signals.chunk_size_for(loss, v, batch, memory_budget=6.0 * per_example)
  assert 1 < expected < batch[0].shape[0] and auto.info["chunk_size"] == expected and fixed.info["chunk_size"] == 7
  for (_, a), (_, b) in zip(jp.leaves_with_paths(fixed.masks), jp.leaves_with_paths(auto.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # matrix-free signals (the official preset's default) hold no G: a larger chunk fits the same budget
  free = jp.lr(v, batch, 30, chunk_size="auto", memory_budget=6.0 * per_example, **dict(kw, signals="auto"))
  expected_free = signals.chunk_size_for(loss, v, batch, memory_budget=6.0 * per_example, materialized=False)
  assert free.info["options"].signals == "matrix_free" and free.info["chunk_size"] == expected_free > expected
  for (_, a), (_, b) in zip(jp.leaves_with_paths(fixed.masks), jp.leaves_with_paths(free.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for bad in ("big", 0):
    with pytest.raises(ValueError, match="chunk_size"):
      jp.lr(v, batch, 30, chunk_size=bad, **kw)
  with pytest.raises(ValueError, match="memory_budget"):
    jp.lr(v, batch, 30, chunk_size="auto", memory_budget=-1.0, **kw)


class _PooledConv(nn.Module):
  """A convolution over 16 x 16 positions, pooled: each kernel weight is used 256 times per example."""
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(jnp.mean(nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x)), axis=(1, 2)))


@pytest.mark.parametrize("method", ["lr", "ewr"])
def test_auto_signals_is_matrix_free_for_the_official_step_without_weight_reuse(method):
  # official preset, dense layers: matrix-free, the same support as with G
  v, batch, loss = _mlp_setup()
  run = lambda vv, bb, ll, **kw: getattr(jp, method)(vv, bb, 30, loss_fn=ll, show_progress=False, **kw)
  auto, with_g = run(v, batch, loss, official=True), run(v, batch, loss, official=True, signals="materialized")
  assert auto.info["options"].signals == "matrix_free" and with_g.info["options"].signals == "materialized"
  for (_, a), (_, b) in zip(jp.leaves_with_paths(auto.masks), jp.leaves_with_paths(with_g.masks)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # a refit (the defaults) or gradient noise reads G itself
  assert run(v, batch, loss, stages=1).info["options"].signals == "materialized"
  noisy = run(v, batch, loss, official=True, noise=(0.1, 0.5), key=jax.random.key(0))
  assert noisy.info["options"].signals == "materialized"
  # a convolution reuses each weight over its positions: products cost more than G
  model = _PooledConv()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(24, 16, 16, 2)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=24), jnp.int32)
  cv = model.init(jax.random.key(0), x[:1])
  closs = jp.classification_loss(model.apply)
  assert signals.weight_reuse(closs, cv, (x, y)) > _ewr.MATRIX_FREE_REUSE
  assert run(cv, (x, y), closs, official=True).info["options"].signals == "materialized"
