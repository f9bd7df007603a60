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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune.core.checks import user_stacklevel


class SinkhornOptions(NamedTuple):
  """Static Sinkhorn settings (kept apart from the traced arrays so they can be jit-static).

  ``threshold`` is the L1 error of the marginals at which Sinkhorn stops (checked every
  ``inner_iterations``); float32 cannot go much below 1e-5 at N = 1000, and the plan is
  rounded onto the exact marginals afterwards (:func:`round_to_marginals`; ``round_to_marginals=
  False`` returns Sinkhorn's own plan, as the official code does). ``momentum`` enables ott's
  adaptive momentum acceleration. A plan that hits ``max_iterations`` before ``threshold`` is
  reported by the methods' drivers: a :class:`ConvergenceWarning`, or an error with ``strict``.
  """
  threshold: float = 1e-4
  max_iterations: int = 5000
  inner_iterations: int = 10
  momentum: bool = True
  round_to_marginals: bool = True
  strict: bool = False


MIN_EPS = 1e-30   # below this, an entropic plan is computed as its eps -> 0 limit (C / eps overflows float32)


class ConvergenceWarning(UserWarning):
  """Sinkhorn stopped at ``max_iterations`` before its marginals reached ``threshold``."""


class PlanInfo(NamedTuple):
  iterations: jax.Array      # Sinkhorn iterations (0 for the closed-form eps=0 / eps=inf plans)
  converged: jax.Array       # bool
  marginal_error: jax.Array  # max |P 1 - a| and |P^T 1 - b| of the returned plan
  sinkhorn_error: jax.Array  # the same of Sinkhorn's plan before rounding (how far it had got)
  potentials: Any = None     # Sinkhorn's dual potentials (f: (N,), g: (M,)): warm-start the next solve


def report_convergence(info: PlanInfo, options: SinkhornOptions, where: str) -> None:
  """Host-side: warns (or raises ``RuntimeError`` with ``options.strict``) when a plan did not converge.

  ``info`` may hold one plan or a batch of them (vmapped solves).
  """
  import numpy as np
  converged = np.asarray(info.converged)
  if converged.all():
    return
  bad = np.flatnonzero(~converged.reshape(-1))
  err = float(np.max(np.asarray(info.sinkhorn_error).reshape(-1)[bad]))
  msg = (f"{where}: Sinkhorn stopped at max_iterations={options.max_iterations} before reaching "
         f"threshold={options.threshold} ({bad.size} plan(s); largest marginal deviation {err:.2e} before "
         "rounding; the threshold is on ott's L1 marginal error). "
         "Raise max_iterations or eps, or loosen threshold")
  if options.strict:
    raise RuntimeError(msg)
  import warnings
  warnings.warn(msg, ConvergenceWarning, stacklevel=user_stacklevel())


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


def marginal_error(plan: jax.Array, a: jax.Array | None = None, b: jax.Array | None = None) -> jax.Array:
  """``max(|P 1 - a|, |P^T 1 - b|)``; uniform ``a = 1/N``, ``b = 1/M`` by default."""
  n, m = plan.shape
  a = jnp.full((n,), 1.0 / n, plan.dtype) if a is None else a
  b = jnp.full((m,), 1.0 / m, plan.dtype) if b is None else b
  return jnp.maximum(jnp.abs(plan.sum(1) - a).max(), jnp.abs(plan.sum(0) - b).max())


