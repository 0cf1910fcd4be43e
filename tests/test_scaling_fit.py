"""Scaling-law fits recover the laws that generated their data, and say how sure they are.

Published anchors (BASELINES.md): Kaplan et al. 2020 α_N ≈ 0.076 with N_c = 8.8e13;
Chinchilla (Hoffmann et al. 2022) E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28;
the refit of Besiroglu et al. 2024 E = 1.8172, A = 482.01, B = 2085.43, α = 0.3478, β = 0.3658.
"""

import json
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from lm_lightning.scaling.chinchilla import fit_chinchilla
from lm_lightning.scaling.fit_common import r_squared
from lm_lightning.scaling.isoflop import fit_isoflop
from lm_lightning.scaling.plots import plot_frontier, plot_isoflop, plot_power_law
from lm_lightning.scaling.power_law import fit_power_law
from lm_lightning.scaling.predict import predict_all

HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BESIROGLU = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chinchilla_loss(N, D, E, A, B, alpha, beta):
    return E + A / np.asarray(N, dtype=float) ** alpha + B / np.asarray(D, dtype=float) ** beta


def chinchilla_grid(law, k=6):
    """k × k runs: N over 1e6..1e10 parameters, D over 1e8..1e12 tokens."""
    N, D = (grid.ravel() for grid in np.meshgrid(np.geomspace(1e6, 1e10, k), np.geomspace(1e8, 1e12, k)))
    return N, D, chinchilla_loss(N, D, **law)


def numerical_optimum(law, C):
    """N minimising the law at C = 6·N·D FLOPs, by a 1-D search in log N (independent of the closed form)."""
    result = minimize_scalar(lambda log_N: chinchilla_loss(math.exp(log_N), C / (6 * math.exp(log_N)), **law),
                             bounds=(math.log(1e3), math.log(C / 6 / 1e3)), method="bounded",
                             options={"xatol": 1e-10})
    return math.exp(result.x)


def isoflop_runs(law, budgets=(1e18, 1e19, 1e20, 1e21), sizes=7, noise=0.0, seed=0):
    """Runs at fixed sizes per budget: 7 sizes over a factor 8 either side of a half-decade round
    number near the optimum (so the sampled grid is not centred on the true optimum)."""
    rng = np.random.default_rng(seed)
    runs = []
    for C in budgets:
        centre = 10 ** (round(2 * math.log10(numerical_optimum(law, C))) / 2)
        for N in np.geomspace(centre / 8, centre * 8, sizes):
            D = C / (6 * N)
            runs.append({"C": C, "N": N, "D": D, "loss": chinchilla_loss(N, D, **law) * math.exp(rng.normal(0, noise))})
    return runs


def assert_within(value, truth, relative):
    assert abs(value / truth - 1) <= relative, f"{value} is not within {relative:.0%} of {truth}"


# ---------------------------------------------------------------------------- noise-free recovery

def test_power_law_recovers_kaplan_exponent_and_scale():
    N = np.geomspace(1e5, 1e9, 12)
    fit = fit_power_law(N, (8.8e13 / N) ** 0.076, n_bootstrap=200)
    assert_within(fit.alpha, 0.076, 0.02)
    assert_within(fit.x_c, 8.8e13, 0.02)
    assert fit.E is None and fit.E_ci is None
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.loo_mean_abs < 1e-10 and len(fit.loo_errors) == 12
    assert fit.alpha_ci[0] <= fit.alpha <= fit.alpha_ci[1]
    assert fit.predict(1e7) == pytest.approx((8.8e13 / 1e7) ** 0.076, rel=1e-9)


def test_power_law_with_irreducible_term_recovers_E_alpha_and_scale():
    x = np.geomspace(1e6, 1e10, 12)  # power term 3.0 down to 0.19 against E = 1.7
    fit = fit_power_law(x, 1.7 + (4e7 / x) ** 0.3, irreducible=True, n_bootstrap=200)
    assert_within(fit.E, 1.7, 0.02)
    assert_within(fit.alpha, 0.3, 0.02)
    assert_within(fit.x_c, 4e7, 0.02)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert fit.loo_mean_abs < 1e-6
    assert fit.E_ci[0] <= fit.E <= fit.E_ci[1]


