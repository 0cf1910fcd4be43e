"""Multirun bookkeeping: a failed job does not stop the sweep, and the sweep ends with a summary."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lm_lightning")


@dataclass
class JobFailure:
    """What a multirun job returns instead of raising, so Hydra goes on to the next job."""

    message: str


@dataclass
class JobSkipped:
    """What a job returns when its configuration is not meant to run (an incompatible family/objective pair)."""

    message: str


def sweep_row(record: dict[str, Any]) -> dict[str, Any]:
    """The figures of a finished training job that the sweep table shows."""
    final = record.get("final", {})
    return {"family": record.get("family"), "objective": record.get("objective"),
            "params": record.get("parameters", {}).get("total"), "initial_loss": record.get("initial_loss"),
            "val_loss": final.get("val/loss"), "perplexity": final.get("val/perplexity"), "bpb": final.get("val/bpb"),
            "seconds": record.get("seconds")}


class SweepSummary(Callback):
    """Hydra callback: records each job's outcome; at the end prints a table, writes
    ``<sweep>/summary.json`` and exits with status 1 when any job failed."""

    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        overrides = " ".join(job_return.overrides or [])
        if job_return.status == JobStatus.FAILED:
            outcome, detail = "failed", f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        elif isinstance(job_return._return_value, JobFailure):
            outcome, detail = "failed", job_return._return_value.message
        elif isinstance(job_return._return_value, JobSkipped):
            outcome, detail = "skipped", job_return._return_value.message
        else:
            value = job_return._return_value
            if isinstance(value, dict):
                row = value
                value = row.get("val_loss")
            outcome, detail = "ok", f"val/loss {value:.4f}" if isinstance(value, float) else ""
        detail = " ".join(detail.split())  # one line per job in the table
        job = {"job": len(self.jobs), "overrides": overrides, "outcome": outcome, "detail": detail,
               "dir": str(job_return.working_dir or "")}
        if outcome == "ok" and isinstance(job_return._return_value, dict):
            job["result"] = job_return._return_value
        self.jobs.append(job)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.jobs:
            return
        failed = [j for j in self.jobs if j["outcome"] == "failed"]
        skipped = [j for j in self.jobs if j["outcome"] == "skipped"]
        ran = len(self.jobs) - len(skipped)
        lines = ["", f"sweep summary: {ran - len(failed)} of {ran} jobs finished, {len(failed)} failed"
                 + (f"; {len(skipped)} incompatible pairs skipped" if skipped else "")]
        lines += [f"  #{j['job']:<3} {j['outcome']:<6} {j['overrides']}  {j['detail']}" for j in self.jobs
                  if j["outcome"] != "skipped"]
        lines += results_table([j["result"] for j in self.jobs if "result" in j])
        print("\n".join(lines), flush=True)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "summary.json").write_text(json.dumps(self.jobs, indent=2))
        if failed:
            sys.exit(1)


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per finished job: family, objective, parameters, losses, perplexity, bits-per-byte, seconds."""
    if not rows:
        return []

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    header = f"  {'family':<18} {'objective':<16} {'params':>10} {'loss@0':>7} {'val loss':>8} {'ppl':>8} {'bpb':>6} {'seconds':>7}"
    lines = ["", header]
    for r in rows:
        lines.append(f"  {r['family'] or '-':<18} {r['objective'] or '-':<16} {fmt(r['params'], ',d'):>10} "
                     f"{fmt(r['initial_loss'], '.3f'):>7} {fmt(r['val_loss'], '.4f'):>8} {fmt(r['perplexity'], '.3f'):>8} "
                     f"{fmt(r['bpb'], '.3f'):>6} {fmt(r['seconds'], '.1f'):>7}")
    return lines
