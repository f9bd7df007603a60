import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxprune import ot


def _points(n, scale, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.normal(size=n) * scale
  return jnp.asarray(y, jnp.float32), jnp.asarray(y + rng.normal(size=n) * scale * 0.3, jnp.float32)


@pytest.mark.parametrize("eps", [10.0, 1.0, 0.1])
def test_entropic_plan_marginals_and_optimality(eps):
  y, z = _points(200, 3.0)
  plan, info = jax.jit(ot.entropic_plan_1d, static_argnames=("eps", "relative", "options"))(y, z, eps=eps)
  plan = np.asarray(plan, np.float64)
  assert np.all(plan >= 0)
  np.testing.assert_allclose(plan.sum(1), 1 / 200, atol=1e-6)
  np.testing.assert_allclose(plan.sum(0), 1 / 200, atol=1e-6)
  assert bool(info.converged) and float(info.marginal_error) < 1e-6
  ref = _reference_sinkhorn(np.asarray(y, np.float64), np.asarray(z, np.float64), eps)
  assert np.abs(plan - ref).max() < 1e-5            # entries are ~1/200^2 .. 1/200
  assert np.abs(plan - ref).sum() < 2e-3            # L1 distance of two couplings of mass 1


def _reference_sinkhorn(y, z, eps, iterations=20000):
  """Independent float64 log-domain Sinkhorn (numpy) for uniform 1-D measures."""
  from scipy.special import logsumexp
  n = y.size
  cost = (y[:, None] - z[None, :]) ** 2
  f, g = np.zeros(n), np.zeros(n)
  log_a = np.full(n, -np.log(n))
  for _ in range(iterations):
    f = eps * (log_a - logsumexp((g[None, :] - cost) / eps, axis=1))
    g_new = eps * (log_a - logsumexp((f[:, None] - cost) / eps, axis=0))
    if np.max(np.abs(g_new - g)) < 1e-13:
      g = g_new
      break
    g = g_new
  return np.exp((f[:, None] + g[None, :] - cost) / eps)


def test_eps_zero_is_the_sorted_matching_and_the_exact_assignment():
  y, z = _points(40, 1.0, seed=3)
  plan, _ = ot.entropic_plan_1d(y, z, 0.0)
  cost = np.asarray(ot.cost_1d(y, z), np.float64)
  rows, cols = linear_sum_assignment(cost)          # exact OT between uniform N-point measures
  exact = np.zeros((40, 40))
  exact[rows, cols] = 1 / 40
  np.testing.assert_allclose(np.asarray(plan), exact, atol=1e-9)
  assert not np.array_equal(cols, np.arange(40))   # not the identity: sorted matching differs from LR
  # as eps decreases the entropic plan moves monotonically towards it
  dist = [np.abs(np.asarray(ot.entropic_plan_1d(y, z, e)[0]) - exact).sum() for e in (1.0, 0.1, 0.01, 0.001)]
  assert all(a > b for a, b in zip(dist, dist[1:])) and dist[-1] < 0.6


def test_eps_inf_is_uniform():
  y, z = _points(30, 1.0)
  plan, _ = ot.entropic_plan_1d(y, z, math.inf)
  np.testing.assert_allclose(np.asarray(plan), 1 / 900)


@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-4])
def test_no_nan_for_tiny_eps_on_unnormalised_costs(eps):
  y, z = _points(300, 100.0)          # costs up to ~1e5: exp(-C/eps) underflows in the kernel domain
  plan, info = ot.entropic_plan_1d(y, z, eps, options=ot.SinkhornOptions(max_iterations=200))
  assert bool(jnp.isfinite(plan).all())
  np.testing.assert_allclose(np.asarray(plan).sum(1), 1 / 300, atol=1e-6)   # rounded onto the marginals
  np.testing.assert_allclose(np.asarray(plan).sum(0), 1 / 300, atol=1e-6)


def test_relative_eps_scales_with_the_cost():
  y, z = _points(100, 1.0)
  a, _ = ot.entropic_plan_1d(y, z, 0.5, relative=True)
  b, _ = ot.entropic_plan_1d(10 * y, 10 * z, 0.5, relative=True)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_vmap_over_problems_and_transport_cost():
  ys = jnp.stack([_points(50, 1.0, seed=s)[0] for s in range(3)])
  zs = jnp.stack([_points(50, 1.0, seed=s)[1] for s in range(3)])
  plans, infos = jax.vmap(lambda y, z: ot.entropic_plan_1d(y, z, 0.5))(ys, zs)
  for i in range(3):
    single, _ = ot.entropic_plan_1d(ys[i], zs[i], 0.5)
    np.testing.assert_allclose(np.asarray(plans[i]), np.asarray(single), atol=1e-7)
    direct = float(jnp.sum(single * ot.cost_1d(ys[i], zs[i])))
    assert float(ot.transport_cost(single, ys[i], zs[i])) == pytest.approx(direct, rel=1e-4)


def test_rounding_gives_exact_marginals_close_to_input():
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.uniform(size=(20, 20)) / 400 * (1 + 0.05 * rng.normal(size=(20, 20))), jnp.float32)
  r = ot.round_to_marginals(p)
  np.testing.assert_allclose(np.asarray(r).sum(1), 1 / 20, atol=1e-7)
  np.testing.assert_allclose(np.asarray(r).sum(0), 1 / 20, atol=1e-7)
  assert np.all(np.asarray(r) >= 0)
  bound = 2 * (np.abs(np.asarray(p).sum(1) - 1 / 20).sum() + np.abs(np.asarray(p).sum(0) - 1 / 20).sum())
  assert np.abs(np.asarray(r) - np.asarray(p)).sum() <= bound + 1e-6


def test_bad_eps():
  y, z = _points(5, 1.0)
  with pytest.raises(ValueError, match="eps"):
    ot.entropic_plan_1d(y, z, -1.0)
  with pytest.raises(ValueError, match="same length"):
    ot.entropic_plan_1d(y, z[:3], 1.0)
