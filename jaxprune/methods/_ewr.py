"""EWR (Entropic Wasserstein Regression, You & Cheng, ICLR 2024) and its Euclidean twin LR.

Both prune by iterative hard thresholding (IHT) on an l0-constrained regression of the
per-example gradients ``G: (N, p)`` (brief ``ewr.md`` sections 2-3):

* LR (CHITA-style): ``Q(w) = 1/2 ||G w_ref - G w||^2 + (N lam / 2) ||w - w_ref||^2``.
* EWR: the Euclidean fit is replaced by entropic OT between the 1-D projections
  ``y = G w_ref`` and ``z = G w``: ``Q(w) = (N/2) <Pi, C(w)> + (N lam / 2) ||w - w_ref||^2``,
  ``C_ij = (y_i - z_j)^2``, ``Pi`` the entropic plan with uniform marginals (held fixed within
  a step). With ``Pi = I/N``, EWR is LR exactly.

One IHT step (brief items 6-8): direction ``d``; ``tau_c``, the largest step that keeps the
top-k support, by bisection; the closed-form minimiser of ``Q`` on the line ``H_k(w) - tau d``
(brief section 10), clipped to ``tau_c``, and past it the 1.05 growth rule; then a hard
threshold to exactly ``k``.

Two readings, one flag apart:

* **Defaults: jaxprune's solver** (the best pruned model we measured, ``experiments/README.md``):
  ``stages`` along a cubic schedule from ``initial_sparsity`` 0.1, each with ``G`` recomputed at
  the current weights and the reference reset to them (CHITA++); per stage the support is the top
  ``k_t`` of the current weights by magnitude (``support="obs"``: by the optimal-brain-surgeon
  saliency) and the kept weights get an exact ridge refit (the "backsolve",
  :mod:`jaxprune.methods._backsolve`), written back. EWR's refit fits ``N Pi^T y`` (the plan
  held fixed), LR's ``y``. ``lam`` and ``stages`` default by sparsity.
* **``official=True``: the official code**: one IHT step per stage (below) from the dense point,
  mask only, ``lam = 0.01``, the reference fixed. From the dense point this step is magnitude
  pruning (``d = 0``).

The official step's readings, each an option:
  * ``direction="official"``: ``d = N [G^T Pi (G w - y) + lam (w - w_ref)]`` (paper-era code;
    ``scale_by_n=False`` drops the factor N as the code's HEAD does). Not the exact gradient
    of ``Q``; ``direction="exact"`` uses ``G^T (G w - N Pi^T y) + N lam (w - w_ref)``.
  * ``update_weights=False``: mask only, surviving weights keep their values (official);
    ``True`` writes the IHT iterate's values back (CHITA).
  * the official line search runs Adam on tau; jaxprune uses the exact closed form.
  * the official threshold keeps ties (``>= k``-th magnitude); jaxprune keeps exactly ``k``.
  * ``eps`` is absolute on the unnormalised cost (official); ``relative_eps=True`` scales it by mean(C).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import ot
from jaxprune.methods import _backsolve
from jaxprune.core.budget import check_k
from jaxprune.core.checks import check_choice, check_finite, check_labels, check_positive_int, traced_call_note
from jaxprune.core.forms import as_model, labelled_batch, user_loss
from jaxprune.core.options import Options, resolve
from jaxprune.core.masks import apply_masks, masks_from_flat, topk_mask, where_kept
from jaxprune.core.progress import progress
from jaxprune.core.results import PruneResult, make_info
from jaxprune.core.schedules import KINDS as SCHEDULES, budgets_between, schedule_fractions
from jaxprune.signals.gradients import (DenseOperator, add_gradient_noise, batch_size, dense_operator,
                                       chunk_size_for, gradient_operator, grads_and_projections,
                                       raise_if_not_finite, weight_reuse)
from jaxprune.core.trees import PrunableSpec, PyTree, flat_spec, flatten, on_host_numeric, to_device, unflatten

DIRECTIONS = ("official", "exact")
SIGNALS = ("auto", "materialized", "matrix_free")
STEPS = ("official", "lipschitz")
SUPPORTS = ("magnitude", "obs", "iht")
REFITS = ("ridge", "none")
# The defaults by target sparsity, measured on MLPNet (N = 1000, experiments/README.md): rows of
# (sparsity from which the row applies, lam, stages, support); the last row that applies wins.
BY_SPARSITY = {
    "lr": ((0.0, 1e-5, 10, "magnitude"), (0.7, 1e-5, 20, "magnitude"), (0.97, 1e-4, 40, "obs")),
    # EWR's OT target is not anchored to each example's own value, so it needs a heavier ridge.
    "ewr": ((0.0, 1e-3, 10, "magnitude"), (0.7, 1e-3, 20, "magnitude"), (0.97, 1e-3, 40, "obs")),
}


class StepConfig(NamedTuple):
  """Static settings of one IHT step (hashable: a jit static argument; the budget k is traced)."""
  coupling: Any                # "entropic", "identity" (LR) or a callable (y, z) -> plan (N, N)
  eps: float
  relative_eps: bool
  lam: float
  direction: str
  scale_by_n: bool
  sinkhorn: ot.SinkhornOptions
  step: str = "official"       # "official" (tau_c, closed form, 1.05 growth) or "lipschitz" (tau = 1/L)
  bisection_iterations: int = 50
  growth: float = 1.05
  max_growth_steps: int = 200


class StepInfo(NamedTuple):
  objective_before: jax.Array     # Q(w) with the step's plan
  objective_after: jax.Array      # Q(H_k(w - tau d)) with the same plan
  transport_cost: jax.Array       # <Pi, C(w)>
  tau: jax.Array
  tau_c: jax.Array
  sinkhorn_iterations: jax.Array
  sinkhorn_converged: jax.Array
  marginal_error: jax.Array
  sinkhorn_error: jax.Array       # marginal error of Sinkhorn's plan before rounding
  potentials: Any = None          # Sinkhorn's (f, g), to warm-start the next iteration's plan


def _plan(y, z, cfg: StepConfig, init=None):
  n = y.shape[0]
  if cfg.coupling == "entropic":
    return ot.entropic_plan_1d(y, z, cfg.eps, relative=cfg.relative_eps, options=cfg.sinkhorn, init=init)
  plan = ot.identity_plan(n, y.dtype) if cfg.coupling == "identity" else cfg.coupling(y, z)
  err = ot.marginal_error(plan)
  return plan, ot.PlanInfo(jnp.asarray(0), jnp.asarray(True), err, err)


def _top_k_support_kept(cand, keep):
  """Whether the top-|.| k entries of ``cand`` are exactly ``keep`` (strict separation; ties fail)."""
  inside = jnp.min(jnp.where(keep, jnp.abs(cand), jnp.inf))
  outside = jnp.max(jnp.where(keep, -jnp.inf, jnp.abs(cand)))
  return inside > outside


def _tau_c(w, d, keep, iterations):
  """Largest step keeping the top-k support of ``w - tau d`` (official bisection, brief 7a)."""
  upper = jnp.minimum(jnp.max(w / (d + 1e-16)), 100.0)

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    ok = _top_k_support_kept(w - mid * d, keep)
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iterations, body, (jnp.zeros((), w.dtype), upper.astype(w.dtype)))
  return jnp.where(upper > 0, lo, 0.0)


def lipschitz_constant(op, n: int, p: int, lam: float, scale_by_n: bool, iterations: int = 30) -> jax.Array:
  """``L = 1.05 (sigma_max(G)^2 + N lam)`` (divided by N without ``scale_by_n``): the curvature of
  ``Q`` along any direction for a doubly stochastic ``N Pi``, by power iteration on ``G^T G``."""
  v = jnp.ones((p,), jnp.float32) / jnp.sqrt(p)

  def body(_, v):
    u = op.rmatvec(op.matvec(v))
    return u / (jnp.linalg.norm(u) + 1e-30)

  v = jax.lax.fori_loop(0, iterations, body, v)
  sigma2 = jnp.linalg.norm(op.matvec(v)) ** 2
  L = 1.05 * (sigma2 + n * lam)
  return L if scale_by_n else L / n


lipschitz_constant = jax.jit(lipschitz_constant, static_argnames=("n", "p", "lam", "scale_by_n", "iterations"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def iht_step(op, w: jax.Array, w_ref: jax.Array, y: jax.Array, k, cfg: StepConfig, lipschitz: jax.Array = 1.0,
             z: Optional[jax.Array] = None, init: Any = None):
  """One EWR/LR IHT step.

  Args:
    op: gradient operator (:class:`~jaxprune.signals.DenseOperator` or ``MatrixFreeOperator``).
    w: ``(p,)`` current weights; w_ref: ``(p,)`` reference weights; y: ``(N,)`` = ``G w_ref``.
    k: number of weights kept (traced: every budget shares one compilation).
    cfg: static :class:`StepConfig`.
    lipschitz: ``L`` for ``cfg.step == "lipschitz"`` (see :func:`lipschitz_constant`).
    z: ``(N,)`` = ``G w`` if already known (taken with the gradients), else computed here.
    init: Sinkhorn potentials to start the plan from (``StepInfo.potentials`` of the previous step).

  Returns:
    ``(w_next: (p,), keep: (p,) bool with exactly k True, StepInfo)``; ``w_next = H_k(w - tau d)``.

  Products with ``G`` are memory-bound, so they are batched: with ``z`` given, the official step
  reads ``G`` twice (``G^T u`` for the direction, then ``G [a, b, d]`` for the line search), and a
  third time only when the step leaves the support (past ``tau_c``) for the final objective.
  """
  n = y.shape[0]
  z = op.matvec(w) if z is None else z
  if cfg.coupling == "identity":   # Pi = I/N, never formed (LR)
    zero = jnp.zeros((), y.dtype)
    pinfo = ot.PlanInfo(jnp.asarray(0), jnp.asarray(True), zero, zero)
    transport_plan = lambda x: x / n   # noqa: E731
    row_mass = col_mass = jnp.full((n,), 1.0 / n, y.dtype)
    plan_t_y = y / n
  else:
    plan, pinfo = _plan(y, z, cfg, init)
    transport_plan = lambda x: plan @ x   # noqa: E731
    row_mass, col_mass = plan.sum(1), plan.sum(0)
    plan_t_y = plan.T @ y

  def objective(z_, w_):
    transport = jnp.dot(row_mass, y * y) - 2.0 * jnp.dot(plan_t_y, z_) + jnp.dot(col_mass, z_ * z_)
    return 0.5 * n * transport + 0.5 * n * cfg.lam * jnp.sum((w_ - w_ref) ** 2), transport

  if cfg.direction == "official":
    d = op.rmatvec(transport_plan(z - y)) + cfg.lam * (w - w_ref)
    d = d * n if cfg.scale_by_n else d
  else:
    d = op.rmatvec(z - n * plan_t_y) + n * cfg.lam * (w - w_ref)

  keep_w = topk_mask(jnp.abs(w), k)
  tau_c = _tau_c(w, d, keep_w, cfg.bisection_iterations)
  if cfg.step == "lipschitz":
    tau = 1.0 / lipschitz
  else:
    # Closed-form minimiser of Q(a - tau b), a = H_k(w), b = d on supp(a) (brief section 10).
    a = jnp.where(keep_w, w, 0.0)
    b = jnp.where(keep_w, d, 0.0)
    u, v, gd = jnp.moveaxis(op.matmat(jnp.stack([a, b, d], axis=1)), 1, 0)   # one pass over G
    num = cfg.lam * jnp.dot(b, a - w_ref) - jnp.dot(v, plan_t_y) + jnp.dot(col_mass * u, v)
    den = jnp.dot(col_mass * v, v) + cfg.lam * jnp.dot(b, b)
    tau_star = jnp.clip(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0), 0.0, tau_c)

    # Past tau_c: grow by 1.05 while Q(w - tau d) decreases (unthresholded w, unmasked d).
    q_line = lambda t: objective(z - t * gd, w - t * d)[0]

    def grow_cond(state):
      t, i = state
      return (i < cfg.max_growth_steps) & (q_line(cfg.growth * t) < q_line(t))

    grow = lambda: jax.lax.while_loop(grow_cond, lambda s: (s[0] * cfg.growth, s[1] + 1), (tau_c, 0))[0]  # noqa: E731
    tau = jax.lax.cond(tau_star < tau_c, lambda: tau_star, grow)   # the growth loop runs only when it is used

  w_step = w - tau * d
  keep = topk_mask(jnp.abs(w_step), k)
  w_next = jnp.where(keep, w_step, 0.0)
  if cfg.step == "lipschitz":
    z_next = op.matvec(w_next)
  else:   # on the same support, G w_next = G a - tau G b: no pass over G
    z_next = jax.lax.cond(jnp.all(keep == keep_w), lambda: u - tau * v, lambda: op.matvec(w_next))
  q_before, transport = objective(z, w)
  q_after, _ = objective(z_next, w_next)
  info = StepInfo(q_before, q_after, transport, tau, tau_c, pinfo.iterations, pinfo.converged, pinfo.marginal_error,
                  pinfo.sinkhorn_error, pinfo.potentials)
  return w_next, keep, info


@dataclasses.dataclass(frozen=True)
class EWROptions(Options):
  """Everything that changes the mathematics of :func:`ewr` and :func:`lr` (frozen, hashable).

  Two readings. The defaults are jaxprune's solver, chosen by measurement on MLPNet (see
  ``experiments/README.md``): several stages along a cubic schedule, each with ``G`` recomputed
  at the current weights and the reference reset to them (CHITA++), a magnitude support and an
  exact ridge refit of the kept weights (the "backsolve", :mod:`jaxprune.methods._backsolve`),
  written back. :meth:`official` is the official EWR code: one IHT step from the dense point,
  mask only, ``lam = 0.01``, reference fixed.

  Attributes:
    eps: entropic regularisation, absolute on the unnormalised cost; ``0`` (default) -> the exact
      sorted matching, the best EWR model we measured (blurrier plans pull the target away from
      each example's own value); ``inf`` -> uniform plan; official 1.0.
    lam: ridge weight; ``None`` (default) picks it by sparsity (:func:`defaults_for`); official 0.01.
    relative_eps: scale ``eps`` by the mean cost instead (not the official code).
    support: how a stage picks its ``k`` weights: ``"magnitude"`` (top-k of the current weights),
      ``"obs"`` (top-k optimal-brain-surgeon saliency ``w_i^2 / 2[H^{-1}]_ii`` for the ridge Fisher
      on the current support; ``O(N^2 p)``, materialised ``G``) or ``"iht"`` (``iterations`` IHT
      steps with ``direction``/``step``, official); ``None`` (default) picks it by sparsity
      (magnitude with matrix-free signals).
    refit: ``"ridge"`` (default): exact ridge refit on the support, ``min 1/2 ||t - G_S w_S||^2 +
      (N lam/2) ||w_S - w_ref_S||^2`` with target ``t = y`` (LR) or ``N Pi^T y`` (EWR, the plan
      held fixed: ``(N/2) <Pi, C(w)>`` is then ``1/2 ||N Pi^T y - G w||^2`` plus a constant);
      ``"none"``: the support step's values (official).
    solver: how the refit is solved: ``"auto"`` (``k x k`` Cholesky when ``k <= N``, else the
      ``N x N`` Woodbury system; conjugate gradients for matrix-free signals), ``"woodbury"``,
      ``"cholesky"`` or ``"cg"``.
    refits: plan refreshes per stage for EWR (plan at the refitted weights, refit again); LR needs one.
    jitter: the refit's ridge is at least ``jitter`` x the system's mean diagonal, so ``lam -> 0``
      on a rank-deficient ``G_S`` stays finite.
    cg_iterations: conjugate-gradient iterations of the matrix-free refit.
    first_order: weight of the first-order term ``(G^T 1)^T (w - w_ref)`` (1 = the loss's Taylor
      expansion; CHITA's option); it shifts the target by ``-first_order``. Default 0, as EWR.
    reset_reference: each stage's reference is its input weights (default, CHITA++); False keeps
      ``w_ref`` fixed across stages (official; diverges at high sparsity with write-back).
    direction: ``"official"`` (paper-era code) or ``"exact"`` (true gradient with Pi fixed), for IHT.
    scale_by_n: keep the factor N in the official direction (paper-era code: True; HEAD: False).
    update_weights: write the solver's values back (default); False = mask only (official), the
      surviving weights keep their values (needs ``refit="none"``). With ``iterations > 1`` the IHT
      iterates carry their values between steps either way.
    iterations: IHT steps per stage (``support="iht"``), the plan refreshed between them.
    stages: number of stages, budgets decreasing to ``k`` along ``stage_schedule`` from
      ``initial_sparsity``; ``None`` (default) picks it by sparsity (:func:`defaults_for`).
    stage_schedule: ``"cubic"`` (default), ``"linear"`` (official multi-stage) or ``"polynomial"``.
    initial_sparsity: the schedule's starting sparsity (default 0.1; official 0).
    signals: ``"materialized"`` (``G`` built in chunks), ``"matrix_free"`` (JVP/VJP operators) or
      ``"auto"`` (default): matrix-free when a stage needs only products with ``G`` (the IHT
      support without a refit and without noise: the official preset) and each weight is used
      at most ``MATRIX_FREE_REUSE`` times per example (:func:`jaxprune.signals.weight_reuse`:
      dense layers), materialised otherwise (the ridge refit's Cholesky/Woodbury systems and the
      OBS saliency read ``G`` itself). The official code forms ``G``; its step needs about six
      products ``G v`` or ``G^T u``, each a batched forward or backward pass. Without weight reuse
      they cost less than writing ``G`` (MLPNet, N = 1000: an LR stage 11 ms against 107 ms, the
      same support); a convolution's pass costs its positions times more (ResNet20, N = 200:
      2.3 s against 1.7 s). ``info["options"]`` records the resolved choice.
    chunk_size, grads_dtype: examples per chunk and storage dtype of the per-example gradients;
      ``chunk_size="auto"`` picks the largest chunk whose gradients and backward pass fit in
      ``memory_budget`` bytes (:func:`jaxprune.signals.chunk_size_for`; default a quarter of the
      device's free memory). ``info["chunk_size"]`` records the one used.
    noise: ``(scale, fraction)`` gradient noise as in the official code (needs ``key``).
    sinkhorn: static :class:`~jaxprune.ot.SinkhornOptions`.
    coupling: ``"entropic"`` (EWR), ``"identity"`` (``Pi = I/N``: LR) or a hashable callable
      ``(y, z) -> plan: (N, N)``.
    step: ``"official"`` (support-preserving ``tau_c``, closed-form line minimiser, 1.05 growth)
      or ``"lipschitz"`` (plain IHT with ``tau = 1/L``: the paper's Algorithm-1 prototype).
    warm_start: start each IHT step's Sinkhorn from the previous step's potentials (across
      iterations and stages; default). The plan is the same to ``sinkhorn.threshold``; only the
      iteration count drops. The official code starts every solve from zero (``False``). The
      refit's plans (``refits``) start from zero either way: started from the plan before them
      (MLP, N = 60, eps = 0.5, 2 stages x 3 refits) they took as many iterations in all (2580
      against 2600), and the next stage's first plan took 2160 instead of 180.
  """
  OFFICIAL = {"eps": 1.0, "lam": 0.01, "support": "iht", "refit": "none", "update_weights": False, "stages": 1,
              "stage_schedule": "linear", "initial_sparsity": 0.0, "reset_reference": False, "warm_start": False}

  eps: float = 0.0
  lam: Optional[float] = None
  relative_eps: bool = False
  support: Optional[str] = None
  refit: str = "ridge"
  solver: str = "auto"
  refits: int = 1
  jitter: float = 1e-6
  cg_iterations: int = 200
  first_order: float = 0.0
  reset_reference: bool = True
  direction: str = "official"
  scale_by_n: bool = True
  update_weights: bool = True
  iterations: int = 1
  stages: Optional[int] = None
  stage_schedule: str = "cubic"
  initial_sparsity: float = 0.1
  signals: str = "auto"
  chunk_size: Any = 256
  memory_budget: Optional[float] = None
  grads_dtype: Any = jnp.float32
  noise: Optional[tuple] = None
  sinkhorn: ot.SinkhornOptions = ot.SinkhornOptions()
  coupling: Any = "entropic"
  step: str = "official"
  warm_start: bool = True

  def check(self) -> None:
    """Raises ``ValueError``/``TypeError`` naming the first bad field."""
    for name, allowed in (("direction", DIRECTIONS), ("signals", SIGNALS), ("step", STEPS),
                          ("stage_schedule", SCHEDULES), ("refit", REFITS), ("solver", _backsolve.SOLVERS)):
      check_choice(getattr(self, name), allowed, name)
    if not (self.coupling in ("entropic", "identity") or callable(self.coupling)):
      raise ValueError(f"coupling must be 'entropic', 'identity' or a callable (y, z) -> plan, got {self.coupling!r}")
    eps = self.eps
    if isinstance(eps, (bool, jax.Array)) or not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
      raise ValueError(f"eps must be a float >= 0 or inf (0: exact sorted matching), got {eps!r}")
    if self.support is not None:
      check_choice(self.support, SUPPORTS, "support")
    for name in ("warm_start", "update_weights", "reset_reference", "scale_by_n", "relative_eps"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
    for name in ("lam", "jitter", "first_order"):
      value = getattr(self, name)
      if name == "lam" and value is None:
        continue
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    for name in ("iterations", "refits", "cg_iterations") + (("stages",) if self.stages is not None else ()):
      check_positive_int(getattr(self, name), name)
    if self.chunk_size != "auto":
      check_positive_int(self.chunk_size, "chunk_size")
    mb = self.memory_budget
    if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0):
      raise ValueError(f"memory_budget must be a positive number of bytes or None, got {mb!r}")
    s0 = self.initial_sparsity
    if isinstance(s0, bool) or not isinstance(s0, (int, float)) or not 0.0 <= s0 < 1.0:
      raise ValueError(f"initial_sparsity must be a float in [0, 1), got {s0!r}")
    if self.refit == "ridge" and not self.update_weights:
      raise ValueError("update_weights=False keeps the input values on the support, which would discard the "
                       "ridge refit: use refit='none' for the official mask-only step")
    if self.signals == "matrix_free" and self.solver in ("woodbury", "cholesky"):
      raise ValueError(f"solver={self.solver!r} needs a materialised G; matrix-free signals refit with solver='cg'")
    if self.signals == "matrix_free" and self.support == "obs":
      raise ValueError("support='obs' needs a materialised G (signals='materialized')")
    if self.noise is not None:
      if self.signals == "matrix_free":
        raise ValueError("noise needs signals='materialized' (noise is added to the rows of G)")
      if len(self.noise) != 2:
        raise ValueError(f"noise must be (scale, fraction), got {self.noise!r}")


MATRIX_FREE_REUSE = 8.0   # signals="auto": matrix-free up to this many uses of a weight per example


def auto_signals(opts: EWROptions, reuse: Callable[[], float]) -> str:
  """``signals="auto"``: matrix-free when every stage only multiplies by ``G`` (the IHT support,
  no refit, no noise) and ``reuse()`` (:func:`jaxprune.signals.weight_reuse`, only then
  computed) is at most ``MATRIX_FREE_REUSE``; else materialised."""
  products_only = opts.support == "iht" and opts.refit == "none" and opts.noise is None
  return "matrix_free" if products_only and reuse() <= MATRIX_FREE_REUSE else "materialized"


def defaults_for(sparsity: float, method: str = "lr") -> dict:
  """``lam``, ``stages`` and ``support`` of the default solver of ``method`` (``"lr"``/``"ewr"``)
  at a target sparsity (the ``BY_SPARSITY`` table, measured on MLPNet): a light ridge and 10-20
  stages with the magnitude support up to 0.97; from 0.97, where the support matters most, 40
  stages with the OBS saliency, so the refit starts from the weights that cost least to remove."""
  check_choice(method, tuple(BY_SPARSITY), "method")
  _, lam, stages, support = [row for row in BY_SPARSITY[method] if sparsity >= row[0]][-1]
  return {"lam": lam, "stages": stages, "support": support}


def ewr(params: PyTree, batch: Any, k: int, *, loss_fn: Optional[Callable] = None,
        apply_fn: Optional[Callable] = None, key: Optional[jax.Array] = None, w_ref: Optional[PyTree] = None,
        prunable: PrunableSpec = None, options: Optional[EWROptions] = None, official: bool = False,
        show_progress: bool = True, **overrides) -> PruneResult:
  """EWR pruning: keep ``k`` weights chosen by entropic-Wasserstein regression of per-example gradients.

  By default a multi-stage magnitude support with an exact ridge refit of the kept weights to the
  OT target ``N Pi^T y`` (see :class:`EWROptions`); ``official=True`` is the official code's
  single IHT step with mask-only write-back.

  Args:
    params: the model's tree (params dict, linen ``variables``, ``nnx.State``) or an
      ``nnx.Module``; the ``prunable`` leaves are pruned.
    batch: ``N`` examples, a pytree of arrays with a leading example axis (e.g. ``(x, y)``).
    k: number of prunable weights kept (exactly).
    loss_fn: the training loss ``loss_fn(params, batch) -> scalar``, receiving the same kind of
      tree as ``params``; per-example losses are ``loss_fn(params, example_as_batch_of_one)``.
      Default: softmax cross-entropy of ``apply_fn(params, x)`` on ``batch = (x, y)``. Call
      BatchNorm models in inference mode.
    apply_fn: ``apply_fn(params, x) -> logits`` for the default loss (not needed for an NNX module).
    key: ``jax.random`` key (needed with gradient ``noise``).
    w_ref: the fixed reference of ``reset_reference=False`` (default: ``params``; the gradual
      driver passes the dense weights); an error with the default ``reset_reference=True``.
    prunable: leaf selection (default: Dense/Conv kernels); see :class:`jaxprune.Prunable`.
    options: an :class:`EWROptions`; official: its official preset. ``**overrides`` set single
      fields on top (``stages=10``, ``eps=0.1``, ...).
    show_progress: progress bars for per-example gradients and stages.

  Returns:
    :class:`PruneResult`: ``params`` (pruned, with the refitted values unless mask only),
    ``masks`` and ``info`` (method, the options with ``lam``/``stages`` resolved, seconds,
    ``budgets`` per stage; under ``steps`` one record per IHT step or refit: its ``kind``,
    objective, transport cost, and step sizes or the refit's ``mu`` and relative residual).
  """
  return _run(params, batch, k, loss_fn, apply_fn, key, w_ref, prunable,
              resolve(EWROptions, options, official, overrides), show_progress)


def lr(params: PyTree, batch: Any, k: int, *, loss_fn: Optional[Callable] = None,
       apply_fn: Optional[Callable] = None, key: Optional[jax.Array] = None, w_ref: Optional[PyTree] = None,
       prunable: PrunableSpec = None, options: Optional[EWROptions] = None, official: bool = False,
       show_progress: bool = True, **overrides) -> PruneResult:
  """LR (CHITA-style sparse linear regression): :func:`ewr` with the identity coupling ``Pi = I/N``.

  ``Q(w) = 1/2 ||G w_ref - G w||^2 + (N lam/2) ||w - w_ref||^2``; every argument and option of
  :func:`ewr` applies except the transport ones (``eps``, ``relative_eps``, ``sinkhorn``,
  ``coupling``). With ``scale_by_n=True`` (default) the official direction is the LR direction of
  the official code, ``G^T (G w - y) + N lam (w - w_ref)``.
  """
  for name in ("eps", "relative_eps", "sinkhorn", "coupling"):
    if name in overrides:
      raise TypeError(f"lr() has no {name!r} option (LR uses the identity coupling)")
  opts = resolve(EWROptions, options, official, overrides).replace(coupling="identity")
  return _run(params, batch, k, loss_fn, apply_fn, key, w_ref, prunable, opts, show_progress)


def _run(params, batch, k, loss_fn, apply_fn, key, w_ref, prunable, opts: EWROptions, show_progress) -> PruneResult:
  started = time.perf_counter()
  model = as_model(params, apply_fn)
  tree = model.tree
  loss = user_loss(model, loss_fn)
  spec = flat_spec(tree, prunable)
  n = batch_size(batch)
  check_finite(tree, "params")
  check_finite(batch, "batch")
  if loss_fn is None:   # the default loss: integer labels within the model's classes
    x, y = labelled_batch(batch)
    try:
      logits = jax.eval_shape(model.apply_fn, tree, x[:1])
    except Exception as error:
      traced_call_note(error, "apply_fn(params, x) for the default loss", x[:1])
      raise
    check_labels(y, logits.shape[-1], "batch labels")
  p = spec.size
  k = check_k(k, p)
  if opts.noise is not None and key is None:
    raise ValueError("key: noise needs a jax.random key to draw the noise")
  sparsity = 1.0 - k / p
  defaults = defaults_for(sparsity, "ewr" if opts.coupling != "identity" else "lr")
  if opts.signals == "matrix_free":   # the OBS saliency needs G itself
    defaults["support"] = "magnitude"
  opts = opts.replace(**{f: v for f, v in defaults.items() if getattr(opts, f) is None})
  if opts.signals == "auto":
    opts = opts.replace(signals=auto_signals(opts, lambda: weight_reuse(loss, tree, batch, spec=spec)))
  if opts.refit == "none" and opts.support != "iht":
    raise ValueError(f"refit='none' keeps the support step's values, and support={opts.support!r} has none of its "
                     "own: use support='iht' (the official step), or jp.magnitude")
  if opts.iterations > 1 and opts.support != "iht":
    raise ValueError(f"iterations={opts.iterations} counts IHT steps, which only support='iht' takes (support is "
                     f"{opts.support!r}); EWR's plan refreshes around the refit are `refits`")
  if w_ref is not None:
    if opts.reset_reference:
      raise ValueError("w_ref is the fixed reference of reset_reference=False (the official reading); with "
                       "reset_reference=True (default) each stage's reference is its input weights")
    w_ref = as_model(w_ref).tree
  w_ref_vec, _ = flatten(tree if w_ref is None else w_ref, spec=spec)
  w_vec, _ = flatten(tree, spec=spec)
  transport = opts.coupling != "identity"
  cfg = StepConfig(opts.coupling, float(opts.eps), opts.relative_eps, float(opts.lam), opts.direction,
                   opts.scale_by_n, opts.sinkhorn, opts.step)
  budgets = _budgets(p, k, opts)
  if opts.chunk_size == "auto":
    chunk = chunk_size_for(loss, tree, batch, spec=spec, memory_budget=opts.memory_budget,
                           materialized=opts.signals == "materialized")
  else:
    chunk = opts.chunk_size
  history, keep = [], None
  noise_keys = None if opts.noise is None else jax.random.split(key, opts.stages)
  name = "EWR" if transport else "LR"
  traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((tree, batch, w_ref_vec)))
  potentials = None
  for stage, k_t in enumerate(progress(budgets, desc=f"{name} stages", disable=not show_progress or opts.stages == 1)):
    current = unflatten(w_vec, tree, spec)
    ref = w_vec if opts.reset_reference or (stage == 0 and w_ref is None) else w_ref_vec
    signals = _signals(loss, current, batch, spec, opts, None if noise_keys is None else noise_keys[stage],
                       show_progress, w_vec, None if ref is w_vec else ref, chunk)
    signals = signals._replace(potentials=potentials)   # used by _iht_support only with warm_start
    w_next, keep, records, potentials = _stage(signals, w_vec, ref, k_t, cfg, opts, n, p, f"{name} stage {stage}",
                                               traced)
    for it, record in enumerate(records):
      history.append({"stage": stage, "k": k_t, **record})
      if not traced and not math.isfinite(record["objective_after"]):
        raise FloatingPointError(
            f"{name} diverged at stage {stage} (record {it}): the objective is {record['objective_after']}. "
            "step='lipschitz' is safe for LR and direction='exact' with a fixed plan; with the official "
            "direction use step='official'.")
    w_vec = w_next if opts.update_weights else where_kept(keep, w_vec)
  current = unflatten(w_vec, tree, spec)
  masks = masks_from_flat(keep, tree, spec)
  out = apply_masks(current, masks)
  info = make_info("ewr" if transport else "lr", opts, started, k=k, p=p, sparsity=sparsity, n=n, chunk_size=chunk,
                   budgets=budgets, steps=history, objective=history[-1]["objective_after"],
                   transport_cost=history[-1]["transport_cost"])
  return PruneResult(out, masks, info)


def _budgets(p: int, k: int, opts: EWROptions) -> list[int]:
  """Kept-weight budgets per stage: from ``initial_sparsity`` (or ``p``) down to exactly ``k``."""
  k_start = max(k, int(round((1.0 - opts.initial_sparsity) * p)))
  return budgets_between(p, k_start, k, schedule_fractions(opts.stages, opts.stage_schedule))


class Signals(NamedTuple):
  """A stage's gradient operator, with what was computed alongside ``G`` (``None`` where not)."""
  op: Any                          # DenseOperator or MatrixFreeOperator
  z: Optional[jax.Array] = None    # (N,) G w at the stage's input weights
  y: Optional[jax.Array] = None    # (N,) G ref (the reference's projection; z when ref is w)
  finite: Optional[jax.Array] = None   # (N,) every gradient of example i is finite
  potentials: Any = None           # Sinkhorn potentials of the previous stage's last plan (warm start)


def _signals(loss, current, batch, spec, opts: EWROptions, noise_key, show_progress, w, ref, chunk: int) -> Signals:
  """The stage's signals at ``current``: materialised ``G`` (with noise) or matrix-free. With a
  materialised, noiseless ``G``, ``z = G w`` and ``y = G ref`` are taken in the gradient pass."""
  if opts.signals == "matrix_free":
    return Signals(gradient_operator(loss, current, batch, spec=spec, chunk_size=chunk))
  vectors = None if noise_key is not None else _columns([w] + ([] if ref is None else [ref]))
  G, finite, proj = grads_and_projections(loss, current, batch, vectors, spec=spec, chunk_size=chunk,
                                          dtype=opts.grads_dtype, show_progress=show_progress)
  if noise_key is not None:
    G = add_gradient_noise(G, noise_key, float(opts.noise[0]), float(opts.noise[1]))
    return Signals(dense_operator(G), finite=finite)
  return Signals(dense_operator(G), *_first_and_last_column(proj), finite)


def _columns(vectors: list) -> jax.Array:
  """``(p, m)`` from ``m`` vectors ``(p,)``; numpy for host arrays (an eager stack compiles)."""
  if on_host_numeric(*vectors):
    return to_device(np.stack([np.asarray(v) for v in vectors], axis=1), vectors[0])
  return jnp.stack(vectors, axis=1)


def _first_and_last_column(a: jax.Array) -> tuple:
  if on_host_numeric(a):
    host = np.asarray(a)
    return to_device(host[:, 0], a), to_device(host[:, -1], a)
  return a[:, 0], a[:, -1]


def _iht_support(signals: Signals, w, ref, k_t, cfg: StepConfig, opts: EWROptions, n, p):
  """The official support step: ``iterations`` IHT steps (plan refreshed between them). The step
  diagnostics stay on device: ``(w, keep, [StepInfo])``."""
  op = signals.op
  L = (lipschitz_constant(op, n, p, float(opts.lam), opts.scale_by_n) if opts.step == "lipschitz"
       else jnp.asarray(1.0))
  y = _matvec(op, ref) if signals.y is None else signals.y
  z, init = signals.z, signals.potentials
  infos = []
  for _ in range(opts.iterations):
    w, keep, info = iht_step(op, w, ref, y, jnp.asarray(k_t, jnp.int32), cfg, L, z, init if opts.warm_start else None)
    infos.append(info)
    z, init = None, info.potentials   # later iterations project their own weights, start from this plan
  return w, keep, infos


@jax.jit
def _matvec(op, v: jax.Array) -> jax.Array:
  """``G v``, compiled once per operator type and shape (an eager matrix-free product
  traces and compiles its chunk loop on every call: 0.12 s on MLPNet, N = 1000)."""
  return op.matvec(v)


class RefitConfig(NamedTuple):
  """Static settings of :func:`backsolve_stage` (hashable: a jit static argument)."""
  support: str            # "magnitude", "obs" or "given" (the caller's keep, e.g. from IHT)
  solver: str             # "woodbury", "cholesky" or "cg"
  refits: int = 1
  jitter: float = 1e-6
  first_order: float = 0.0
  cg_iterations: int = 200
  k: Optional[int] = None  # the budget as a static int: only the k x k Cholesky solver needs it


class RefitRecord(NamedTuple):
  """Diagnostics of each refit of a stage, stacked over ``refits`` (device arrays)."""
  objective: jax.Array            # 1/2 ||t - G w||^2 + (mu/2) ||w - ref||^2 after the refit
  transport_cost: jax.Array       # <Pi, C(w)> of the plan the target came from
  mu: jax.Array
  residual: jax.Array             # relative residual of the solved system
  sinkhorn_iterations: jax.Array
  plan_converged: jax.Array
  marginal_error: jax.Array
  sinkhorn_error: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "rcfg"))
def backsolve_stage(op, w: jax.Array, ref: jax.Array, k, mu, cfg: StepConfig, rcfg: RefitConfig,
                    keep: Optional[jax.Array] = None, y: Optional[jax.Array] = None):
  """One stage of the default solver, jitted whole: support, then ``refits`` rounds of (target
  from the plan at the current weights, exact ridge refit).

  Args:
    op: the stage's gradient operator (``DenseOperator`` for the ``woodbury``/``cholesky``
      solvers and the ``obs`` support; any operator for ``cg``).
    w: ``(p,)`` the stage's input weights; ref: ``(p,)`` its reference (``y = G ref``).
    k: the budget (traced, except through ``rcfg.k`` for the Cholesky solver); mu: ``N lam``.
    cfg: the plan's :class:`StepConfig` (``coupling="identity"`` for LR); rcfg: :class:`RefitConfig`.
    keep: ``(p,)`` bool support for ``rcfg.support == "given"``.
    y: ``(N,)`` = ``G ref`` if already known (taken with the gradients).

  Returns:
    ``(w: (p,) zero off the support, keep: (p,) bool with exactly k True, RefitRecord stacked)``.
  """
  y = op.matvec(ref) if y is None else y
  if rcfg.support == "obs":
    keep = topk_mask(_backsolve.obs_saliency(op.G, w, mu, rcfg.jitter), k)
  elif rcfg.support == "magnitude":
    keep = topk_mask(jnp.abs(w), k)
  w = jnp.where(keep, w, 0.0)
  records = []
  for _ in range(rcfg.refits):
    target, transport, pinfo = regression_target(y, op.matvec(w), cfg)
    target = target - rcfg.first_order
    if rcfg.solver == "woodbury":
      w, rinfo = _backsolve.refit_woodbury(op.G, keep, target, ref, mu, rcfg.jitter)
    elif rcfg.solver == "cholesky":
      w, rinfo = _backsolve.refit_cholesky(op.G, keep, target, ref, mu, rcfg.k, rcfg.jitter)
    else:
      w, rinfo = _backsolve.refit_cg(op, keep, target, ref, mu, rcfg.jitter, rcfg.cg_iterations)
    records.append(RefitRecord(regression_objective(op, w, ref, target, mu), transport, rinfo.mu, rinfo.residual,
                               pinfo.iterations, pinfo.converged, pinfo.marginal_error, pinfo.sinkhorn_error))
  return w, keep, jax.tree.map(lambda *x: jnp.stack(x), *records)


def _stage(signals: Signals, w, ref, k_t, cfg: StepConfig, opts: EWROptions, n, p, where, traced=False):
  """A stage: the official IHT support and/or the jitted backsolve stage; returns ``(w, keep,
  records, potentials of the last IHT plan)``. Every diagnostic (and the
  gradients' finite flags) stays on device until one transfer at the end of the stage; under a
  user's ``jit`` (``traced``) the records stay arrays and the host checks are skipped."""
  op, infos, rec, keep = signals.op, [], None, None
  if opts.support == "iht":
    w, keep, infos = _iht_support(signals, w, ref, k_t, cfg, opts, n, p)
  if not (opts.support == "iht" and opts.refit == "none"):
    solver = _backsolve.choose_solver(opts.solver, k_t, n, isinstance(op, DenseOperator))
    rcfg = RefitConfig("given" if keep is not None else opts.support, solver,
                       opts.refits if cfg.coupling != "identity" else 1, float(opts.jitter), float(opts.first_order),
                       opts.cg_iterations, k_t if solver == "cholesky" else None)
    w, keep, rec = backsolve_stage(op, w, ref, jnp.asarray(k_t, jnp.int32), jnp.asarray(n * opts.lam, jnp.float32),
                                   cfg, rcfg, keep, signals.y)
  potentials = infos[-1].potentials if infos else None   # stays on device for the next stage
  infos = [info._replace(potentials=None) for info in infos]   # not a record: not brought to the host
  if not traced:
    infos, rec, finite = jax.device_get((infos, rec, signals.finite))
    if finite is not None:
      raise_if_not_finite(finite)
  records = [_iht_record(info, cfg, opts, f"{where}, iteration {it}", traced) for it, info in enumerate(infos)]
  if rec is not None:
    records += [_refit_record(rec, r, solver, cfg, opts, f"{where}, refit {r}", traced) for r in range(rcfg.refits)]
  return w, keep, records, potentials


def _iht_record(info: StepInfo, cfg: StepConfig, opts: EWROptions, where: str, traced: bool) -> dict:
  if cfg.coupling == "entropic" and not traced:
    ot.report_convergence(ot.PlanInfo(info.sinkhorn_iterations, info.sinkhorn_converged, info.marginal_error,
                                      info.sinkhorn_error), opts.sinkhorn, where)
  return {"kind": "iht", **{f: v if traced else float(v) for f, v in info._asdict().items() if f != "potentials"}}


def _refit_record(rec: RefitRecord, r: int, solver: str, cfg: StepConfig, opts: EWROptions, where: str,
                  traced: bool) -> dict:
  if cfg.coupling == "entropic" and not traced:
    ot.report_convergence(ot.PlanInfo(rec.sinkhorn_iterations[r], rec.plan_converged[r], rec.marginal_error[r],
                                      rec.sinkhorn_error[r]), opts.sinkhorn, where)
  as_float = (lambda v: v) if traced else float
  return {"kind": f"refit ({solver})", "objective_after": as_float(rec.objective[r]),
          "transport_cost": as_float(rec.transport_cost[r]), "mu": as_float(rec.mu[r]),
          "refit_residual": as_float(rec.residual[r]),
          "sinkhorn_iterations": rec.sinkhorn_iterations[r] if traced else int(rec.sinkhorn_iterations[r])}


@functools.partial(jax.jit, static_argnames=("cfg",))
def regression_target(y: jax.Array, z: jax.Array, cfg: StepConfig):
  """The refit's target ``t: (N,)``: ``y`` for LR, ``N Pi^T y`` for EWR with the plan ``Pi``
  between ``y`` and ``z = G w`` held fixed. Returns ``(t, <Pi, C(w)>, PlanInfo)``."""
  n = y.shape[0]
  if cfg.coupling == "identity":
    err = jnp.zeros((), y.dtype)
    return y, jnp.mean((y - z) ** 2), ot.PlanInfo(jnp.asarray(0), jnp.asarray(True), err, err)
  plan, pinfo = _plan(y, z, cfg)
  cost = jnp.sum(plan * (y[:, None] - z[None, :]) ** 2)
  return n * (plan.T @ y), cost, pinfo


@jax.jit
def regression_objective(op, w, ref, target, mu):
  """``1/2 ||t - G w||^2 + (mu/2) ||w - ref||^2`` (``mu = N lam``)."""
  return 0.5 * jnp.sum((target - op.matvec(w)) ** 2) + 0.5 * mu * jnp.sum((w - ref) ** 2)
