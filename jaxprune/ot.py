"""Optimal transport: the one module that talks to ott-jax.

EWR couples two 1-D empirical measures with uniform weights: ``y: (N,)`` (projections of
the per-example gradients on the reference weights) and ``z: (N,)`` (on the candidate
weights), with cost ``C_ij = (y_i - z_j)^2``. Plans have marginals ``1/N`` on both sides.

Epsilon semantics (official EWR code, brief 3.5): ``eps`` is an absolute value on the
*unnormalised* cost. ``relative=True`` instead scales it by the mean of ``C`` (ott's
``relative_epsilon="mean"``). ``eps=0`` gives the exact sorted (monotone) matching,
``eps=inf`` the uniform plan ``11^T/N^2``. The solver runs in the log domain, so no epsilon
underflows into NaN (the official code's plain POT Sinkhorn does below about C/eps ~ 700);
a small epsilon may hit ``max_iterations`` before the marginals converge, which
``PlanInfo.converged`` reports.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn


class SinkhornOptions(NamedTuple):
  """Static Sinkhorn settings (kept apart from the traced arrays so they can be jit-static).

  ``threshold`` is the L1 error of the marginals at which Sinkhorn stops (checked every
  ``inner_iterations``); float32 cannot go much below 1e-5 at N = 1000, and the plan is
  rounded onto the exact marginals afterwards (:func:`round_to_marginals`). ``momentum``
  enables ott's adaptive momentum acceleration.
  """
  threshold: float = 1e-4
  max_iterations: int = 5000
  inner_iterations: int = 10
  momentum: bool = True


class PlanInfo(NamedTuple):
  iterations: jax.Array      # Sinkhorn iterations (0 for the closed-form eps=0 / eps=inf plans)
  converged: jax.Array       # bool
  marginal_error: jax.Array  # max |P 1 - 1/N| and |P^T 1 - 1/N|


def cost_1d(y: jax.Array, z: jax.Array) -> jax.Array:
  """``C: (N, M)`` with ``C_ij = (y_i - z_j)^2``."""
  return (y[:, None] - z[None, :]) ** 2


def sorted_plan(y: jax.Array, z: jax.Array) -> jax.Array:
  """Exact 1-D OT plan for the squared cost with uniform weights: the monotone matching.

  ``y`` and ``z`` have the same length ``N``; the plan has one entry ``1/N`` per row.
  """
  n = y.shape[0]
  rank_y, rank_z = jnp.argsort(y, stable=True), jnp.argsort(z, stable=True)
  return jnp.zeros((n, n), y.dtype).at[rank_y, rank_z].set(1.0 / n)


def uniform_plan(n: int, dtype=jnp.float32) -> jax.Array:
  return jnp.full((n, n), 1.0 / (n * n), dtype)


def identity_plan(n: int, dtype=jnp.float32) -> jax.Array:
  """``I / N``: the coupling under which EWR is exactly LR."""
  return jnp.eye(n, dtype=dtype) / n


def marginal_error(plan: jax.Array) -> jax.Array:
  """``max(|P 1 - 1/N|, |P^T 1 - 1/M|)``."""
  n, m = plan.shape
  return jnp.maximum(jnp.abs(plan.sum(1) - 1.0 / n).max(), jnp.abs(plan.sum(0) - 1.0 / m).max())


def entropic_plan_1d(y: jax.Array, z: jax.Array, eps: float, *, relative: bool = False,
                     options: SinkhornOptions = SinkhornOptions()) -> tuple[jax.Array, PlanInfo]:
  """The entropic OT plan between ``y: (N,)`` and ``z: (N,)`` with uniform marginals.

  Solves ``min_P <P, C> + eps * sum P log P`` over couplings with marginals ``1/N`` (the POT
  ``sinkhorn`` convention of the official code) with ott-jax's log-domain Sinkhorn.

  Args:
    eps: entropic regularisation (a Python float: ``0`` -> sorted matching, ``inf`` -> uniform).
    relative: multiply ``eps`` by ``mean(C)`` instead of using it as an absolute value.
    options: static :class:`SinkhornOptions`.

  Returns:
    ``(plan: (N, N), PlanInfo)``. Jit- and vmap-safe (``eps``, ``relative``, ``options`` static).
  """
  eps = _check_eps(eps)
  if y.shape != z.shape or y.ndim != 1:
    raise ValueError(f"y and z must be vectors of the same length, got {y.shape} and {z.shape}")
  n = y.shape[0]
  if eps == 0.0:
    plan = sorted_plan(y, z)
    return plan, PlanInfo(jnp.asarray(0), jnp.asarray(True), marginal_error(plan))
  if math.isinf(eps):
    plan = uniform_plan(n, y.dtype)
    return plan, PlanInfo(jnp.asarray(0), jnp.asarray(True), marginal_error(plan))
  return _sinkhorn(y, z, eps, relative, options)


def _check_eps(eps) -> float:
  if isinstance(eps, jax.Array):
    raise TypeError("eps must be a Python float (it is a static setting), not a traced array")
  eps = float(eps)
  if math.isnan(eps) or eps < 0:
    raise ValueError(f"eps must be >= 0 (or inf), got {eps}")
  return eps


def round_to_marginals(plan: jax.Array) -> jax.Array:
  """Projects an approximate plan onto the couplings with marginals ``1/N`` (both sides).

  The rounding of Altschuler, Weed & Rigollet (2017, Alg. 2): scale down rows and columns
  that carry too much mass, then add the missing mass as a rank-one term. The result has
  exact marginals (to float rounding) and is L1-close to ``plan`` (within twice its
  marginal errors), so a Sinkhorn stopped at a float32-friendly threshold still yields a
  true coupling.
  """
  n, m = plan.shape
  a, b = jnp.full((n,), 1.0 / n, plan.dtype), jnp.full((m,), 1.0 / m, plan.dtype)
  rows = plan.sum(1)
  plan = plan * jnp.minimum(1.0, a / jnp.maximum(rows, 1e-30))[:, None]
  cols = plan.sum(0)
  plan = plan * jnp.minimum(1.0, b / jnp.maximum(cols, 1e-30))[None, :]
  # Deficits are >= 0 in exact arithmetic; clip float round-off so the result stays >= 0.
  err_a, err_b = jnp.maximum(a - plan.sum(1), 0.0), jnp.maximum(b - plan.sum(0), 0.0)
  return plan + jnp.outer(err_a, err_b) / jnp.maximum(err_a.sum(), 1e-30)


def _sinkhorn(y, z, eps, relative, options):
  cost = cost_1d(y, z)
  geom = geometry.Geometry(cost_matrix=cost, epsilon=eps, relative_epsilon="mean" if relative else None)
  kw = {}
  if options.momentum:
    kw["momentum"] = acceleration.Momentum(start=2 * options.inner_iterations, error_threshold=1e-2)
  solver = sinkhorn.Sinkhorn(lse_mode=True, threshold=options.threshold, max_iterations=options.max_iterations,
                             inner_iterations=options.inner_iterations, implicit_diff=None, **kw)
  out = solver(linear_problem.LinearProblem(geom))
  plan = round_to_marginals(jax.lax.stop_gradient(out.matrix))
  return plan, PlanInfo(out.n_iters, out.converged, marginal_error(plan))


def transport_cost(plan: jax.Array, y: jax.Array, z: jax.Array) -> jax.Array:
  """``<P, C>`` with ``C_ij = (y_i - z_j)^2``, without forming ``C``."""
  a, b = plan.sum(1), plan.sum(0)
  return jnp.dot(a, y * y) - 2.0 * jnp.dot(y, plan @ z) + jnp.dot(b, z * z)
