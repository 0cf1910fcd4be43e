"""The skeleton of every training-like command (train, distill, finetune, align with PPO, quantize's QAT):
trackers, Trainer, fit, final validation, tracker summary, run record and end-of-run banner.

    with Job(cfg, {"parameters": ...}) as job:       # loggers from cfg.logger; hyper-parameters logged
        job.build_trainer(callbacks=[...])           # cfg.trainer plus what the command adds
        job.fit(module, datamodule=data)
        final = job.final_validation(module, datamodule=data)
        ...                                          # the command's own checkpoints and figures
        return job.finish(record, banner, final=final, summary={...})

Leaving the ``with`` block by any exception closes the trackers as failed (W&B ``exit_code=1``): in a
multirun the next job then starts its own W&B run instead of logging into this one. TensorBoard and MLflow get
the hyper-parameters with dotted names and, at the finish, the final metrics beside them (``tracking/loggers.py``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from lm_lightning.config.app import instantiate_group, plain, run_identity
from lm_lightning.tracking.loggers import log_final, params_for, viewer_lines
from lm_lightning.tracking.records import write_run_record
from lm_lightning.training import run_lock

log = logging.getLogger("lm_lightning")

RULE = "=" * 72  # frames the end-of-run banner


class Job:
    """One job of a command: owns its loggers (the ``logger`` group) and its Trainer (the ``trainer`` group)."""

    def __init__(self, cfg: DictConfig, hyperparameters: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(HydraConfig.get().runtime.output_dir)
        # before anything is written here (the W&B id file, checkpoints): a second job into this folder stops
        self._locked = run_lock.acquire(self.output_dir)
        self.run_name, self.group = run_identity(cfg.experiment_name)
        try:
            self.loggers: list = instantiate_group(cfg.get("logger"))
        except BaseException:
            self._release()
            raise
        self.hyperparameters = {"config": plain(cfg), **(hyperparameters or {})}
        self.trainer: L.Trainer | None = None
        self._fit_started: float | None = None

    def __enter__(self) -> Self:
        try:
            for logger in self.loggers:
                logger.log_hyperparams(params_for(logger, self.hyperparameters))
        except BaseException:
            self.abort()
            self._release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                self.abort()
        finally:
            self._release()

    def _release(self) -> None:
        if self._locked:
            run_lock.release(self.output_dir)
            self._locked = False

    @property
    def record_path(self) -> Path:
        return self.output_dir / "run.json"

    @property
    def is_global_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    @property
    def wandb_dir(self) -> str | None:
        """The W&B run folder (``<run>/wandb/offline-run-...``); None with W&B off and off the main process."""
        wandb_logger = next((logger for logger in self.loggers if isinstance(logger, WandbLogger)), None)
        if wandb_logger is None or not self.is_global_zero:
            return None
        return str(Path(wandb_logger.experiment.dir).parent)

    def build_trainer(self, **arguments: Any) -> L.Trainer:
        """The ``trainer`` group's Trainer, logging to this job's loggers, with the command's ``arguments``
        (callbacks, strategy, plugins, enable_checkpointing, ...) added or overriding the group."""
        trainer_cfg = self.cfg.get("trainer") or {"_target_": "lightning.pytorch.Trainer"}
        self.trainer = hydra.utils.instantiate(trainer_cfg, logger=self.loggers or False, **arguments)
        return self.trainer

    def fit(self, module: L.LightningModule, **data: Any) -> None:
        """``Trainer.fit``; ``data`` is its datamodule, dataloaders or ckpt_path."""
        self._fit_started = time.perf_counter()
        self.trainer.fit(module, **data)

    def seconds(self) -> float:
        """Seconds since fit started."""
        return time.perf_counter() - self._fit_started

    def final_validation(self, module: L.LightningModule, reuse: bool = False, **data: Any) -> dict[str, float]:
        """Validation metrics of the final weights. ``reuse``: the last validation during fit was of these
        weights, and its metrics stand (a pass runs anyway when there are none)."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if reuse and k.startswith("val/")}
        if not metrics:
            metrics = {k: float(v) for k, v in self.trainer.validate(module, verbose=False, **data)[0].items()}
        return metrics

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Figures computed outside fit, into every logger (W&B history, metrics.csv, ...)."""
        for logger in self.loggers:
            logger.log_metrics(metrics)

    def where(self) -> list[str]:
        """The banner's last lines: where the tracker run and the run record are."""
        return [f"W&B run folder: {self.wandb_dir or '(W&B off)'}", f"run record: {self.record_path}"]

    def finish(self, record: dict[str, Any], banner: list[str], final: dict[str, float] | None = None,
               summary: dict[str, Any] | None = None, images: dict[str, Path | None] | None = None) -> dict[str, Any]:
        """Closes the trackers as finished, writes ``run.json`` and prints the banner (on the main process).

        The W&B summary gets ``final/<metric>`` for each of ``final`` and the ``summary`` items as they are;
        ``images`` (PNG paths, None skipped) are logged to W&B; ``record`` gets ``wandb_dir`` with W&B on.
        TensorBoard and MLflow get ``final/<metric>`` at the last step (TensorBoard: with the hyper-parameters,
        for its HParams tab; MLflow: with the summary's numbers and the images as artifacts)."""
        if not self.is_global_zero:
            return record
        step = self.trainer.global_step if self.trainer is not None else 0
        for logger in self.loggers:
            log_final(logger, self.hyperparameters, final or {}, summary or {}, step, images or {})
        banner = [*banner, *viewer_lines(self.loggers, self._tensorboard_logdir())]
        for logger in self.loggers:
            logger.finalize("success")
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                for key, path in (images or {}).items():
                    if path:
                        logger.log_image(key, [str(path)])
                run.summary.update({f"final/{k}": v for k, v in (final or {}).items()})
                run.summary.update(summary or {})
                record["wandb_dir"] = self.wandb_dir
                run.finish()  # in a multirun each job's run ends before the next job starts
        write_run_record(self.record_path, record)
        print("\n".join(["", RULE, *banner, RULE]), flush=True)
        return record

    def _tensorboard_logdir(self) -> Path:
        """The folder whose runs TensorBoard should show side by side: the sweep's in a multirun, else the run's."""
        hc = HydraConfig.get()
        return Path(hc.sweep.dir).resolve() if hc.mode == RunMode.MULTIRUN else self.output_dir

    def abort(self) -> None:
        """Closes the trackers as failed; never raises (the job's own error is the one to see)."""
        for logger in self.loggers:
            try:
                logger.finalize("failed")
            except Exception:
                log.warning("could not close the %s logger of a failed job", type(logger).__name__, exc_info=True)
        if any(isinstance(logger, WandbLogger) for logger in self.loggers):
            import wandb

            if wandb.run is not None:
                try:
                    wandb.run.finish(exit_code=1)
                except Exception:
                    log.warning("could not close the W&B run of a failed job", exc_info=True)
