"""The scaling-law plots, saved as PNG: loss against x with a fitted power law and its 95% bootstrap
band (``power_law.py``), the IsoFLOP profiles with their parabolas and minima, and the
compute-optimal frontier N_opt, D_opt against C (``isoflop.py``). Figures are drawn on matplotlib's
Agg canvas without pyplot, so plotting never switches a global backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lm_lightning.scaling.isoflop import IsoFlopFit, run_field
from lm_lightning.scaling.power_law import PowerLawFit


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
    with np.errstate(all="ignore"):  # degenerate samples: dropped below
        values = curves(grid)
    values = values[np.all(np.isfinite(values), axis=1)]
    return None if len(values) < 2 else tuple(np.percentile(values, [2.5, 97.5], axis=0))


def plot_power_law(fit: PowerLawFit, x: Sequence[float] | np.ndarray, loss: Sequence[float] | np.ndarray,
                   xlabel: str = "x", path: str | Path = "power_law.png", loss_err: Sequence[float] | None = None,
                   predictions: Sequence[tuple] = ()) -> Path:
    """Log-log loss against ``x`` with the fitted law and its 95% bootstrap band; ``loss_err``: each run's seed
    spread (standard deviation, 0 for one seed), drawn as error bars; ``predictions``: (x, loss, 95% interval[,
    actual loss]) marked beyond the runs. Saves a PNG, returns its path."""
    figure, axes = _figure()
    x = np.asarray(x, dtype=float)
    reach = [x.min(), x.max(), *(p[0] for p in predictions)]
    grid = np.geomspace(min(reach), max(reach), 200)
    E_samples = fit.E_samples if fit.E_samples is not None else np.zeros_like(fit.alpha_samples)
    band = _band(lambda g: (fit.x_c_samples[:, None] / g) ** fit.alpha_samples[:, None] + E_samples[:, None], grid)
    if band is not None:
        axes.fill_between(grid, *band, alpha=0.25, label="95% bootstrap band")
    label = f"fit: α = {fit.alpha:.3g}, x_c = {fit.x_c:.3g}" + (f", E = {fit.E:.3g}" if fit.E is not None else "")
    axes.plot(grid, fit.predict(grid), label=label)
    if loss_err is not None and np.any(np.asarray(loss_err) > 0):
        axes.errorbar(x, loss, yerr=loss_err, fmt="o", color="black", ms=3.5, capsize=2, zorder=3,
                      label="runs (mean ± seed s.d.)")
    else:
        axes.scatter(x, loss, color="black", s=12, zorder=3, label="runs")
    _mark_predictions(axes, predictions)
    axes.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="loss (nats/token)")
    axes.legend()
    return _save(figure, path)


def _mark_predictions(axes: Any, predictions: Sequence[tuple]) -> None:
    """(x, loss, interval[, actual]) each: a red diamond with its interval, and the actual loss as a black star."""
    for number, (x, loss, interval, *actual) in enumerate(predictions):
        yerr = None if interval is None else [[loss - interval[0]], [interval[1] - loss]]
        axes.errorbar([x], [loss], yerr=yerr, fmt="D", color="C3", ms=6, capsize=4, zorder=4,
                      label="predicted (95% interval)" if number == 0 else None)
        if actual and actual[0] is not None:
            axes.scatter([x], actual, marker="*", s=140, color="black", zorder=5,
                         label="actual" if number == 0 else None)


def plot_chinchilla(fit: Any, N: Sequence[float], D: Sequence[float], loss: Sequence[float],
                    path: str | Path = "loss_vs_ND.png", loss_err: Sequence[float] | None = None,
                    predictions: Sequence[tuple] = ()) -> Path:
    """Loss against D, one colour per model size N, with the fitted L(N, D) through each (a WSD ladder's
    branches are the dots along each size's curve); ``predictions``: (N, D, loss, interval[, actual]), each marked
    with its own fitted curve. Saves a PNG, returns its path."""
    figure, axes = _figure()
    N, D, loss = (np.asarray(v, dtype=float) for v in (N, D, loss))
    err = np.zeros_like(loss) if loss_err is None else np.asarray(loss_err, dtype=float)
    reach = [D.min(), D.max(), *(p[1] for p in predictions)]
    grid = np.geomspace(min(reach), max(reach), 200)
    for number, size in enumerate(np.unique(N)):
        colour, mine = f"C{number % 10}", N == size
        axes.errorbar(D[mine], loss[mine], yerr=err[mine] if np.any(err[mine] > 0) else None, fmt="o", ms=3.5,
                      color=colour, capsize=2, zorder=3, label=f"N = {size:,.0f}")
        axes.plot(grid, fit.predict(size, grid), color=colour, linewidth=1)
    for size, tokens, *_ in predictions:
        axes.plot(grid, fit.predict(size, grid), color="C3", linestyle="--", linewidth=1)
    _mark_predictions(axes, [mark[1:] for mark in predictions])
    axes.set(xscale="log", yscale="log", xlabel="tokens trained D", ylabel="loss (nats/token)",
             title=f"L(N, D) = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3g} + {fit.B:.3g}/D^{fit.beta:.3g}  (R² {fit.r2:.3f})")
    axes.title.set_fontsize("small")
    axes.legend(fontsize="x-small")
    return _save(figure, path)


def plot_isoflop(fit: IsoFlopFit, runs: Iterable[Mapping[str, float] | Any],
                 path: str | Path = "isoflop.png") -> Path:
    """Loss against N per budget with the fitted parabolas and their minima; saves a PNG, returns its path."""
    figure, axes = _figure()
    runs = list(runs)
    for number, budget in enumerate(fit.per_budget):
        colour = f"C{number % 10}"
        points = [(run_field(run, "N"), run_field(run, "loss")) for run in runs if run_field(run, "C") == budget.C]
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
