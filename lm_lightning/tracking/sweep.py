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
        else:
            value = job_return._return_value
            outcome, detail = "ok", f"val/loss {value:.4f}" if isinstance(value, float) else ""
        detail = " ".join(detail.split())  # one line per job in the table
        self.jobs.append({"job": len(self.jobs), "overrides": overrides, "outcome": outcome, "detail": detail,
                          "dir": str(job_return.working_dir or "")})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.jobs:
            return
        failed = [j for j in self.jobs if j["outcome"] == "failed"]
        lines = ["", f"sweep summary: {len(self.jobs) - len(failed)} of {len(self.jobs)} jobs finished, {len(failed)} failed"]
        lines += [f"  #{j['job']:<3} {j['outcome']:<6} {j['overrides']}  {j['detail']}" for j in self.jobs]
        print("\n".join(lines), flush=True)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / "summary.json").write_text(json.dumps(self.jobs, indent=2))
        if failed:
            sys.exit(1)
