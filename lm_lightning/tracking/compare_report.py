"""What ``lm-lightning compare`` draws and writes beside its table: the runs' curves overlaid (validation loss
against steps, tokens and FLOPs; training loss smoothed), read from each run's CSV log, and one HTML file that
holds the table and the plots (as data URIs) and needs nothing else to be viewed."""

from __future__ import annotations

import base64
import html
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_lightning.tracking.records import read_metrics_csv

if TYPE_CHECKING:
    from lm_lightning.tracking.compare import Run


def read_curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(optimizer steps done, value), ...]} from the run's CSV log: every ``version_*`` beside the one
    the record names (a resumed run starts a new version), later versions overriding earlier ones at a step.

    The record's ``csv_dir`` is taken relative to the record's ``output_dir`` and found again below the run's
    folder, so runs copied from another machine still have their curves. Lightning logs a 0-based step; the
    curves count steps done (the record's ``steps`` is the last one)."""
    csv_dir, output_dir = run.record.get("csv_dir"), run.record.get("output_dir")
    if not csv_dir:
        return {}
    csv_dir = Path(csv_dir)
    if output_dir and csv_dir.is_relative_to(output_dir):
        csv_dir = run.dir / csv_dir.relative_to(output_dir)
    versions = sorted(csv_dir.parent.glob("version_*/metrics.csv"),
                      key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    merged: dict[str, dict[int, float]] = {}
    for metrics in versions or ([csv_dir / "metrics.csv"] if (csv_dir / "metrics.csv").is_file() else []):
        for name, points in read_metrics_csv(metrics).items():
            merged.setdefault(name, {}).update((step + 1, value) for step, value in points)
    return {name: sorted(points.items()) for name, points in merged.items()}


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i) if weight else value)
    return out


def plot_curves(runs: list[Run], keys: list[str], out_dir: Path, metric: str = "val/loss",
                smoothing: float = 0.9) -> dict[str, Path]:
    """The overlaid curves as PNGs in ``out_dir``: ``metric`` against steps, tokens and training FLOPs (tokens
    and FLOPs from the record's tokens per step and FLOPs per token), and the training loss against steps,
    smoothed (the raw curve faint behind it). Returns {title: path}; a plot no run has data for is not drawn."""
    curves = {run.label: read_curves(run) for run in runs}
    legend = {run.label: " ".join([run.label, *(f"{k}={_short(run.config.get(k))}" for k in keys)]) for run in runs}
    plots: dict[str, Path] = {}
    name = metric.replace("/", "_")
    for axis, unit in (("step", "optimizer steps"), ("tokens", "tokens trained"), ("flops", "training FLOPs")):
        figure, ax = _figure()
        xs: list[float] = []
        for run in runs:
            points = curves[run.label].get(metric, [])
            per_step = _per_step(run, axis)
            if points and per_step:
                steps, values = zip(*points)
                x = [step * per_step for step in steps]
                ax.plot(x, values, marker="o", markersize=3, linewidth=1.4, label=legend[run.label])
                xs += x
        if xs:  # runs of sizes or lengths orders of magnitude apart: a log axis
            _finish(figure, ax, unit, f"{metric} (validation)", "log" if max(xs) > 100 * min(xs) else "linear",
                    len(runs))
            plots[f"{metric} against {unit}"] = _save(figure, out_dir / f"{name}_vs_{axis}.png")
    figure, ax = _figure()
    drawn = False
    for run in runs:
        points = curves[run.label].get("train/loss", [])
        if points:
            steps, values = zip(*points)
            line, = ax.plot(steps, smoothed(list(values), smoothing), linewidth=1.4, label=legend[run.label])
            ax.plot(steps, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
            drawn = True
    if drawn:
        _finish(figure, ax, "optimizer steps", f"train/loss (smoothed {smoothing:g})", "linear", len(runs))
        plots["training loss, smoothed"] = _save(figure, out_dir / "train_loss_vs_step.png")
    return plots


def write_report(path: Path, rows: list[dict[str, Any]], columns: list[str], plots: dict[str, Path], *,
                 runs: list[Run], keys: list[str], inputs: list[str], sort: str | None,
                 filters: list[str]) -> Path:
    """One HTML file: what was compared, the table (each row a ``<tr data-run=label>``; the lowest final
    validation loss marked), the config every run shares, and the plots embedded as base64 PNG data URIs."""
    from lm_lightning.tracking.compare import format_value

    losses = [row.get("final/val/loss") for row in rows if isinstance(row.get("final/val/loss"), (int, float))]
    best = min(losses) if losses else None
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join(
        f'<tr data-run="{html.escape(str(row["run"]))}"{" class=best" if best is not None and row.get("final/val/loss") == best else ""}>'
        + "".join(f'<td title="{html.escape(row["dir"])}">{html.escape(format_value(c, row.get(c)))}</td>' if c == "run"
                  else f"<td>{html.escape(format_value(c, row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows)
    shared = {key: value for key, value in runs[0].config.items() if all(run.config.get(key) == value for run in runs)}
    shared_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(format_value(k, v))}</td></tr>"
                          for k, v in shared.items())
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, png in plots.items())
    how = [f"{len(rows)} runs from {', '.join(inputs)}"] + ([f"filter: {' and '.join(filters)}"] if filters else []) \
        + ([f"sorted by {sort}"] if sort else []) + [f"written {datetime.now().isoformat(timespec='seconds')}"]
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lm-lightning compare: {len(rows)} runs</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }}
th {{ background: #f0f0f0; }} td:first-child, th:first-child {{ text-align: left; }}
tr.best {{ background: #e6f4e6; font-weight: 600; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 1em; max-width: 1400px; }}
figure {{ margin: 0; }} img {{ width: 100%; }} figcaption {{ text-align: center; color: #555; }}
</style></head><body>
<h1>lm-lightning compare</h1>
<p>{html.escape('; '.join(how))}. Columns: the config keys that differ across the runs, then each run's
figures from its run.json (final/* and best/* validation metrics; params, tokens, FLOPs trained; seconds).
The lowest final validation loss is highlighted.</p>
<table id="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Curves</h2>
<div class="plots">{figures or "<p>No CSV log with curves was found for these runs.</p>"}</div>
<details><summary>Config every run shares ({len(shared)} keys)</summary><table>{shared_rows}</table></details>
</body></html>
""")
    return path


def _per_step(run: Run, axis: str) -> float | None:
    """What one optimizer step is on ``axis``: 1 step, the tokens of a step, or their training FLOPs."""
    if axis == "step":
        return 1.0
    steps, tokens = run.record.get("steps"), run.record.get("tokens_trained")
    per_token = run.record.get("flops_per_token") if axis == "flops" else 1
    return tokens / steps * per_token if steps and tokens and per_token else None


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _figure() -> tuple[Any, Any]:
    """A figure on the Agg canvas without pyplot: no global backend switch, safe in any process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _finish(figure: Any, ax: Any, xlabel: str, ylabel: str, scale: str, n_runs: int) -> None:
    ax.set_xscale(scale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if n_runs <= 12:  # beyond that a legend hides the curves; the table names the runs
        ax.legend(fontsize="small")


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path
