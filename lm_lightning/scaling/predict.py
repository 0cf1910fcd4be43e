"""``scaling fit ... predict=[{N: 1e7, D: 2e8}]``: the loss each fitted law predicts at the points asked for, with
the 95% percentile interval of its bootstrap fits (which carry the seed noise when seeds were averaged)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lm_lightning.errors import UserError
from lm_lightning.scaling.chinchilla import ChinchillaFit
from lm_lightning.scaling.collect import RunPoint
from lm_lightning.scaling.fit_common import bootstrap_interval
from lm_lightning.scaling.power_law import PowerLawFit

Z95 = 1.959964  # two-sided 95% normal quantile, for the seed noise of a single run


def parse_targets(targets: Iterable[Mapping[str, Any]], points: list[RunPoint]) -> list[dict[str, float]]:
    """Each ``predict`` entry as {N, D, C} floats (those given), plus ``actual``: the loss a run there reached, when
    known, to check the prediction against. C, when not given with N and D, is estimated as 6·N·D times the
    C/(6·N·D) of the largest run (attention and head FLOPs on top of 6·N per token)."""
    parsed = []
    for target in targets:
        target = dict(target)
        unknown = set(target) - {"N", "D", "C", "actual"}
        if not set(target) & {"N", "D", "C"} or unknown:
            raise UserError(f"scaling fit: predict entry {target} must name N, D and/or C (and may give the actual "
                            "loss), e.g. predict=[{N: 1e7, D: 2e8}] or predict=[{N: 1e7, D: 2e8, actual: 3.21}]")
        at = {}
        for key, value in target.items():
            try:
                at[key] = float(value)
            except (TypeError, ValueError):
                at[key] = math.nan
            if not math.isfinite(at[key]) or at[key] <= 0:
                raise UserError(f"scaling fit: predict {key}={value!r} must be a positive number")
        if "C" not in at and {"N", "D"} <= set(at):
            largest = max(points, key=lambda p: p.N)
            at["C"] = 6 * at["N"] * at["D"] * largest.C / (6 * largest.N * largest.D)
            at["C_estimated"] = True
        parsed.append(at)
    return parsed


def _power_law_samples(law: PowerLawFit, x: float) -> np.ndarray:
    E = law.E_samples if law.E_samples is not None else 0.0
    with np.errstate(all="ignore"):  # degenerate samples: bootstrap_interval drops them
        return (law.x_c_samples / x) ** law.alpha_samples + E


def _chinchilla_samples(law: ChinchillaFit, N: float, D: float) -> np.ndarray:
    E, A, B, alpha, beta = law.parameter_samples.T
    with np.errstate(all="ignore"):  # degenerate samples: bootstrap_interval drops them
        return E + A / N ** alpha + B / D ** beta


def predict_all(at: dict[str, float], laws: dict[str, Any], seed_std: float | None) -> dict[str, Any]:
    """The prediction of every law in ``laws`` ({"L(N)": PowerLawFit, ..., "L(N,D)": ChinchillaFit}) whose
    variables ``at`` gives: loss, ``interval`` (95% bootstrap of the law) and, with ``seed_std`` (the runs'
    typical seed spread), ``run_interval``: that interval widened in quadrature by the seed noise of one run."""
    out = {}
    for name, law in laws.items():
        if name == "L(N,D)":
            if not {"N", "D"} <= set(at):
                continue
            loss, samples = law.predict(at["N"], at["D"]), _chinchilla_samples(law, at["N"], at["D"])
        else:
            axis = name[2]
            if axis not in at:
                continue
            loss, samples = law.predict(at[axis]), _power_law_samples(law, at[axis])
        interval = bootstrap_interval(np.asarray(samples, dtype=float))
        entry = {"loss": float(loss), "interval": interval}
        if "actual" in at:
            entry["relative_error"] = float(loss / at["actual"] - 1)
            entry["actual_in_interval"] = interval is not None and interval[0] <= at["actual"] <= interval[1]
        if seed_std and interval is not None:
            noise = Z95 * seed_std
            entry["run_interval"] = (float(loss - math.hypot(loss - interval[0], noise)),
                                     float(loss + math.hypot(interval[1] - loss, noise)))
        out[name] = entry
    return out


def describe(at: dict[str, float]) -> str:
    return ", ".join(f"{k}={at[k]:.3g}" + (" (estimated)" if k == "C" and at.get("C_estimated") else "")
                     for k in ("N", "D", "C") if k in at) + (f"; actual loss {at['actual']:.4f}" if "actual" in at else "")


def prediction_lines(predictions: list[dict[str, Any]]) -> list[str]:
    lines = []
    for prediction in predictions:
        lines.append(f"  predicted at {describe(prediction['at'])}:")
        for name, entry in prediction["laws"].items():
            interval = entry["interval"]
            text = f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "(no bootstrap interval)"
            run = entry.get("run_interval")
            check = (f"; {entry['relative_error']:+.2%} vs actual, "
                     + ("inside" if entry["actual_in_interval"] else "outside") if "relative_error" in entry else "")
            lines.append(f"    {name:<8} {entry['loss']:.4f}  95% interval {text}"
                         + (f", one run with seed noise [{run[0]:.4f}, {run[1]:.4f}]" if run else "") + check)
        if not prediction["laws"]:
            lines.append("    (no fitted law takes these variables)")
    return lines
