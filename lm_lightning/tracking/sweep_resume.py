"""Resumable multiruns: the same sweep re-run with ``resume_sweep=true hydra.sweep.dir=<its folder>`` skips the jobs
that finished, resumes the interrupted ones from their own ``last.ckpt`` and runs the rest.

    lm-lightning train -m experiment=tiny model.n_layer=1,2,3 hydra.sweep.dir=outputs/depths            # killed at job 2
    lm-lightning train -m experiment=tiny model.n_layer=1,2,3 hydra.sweep.dir=outputs/depths resume_sweep=true

A job's folder is ``<sweep>/<job number>_<overrides>`` (``hydra.sweep.subdir``), so the same command line finds the
same folders. Each multirun job that returns keeps its return value in ``<job>/job_return.json``: a finished job hands
that back to the sweep (its summary row, or the objective a sweeper optimises) without running or touching its
``run.json``. An interrupted job (killed, or stopped by a signal) continues with ``ckpt_path=last`` in its folder,
and so with the W&B run id kept there (``<job>/wandb_run_id``, lm_lightning/tracking/wandb.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lm_lightning.errors import UserError
from lm_lightning.tracking.sweep import _first_rank

log = logging.getLogger("lm_lightning")

RETURN_FILE = "job_return.json"  # in each job's folder: what the job's command returned
# commands whose ``ckpt_path=last`` continues a run from <job>/checkpoints/last.ckpt (the others' ckpt_path names
# the model they start from, so an interrupted job of theirs runs again from its start)
RESUMES_FROM_LAST = ("train", "distill")


def run_job(command: Callable[[DictConfig], Any], cfg: DictConfig, config_name: str, multirun: bool) -> Any:
    """``command(cfg)``. A multirun job keeps what it returns in ``<job>/job_return.json``; with ``resume_sweep``
    true, a job that finished before is not run again and an interrupted one resumes from its last.ckpt."""
    if not multirun:
        if cfg.get("resume_sweep"):
            raise UserError("resume_sweep=true is for multiruns (-m ... hydra.sweep.dir=<the sweep folder>); "
                            "a single run resumes with hydra.run.dir=<its folder> ckpt_path=last")
        return command(cfg)
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("resume_sweep"):
        _check_same_folders()
        finished, value = earlier_result(job_dir)
        number = HydraConfig.get().job.num
        if finished:
            log.info("resume_sweep: job #%s finished before (%s); not run again", number, job_dir)
            return value
        if config_name in RESUMES_FROM_LAST and (job_dir / "checkpoints" / "last.ckpt").exists():
            log.info("resume_sweep: job #%s resumes from %s", number, job_dir / "checkpoints" / "last.ckpt")
            with open_dict(cfg):
                cfg.ckpt_path = "last"
        else:
            log.info("resume_sweep: job #%s runs from its start", number)
    if _first_rank():  # an earlier sweep's value in a reused folder must not mark this run, if it is cut short, done
        (job_dir / RETURN_FILE).unlink(missing_ok=True)
    value = command(cfg)
    keep_result(job_dir, value)
    return value


def earlier_result(job_dir: Path) -> tuple[bool, Any]:
    """(whether the job in ``job_dir`` finished, what it returned, None if not). Finished: it returned (``job_return.json``) and
    its run record, when it writes one, says ``finished`` (a run stopped by a signal returns too, unfinished)."""
    try:
        value = json.loads((job_dir / RETURN_FILE).read_text())["value"]
    except (OSError, ValueError, KeyError):  # never returned (killed, crashed), or written before this existed
        return False, None
    try:
        status = json.loads((job_dir / "run.json").read_text()).get("status", "finished")
    except OSError:  # a command that keeps no run record
        status = "finished"
    except ValueError:
        return False, None
    return (True, value) if status == "finished" else (False, None)


def keep_result(job_dir: Path, value: Any) -> None:
    """Writes ``<job>/job_return.json`` atomically (the first rank of a several-process job only)."""
    if not _first_rank():
        return
    partial = job_dir / f".{RETURN_FILE}.partial"
    partial.write_text(json.dumps({"value": value}, indent=2, default=str))
    os.replace(partial, job_dir / RETURN_FILE)


def _check_same_folders() -> None:
    """The option must stay out of the job folders' names, or the re-run would look in folders that never ran."""
    if "resume_sweep" not in HydraConfig.get().job.config.override_dirname.exclude_keys:
        raise UserError("resume_sweep is part of the job folders' names here: add it to "
                        "hydra.job.config.override_dirname.exclude_keys of this command's config")
