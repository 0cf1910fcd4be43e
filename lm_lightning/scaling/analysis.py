"""Scaling laws fitted from the run records of any sweep (``lm-lightning scaling fit``).

Reads every finished run under the folders, averages runs that differ only by seed into one point (their spread
becomes error bars and a second level of the bootstrap), fits what the runs can support — L(N), L(D), L(C)
power laws, the parametric L(N, D) of Hoffmann et al. (2022), IsoFLOP minima and the
compute-optimal frontier — and prints one table, saves it (fits.csv, fits.json) with PNG plots,
and logs the same to W&B (offline unless logged in). ``predict=[{N: .., D: ..}]`` adds each law's
predicted loss there, with its 95% interval, to the table, fits.json and the plots.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.scaling.chinchilla import fit_chinchilla
from lm_lightning.scaling.collect import RunPoint, average_seeds, collect_runs
from lm_lightning.scaling.isoflop import fit_isoflop
from lm_lightning.scaling.plots import plot_chinchilla, plot_frontier, plot_isoflop, plot_power_law
from lm_lightning.scaling.power_law import fit_power_law
from lm_lightning.scaling.predict import parse_targets, predict_all, prediction_lines
from lm_lightning.tracking.records import write_run_record

log = logging.getLogger("lm_lightning")
AXES = {"N": "non-embedding parameters N", "D": "tokens trained D", "C": "training FLOPs C"}


def scaling_fit(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.runs:
        raise UserError("scaling fit needs runs=[<multirun or run folders>] holding run.json records")
    runs = collect_runs(list(cfg.runs), cfg.loss_key)
    points = average_seeds(runs) if cfg.get("average_seeds", True) else runs
    targets = parse_targets(cfg.get("predict") or [], points)
    out_dir = Path(cfg.output_dir or Path(cfg.runs[0]) / "scaling_fit")
    out_dir.mkdir(parents=True, exist_ok=True)
    loss = np.array([p.loss for p in points])
    seeded = any(len(p.seed_losses) > 1 for p in points)
    seed_losses = [p.seed_losses for p in points] if seeded else None  # a second bootstrap level: seeds
    loss_err = np.array([p.loss_std or 0.0 for p in points])
    spreads = [p.loss_std for p in points if p.loss_std is not None]
    seed_std = float(np.sqrt(np.mean(np.square(spreads)))) if spreads else None
    rows, plots, laws = [], [], {}
    results = {"runs": [p.as_dict() for p in points], "n_runs": len(runs), "n_points": len(points),
               "seeds": {"points_with_seeds": len(spreads), "seed_std_rms": seed_std}}

    for axis in cfg.laws:
        values = np.array([getattr(p, axis) for p in points], dtype=float)
        if len(np.unique(values)) < 3:
            log.info("L(%s): fewer than 3 distinct values of %s, skipped", axis, axis)
            continue
        law = fit_power_law(values, loss, irreducible=cfg.irreducible, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                            seed_losses=seed_losses)
        laws[f"L({axis})"] = law
        results[f"L({axis})"] = law.as_dict()
        rows.append(_law_row(f"L({axis})", law))

    if cfg.holdout_largest and len({p.N for p in points}) >= 4:
        results["holdout"] = _holdout_largest(points, cfg)
        rows.append(results["holdout"]["row"])

    if len({p.N for p in points}) >= 2 and len({p.D for p in points}) >= 2 and len(points) >= 6:
        ch = fit_chinchilla(np.array([p.N for p in points], float), np.array([p.D for p in points], float), loss,
                            n_bootstrap=cfg.n_bootstrap_chinchilla, seed=cfg.seed, seed_losses=seed_losses)
        laws["L(N,D)"] = ch
        results["L(N,D)"] = ch.as_dict()
        rows.append({"law": "L(N,D)", "exponent": f"alpha {ch.alpha:.3f} {_ci(ch.alpha_ci)}, beta {ch.beta:.3f} {_ci(ch.beta_ci)}",
                     "constant": f"E {ch.E:.3f} A {ch.A:.4g} B {ch.B:.4g}", "r2": ch.r2, "loo": None})

    budgets = [p for p in points if p.budget]
    iso = _isoflop(budgets, cfg) if len({p.budget for p in budgets}) >= 2 else None
    if iso is not None:
        results["isoflop"] = iso.as_dict()
        rows.append({"law": "N_opt ∝ C^a", "exponent": f"a {iso.a:.3f} {_ci(iso.a_ci)}", "constant": "",
                     "r2": None, "loo": None})
        rows.append({"law": "D_opt ∝ C^b", "exponent": f"b {iso.b:.3f} {_ci(iso.b_ci)}", "constant": "",
                     "r2": None, "loo": None})
        plots.append(plot_isoflop(iso, [{"C": p.budget, "N": p.N, "loss": p.loss} for p in budgets],
                                          out_dir / "isoflop.png"))
        plots.append(plot_frontier(iso, out_dir / "frontier.png"))

    if not rows:
        raise UserError(f"scaling fit: the {len(points)} runs found vary too little to fit a law "
                        "(need at least 3 distinct model sizes, token counts or budgets)")
    predictions = [{"at": at, "laws": predict_all(at, laws, seed_std)} for at in targets]
    if predictions:
        results["predictions"] = predictions
    plots = _law_plots(laws, points, loss_err, predictions, out_dir) + plots
    results["plots"] = [str(p) for p in plots]
    _save(rows, results, out_dir)
    _print(rows, points, plots, out_dir, len(runs), prediction_lines(predictions))
    if cfg.tracker:
        _log_to_wandb(cfg, rows, results, plots, out_dir)
    return results


def _law_plots(laws: dict[str, Any], points: list[RunPoint], loss_err: np.ndarray, predictions: list[dict],
               out_dir: Path) -> list[Path]:
    """loss_vs_<N|D|C>.png per power law and loss_vs_ND.png for L(N, D): runs with seed error bars, predictions
    marked with their 95% intervals."""
    loss, plots = np.array([p.loss for p in points]), []

    def marks(name: str, *axes: str) -> list[tuple]:
        return [(*(p["at"][a] for a in axes), p["laws"][name]["loss"], p["laws"][name]["interval"],
                 p["at"].get("actual")) for p in predictions if name in p["laws"]]

    for name, law in laws.items():
        if name == "L(N,D)":
            plots.append(plot_chinchilla(law, [p.N for p in points], [p.D for p in points], loss,
                                         out_dir / "loss_vs_ND.png", loss_err, marks(name, "N", "D")))
        else:
            axis = name[2]
            plots.append(plot_power_law(law, [getattr(p, axis) for p in points], loss, AXES[axis],
                                        out_dir / f"loss_vs_{axis}.png", loss_err, marks(name, axis)))
    return plots


def _isoflop(budgets: list[RunPoint], cfg: DictConfig):
    """The IsoFLOP fit, or None (with the reason logged) when fewer than two budgets give a usable minimum."""
    try:
        return fit_isoflop([{"C": p.budget, "N": p.N, "D": p.D, "loss": p.loss} for p in budgets],
                                   n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
    except ValueError as err:
        log.warning("IsoFLOP fit skipped: %s", err)
        return None


def _ci(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval is not None else ""


def _law_row(name: str, law) -> dict[str, Any]:
    constant = f"x_c {law.x_c:.4g}" + (f", E {law.E:.3f}" if law.E is not None else "")
    return {"law": name, "exponent": f"alpha {law.alpha:.4f} {_ci(law.alpha_ci)}", "constant": constant,
            "r2": law.r2, "loo": law.loo_mean_abs}


def _holdout_largest(points: list[RunPoint], cfg: DictConfig) -> dict[str, Any]:
    """Fits L(N) without the largest model's runs and predicts its final loss."""
    largest = max(p.N for p in points)
    train = [p for p in points if p.N != largest]
    held = [p for p in points if p.N == largest]
    law = fit_power_law(np.array([p.N for p in train], float), np.array([p.loss for p in train]),
                                irreducible=cfg.irreducible, n_bootstrap=0, seed=cfg.seed)
    actual = float(np.mean([p.loss for p in held]))
    predicted = float(law.predict(largest))
    error = (predicted - actual) / actual
    row = {"law": f"L(N) without N={largest:,}", "exponent": f"alpha {law.alpha:.4f}", "constant": f"x_c {law.x_c:.4g}",
           "r2": law.r2, "loo": None, "note": f"predicts {predicted:.4f} vs actual {actual:.4f} ({error:+.1%})"}
    return {"N": largest, "predicted": predicted, "actual": actual, "relative_error": error, "row": row}