@pytest.mark.parametrize("law", [HOFFMANN, BESIROGLU], ids=["hoffmann2022", "besiroglu2024"])
def test_chinchilla_fit_recovers_the_published_constants_from_their_own_curve(law):
    fit = fit_chinchilla(*chinchilla_grid(law), n_bootstrap=0)
    for name, truth in law.items():
        assert_within(getattr(fit, name), truth, 0.02)
    assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    assert fit.loo_mean_abs < 1e-4
    assert fit.n_starts == 25 and fit.delta == 1e-3
    assert fit.a == pytest.approx(law["beta"] / (law["alpha"] + law["beta"]), rel=0.02)


@pytest.mark.parametrize("law", [HOFFMANN, BESIROGLU], ids=["hoffmann2022", "besiroglu2024"])
def test_chinchilla_optimal_allocation_is_the_minimum_along_each_compute_budget(law):
    fit = fit_chinchilla(*chinchilla_grid(law), n_bootstrap=0, loo=False)
    for C in (1e18, 1e21, 5.76e23):
        N_opt, D_opt = fit.optimal_allocation(C)
        assert 6 * N_opt * D_opt == pytest.approx(C, rel=1e-9)
        assert N_opt == pytest.approx(numerical_optimum(law, C), rel=0.02)
    if law is BESIROGLU:  # their refit restores Chinchilla's ~20 tokens per parameter at its 5.76e23 FLOPs
        N_opt, D_opt = fit.optimal_allocation(5.76e23)
        assert 15 < D_opt / N_opt < 25


# ---------------------------------------------------------------------------- with noise

def test_power_law_bootstrap_interval_covers_true_exponent_with_2pct_noise():
    rng = np.random.default_rng(0)
    N = np.geomspace(1e5, 1e9, 30)
    exact = (8.8e13 / N) ** 0.076
    noisy = exact * np.exp(rng.normal(0, 0.02, N.size))
    fit = fit_power_law(N, noisy, n_bootstrap=500, seed=1)
    low, high = fit.alpha_ci
    assert low < 0.076 < high
    assert high - low < 0.02  # informative, not just wide
    assert fit.n_bootstrap == 500 and fit.alpha_samples.shape == (500,)
    clean = fit_power_law(N, exact, n_bootstrap=0)
    assert 0.98 < fit.r2 < 0.999 < clean.r2  # noise lowers R² (on log loss)
    assert 0.005 < fit.loo_mean_abs < 0.05 and clean.loo_mean_abs < 1e-10  # LOO error ~ the 2% noise
    # least squares in log space: the LOO log residual is the in-sample one over (1 − leverage)
    u = np.log(N) - np.log(N).mean()
    leverage = 1 / N.size + u ** 2 / np.sum(u ** 2)
    in_sample = np.log(fit.predict(N) / noisy)
    np.testing.assert_allclose(np.log1p(fit.loo_errors), in_sample / (1 - leverage), rtol=1e-6)


def test_chinchilla_bootstrap_intervals_cover_true_exponents_with_2pct_noise():
    rng = np.random.default_rng(0)  # 40 runs, log-uniform over the N × D box
    N = np.exp(rng.uniform(math.log(1e6), math.log(1e10), 40))
    D = np.exp(rng.uniform(math.log(1e8), math.log(1e12), 40))
    loss = chinchilla_loss(N, D, **HOFFMANN) * np.exp(rng.normal(0, 0.02, 40))
    fit = fit_chinchilla(N, D, loss, n_bootstrap=200, bootstrap_starts=1, loo=False)
    assert fit.n_bootstrap == 200 and fit.parameter_samples.shape == (200, 5)
    for name in ("alpha", "beta"):
        low, high = getattr(fit, f"{name}_ci")
        assert low < HOFFMANN[name] < high, f"{name}: {HOFFMANN[name]} outside ({low:.4f}, {high:.4f})"
        assert high - low < 0.15
    assert 0.9 < fit.r2 < 0.9999


def test_bootstrap_is_reproducible_by_seed():
    rng = np.random.default_rng(3)
    N = np.geomspace(1e5, 1e9, 10)
    loss = (8.8e13 / N) ** 0.076 * np.exp(rng.normal(0, 0.02, 10))
    first, again, other = (fit_power_law(N, loss, n_bootstrap=200, seed=s) for s in (0, 0, 1))
    assert first.alpha_ci == again.alpha_ci
    assert first.alpha_ci != other.alpha_ci


