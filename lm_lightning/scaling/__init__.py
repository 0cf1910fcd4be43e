"""Scaling laws: power-law, Chinchilla (approach 3) and IsoFLOP (approach 2) fits with bootstrap intervals; plots."""

from lm_lightning.scaling.fit import (
    BudgetFit, ChinchillaFit, IsoFlopFit, PowerLawFit, fit_chinchilla, fit_isoflop, fit_power_law, plot_frontier,
    plot_isoflop, plot_power_law, r_squared,
)

__all__ = [
    "BudgetFit", "ChinchillaFit", "IsoFlopFit", "PowerLawFit", "fit_chinchilla", "fit_isoflop", "fit_power_law",
    "plot_frontier", "plot_isoflop", "plot_power_law", "r_squared",
]
