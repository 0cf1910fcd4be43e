"""The single power law of Kaplan et al. 2020, "Scaling Laws for Neural Language Models":
L(x) = (x_c / x)^α for x = N (non-embedding parameters), D (tokens) or C (training FLOPs), with
α_N ≈ 0.076, α_D ≈ 0.095, α_C ≈ 0.050; optionally with an irreducible loss, L(x) = E + (x_c / x)^α.
Fitted in log space, with R² on log loss, leave-one-out relative errors and 95% bootstrap intervals
whose parameter samples stay on the result (for the plot's band).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.optimize import least_squares

from lm_lightning.scaling.fit_common import (
    FitResult, Interval, bootstrap_interval, check_at_least, check_positive, check_same_length, check_seed_losses,
    one_blas_thread, r_squared, resampled_losses, scalar_or_array,
)


@dataclasses.dataclass
class PowerLawFit(FitResult):
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
        return scalar_or_array(values, x)


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


@one_blas_thread()
def fit_power_law(x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray, irreducible: bool = False,
                  n_bootstrap: int = 1000, seed: int = 0,
                  seed_losses: Sequence[Sequence[float]] | None = None) -> PowerLawFit:
    """Fit L(x) = (x_c / x)^α, or L(x) = E + (x_c / x)^α with ``irreducible=True``.

    ``x`` is whatever the caller scales (N parameters, D tokens or C FLOPs), shape (n,), positive;
    ``loss`` has shape (n,), positive. Without E the fit is the closed-form least squares of
    log L on log x (Kaplan et al. 2020). With E it is nonlinear least squares on log L
    (E and the power term's constant kept positive through their logs) from 12 starts.
    Bootstrap: ``n_bootstrap`` resamples of the points with replacement (seeded), each refitted
    (with E: warm-started from the full fit); resamples with too few distinct x are skipped.
    LOO refits likewise start from the full fit. Needs 3 points (4 with E). ``seed_losses`` (each point's
    per-seed losses, ``loss`` their means) resamples the seeds within each resampled point too.
    """
    where = "fit_power_law"
    x, loss = check_positive("x", x, where), check_positive("loss", loss, where)
    n = check_same_length(where, x=x, loss=loss)
    check_seed_losses(seed_losses, n, where)
    needed = 4 if irreducible else 3
    check_at_least(where, n, needed, "one more than the parameters, for leave-one-out")
    if np.unique(x).size < needed - 1:
        raise ValueError(f"{where}: x must take at least {needed - 1} distinct values (got {np.unique(x).size})")
    log_x, log_loss = np.log(x), np.log(loss)
    centre = float(log_x.mean())
    u = log_x - centre  # centred log x: better conditioned than log x near 20 (N) or 50 (C)

    if irreducible:
        theta = _irreducible_fit(u, log_loss, _irreducible_starts(u, loss))

        def fit_subset(index: np.ndarray, y: np.ndarray | None = None) -> tuple[float, float, float]:
            log_E, log_A, alpha = _irreducible_fit(u[index], log_loss[index] if y is None else y, [theta])
            return alpha, log_A / alpha + centre, math.exp(log_E)

        log_E, log_A, alpha = theta
        E, log_x_c = math.exp(log_E), log_A / alpha + centre
    else:
        def fit_subset(index: np.ndarray, y: np.ndarray | None = None) -> tuple[float, float, float]:
            return *_power_law_loglinear(log_x[index], log_loss[index] if y is None else y), float("nan")

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
            samples.append(fit_subset(index, np.log(resampled_losses(rng, index, loss, seed_losses))))
    samples = np.array(samples, dtype=float).reshape(-1, 3)
    with np.errstate(over="ignore"):
        x_c_samples = np.exp(samples[:, 1])
    return PowerLawFit(
        alpha=float(alpha), x_c=x_c, E=E if irreducible else None,
        r2=r_squared(log_loss, np.log(fitted)), loo_errors=[float(e) for e in loo],
        loo_mean_abs=float(np.mean(np.abs(loo))),
        alpha_ci=bootstrap_interval(samples[:, 0]), x_c_ci=bootstrap_interval(x_c_samples),
        E_ci=bootstrap_interval(samples[:, 2]) if irreducible else None,
        n_points=n, n_bootstrap=len(samples),
        alpha_samples=samples[:, 0], x_c_samples=x_c_samples, E_samples=samples[:, 2] if irreducible else None,
    )
