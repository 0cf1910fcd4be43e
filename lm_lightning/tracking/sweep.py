"""Multirun bookkeeping: a failed job does not stop the sweep, and the sweep ends with a summary."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

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
    """Hydra callback: each job writes its outcome to ``<job>/job_outcome.json``; at the end of the multirun the
    parent process reads them back, prints a table, writes ``<sweep>/summary.json`` and exits with status 1 when
    any job failed. It also gives a run or sweep a timestamped folder of its own (:func:`claim_stamped_folder`).

    The job hooks run where the job runs (the parent under the basic launcher, a worker process under joblib, a
    SLURM or local submitit job), so they leave files; ``on_multirun_end`` runs in the parent under every launcher.
    Jobs that ran in the parent are also kept in memory: a job's folder may lie outside the parent's sweep folder
    (an ``experiment=a,b`` sweep puts each experiment's jobs under its own name).
    """

    def __init__(self) -> None:
        self.jobs: dict[int, dict[str, Any]] = {}  # job number -> outcome, for the jobs run in this process

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if _first_rank():  # other ranks name their folder (torchrun's must, Lightning's get the first's)
            claim_stamped_folder(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _first_rank():
            return
        claim_stamped_folder(config, "sweep")
        for stale in _outcome_files(Path(config.hydra.sweep.dir)):  # a sweep folder used before: its old jobs
            stale.unlink()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        value = job_return._return_value
        if config.get("optimized_metric") and isinstance(value, float):  # a search's trial: the row from run.json
            value = _run_row(Path(config.hydra.runtime.output_dir)) or value
        job = _write_outcome(config, job_outcome(job_return.status, value))
        if job is not None:
            self.jobs[job["job"]] = job

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = {job["job"]: job for job in (json.loads(path.read_text()) for path in _outcome_files(sweep_dir))}
        jobs = sorted({**written, **self.jobs}.values(), key=lambda j: j["job"])
        if not jobs:
            return
        common, varying = split_overrides([job_overrides(j) for j in jobs])
        for job, values in zip(jobs, varying):
            job["varying"] = values  # what tells this job from the others, e.g. {"optimizer.lr": "0.001"}
        failed = [j for j in jobs if j["outcome"] == "failed"]
        skipped = [j for j in jobs if j["outcome"] == "skipped"]
        ran = len(jobs) - len(skipped)
        lines = ["", f"sweep summary: {ran - len(failed)} of {ran} jobs finished, {len(failed)} failed"
                 + (f"; {len(skipped)} incompatible pairs skipped" if skipped else "")]
        if any(varying):  # the shared overrides once, then what each job changes
            lines.append(f"  every job: {_joined(common)}")
        lines += [f"  #{j['job']:<3} {j['outcome']:<6} {_joined(j['varying']) if any(varying) else j['overrides']}"
                  f"  {j['detail']}" for j in jobs if j["outcome"] != "skipped"]
        lines += results_table([j for j in jobs if "result" in j])
        lines += _search_best(config, sweep_dir)
        print("\n".join(lines), flush=True)
        (sweep_dir / "summary.json").write_text(json.dumps(jobs, indent=2))
        if failed:
            sys.exit(1)


def claim_stamped_folder(config: DictConfig, mode: str) -> None:
    """Two runs (``mode`` "run") or two sweeps ("sweep") started in the same second resolve the same timestamped
    folder (``${now:...}`` in ``hydra.<mode>.dir``): a second run would be refused by the first's lock after Hydra
    wrote its config files into the first's folder, a second sweep would delete the first's job outcomes and run
    its jobs in the first's job folders. The folder is taken with an atomic ``mkdir``; one that finds it taken moves
    to ``<folder>_2`` (``_3``, ...), a sweep's jobs too (an override Hydra applies when it composes each job). A
    folder named without ``${now:`` (``hydra.run.dir=<path>`` of a resume) is the user's to reuse."""
    if not is_stamped(config, mode):
        return
    base = Path(config.hydra[mode].dir)
    folder, number = base, 1
    while True:
        try:
            folder.mkdir(parents=True)  # FileExistsError only for the folder itself
            break
        except FileExistsError:
            number += 1
            folder = base.with_name(f"{base.name}_{number}")
    if folder != base:
        from lm_lightning.config.overrides import quote_values

        log.warning("%s folder %s is another %s's (started in the same second): this one writes to %s",
                    mode, base, mode, folder)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[mode].dir = str(folder)
            config.hydra.overrides.hydra.append(quote_values([f"hydra.{mode}.dir={folder}"])[0])


def is_stamped(config: DictConfig, mode: str) -> bool:
    """Whether ``hydra.<mode>.dir`` (mode "run" or "sweep") is named by the time it starts (``${now:...}``)."""
    return "${now:" in str(OmegaConf.to_container(config.hydra[mode], resolve=False).get("dir"))


OUTCOME_FILE = "job_outcome.json"  # in each job's folder: what the sweep summary reads back


def job_outcome(status: JobStatus, value: Any) -> dict[str, Any]:
    """``outcome`` (ok, failed, skipped), a one-line ``detail`` and, for a training job, its ``result`` row,
    from what the job's function returned (or raised: ``status`` FAILED)."""
    if status == JobStatus.FAILED:
        outcome, detail = "failed", f"{type(value).__name__}: {value}"
    elif isinstance(value, JobFailure):
        outcome, detail = "failed", value.message
    elif isinstance(value, JobSkipped):
        outcome, detail = "skipped", value.message
    elif isinstance(value, dict):
        loss = value.get("val_loss")
        outcome, detail = "ok", f"val/loss {loss:.4f}" if isinstance(loss, float) else ""
    else:  # the command's objective: a loss, an accuracy or a reward
        outcome, detail = "ok", f"result {value:.4f}" if isinstance(value, float) else ""
    job = {"outcome": outcome, "detail": " ".join(detail.split())}  # one line per job in the table
    if outcome == "ok" and isinstance(value, dict):
        job["result"] = value
    return job


def _write_outcome(config: DictConfig, outcome: dict[str, Any]) -> dict[str, Any] | None:
    """Writes ``<job>/job_outcome.json`` (atomically; the first rank of a several-process job only) in a multirun;
    returns what it wrote."""
    if config.hydra.mode != RunMode.MULTIRUN or not _first_rank():
        return None
    import torch

    job_dir = Path(config.hydra.runtime.output_dir)
    job = {"job": config.hydra.job.num, "overrides": " ".join(config.hydra.overrides.task),
           "override_list": list(config.hydra.overrides.task), **outcome,
           "dir": str(job_dir), "threads": torch.get_num_threads()}
    partial = job_dir / f".{OUTCOME_FILE}.partial"
    partial.write_text(json.dumps(job, indent=2, default=str))
    os.replace(partial, job_dir / OUTCOME_FILE)
    return job


def _outcome_files(sweep_dir: Path) -> list[Path]:
    return list(sweep_dir.rglob(OUTCOME_FILE)) if sweep_dir.is_dir() else []


def _run_row(job_dir: Path) -> dict[str, Any] | None:
    """The table row of the job whose function returned its ``optimized_metric`` (for a sweeper) instead of the row."""
    path = job_dir / "run.json"
    return sweep_row(json.loads(path.read_text())) if path.is_file() else None


def _search_best(config: DictConfig, sweep_dir: Path) -> list[str]:
    """The Optuna sweeper's best trial (its ``optimization_results.yaml`` in the sweep folder), as the last line."""
    path = sweep_dir / "optimization_results.yaml"
    if "optuna" not in str(config.hydra.sweeper.get("_target_", "")).lower() or not path.is_file():
        return []
    from omegaconf import OmegaConf

    best = OmegaConf.load(path)
    if "best_params" not in best:  # several objectives: a Pareto front, listed in that file
        return ["", f"search: {len(best.get('solutions', []))} Pareto-optimal trials in {path}"]
    params = " ".join(f"{name}={value}" for name, value in best.best_params.items())
    return ["", f"search best: {params}  {config.get('optimized_metric') or 'objective'} {best.best_value:.4f}  ({path})"]


def _first_rank() -> bool:
    """Whether this is rank 0 of a several-process job (and so also of a SLURM job's tasks, or of the processes
    Lightning starts for its other ranks): every rank variable that is set says 0."""
    return all(os.environ.get(variable, "0") == "0" for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def job_overrides(job: dict[str, Any]) -> dict[str, str]:
    """A job's command-line overrides as {key: value} (``+key``/``++key`` under ``key``; ``~key``: value ``~``)."""
    overrides = {}
    for override in job.get("override_list") or job["overrides"].split():
        key, _, value = override.partition("=")
        overrides[key.lstrip("+")] = value if not key.startswith("~") else "~"
    return overrides


def _joined(overrides: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in overrides.items()) or "-"


def split_overrides(jobs: list[dict[str, str]]) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(the overrides every job shares, each job's overrides that vary across the jobs); a key some jobs lack
    varies, with ``-`` where it is missing."""
    keys = list(dict.fromkeys(key for job in jobs for key in job))
    varying = [key for key in keys if len({job.get(key) for job in jobs}) > 1]
    common = {key: jobs[0][key] for key in keys if key not in varying}
    return common, [{key: job.get(key, "-") for key in varying} for job in jobs]


def results_table(jobs: list[dict[str, Any]]) -> list[str]:
    """One line per finished job: family, objective, the overrides that vary across the sweep (a column each),
    parameters, losses, perplexity, bits-per-byte, seconds."""
    if not jobs:
        return []

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    varying = [job.get("varying", {}) for job in jobs]
    shown = ("model", "objective")  # the family and objective columns already tell these apart
    keys = list(dict.fromkeys(key for values in varying for key in values if key not in shown))
    widths = {key: max(len(key), *(len(str(values.get(key, "-"))) for values in varying)) for key in keys}
    varying_header = "".join(f" {key:>{widths[key]}}" for key in keys)
    header = (f"  {'family':<18} {'objective':<16}{varying_header} {'params':>10} {'loss@0':>7} {'val loss':>8} "
              f"{'ppl':>8} {'bpb':>6} {'seconds':>7}")
    lines = ["", header]
    for job, values in zip(jobs, varying):
        r = job["result"]
        cells = "".join(f" {values.get(key, '-')!s:>{widths[key]}}" for key in keys)
        lines.append(f"  {r['family'] or '-':<18} {r['objective'] or '-':<16}{cells} {fmt(r['params'], ',d'):>10} "
                     f"{fmt(r['initial_loss'], '.3f'):>7} {fmt(r['val_loss'], '.4f'):>8} {fmt(r['perplexity'], '.3f'):>8} "
                     f"{fmt(r['bpb'], '.3f'):>6} {fmt(r['seconds'], '.1f'):>7}")
    return lines
