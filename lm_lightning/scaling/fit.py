"""Scaling-law fits: power laws, the Chinchilla parametric form, IsoFLOP profiles, and their plots.

Pure numpy/scipy; nothing here trains a model. Every fit works in log space, reports R² on log
loss and leave-one-out (LOO) relative errors, and carries 95% percentile-bootstrap intervals
whose parameter samples are kept on the result (for the plots' bands; left out of ``as_dict``).

- Kaplan et al. 2020, "Scaling Laws for Neural Language Models": L(x) = (x_c / x)^α for
  x = N (non-embedding parameters), D (tokens) or C (training FLOPs); α_N ≈ 0.076,
  α_D ≈ 0.095, α_C ≈ 0.050.
- Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" (Chinchilla):
  approach 2 (IsoFLOP profiles: a parabola in log N per budget, then N_opt ∝ C^a) and
  approach 3 (L(N, D) = E + A/N^α + B/D^β, Huber loss δ = 1e-3 on log loss, L-BFGS from a
  grid of starts); E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28.
- Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt": the same approach 3
  refitted on Hoffmann's data, E = 1.8172, A = 482.01, B = 2085.43, α = 0.3478, β = 0.3658,
  with bootstrap intervals (Hoffmann's reported intervals were implausibly narrow).

Units: N in parameters, D in tokens, C in FLOPs with C = 6·N·D, loss in nats per token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from scipy.optimize import least_squares, minimize

__all__ = [
    "BudgetFit", "ChinchillaFit", "IsoFlopFit", "PowerLawFit", "fit_chinchilla", "fit_isoflop",
    "fit_power_law", "plot_frontier", "plot_isoflop", "plot_power_law", "r_squared",
]

Interval = tuple[float, float] | None

# Hoffmann et al. 2022's grid of L-BFGS starts for approach 3 (6 · 6 · 6 · 5 · 5 = 5400 starts)
CHINCHILLA_GRID = {
    "log_A": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "log_B": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "log_E": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


# ---------------------------------------------------------------------------- shared helpers

def _positive(name: str, values: Any, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{where}: {name} must be one-dimensional (got shape {array.shape})")
    bad = np.flatnonzero(~np.isfinite(array) | (array <= 0))
    if bad.size:
        raise ValueError(f"{where}: {name} must be positive and finite (got {name}[{bad[0]}] = {array[bad[0]]})")
    return array


def _same_length(where: str, **arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: inputs must have the same length (got {lengths})")
    return next(iter(lengths.values()))


def _at_least(where: str, n: int, needed: int, why: str) -> None:
    if n < needed:
        raise ValueError(f"{where}: needs at least {needed} points ({why}); got {n}")


def _ci(samples: np.ndarray) -> Interval:
    """95% percentile interval of the finite samples, or None without any."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None  # JSON has no NaN/inf
    if isinstance(value, np.integer):
        return int(value)
    return value


class _Result:
    """``as_dict()`` for JSON: every field except the bootstrap sample arrays (``*_samples``)."""

    def as_dict(self) -> dict[str, Any]:
        return {field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)
                if not field.name.endswith("_samples")}


def _scalar_or_array(values: np.ndarray, like: Any) -> float | np.ndarray:
    return float(values) if np.ndim(like) == 0 else values


@contextlib.contextmanager
def _one_blas_thread() -> Any:
    """Run the optimisers with one BLAS thread.

    L-BFGS-B and least_squares call BLAS on 5-vectors; on a busy machine OpenBLAS's worker
    threads spin for them and a Chinchilla fit became 4-20x slower (2 shared cores, measured).
    The limit is process-wide while a fit runs.
    """
    with threadpool_limits(1, user_api="blas"):
        yield


