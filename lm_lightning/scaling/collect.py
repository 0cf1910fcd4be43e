"""Finished runs of a sweep, read back from their run records (``run.json``) — no network needed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lm_lightning.errors import UserError


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
            scaling = (record.get("config") or {}).get("scaling") or {}
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
            ))
    if not points:
        raise UserError(f"scaling fit: no finished run records (run.json with {loss_key}) under "
                        + ", ".join(map(str, folders)))
    return sorted(points, key=lambda p: (p.N, p.D))
