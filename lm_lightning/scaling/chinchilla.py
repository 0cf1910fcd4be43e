"""The Chinchilla parametric law, Hoffmann et al. 2022 ("Training Compute-Optimal Large Language
Models") approach 3: L(N, D) = E + A/N^α + B/D^β fitted by L-BFGS under a Huber loss (δ = 1e-3) on log
loss from a grid of starts, giving E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28, and the
compute-optimal allocation it implies; with the percentile-bootstrap intervals of Besiroglu et al.
2024 ("Chinchilla Scaling: A replication attempt"), whose refit of Hoffmann's data gave E = 1.8172,
A = 482.01, B = 2085.43, α = 0.3478, β = 0.3658 (Hoffmann's reported intervals were implausibly narrow).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.optimize import minimize

from lm_lightning.scaling.fit_common import (
    FitResult, Interval, bootstrap_interval, check_at_least, check_positive, check_same_length, check_seed_losses,
    one_blas_thread, r_squared, resampled_losses, scalar_or_array,
)

# Hoffmann et al. 2022's grid of L-BFGS starts for approach 3 (6 · 6 · 6 · 5 · 5 = 5400 starts)
CHINCHILLA_GRID = {
    "log_A": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "log_B": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "log_E": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}


@dataclasses.dataclass
class ChinchillaFit(FitResult):
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
        return scalar_or_array(values, values)

    def optimal_allocation(self, C: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray]:
        """(N_opt, D_opt) minimising L under C = 6·N·D FLOPs: N_opt = G·(C/6)^a, D_opt = (C/6)^b / G,
        G = (αA / (βB))^(1/(α+β)) (Hoffmann et al. 2022, eq. 4 and appendix D.2)."""
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        flops = np.asarray(C, dtype=float) / 6
        return scalar_or_array(G * flops ** self.a, C), scalar_or_array(flops ** self.b / G, C)


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


@one_blas_thread()
def fit_chinchilla(N: Sequence[float] | np.ndarray, D: Sequence[float] | np.ndarray,
                   loss: Sequence[float] | np.ndarray, n_bootstrap: int = 500, seed: int = 0, delta: float = 1e-3,
                   full_grid: bool = False, bootstrap_starts: int = 2, loo: bool = True,
                   seed_losses: Sequence[Sequence[float]] | None = None) -> ChinchillaFit:
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
    for that resample; ``seed_losses`` (each point's per-seed losses, ``loss`` their means) resamples the
    seeds within each resampled point too. LOO (``loo=True``) refits without each run the same way.
    """
    where = "fit_chinchilla"
    N, D, loss = check_positive("N", N, where), check_positive("D", D, where), check_positive("loss", loss, where)
    n = check_same_length(where, N=N, D=D, loss=loss)
    check_seed_losses(seed_losses, n, where)
    check_at_least(where, n, 6, "one more than the 5 parameters, for leave-one-out")
    for name, values in (("N", N), ("D", D)):
        if np.unique(values).size < 2:
            raise ValueError(f"{where}: {name} must take at least 2 distinct values")
    log_N, log_D, log_loss = np.log(N), np.log(D), np.log(loss)
    grid = np.array(list(itertools.product(*CHINCHILLA_GRID.values())))

    def ranked_grid(index: np.ndarray, count: int, y: np.ndarray) -> np.ndarray:
        order = np.argsort(_grid_objectives(grid, log_N[index], log_D[index], y, delta))
        return grid[order[:count]]

    everything = np.arange(n)
    starts = grid if full_grid else _best_per_exponents(grid, _grid_objectives(grid, log_N, log_D, log_loss, delta))
    theta, objective = _lbfgs(starts, log_N, log_D, log_loss, delta)

    def fit_subset(index: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        y = log_loss[index] if y is None else y  # log losses of the points in index
        subset_starts = [theta, *ranked_grid(index, bootstrap_starts - 1, y)]
        return _lbfgs(subset_starts, log_N[index], log_D[index], y, delta)[0]

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
            samples.append(to_parameters(fit_subset(index, np.log(resampled_losses(rng, index, loss, seed_losses)))))
    samples = np.array(samples, dtype=float).reshape(-1, 5)
    a_samples = samples[:, 4] / (samples[:, 3] + samples[:, 4])
    intervals = [bootstrap_interval(samples[:, i]) for i in range(5)]
    return ChinchillaFit(
        E=float(E), A=float(A), B=float(B), alpha=float(alpha), beta=float(beta),
        E_ci=intervals[0], A_ci=intervals[1], B_ci=intervals[2], alpha_ci=intervals[3], beta_ci=intervals[4],
        a=float(beta / (alpha + beta)), b=float(alpha / (alpha + beta)), a_ci=bootstrap_interval(a_samples),
        r2=r_squared(log_loss, np.log(fitted)), loo_errors=loo_errors,
        loo_mean_abs=float(np.mean(np.abs(loo_errors))) if loo else None,
        objective=objective, delta=delta, n_points=n, n_starts=len(starts), n_bootstrap=len(samples),
        parameter_samples=samples,
    )