def r_squared(y: Sequence[float] | np.ndarray, y_hat: Sequence[float] | np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res/SS_tot of predictions ``y_hat`` for ``y`` (NaN when y is constant)."""
    y, y_hat = np.asarray(y, dtype=float), np.asarray(y_hat, dtype=float)
    if y.shape != y_hat.shape:
        raise ValueError(f"r_squared: y and y_hat must have the same shape (got {y.shape} and {y_hat.shape})")
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - y_hat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


# ---------------------------------------------------------------------------- single power law

@dataclasses.dataclass
class PowerLawFit(_Result):
    """L(x) = E + (x_c / x)^α (``E`` is None for the pure power law of Kaplan et al. 2020).

    ``r2`` is on log loss; ``loo_errors[i]`` = (prediction of point i by the fit without it − loss_i) / loss_i.
    """

    alpha: float
    x_c: float
    E: float | None
    r2: float
    loo_errors: list[float]
    loo_mean_abs: float
    alpha_ci: Interval
    x_c_ci: Interval
    E_ci: Interval
    n_points: int
    n_bootstrap: int  # bootstrap replicates that gave a fit (degenerate resamples are skipped)
    alpha_samples: np.ndarray = dataclasses.field(repr=False)
    x_c_samples: np.ndarray = dataclasses.field(repr=False)
    E_samples: np.ndarray | None = dataclasses.field(repr=False)

    def predict(self, x: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Loss at ``x`` (same units as the fitted x)."""
        values = (self.x_c / np.asarray(x, dtype=float)) ** self.alpha + (self.E or 0.0)
        return _scalar_or_array(values, x)


def _power_law_loglinear(log_x: np.ndarray, log_loss: np.ndarray) -> tuple[float, float]:
    """Closed-form least squares of log L = α log x_c − α log x: returns (α, log x_c)."""
    slope, intercept = np.polyfit(log_x, log_loss, 1)
    alpha = -slope
    return float(alpha), float(intercept / alpha) if alpha != 0 else float("nan")


def _irreducible_residuals(theta: np.ndarray, u: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    log_E, log_A, alpha = theta  # log_A: of the power term at u = 0 (the centred log x)
    return np.logaddexp(log_E, log_A - alpha * u) - log_loss


def _irreducible_jacobian(theta: np.ndarray, u: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    log_E, log_A, alpha = theta
    power = log_A - alpha * u
    lse = np.logaddexp(log_E, power)
    w_E, w_power = np.exp(log_E - lse), np.exp(power - lse)
    return np.stack([w_E, w_power, -u * w_power], axis=1)


def _irreducible_fit(u: np.ndarray, log_loss: np.ndarray, starts: Iterable[np.ndarray]) -> np.ndarray:
    """Nonlinear least squares of log(E + A·e^(−α·u)) on log L (E, A > 0 by their logs), best of ``starts``."""
    best, best_cost = None, np.inf
    for start in starts:
        result = least_squares(_irreducible_residuals, start, jac=_irreducible_jacobian, args=(u, log_loss),
                               method="lm", xtol=1e-12, ftol=1e-12, gtol=1e-12)
        if np.all(np.isfinite(result.x)) and result.cost < best_cost:
            best, best_cost = result.x, result.cost
    return best if best is not None else np.full(3, np.nan)


def _irreducible_starts(u: np.ndarray, loss: np.ndarray) -> list[np.ndarray]:
    """12 starts: α ∈ {0.05, 0.2, 0.5, 1}, E ∈ {0.1, 0.5, 0.9}·min L, A from the geometric-mean loss."""
    middle = float(np.exp(np.mean(np.log(loss))))
    starts = []
    for alpha, fraction in itertools.product((0.05, 0.2, 0.5, 1.0), (0.1, 0.5, 0.9)):
        E = fraction * float(loss.min())
        starts.append(np.array([math.log(E), math.log(middle - E), alpha]))
    return starts


@_one_blas_thread()
def fit_power_law(x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray, irreducible: bool = False,
                  n_bootstrap: int = 1000, seed: int = 0) -> PowerLawFit:
    """Fit L(x) = (x_c / x)^α, or L(x) = E + (x_c / x)^α with ``irreducible=True``.

    ``x`` is whatever the caller scales (N parameters, D tokens or C FLOPs), shape (n,), positive;
    ``loss`` has shape (n,), positive. Without E the fit is the closed-form least squares of
    log L on log x (Kaplan et al. 2020). With E it is nonlinear least squares on log L
    (E and the power term's constant kept positive through their logs) from 12 starts.
    Bootstrap: ``n_bootstrap`` resamples of the points with replacement (seeded), each refitted
    (with E: warm-started from the full fit); resamples with too few distinct x are skipped.
    LOO refits likewise start from the full fit. Needs 3 points (4 with E).
    """
    where = "fit_power_law"
    x, loss = _positive("x", x, where), _positive("loss", loss, where)
    n = _same_length(where, x=x, loss=loss)
    needed = 4 if irreducible else 3
    _at_least(where, n, needed, "one more than the parameters, for leave-one-out")
    if np.unique(x).size < needed - 1:
        raise ValueError(f"{where}: x must take at least {needed - 1} distinct values (got {np.unique(x).size})")
    log_x, log_loss = np.log(x), np.log(loss)
    centre = float(log_x.mean())
    u = log_x - centre  # centred log x: better conditioned than log x near 20 (N) or 50 (C)

    if irreducible:
        theta = _irreducible_fit(u, log_loss, _irreducible_starts(u, loss))

        def fit_subset(index: np.ndarray) -> tuple[float, float, float]:
            log_E, log_A, alpha = _irreducible_fit(u[index], log_loss[index], [theta])
            return alpha, log_A / alpha + centre, math.exp(log_E)

        log_E, log_A, alpha = theta
        E, log_x_c = math.exp(log_E), log_A / alpha + centre
    else:
        def fit_subset(index: np.ndarray) -> tuple[float, float, float]:
            return *_power_law_loglinear(log_x[index], log_loss[index]), float("nan")

        alpha, log_x_c, E = fit_subset(np.arange(n))
    with np.errstate(over="ignore"):
        x_c = float(np.exp(log_x_c))  # inf (null in JSON) when α ≈ 0 leaves no finite scale

    def predict(params: tuple[float, float, float], at_log_x: np.ndarray) -> np.ndarray:
        alpha_, log_x_c_, E_ = params
        return np.exp(alpha_ * (log_x_c_ - at_log_x)) + (E_ if irreducible else 0.0)

    fitted = predict((alpha, log_x_c, E), log_x)
    loo = np.array([predict(fit_subset(np.delete(np.arange(n), i)), log_x[i])[()] / loss[i] - 1 for i in range(n)])

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        index = rng.integers(0, n, n)
        if np.unique(x[index]).size >= needed - 1:
            samples.append(fit_subset(index))
    samples = np.array(samples, dtype=float).reshape(-1, 3)
    with np.errstate(over="ignore"):
        x_c_samples = np.exp(samples[:, 1])
    return PowerLawFit(
        alpha=float(alpha), x_c=x_c, E=E if irreducible else None,
        r2=r_squared(log_loss, np.log(fitted)), loo_errors=[float(e) for e in loo],
        loo_mean_abs=float(np.mean(np.abs(loo))),
        alpha_ci=_ci(samples[:, 0]), x_c_ci=_ci(x_c_samples), E_ci=_ci(samples[:, 2]) if irreducible else None,
        n_points=n, n_bootstrap=len(samples),
        alpha_samples=samples[:, 0], x_c_samples=x_c_samples, E_samples=samples[:, 2] if irreducible else None,
    )


# ---------------------------------------------------------------------------- Chinchilla approach 3

@dataclasses.dataclass
class ChinchillaFit(_Result):
    """L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, approach 3), with its compute-optimal allocation.

    ``a`` = β/(α+β) and ``b`` = α/(α+β) are the exponents of N_opt ∝ C^a and D_opt ∝ C^b.
    ``objective`` is the Huber sum at the optimum; ``samples`` has one bootstrap fit per row,
    columns (E, A, B, alpha, beta).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    E_ci: Interval
    A_ci: Interval
    B_ci: Interval
    alpha_ci: Interval
    beta_ci: Interval
    a: float
    b: float
    a_ci: Interval
    r2: float
    loo_errors: list[float] | None
    loo_mean_abs: float | None
    objective: float
    delta: float
    n_points: int
    n_starts: int
    n_bootstrap: int
    parameter_samples: np.ndarray = dataclasses.field(repr=False)

    def predict(self, N: float | np.ndarray, D: float | np.ndarray) -> float | np.ndarray:
        """Loss of a model of N parameters trained on D tokens."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        values = self.E + self.A / N ** self.alpha + self.B / D ** self.beta
        return _scalar_or_array(values, values)

    def optimal_allocation(self, C: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        """(N_opt, D_opt) minimising L under C = 6·N·D FLOPs: N_opt = G·(C/6)^a, D_opt = (C/6)^b / G,
        G = (αA / (βB))^(1/(α+β)) (Hoffmann et al. 2022, eq. 4 and appendix D.2)."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        flops = np.asarray(C, dtype=float) / 6
        return _scalar_or_array(G * flops ** self.a, C), _scalar_or_array(flops ** self.b / G, C)


def _chinchilla_objective(theta: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_loss: np.ndarray,
                          delta: float) -> tuple[float, np.ndarray]:
    """Σ Huber_δ(LSE(log_A − α log N, log_B − β log D, log_E) − log L) and its gradient in
    theta = (log_A, log_B, log_E, alpha, beta)."""
    log_A, log_B, log_E, alpha, beta = theta
    terms = np.stack([log_A - alpha * log_N, log_B - beta * log_D, np.full_like(log_N, log_E)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta)).sum()
    slope = np.where(small, residual, delta * np.sign(residual)) * weights / total  # (3, n)
    gradient = np.array([slope[0].sum(), slope[1].sum(), slope[2].sum(),
                         -(slope[0] * log_N).sum(), -(slope[1] * log_D).sum()])
    return float(value), gradient


def _grid_objectives(grid: np.ndarray, log_N: np.ndarray, log_D: np.ndarray, log_loss: np.ndarray,
                     delta: float) -> np.ndarray:
    """The Huber objective at every row of ``grid`` (shape (starts, 5)), vectorised: shape (starts,)."""
    log_A, log_B, log_E, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    predicted = np.logaddexp(np.logaddexp(log_A - alpha * log_N, log_B - beta * log_D), log_E)
    residual = np.abs(predicted - log_loss)
    return np.where(residual <= delta, 0.5 * residual ** 2, delta * (residual - 0.5 * delta)).sum(axis=1)


def _best_per_exponents(grid: np.ndarray, objectives: np.ndarray) -> np.ndarray:
    """For each distinct (alpha, beta) in ``grid`` (columns 3, 4), its row with the lowest objective."""
    best: dict[tuple[float, float], int] = {}
    for row in np.argsort(objectives):
        best.setdefault((grid[row, 3], grid[row, 4]), row)
    return grid[sorted(best.values(), key=lambda row: objectives[row])]


def _lbfgs(starts: Iterable[np.ndarray], log_N: np.ndarray, log_D: np.ndarray, log_loss: np.ndarray,
           delta: float) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start; the best (theta, objective).

    The objective is multiplied by 1/δ² while optimising (same minimiser): scipy's stopping
    tests are absolute once the objective is below 1, and the raw Huber sum near a good fit is ~1e-6.
    """
    scale = 1 / delta ** 2

    def scaled(theta: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = _chinchilla_objective(theta, log_N, log_D, log_loss, delta)
        return value * scale, gradient * scale

    best, best_value = np.full(5, np.nan), np.inf
    for start in starts:
        result = minimize(scaled, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
        if np.all(np.isfinite(result.x)) and result.fun < best_value:
            best, best_value = result.x, result.fun
    return best, best_value / scale


@_one_blas_thread()
def fit_chinchilla(N: Sequence[float] | np.ndarray, D: Sequence[float] | np.ndarray,
                   loss: Sequence[float] | np.ndarray, n_bootstrap: int = 500, seed: int = 0, delta: float = 1e-3,
                   full_grid: bool = False, bootstrap_starts: int = 2, loo: bool = True) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^α + B/D^β as Hoffmann et al. 2022 (approach 3).

    Minimises Σ Huber_δ(LSE(log A − α log N, log B − β log D, log E) − log L) over
    (log A, log B, log E, α, β) with L-BFGS-B from Hoffmann's grid of 5400 starts
    (``CHINCHILLA_GRID``). Thinned for speed unless ``full_grid``: the objective is evaluated at
    all 5400 grid points (vectorised, milliseconds) and L-BFGS-B runs from 25 of them, for each
    (α, β) pair of the grid the (log A, log B, log E) point with the lowest objective (the best
    starts overall crowd into one basin; these keep the exponents diverse; on noisy synthetic
    data they reached the full grid's optimum). ``full_grid=True`` runs all 5400 (~35 s on
    2 cores against ~0.2 s). Shapes: N, D, loss (n,), positive; N in parameters,
    D in tokens, loss in nats/token. Needs 6 points (one more than the parameters, for LOO).

    Bootstrap (Besiroglu et al. 2024): ``n_bootstrap`` resamples of the runs with replacement,
    each fitted from the full fit's optimum plus the ``bootstrap_starts - 1`` best grid points
    for that resample. LOO (``loo=True``) refits without each run the same way.
    """
    where = "fit_chinchilla"
    N, D, loss = _positive("N", N, where), _positive("D", D, where), _positive("loss", loss, where)
    n = _same_length(where, N=N, D=D, loss=loss)
    _at_least(where, n, 6, "one more than the 5 parameters, for leave-one-out")
    for name, values in (("N", N), ("D", D)):
        if np.unique(values).size < 2:
            raise ValueError(f"{where}: {name} must take at least 2 distinct values")
    log_N, log_D, log_loss = np.log(N), np.log(D), np.log(loss)
    grid = np.array(list(itertools.product(*CHINCHILLA_GRID.values())))

    def ranked_grid(index: np.ndarray, count: int) -> np.ndarray:
        order = np.argsort(_grid_objectives(grid, log_N[index], log_D[index], log_loss[index], delta))
        return grid[order[:count]]

    everything = np.arange(n)
    starts = grid if full_grid else _best_per_exponents(grid, _grid_objectives(grid, log_N, log_D, log_loss, delta))
    theta, objective = _lbfgs(starts, log_N, log_D, log_loss, delta)

    def fit_subset(index: np.ndarray) -> np.ndarray:
        subset_starts = [theta, *ranked_grid(index, bootstrap_starts - 1)]
        return _lbfgs(subset_starts, log_N[index], log_D[index], log_loss[index], delta)[0]

    def to_parameters(theta_: np.ndarray) -> np.ndarray:  # (E, A, B, alpha, beta)
        log_A, log_B, log_E, alpha, beta = theta_
        with np.errstate(over="ignore"):
            return np.array([np.exp(log_E), np.exp(log_A), np.exp(log_B), alpha, beta])

    E, A, B, alpha, beta = to_parameters(theta)
    fitted = E + A / N ** alpha + B / D ** beta
    loo_errors = None
    if loo:
        loo_errors = []
        for i in range(n):
            E_i, A_i, B_i, alpha_i, beta_i = to_parameters(fit_subset(np.delete(everything, i)))
            loo_errors.append(float((E_i + A_i / N[i] ** alpha_i + B_i / D[i] ** beta_i) / loss[i] - 1))

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        index = rng.integers(0, n, n)
        if len({*zip(N[index], D[index])}) >= 6 and np.unique(N[index]).size > 1 and np.unique(D[index]).size > 1:
            samples.append(to_parameters(fit_subset(index)))
    samples = np.array(samples, dtype=float).reshape(-1, 5)
    a_samples = samples[:, 4] / (samples[:, 3] + samples[:, 4])
    intervals = [_ci(samples[:, i]) for i in range(5)]
    return ChinchillaFit(
        E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta),
        E_ci=intervals[0], A_ci=intervals[1], B_ci=intervals[2], alpha_ci=intervals[3], beta_ci=intervals[4],
        a=float(beta / (alpha + beta)), b=float(alpha / (alpha + beta)), a_ci=_ci(a_samples),
        r2=r_squared(log_loss, np.log(fitted)), loo_errors=loo_errors,
        loo_mean_abs=float(np.mean(np.abs(loo_errors))) if loo else None,
        objective=objective, delta=delta, n_points=n, n_starts=len(starts), n_bootstrap=len(samples),
        parameter_samples=samples,
    )


# ---------------------------------------------------------------------------- IsoFLOP profiles (approach 2)

@dataclasses.dataclass
class BudgetFit(_Result):
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
class IsoFlopFit(_Result):
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
        return _scalar_or_array(self.N_coef * flops ** self.a, C), _scalar_or_array(self.D_coef * flops ** self.b, C)


def _field(run: Any, key: str) -> float:
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
    C, N, loss = (np.array([_field(run, key) for run in runs]) for key in ("C", "N", "loss"))
    _positive("C", C, where)
    _positive("N", N, where)
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
        per_budget=per_budget, a=a, a_ci=_ci(a_samples), b=1 - a, b_ci=_ci(b_samples),
        N_coef=N_coef, D_coef=1 / (6 * N_coef), r2=r2, n_budgets_used=len(usable), n_bootstrap=len(a_samples),
        a_samples=a_samples, b_samples=b_samples,
    )


# ---------------------------------------------------------------------------- plots

def _figure() -> tuple[Any, Any]:
    """A figure on the Agg canvas without pyplot: no global backend switch, safe in any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _band(curves: Callable[[np.ndarray], np.ndarray], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    with np.errstate(over="ignore", invalid="ignore"):
        values = curves(grid)
    values = values[np.all(np.isfinite(values), axis=1)]
    return None if len(values) < 2 else tuple(np.percentile(values, [2.5, 97.5], axis=0))


def plot_power_law(fit: PowerLawFit, x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray,
                   xlabel: str = "x", path: str | Path = "power_law.png") -> Path:
    """Log-log loss against ``x`` with the fitted law and its 95% bootstrap band; saves a PNG, returns its path."""
    figure, axes = _figure()
    x = np.asarray(x, dtype=float)
    grid = np.geomspace(x.min(), x.max(), 200)
    E_samples = fit.E_samples if fit.E_samples is not None else np.zeros_like(fit.alpha_samples)
    band = _band(lambda g: (fit.x_c_samples[:, None] / g) ** fit.alpha_samples[:, None] + E_samples[:, None], grid)
    if band is not None:
        axes.fill_between(grid, *band, alpha=0.25, label="95% bootstrap band")
    label = f"fit: α = {fit.alpha:.3g}, x_c = {fit.x_c:.3g}" + (f", E = {fit.E:.3g}" if fit.E is not None else "")
    axes.plot(grid, fit.predict(grid), label=label)
    axes.scatter(x, loss, color="black", s=12, zorder=3, label="runs")
    axes.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="loss (nats/token)")
    axes.legend()
    return _save(figure, path)


def plot_isoflop(fit: IsoFlopFit, runs: Iterable[Mapping[str, float] | Any],
                 path: str | Path = "isoflop.png") -> Path:
    """Loss against N per budget with the fitted parabolas and their minima; saves a PNG, returns its path."""
    figure, axes = _figure()
    runs = list(runs)
    for number, budget in enumerate(fit.per_budget):
        colour = f"C{number % 10}"
        points = [(_field(run, "N"), _field(run, "loss")) for run in runs if _field(run, "C") == budget.C]
        N, loss = np.array(points).T
        axes.scatter(N, loss, color=colour, s=12, label=f"C = {budget.C:.2g}" + ("" if budget.ok else " (flagged)"))
        if budget.coefficients is not None:
            grid = np.geomspace(*budget.N_range, 100)
            axes.plot(grid, np.polyval(budget.coefficients, np.log(grid)), color=colour,
                      linestyle="-" if budget.ok else ":")
        if budget.ok:
            axes.scatter([budget.N_opt], [budget.loss_min], color=colour, marker="*", s=120, edgecolor="black",
                         zorder=3)
    axes.set(xscale="log", xlabel="parameters N", ylabel="loss (nats/token)", title="IsoFLOP profiles")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_frontier(fit: IsoFlopFit, path: str | Path = "frontier.png") -> Path:
    """N_opt and D_opt against C (log-log) with the fitted power laws; saves a PNG, returns its path."""
    figure, axes = _figure()
    used = [budget for budget in fit.per_budget if budget.ok]
    C = np.array([budget.C for budget in used])
    grid = np.geomspace(C.min(), C.max(), 100)
    N_line, D_line = fit.optimal_allocation(grid)
    axes.scatter(C, [budget.N_opt for budget in used], color="C0", zorder=3)
    axes.plot(grid, N_line, color="C0", label=f"N_opt ∝ C^{fit.a:.3f}")
    axes.scatter(C, [budget.D_opt for budget in used], color="C1", zorder=3)
    axes.plot(grid, D_line, color="C1", label=f"D_opt ∝ C^{fit.b:.3f}")
    axes.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="parameters / tokens",
             title="compute-optimal frontier")
    axes.legend()
    return _save(figure, path)