def _save(rows: list[dict], results: dict, out_dir: Path) -> None:
    with open(out_dir / "fits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["law", "exponent", "constant", "r2", "loo", "note"])
        writer.writeheader()
        writer.writerows(rows)
    write_run_record(out_dir / "fits.json", results)


def _print(rows: list[dict], points: list[RunPoint], plots: list[Path], out_dir: Path, n_runs: int,
           predicted: list[str]) -> None:
    def num(value, spec):
        return format(value, spec) if isinstance(value, float) else "-"

    spreads = [p.loss_std for p in points if p.loss_std is not None]
    seeds = (f"{n_runs} runs as {len(points)} points: seeds averaged at {len(spreads)}, seed s.d. "
             f"{min(spreads):.4f}..{max(spreads):.4f}" if len(points) < n_runs and spreads else f"{n_runs} runs")
    lines = ["", f"scaling fit over {seeds} "
             f"(N {min(p.N for p in points):,}..{max(p.N for p in points):,}, D {min(p.D for p in points):,}.."
             f"{max(p.D for p in points):,})",
             f"  {'law':<26} {'exponent [95% CI]':<52} {'constant':<28} {'R²':>6} {'LOO':>7}"]
    for r in rows:
        lines.append(f"  {r['law']:<26} {r['exponent']:<52} {r['constant']:<28} {num(r['r2'], '.4f'):>6} "
                     f"{num(r['loo'], '.2%'):>7}" + (f"  {r['note']}" if r.get("note") else ""))
    lines += ["", *predicted] if predicted else []
    lines += ["", f"table: {out_dir / 'fits.csv'} and {out_dir / 'fits.json'}"]
    lines += [f"plot:  {p}" for p in plots]
    print("\n".join(lines), flush=True)


def _log_to_wandb(cfg: DictConfig, rows: list[dict], results: dict, plots: list[Path], out_dir: Path) -> None:
    """One W&B run for the fit: the table, every exponent in the summary, the plots as images."""
    import wandb

    from lm_lightning.tracking.wandb import resolve_mode

    run = wandb.init(project=cfg.tracker.project, group=cfg.tracker.group, name="scaling-fit", job_type="scaling_fit",
                     dir=str(out_dir), mode=resolve_mode(cfg.tracker.mode), config=OmegaConf.to_container(cfg))
    table = wandb.Table(columns=["law", "exponent", "constant", "r2", "loo"],
                        data=[[r["law"], r["exponent"], r["constant"], r["r2"], r["loo"]] for r in rows])
    run.log({"scaling/fits": table, **{f"scaling/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.summary.update({k: v for k, v in json.loads((out_dir / "fits.json").read_text()).items() if k != "runs"})
    run.finish()
    print(f"W&B run folder: {Path(run.dir).parent}", flush=True)
