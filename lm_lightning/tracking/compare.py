"""Runs side by side, from what they leave on disk (``run.json`` and the CSV log): no tracker, no network.

``lm-lightning compare <run folders, multirun folders or globs>`` prints one row per run with the config keys
whose values differ across the runs, the final and best validation metrics, parameters, tokens, FLOPs and
seconds, and writes ``compare.csv``, overlaid curves (:mod:`lm_lightning.tracking.compare_report`) and one
self-contained HTML report.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import json
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lm_lightning.errors import UserError

RECORD = "run.json"


@dataclass
class Run:
    """One run folder: its record, its config as dotted keys (``optimizer.lr``) and its label in the table."""

    dir: Path
    record: dict[str, Any]
    config: dict[str, Any]
    label: str = ""
    figures: dict[str, Any] = field(default_factory=dict)  # the table's metric columns


def find_run_folders(patterns: list[str]) -> tuple[list[Path], list[Path]]:
    """(run folders holding a run.json, job folders of multiruns that left none: failed or still running).

    Each pattern is a run folder, a multirun folder (searched recursively) or a glob of either; a folder named
    outright must hold a run record, a glob's matches without one are passed over (``runs/*`` also matches a
    ``compare`` output folder)."""
    if not patterns:
        raise UserError("compare: no runs given: name run folders, multirun folders or globs "
                        "(lm-lightning compare outputs/tiny/multiruns/<sweep>)")
    found: dict[Path, None] = {}
    unfinished: dict[Path, None] = {}
    for pattern in map(os.path.expanduser, map(str, patterns)):
        named = Path(pattern).exists()  # a job folder's name may hold glob characters ([0.9,0.95])
        matches = [Path(pattern)] if named else [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        if not matches:
            raise UserError(f"compare: {pattern} does not exist" + (" (no folder matches the glob)"
                                                                   if glob.has_magic(pattern) else ""))
        before = len(found)
        for folder in (m.parent if m.name == RECORD else m for m in matches):
            if not folder.is_dir():
                continue
            records = [folder / RECORD] if (folder / RECORD).is_file() else sorted(folder.rglob(RECORD))
            found.update((record.parent.resolve(), None) for record in records)
            unfinished.update((outcome.parent.resolve(), None) for outcome in folder.rglob("job_outcome.json")
                              if not (outcome.parent / RECORD).is_file())
        if len(found) == before:
            raise UserError(f"compare: no {RECORD} in {pattern}: name run folders (holding {RECORD}) or multirun "
                            "folders (holding job folders)")
    return sorted(found, key=_natural), sorted(unfinished, key=_natural)


def load_runs(patterns: list[str]) -> tuple[list[Run], list[Path]]:
    """The runs under ``patterns``, labelled by their path below the runs' common folder (a job folder
    ``3_optimizer.lr=0.01,...`` as ``#3``); and the job folders without a record."""
    folders, unfinished = find_run_folders(patterns)
    runs = []
    for folder in folders:
        try:
            record = json.loads((folder / RECORD).read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"compare: {folder / RECORD} is not valid JSON ({err}); remove that run or rerun it") from None
        runs.append(Run(folder, record, flatten(record.get("config") or {})))
    root = common_folder([run.dir for run in runs])
    for run in runs:
        relative = run.dir.relative_to(root).parts or (run.dir.name,)
        run.label = "/".join(re.sub(r"^(\d+)_.*", r"#\1", part) for part in relative)
        run.figures = run_figures(run)
    return runs, unfinished


