"""Layer 3: optimal transport, the one place that talks to ott-jax (entropic plans) and POT (exact plans).

Both are imported on first use, not with ``import jaxprune``.
"""
from jaxprune.ot.plans import (ConvergenceWarning, PlanInfo, SinkhornOptions, report_convergence, cost_1d, entropic_plan, entropic_plan_1d, exact_plan,
                               identity_plan, marginal_error, round_to_marginals, sorted_plan, transport_cost,
                               uniform_plan)

__all__ = ["ConvergenceWarning", "report_convergence", "PlanInfo", "SinkhornOptions", "cost_1d", "entropic_plan", "entropic_plan_1d", "exact_plan",
           "identity_plan", "marginal_error", "round_to_marginals", "sorted_plan", "transport_cost", "uniform_plan"]