# ---------------------------------------------------------------------------- IsoFLOP (approach 2)

def test_isoflop_recovers_allocation_exponent_and_per_budget_optima():
    fit = fit_isoflop(isoflop_runs(HOFFMANN), n_bootstrap=200)
    a_true = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
    assert_within(fit.a, a_true, 0.05)
    assert_within(fit.b, 1 - a_true, 0.05)
    assert fit.a_ci[0] <= fit.a <= fit.a_ci[1] and fit.n_budgets_used == 4
    for budget in fit.per_budget:
        assert budget.ok and budget.reason is None and budget.n_runs == 7
        assert_within(budget.N_opt, numerical_optimum(HOFFMANN, budget.C), 0.10)
        assert 6 * budget.N_opt * budget.D_opt == pytest.approx(budget.C)
        assert budget.coefficients[0] > 0
    N_opt, D_opt = fit.optimal_allocation(1e20)
    assert_within(N_opt, numerical_optimum(HOFFMANN, 1e20), 0.10)


def test_isoflop_bootstrap_interval_covers_allocation_exponent_with_1pct_noise():
    fit = fit_isoflop(isoflop_runs(HOFFMANN, noise=0.01, seed=0), n_bootstrap=300)
    low, high = fit.a_ci
    assert low < HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"]) < high
    assert 0.01 < high - low < 0.3
    assert fit.b_ci == pytest.approx((1 - high, 1 - low))  # D_opt = C / (6 N_opt)
    assert fit.n_bootstrap == 300 and fit.a_samples.shape == (300,)


def test_isoflop_flags_few_points_downward_and_out_of_range_budgets_and_leaves_them_out():
    runs = isoflop_runs(HOFFMANN, budgets=(1e18, 1e19, 1e20))
    runs += [{"C": 1e17, "N": 1e6, "loss": 3.0}, {"C": 1e17, "N": 1e7, "loss": 2.9}]  # two sizes only
    runs += [{"C": 5e16, "N": N, "loss": 3.0 - 0.1 * (math.log(N) - math.log(1e6)) ** 2}  # opens downward
             for N in np.geomspace(1e5, 1e7, 5)]
    runs += [{"C": 2e16, "N": N, "loss": 3.0 + 0.01 * (math.log(N) - math.log(1e9)) ** 2}  # minimum at 1e9
             for N in np.geomspace(1e5, 1e7, 5)]
    fit = fit_isoflop(runs, n_bootstrap=50)
    flagged = {budget.C: budget for budget in fit.per_budget if not budget.ok}
    assert set(flagged) == {1e17, 5e16, 2e16}
    assert "at least 3" in flagged[1e17].reason
    assert "downward" in flagged[5e16].reason
    assert "outside" in flagged[2e16].reason
    assert all(budget.N_opt is None for budget in flagged.values())
    assert fit.n_budgets_used == 3
    assert_within(fit.a, fit_isoflop(isoflop_runs(HOFFMANN, budgets=(1e18, 1e19, 1e20)), n_bootstrap=0).a, 1e-12)


def test_isoflop_needs_two_usable_budgets():
    runs = isoflop_runs(HOFFMANN, budgets=(1e19,)) + [{"C": 1e20, "N": 1e8, "loss": 2.5}]
    with pytest.raises(ValueError, match="at least 2 budgets"):
        fit_isoflop(runs)


# ---------------------------------------------------------------------------- plots and JSON