def entropic_plan_1d(y: jax.Array, z: jax.Array, eps: float, *, relative: bool = False,
                     options: SinkhornOptions = SinkhornOptions(),
                     init: Any = None) -> tuple[jax.Array, PlanInfo]:
  """The entropic OT plan between ``y: (N,)`` and ``z: (N,)`` with uniform marginals.

  Solves ``min_P <P, C> + eps * sum P log P`` over couplings with marginals ``1/N`` (the POT
  ``sinkhorn`` convention of the official code) with ott-jax's log-domain Sinkhorn.

  Args:
    eps: entropic regularisation (a Python float: ``0`` -> sorted matching, ``inf`` -> uniform; below
      ``MIN_EPS = 1e-30`` the sorted matching, the eps -> 0 limit, as ``C / eps`` overflows float32).
    relative: multiply ``eps`` by ``mean(C)`` instead of using it as an absolute value.
    options: static :class:`SinkhornOptions`.
    init: ``(f, g)`` potentials of a nearby problem (``PlanInfo.potentials`` of the previous IHT
      iteration or stage) to start Sinkhorn from; ``None`` starts from zero. The plan is the
      same to the threshold; only the iteration count changes.

  Returns:
    ``(plan: (N, N), PlanInfo)``. Jit- and vmap-safe (``eps``, ``relative``, ``options`` static).
  """
  eps = _check_eps(eps)
  y, z = _as_float(y, "y"), _as_float(z, "z")
  if y.shape != z.shape or y.ndim != 1:
    raise ValueError(f"y and z must be vectors of the same length, got {y.shape} and {z.shape}")
  n = y.shape[0]
  if eps < MIN_EPS:   # C / eps would overflow float32: the eps -> 0 limit, the sorted matching
    eps = 0.0
  if eps == 0.0:
    return _closed_form(sorted_plan(y, z))
  if math.isinf(eps):
    return _closed_form(uniform_plan(n, y.dtype))
  return _sinkhorn(y, z, eps, relative, options, init)


def _closed_form(plan):
  err = marginal_error(plan)
  return plan, PlanInfo(jnp.asarray(0), jnp.asarray(True), err, err)


def _as_float(x, name: str) -> jax.Array:
  """Floating arrays for the solvers: integers and float16/bfloat16 are computed in float32."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype in (jnp.float16, jnp.bfloat16):
    if not (jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)
            or x.dtype == jnp.bool_):
      raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = x.astype(jnp.float32)
  return x


def _geometry(cost, eps: float, relative: bool):
  """ott's geometry with ``eps`` absolute, or relative to ``mean(C)``.

  A cost that is zero everywhere has mean 0, which would make a relative eps 0 and the plan NaN;
  every coupling is optimal there, and eps relative to 1 gives the product plan (the entropic
  optimum), so the scale falls back to 1.
  """
  geometry, _, _, _ = _ott()
  if not relative:
    return geometry.Geometry(cost_matrix=cost, epsilon=eps)
  scale = jnp.mean(cost)
  return geometry.Geometry(cost_matrix=cost, epsilon=eps * jnp.where(scale > 0, scale, 1.0))


def _check_eps(eps) -> float:
  if isinstance(eps, jax.Array):
    raise TypeError("eps must be a Python float (it is a static setting), not a traced array")
  eps = float(eps)
  if math.isnan(eps) or eps < 0:
    raise ValueError(f"eps must be >= 0 (or inf), got {eps}")
  return eps


def round_to_marginals(plan: jax.Array, a: jax.Array | None = None, b: jax.Array | None = None) -> jax.Array:
  """Projects an approximate plan onto the couplings with marginals ``a``, ``b`` (uniform by default).

  The rounding of Altschuler, Weed & Rigollet (2017, Alg. 2): scale down rows and columns
  that carry too much mass, then add the missing mass as a rank-one term. The result has
  exact marginals (to float rounding) and is L1-close to ``plan`` (within twice its
  marginal errors), so a Sinkhorn stopped at a float32-friendly threshold still yields a
  true coupling.
  """
  n, m = plan.shape
  a = jnp.full((n,), 1.0 / n, plan.dtype) if a is None else a
  b = jnp.full((m,), 1.0 / m, plan.dtype) if b is None else b
  rows = plan.sum(1)
  plan = plan * jnp.minimum(1.0, a / jnp.maximum(rows, 1e-30))[:, None]
  cols = plan.sum(0)
  plan = plan * jnp.minimum(1.0, b / jnp.maximum(cols, 1e-30))[None, :]
  # Deficits are >= 0 in exact arithmetic; clip float round-off so the result stays >= 0.
  err_a, err_b = jnp.maximum(a - plan.sum(1), 0.0), jnp.maximum(b - plan.sum(0), 0.0)
  return plan + jnp.outer(err_a, err_b) / jnp.maximum(err_a.sum(), 1e-30)


def _ott():
  """ott-jax's geometry, problem and solver modules, imported on first use (ott-jax and jaxopt
  take seconds to import, which ``import jaxprune`` should not pay)."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import acceleration, sinkhorn
  return geometry, linear_problem, acceleration, sinkhorn


