"""The run record (JSON in the run folder) and the loss-curve plot: what a run leaves behind."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any



def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSVLogger metrics.csv → {metric: [(step, value), ...]}, empty cells skipped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"]) if row.get("step") else 0
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def plot_loss_curves(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """Train and validation loss against step, saved as PNG; None when there is nothing to plot."""
    series = read_metrics_csv(metrics_csv)
    curves = {k: series[k] for k in ("train/loss", "val/loss") if series.get(k)}
    if not curves:
        return None
    fig = agg_figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    for name, points in curves.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=name, marker="o" if name.startswith("val") else None, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    return Path(out_png)


def agg_figure(**options: Any) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot: no global backend or figure list (nothing to close),
    and matplotlib is imported only by what plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure


def write_run_record(path: str | Path, record: dict[str, Any]) -> Path:
    """Writes the record atomically (temp file, then rename) so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(record), indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