def common_folder(folders: list[Path]) -> Path:
    """The deepest folder holding every one of ``folders`` (the folder itself when there is one)."""
    return Path(os.path.commonpath([str(f) for f in folders]))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.01}}`` → ``{"optimizer.lr": 0.01}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(runs: list[Run], exclude: list[str] = ()) -> list[str]:
    """Config keys whose values differ across ``runs``, in config order; not those named by ``exclude``
    (glob patterns) nor those that only name the run's own folder or tracker run (checkpoint paths, save
    folders, run names), which differ between any two runs."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config))

    def names_the_run(run: Run, value: Any) -> bool:
        own = {str(run.record.get("output_dir")), str(run.dir), str(run.record.get("run_name")),
               str(run.record.get("group"))}
        return isinstance(value, str) and (value in own or any(value.startswith(f"{o}/") for o in own))

    differing = []
    for key in keys:
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in exclude):
            continue
        values = [run.config.get(key, "-") for run in runs]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1 and \
                not all(names_the_run(run, v) for run, v in zip(runs, values) if v not in ("-", None)):
            differing.append(key)
    return differing


def run_figures(run: Run) -> dict[str, Any]:
    """The metric columns of a run: status, final validation metrics (``final/val/loss``, ...), the best
    validation loss, parameters, steps, tokens, training FLOPs and seconds, from its record."""
    record = run.record
    final = record.get("final") or {}
    final = {f"final/{name}": final[name] for name in sorted(final, key=lambda name: (name != "val/loss", name))}
    return {"status": record.get("status"), **final,
            "best/val/loss": (record.get("best") or {}).get("val/loss"),
            "params": (record.get("parameters") or {}).get("total"), "steps": record.get("steps"),
            "tokens": record.get("tokens_trained"), "flops": record.get("training_flops"),
            "seconds": record.get("seconds")}


def table_rows(runs: list[Run], keys: list[str]) -> list[dict[str, Any]]:
    """One row per run: ``run`` (its label), the ``keys`` of its config, its figures, ``dir``."""
    metric_columns = list(dict.fromkeys(column for run in runs for column in run.figures))
    return [{"run": run.label, **{key: run.config.get(key) for key in keys},
             **{column: run.figures.get(column) for column in metric_columns}, "dir": str(run.dir)} for run in runs]


OPERATORS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
             ">": operator.gt, "=": operator.eq}
CONDITION = re.compile(r"^\s*([^<>=!\s]+)\s*(<=|>=|==|!=|<|>|=)\s*(.*?)\s*$")


def select(runs: list[Run], conditions: list[str]) -> list[Run]:
    """The runs that meet every condition ``<key><op><value>`` (op one of ``== != < <= > >=``; key a config
    key such as ``optimizer.lr`` or a figure such as ``final/val/loss`` or ``status``). Numbers compare as
    numbers, anything else as text; a run without the key is left out."""
    for condition in conditions:
        match = CONDITION.match(str(condition))
        if not match:
            raise UserError(f"compare: cannot read filter {condition!r}: write <key><op><value>, op one of "
                            "== != < <= > >=, e.g. 'optimizer.lr<0.01' or status==finished")
        key, op, wanted = match.groups()
        _check_key(runs, key, "filter")
        runs = [run for run in runs if _holds(_value(run, key), OPERATORS[op], wanted)]
    return runs


def order(runs: list[Run], key: str | None) -> list[Run]:
    """``runs`` sorted by ``key`` (``-key``: descending); runs without a value last."""
    if not key:
        return runs
    descending, key = key.startswith("-"), key.lstrip("-")
    _check_key(runs, key, "sort")
    present = [run for run in runs if _value(run, key) is not None]
    missing = [run for run in runs if _value(run, key) is None]
    numeric = all(_number(_value(run, key)) is not None for run in present)
    return sorted(present, key=lambda run: _number(_value(run, key)) if numeric else str(_value(run, key)),
                  reverse=descending) + missing


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """The rows as aligned text: numbers right-aligned, losses to 4 decimals, counts with thousands separators."""
    cells = [[format_value(column, row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(f"{column:<{w}}" if i == 0 else f"{column:>{w}}" for i, (column, w) in enumerate(zip(columns, widths)))]
    lines += ["  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}" for i, (cell, w) in enumerate(zip(line, widths)))
              for line in cells]
    return lines


def format_value(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value if isinstance(value, str) else json.dumps(value)
    if column in ("params", "tokens", "steps"):
        return f"{value:,}"
    if column == "flops":
        return f"{value:.3g}"
    if column == "seconds":
        return f"{value:.1f}"
    if column.startswith(("final/", "best/")):
        return f"{value:.4f}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> Path:
    """``compare.csv``: the table's columns with full-precision values (lists as JSON), plus each run's folder."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, "dir"])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: json.dumps(value) if isinstance(value, (list, dict)) else value
                             for key, value in row.items() if key in writer.fieldnames})
    return path


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Reads the runs of ``cfg.runs``, prints the table and writes the CSV, the curves and the HTML report
    into ``cfg.out_dir`` (default ``<the runs' common folder>/compare``); returns the rows and the paths."""
    from lm_lightning.tracking.compare_report import plot_curves, write_report

    runs, unfinished = load_runs(list(cfg.runs))
    keys = differing_keys(runs, list(cfg.get("exclude_keys") or []))  # across every run found, before filtering
    filters = cfg.get("filter") or []
    filters = [filters] if isinstance(filters, str) else [str(condition) for condition in filters]
    shown = order(select(runs, filters), cfg.get("sort"))
    if not shown:
        raise UserError(f"compare: no run of the {len(runs)} found meets filter={filters}")
    rows = table_rows(shown, keys)
    columns = [column for column in rows[0] if column != "dir"]
    out_dir = Path(cfg.get("out_dir") or common_folder([run.dir for run in runs]) / "compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(rows, columns, out_dir / "compare.csv")
    plots = plot_curves(shown, keys, out_dir, metric=cfg.get("metric", "val/loss"), smoothing=cfg.get("smoothing", 0.9))
    html = write_report(out_dir / "compare.html", rows, columns, plots, runs=shown, keys=keys,
                        inputs=[str(p) for p in cfg.runs], sort=cfg.get("sort"), filters=filters)
    heading = f"{len(shown)} run{'s' * (len(shown) != 1)}"
    if len(shown) < len(runs):
        heading += f" of {len(runs)} (filter: {' and '.join(filters)})"
    if cfg.get("sort"):
        heading += f", sorted by {cfg.sort}"
    heading += f"; differing config keys: {', '.join(keys)}" if keys else "; no config key differs"
    lines = [heading, "", *format_table(rows, columns), ""]
    if unfinished:
        lines.append(f"without {RECORD} (failed or still running): " + ", ".join(p.name for p in unfinished))
    lines += [f"table:  {csv_path}", *[f"plot:   {path}" for path in plots.values()], f"report: {html}"]
    print("\n".join(lines), flush=True)
    return {"rows": rows, "columns": columns, "csv": csv_path, "plots": plots, "html": html}


def _value(run: Run, key: str) -> Any:
    return run.label if key == "run" else run.figures[key] if key in run.figures else run.config.get(key)


def _check_key(runs: list[Run], key: str, option: str) -> None:
    if key != "run" and not any(key in run.figures or key in run.config for run in runs):
        columns = list(dict.fromkeys(c for run in runs for c in run.figures))
        raise UserError(f"compare: {option} key {key!r} is neither a config key of the runs nor one of "
                        f"{', '.join(['run', *columns])}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _holds(value: Any, op: Any, wanted: str) -> bool:
    if value is None:
        return False
    if _number(value) is not None and _number(wanted) is not None:
        return op(_number(value), _number(wanted))
    text = value if isinstance(value, str) else json.dumps(value)
    return op(text, wanted.strip("'\""))


def _natural(path: Path) -> list[Any]:
    """Sort key: job 10 after job 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]
