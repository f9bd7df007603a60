"""Sparsity schedules for multi-stage and gradual pruning."""
from __future__ import annotations

from typing import Callable

import numpy as np

from jaxprune.core.budget import check_sparsity

KINDS = ("cubic", "linear", "polynomial")


def sparsity_schedule(target: float, stages: int, kind: str = "cubic", *, initial: float = 0.0,
                      power: float = 3.0, include_initial: bool = False) -> list[float]:
  """The sparsity of each of ``stages`` pruning stages, ending at ``target``.

  * ``"cubic"`` (Zhu & Gupta; the official EWR gradual code):
    ``s_t = s_T + (s_0 - s_T) * (1 - (t - 1) / (T - 1))^3`` for ``t = 1..T`` when
    ``include_initial=True`` (stage 1 sits at ``initial``, a no-op at 0, as in the official
    code), else ``s_t = s_T + (s_0 - s_T) * (1 - t / T)^3`` (every stage prunes).
  * ``"polynomial"``: the same with exponent ``power``.
  * ``"linear"``: ``s_t = s_0 + (s_T - s_0) * t / T`` (or ``(t - 1) / (T - 1)`` with
    ``include_initial``).
  """
  target = check_sparsity(target, "target")
  initial = check_sparsity(initial, "initial")
  if isinstance(stages, bool) or not isinstance(stages, (int, np.integer)) or stages < 1:
    raise ValueError(f"stages must be a positive int, got {stages!r}")
  return [initial + (target - initial) * f for f in schedule_fractions(stages, kind, power=power,
                                                                      include_initial=include_initial)]


def schedule_fractions(stages: int, kind: str = "cubic", *, power: float = 3.0,
                       include_initial: bool = False) -> list[float]:
  """Fraction of the way from the initial to the target budget at each stage (last = 1)."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if include_initial:
    steps = [1.0] if stages == 1 else [(t - 1) / (stages - 1) for t in range(1, stages + 1)]
  else:
    steps = [t / stages for t in range(1, stages + 1)]
  if kind == "linear":
    return steps
  power = 3.0 if kind == "cubic" else power
  return [1.0 - (1.0 - f) ** power for f in steps]


def polynomial_sparsity(target: float, begin_step: int, end_step: int, *, initial: float = 0.0,
                        power: float = 3.0) -> Callable[[int], float]:
  """An optax-style ``step -> sparsity`` schedule (``power=3``: cubic; ``power=1``: linear)."""
  target = check_sparsity(target, "target")
  if end_step <= begin_step:
    raise ValueError(f"end_step ({end_step}) must exceed begin_step ({begin_step})")

  def schedule(step: int) -> float:
    f = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
    return target + (initial - target) * (1.0 - f) ** power
  return schedule


def budgets_between(p: int, k_start: int, k_final: int, fractions) -> list[int]:
  """Kept-weight budgets moving from ``k_start`` to exactly ``k_final`` by ``fractions`` in [0, 1]
  (``p`` is the number of prunable weights, an upper bound for every budget)."""
  return [k_final if f >= 1.0 else int(round(k_start - (k_start - k_final) * f)) for f in fractions]