def test_plots_write_png_files(tmp_path):
    N = np.geomspace(1e5, 1e9, 8)
    loss = 1.7 + (8.8e8 / N) ** 0.3
    power = fit_power_law(N, loss, irreducible=True, n_bootstrap=50)
    runs = isoflop_runs(HOFFMANN, budgets=(1e18, 1e19, 1e20), noise=0.01)
    runs += [{"C": 1e17, "N": 1e6, "loss": 3.0}, {"C": 1e17, "N": 1e7, "loss": 2.9}]  # flagged: drawn without a curve
    isoflop = fit_isoflop(runs, n_bootstrap=50)
    paths = [plot_power_law(power, N, loss, "parameters N", tmp_path / "power.png"),
             plot_isoflop(isoflop, runs, tmp_path / "isoflop.png"),
             plot_frontier(isoflop, tmp_path / "plots" / "frontier.png")]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_a_fit_with_degenerate_bootstrap_samples_plots_and_predicts_without_numpy_warnings(tmp_path):
    # L(C) over an IsoFLOP ladder of two budgets (the speedrun ladder's 11 runs): resamples of one budget give
    # x_c = 0 or inf with alpha < 0, curves the band leaves out rather than warn about
    C = [1e13, 3e13] * 5 + [3e13]
    loss = [5.0079, 4.5535, 5.1905, 4.6182, 5.5038, 4.886, 5.7669, 5.1829, 5.9183, 5.3504, 5.4933]
    fit = fit_power_law(C, loss)
    assert np.any(fit.x_c_samples == 0) and np.any(fit.alpha_samples < 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_power_law(fit, C, loss, "compute C", tmp_path / "loss_vs_C.png")
        prediction = predict_all({"C": 2.5e14}, {"L(C)": fit}, seed_std=None)["L(C)"]
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    low, high = prediction["interval"]
    assert low < prediction["loss"] < high and math.isfinite(high)


def test_results_serialise_to_json_without_the_sample_arrays():
    N = np.geomspace(1e5, 1e9, 6)
    power = fit_power_law(N, (8.8e13 / N) ** 0.076, n_bootstrap=20).as_dict()
    chinchilla = fit_chinchilla(*chinchilla_grid(HOFFMANN, k=3), n_bootstrap=2, loo=False).as_dict()
    isoflop = fit_isoflop(isoflop_runs(HOFFMANN, budgets=(1e18, 1e19)), n_bootstrap=5).as_dict()
    for result in (power, chinchilla, isoflop):
        assert not any(key.endswith("_samples") for key in result)
        json.loads(json.dumps(result, allow_nan=False))
    assert {"alpha", "x_c", "E", "r2", "loo_errors", "alpha_ci", "x_c_ci", "n_points"} <= set(power)
    assert {"E", "A", "B", "alpha", "beta", "alpha_ci", "beta_ci", "a", "a_ci", "r2"} <= set(chinchilla)
    assert isoflop["per_budget"][0]["ok"] is True and len(isoflop["a_ci"]) == 2


# ---------------------------------------------------------------------------- helpers and bad input

def test_r_squared():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert r_squared(y, y) == 1.0
    assert r_squared(y, np.full(4, y.mean())) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        r_squared(y, y[:3])


@pytest.mark.parametrize("call, message", [
    (lambda: fit_power_law([1e6, 1e7], [3.0, 2.8]), "at least 3 points"),
    (lambda: fit_power_law([1e6, 1e7, 1e8], [3.0, 2.8, 2.6], irreducible=True), "at least 4 points"),
    (lambda: fit_power_law([1e6, 1e7, 1e8], [3.0, 2.8]), "same length"),
    (lambda: fit_power_law([1e6, -1e7, 1e8], [3.0, 2.8, 2.6]), r"x must be positive and finite \(got x\[1\]"),
    (lambda: fit_power_law([1e6, 1e7, 1e8], [3.0, 0.0, 2.6]), "loss must be positive"),
    (lambda: fit_power_law([1e6, 1e6, 1e6], [3.0, 2.8, 2.6]), "distinct"),
    (lambda: fit_chinchilla([1e6] * 5, [1e9] * 5, [3.0] * 5), "at least 6 points"),
    (lambda: fit_chinchilla([1e6] * 6, np.geomspace(1e8, 1e9, 6), [3.0] * 6), "N must take at least 2"),
    (lambda: fit_chinchilla([1e6, 1e7] * 3, [1e9] * 6, [3.0] * 5), "same length"),
    (lambda: fit_isoflop([]), "no runs"),
    (lambda: fit_isoflop([{"C": 1e18, "N": 1e6}]), "missing 'loss'"),
    (lambda: fit_isoflop([{"C": 1e18, "N": -1.0, "loss": 3.0}]), "N must be positive"),
])
def test_bad_input_raises_value_error_with_a_clear_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()
