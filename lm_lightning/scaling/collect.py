"""Finished runs of a sweep, read back from their run records (``run.json``) — no network needed; runs that
differ only by seed are one point (:func:`average_seeds`)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lm_lightning.errors import UserError

log = logging.getLogger("lm_lightning")
# the parts of a run's config that make it a different experiment; the rest (folders, loggers, seeds) does not
EXPERIMENT_KEYS = ("model", "optimizer", "scheduler", "objective", "tokenizer", "data", "scaling", "precision")

@dataclass(frozen=True)
class RunPoint:
    """What a scaling fit needs from one finished run."""

    name: str
    N: int  # non-embedding parameters
    N_total: int  # all parameters
    D: int  # tokens trained
    C: float  # training FLOPs, as the model counts them
    loss: float  # final validation loss, nats/token
    best_loss: float | None
    bpb: float | None
    budget: float | None  # the compute budget the run was planned for (IsoFLOP grids), if any
    path: str
    seed: int | None = None
    experiment: str = ""  # the config that makes it this experiment (seeds and folders left out), as JSON
    seed_losses: list[float] = field(default_factory=list)  # one final loss per seed (after average_seeds)
    loss_std: float | None = None  # sample standard deviation of seed_losses (2 seeds or more)

    def as_dict(self) -> dict:
        return asdict(self)


def collect_runs(folders: list[str | Path], loss_key: str = "val/loss") -> list[RunPoint]:
    """Every finished run under ``folders`` (searched recursively for run.json), sorted by N then D."""
    points = []
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"scaling fit: folder not found: {folder} (pass runs=[<multirun or run folders>])")
        for record_path in sorted(folder.rglob("run.json")):
            record = json.loads(record_path.read_text())
            final = record.get("final") or {}
            if record.get("status") != "finished" or final.get(loss_key) is None:
                continue  # stopped or crashed runs have no final loss to fit
            config = record.get("config") or {}
            if (config.get("callbacks") or {}).get("branch_points"):
                log.info("%s: the stable phase of a WSD ladder (constant lr), left out: fit its cooldown branches",
                         record_path.parent)
                continue
            scaling = config.get("scaling") or {}
            points.append(RunPoint(
                name=record.get("run_name", record_path.parent.name),
                N=int(record["parameters"]["non_embedding"]),
                N_total=int(record["parameters"]["total"]),
                D=int(record["tokens_trained"]),
                C=float(record["training_flops"]),
                loss=float(final[loss_key]),
                best_loss=(record.get("best") or {}).get(loss_key),
                bpb=final.get("val/bpb"),
                budget=scaling.get("compute_budget"),
                path=str(record_path.parent),
                seed=config.get("seed"),
                experiment=_experiment(config),
                seed_losses=[float(final[loss_key])],
            ))
    if not points:
        raise UserError(f"scaling fit: no finished run records (run.json with {loss_key}) under "
                        + ", ".join(map(str, folders)))
    return sorted(points, key=lambda p: (p.N, p.D))


def _experiment(config: dict[str, Any]) -> str:
    """The run's config minus what differs between seeds of one experiment: the data order's seed (``data.seed:
    ${seed}``, the only option that follows the run's seed), the cache folder, and a cooldown's start (its D tells
    the branches apart). Other ``*seed`` options (the tokenizer's, dedup's, the split's) are fixed values of the
    experiment, whatever the run's seed."""
    left_out = (".data.seed", ".data.cache_dir", ".scheduler.decay_start")

    def keep(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: keep(v, f"{path}.{k}") for k, v in sorted(node.items()) if f"{path}.{k}" not in left_out}
        return node

    return json.dumps({k: keep(config.get(k), f".{k}") for k in EXPERIMENT_KEYS}, sort_keys=True, default=str)


def average_seeds(points: list[RunPoint]) -> list[RunPoint]:
    """One point per experiment: runs of the same N, D, budget and config but for the seed become their mean,
    with each seed's loss in ``seed_losses`` and their sample standard deviation in ``loss_std``."""
    groups: dict[tuple, list[RunPoint]] = {}
    for point in points:
        groups.setdefault((point.N, point.D, point.budget, point.experiment), []).append(point)
    averaged = []
    for group in groups.values():
        if len(group) == 1:
            averaged.append(group[0])
            continue
        losses = [p.loss for p in group]
        seeds = sorted({p.seed for p in group}, key=str)
        if len(seeds) < len(group):
            log.warning("%d runs at N=%s, D=%s share a seed (%s): averaged as repeats", len(group), group[0].N,
                        group[0].D, ", ".join(p.path for p in group))
        averaged.append(replace(
            group[0], name=f"{group[0].name} (+{len(group) - 1} seeds)", loss=float(np.mean(losses)),
            best_loss=_mean([p.best_loss for p in group]), bpb=_mean([p.bpb for p in group]),
            path=", ".join(p.path for p in group), seed=None, seed_losses=losses,
            loss_std=float(np.std(losses, ddof=1))))
    return sorted(averaged, key=lambda p: (p.N, p.D))


def _mean(values: list[float | None]) -> float | None:
    return float(np.mean(values)) if values and all(v is not None for v in values) else None
