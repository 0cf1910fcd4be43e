"""IsoFLOP profiles, Hoffmann et al. 2022 approach 2: per compute budget a parabola of loss in ln N
gives that budget's compute-optimal N_opt (budgets whose parabola has no usable minimum are flagged
and left out), then a line in log space over the budgets gives the frontier N_opt ∝ C^a and
D_opt = C / (6·N_opt) ∝ C^(1−a), with bootstrap intervals from resampling the runs within each budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lm_lightning.scaling.fit_common import (
    FitResult, Interval, bootstrap_interval, check_positive, r_squared, scalar_or_array,
)


@dataclasses.dataclass
class BudgetFit(FitResult):
    """One compute budget's IsoFLOP profile: loss ≈ c2·(ln N)² + c1·ln N + c0 (``coefficients`` = (c2, c1, c0)).

    ``ok`` is False, with the ``reason``, when the parabola has fewer than 3 distinct sizes,
    opens downward, or has its minimum outside the sampled N; such a budget is left out of the frontier.
    """

    C: float
    n_runs: int
    ok: bool
    reason: str | None
    N_opt: float | None
    D_opt: float | None
    loss_min: float | None
    coefficients: tuple[float, float, float] | None
    N_range: tuple[float, float]


@dataclasses.dataclass
class IsoFlopFit(FitResult):
    """N_opt = N_coef·C^a and D_opt = D_coef·C^b fitted in log space over the budgets whose profile is ``ok``."""

    per_budget: list[BudgetFit]
    a: float
    a_ci: Interval
    b: float
    b_ci: Interval
    N_coef: float
    D_coef: float
    r2: float  # of log N_opt against log C
    n_budgets_used: int
    n_bootstrap: int
    a_samples: np.ndarray = dataclasses.field(repr=False)
    b_samples: np.ndarray = dataclasses.field(repr=False)

    def optimal_allocation(self, C: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        """(N_opt, D_opt) at budget C FLOPs from the fitted frontier."""
        flops = np.asarray(C, dtype=float)
        return scalar_or_array(self.N_coef * flops ** self.a, C), scalar_or_array(self.D_coef * flops ** self.b, C)


def run_field(run: Any, key: str) -> float:
    value = run.get(key) if isinstance(run, Mapping) else getattr(run, key, None)
    if value is None:
        raise ValueError(f"fit_isoflop: every run needs the keys C, N and loss (missing {key!r} in {run!r})")
    return float(value)


def _parabola(C: float, log_N: np.ndarray, loss: np.ndarray) -> BudgetFit:
    N_range = (float(np.exp(log_N.min())), float(np.exp(log_N.max())))

    def flagged(reason: str, coefficients: Any = None) -> BudgetFit:
        return BudgetFit(C, len(log_N), False, reason, None, None, None, coefficients, N_range)

    if np.unique(log_N).size < 3:
        return flagged(f"needs at least 3 distinct model sizes (got {np.unique(log_N).size})")
    c2, c1, c0 = (float(c) for c in np.polyfit(log_N, loss, 2))
    if c2 <= 0:
        return flagged("parabola opens downward: no minimum", (c2, c1, c0))
    vertex = -c1 / (2 * c2)
    if not log_N.min() <= vertex <= log_N.max():
        with np.errstate(over="ignore"):
            where = f"N = {float(np.exp(vertex)):.3g}"
        return flagged(f"minimum at {where} lies outside the sampled N range", (c2, c1, c0))
    N_opt = math.exp(vertex)
    loss_min = c0 - c1 ** 2 / (4 * c2)
    return BudgetFit(C, len(log_N), True, None, N_opt, C / (6 * N_opt), loss_min, (c2, c1, c0), N_range)


def _frontier_line(budgets: Sequence[BudgetFit]) -> tuple[float, float, float]:
    """Least squares of ln N_opt on ln C: (a, N_coef, R²)."""
    log_C = np.log([budget.C for budget in budgets])
    log_N = np.log([budget.N_opt for budget in budgets])
    a, intercept = np.polyfit(log_C, log_N, 1)
    return float(a), math.exp(intercept), r_squared(log_N, intercept + a * log_C)


def fit_isoflop(runs: Iterable[Mapping[str, float] | Any], n_bootstrap: int = 1000, seed: int = 0) -> IsoFlopFit:
    """Hoffmann et al. 2022 approach 2: a parabola of loss in ln N per compute budget, then N_opt ∝ C^a.

    ``runs``: records (dicts or objects with attributes) with ``C`` (the budget in FLOPs: runs of
    one budget share the same value), ``N`` (parameters) and ``loss``; ``D`` may be present but
    the frontier uses D_opt = C / (6·N_opt), so D_opt ∝ C^b with b = 1 − a. Budgets whose profile
    is not ``ok`` (see ``BudgetFit``) are reported and left out; at least 2 must remain.
    Bootstrap: resample the runs within each usable budget with replacement and refit the
    parabolas and the line; budgets whose resampled parabola fails are dropped from that
    replicate, and replicates with fewer than 2 budgets are skipped.
    """
    where = "fit_isoflop"
    runs = list(runs)
    if not runs:
        raise ValueError(f"{where}: no runs given")
    C, N, loss = (np.array([run_field(run, key) for run in runs]) for key in ("C", "N", "loss"))
    check_positive("C", C, where)
    check_positive("N", N, where)
    if not np.all(np.isfinite(loss)):
        raise ValueError(f"{where}: loss must be finite")
    groups = {budget: np.flatnonzero(C == budget) for budget in np.unique(C)}
    per_budget = [_parabola(float(budget), np.log(N[index]), loss[index]) for budget, index in groups.items()]
    usable = [budget for budget in per_budget if budget.ok]
    if len(usable) < 2:
        reasons = "; ".join(f"C={budget.C:.3g}: {budget.reason}" for budget in per_budget if not budget.ok)
        raise ValueError(f"{where}: needs at least 2 budgets with a usable parabola, got {len(usable)} ({reasons})")
    a, N_coef, r2 = _frontier_line(usable)

    rng = np.random.default_rng(seed)
    a_samples = []
    for _ in range(n_bootstrap):
        replicate = []
        for budget in usable:
            index = rng.choice(groups[budget.C], size=len(groups[budget.C]), replace=True)
            refit = _parabola(budget.C, np.log(N[index]), loss[index])
            if refit.ok:
                replicate.append(refit)
        if len(replicate) >= 2:
            a_samples.append(_frontier_line(replicate)[0])
    a_samples = np.array(a_samples, dtype=float)
    b_samples = 1 - a_samples
    return IsoFlopFit(
        per_budget=per_budget, a=a, a_ci=bootstrap_interval(a_samples), b=1 - a, b_ci=bootstrap_interval(b_samples),
        N_coef=N_coef, D_coef=1 / (6 * N_coef), r2=r2, n_budgets_used=len(usable), n_bootstrap=len(a_samples),
        a_samples=a_samples, b_samples=b_samples,
    )