def _solver(options: SinkhornOptions):
  _, _, acceleration, sinkhorn = _ott()
  kw = {}
  if options.momentum:
    kw["momentum"] = acceleration.Momentum(start=2 * options.inner_iterations, error_threshold=1e-2)
  return sinkhorn.Sinkhorn(lse_mode=True, threshold=options.threshold, max_iterations=options.max_iterations,
                           inner_iterations=options.inner_iterations, implicit_diff=None, **kw)


def _sinkhorn(y, z, eps, relative, options, init=None):
  _, linear_problem, _, _ = _ott()
  out = _solver(options)(linear_problem.LinearProblem(_geometry(cost_1d(y, z), eps, relative)), init=init)
  return _finish(jax.lax.stop_gradient(out.matrix), out, options)


def _finish(raw, out, options, a=None, b=None):
  plan = round_to_marginals(raw, a, b) if options.round_to_marginals else raw
  return plan, PlanInfo(out.n_iters, out.converged, marginal_error(plan, a, b), marginal_error(raw, a, b),
                        (jax.lax.stop_gradient(out.f), jax.lax.stop_gradient(out.g)))


def transport_cost(plan: jax.Array, y: jax.Array, z: jax.Array) -> jax.Array:
  """``<P, C>`` with ``C_ij = (y_i - z_j)^2``, without forming ``C``."""
  a, b = plan.sum(1), plan.sum(0)
  return jnp.dot(a, y * y) - 2.0 * jnp.dot(y, plan @ z) + jnp.dot(b, z * z)


# -- general discrete OT (Intra-Fusion): cost C: (n, m), marginals a: (n,), b: (m,) ---------------

def entropic_plan(cost: jax.Array, a: jax.Array, b: jax.Array, eps: float, *, relative: bool = True,
                  options: SinkhornOptions = SinkhornOptions()) -> tuple[jax.Array, PlanInfo]:
  """Entropic OT plan ``P: (n, m)`` for a cost matrix, by ott-jax's log-domain Sinkhorn.

  Args:
    cost: ``C: (n, m)``.
    a, b: marginals ``(n,)`` and ``(m,)`` summing to 1.
    eps: regularisation (Python float, static); with ``relative=True`` (default) it is a
      fraction of ``mean(C)``, so one value suits costs of any scale.
    options: static :class:`SinkhornOptions`.

  Returns:
    ``(plan, PlanInfo)``; the plan is rounded onto the exact marginals. Jit- and vmap-safe.
  """
  eps = _check_eps(eps)
  if eps < MIN_EPS or math.isinf(eps):
    raise ValueError(f"eps must be in [{MIN_EPS}, inf) for an entropic plan, got {eps} "
                     "(exact_plan gives the eps -> 0 limit)")
  cost = _as_float(cost, "cost")
  _, linear_problem, _, _ = _ott()
  out = _solver(options)(linear_problem.LinearProblem(_geometry(cost, eps, relative), a=a, b=b))
  return _finish(jax.lax.stop_gradient(out.matrix), out, options, a, b)


def exact_plan(cost, a, b, *, max_iterations: int = 10_000_000):
  """Exact (unregularised) OT plan ``P: (n, m)`` by POT's network simplex (``ot.emd``), in float64.

  The official Intra-Fusion code calls the same solver (with POT's default iteration cap of
  1e5, which large groups can hit; here the cap is 1e7 and hitting it raises). Runs on the
  host (numpy in, numpy out), outside ``jit``.
  """
  import numpy as np
  import ot as pot
  c = np.asarray(cost, np.float64)
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a, b = a / a.sum(), b / b.sum()
  plan, log = pot.emd(a, b, np.ascontiguousarray(c), numItermax=max_iterations, log=True)
  if log.get("result_code") != 1:
    raise RuntimeError(f"exact OT did not reach the optimum: {log.get('warning')} (result code {log.get('result_code')})")
  return plan
