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
