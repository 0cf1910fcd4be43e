"""One training job: compose-time checks, corpus, model, Lightning's Trainer, fit, final validation, sample,
run record and summary. ``lm-lightning train`` (lm_lightning/cli/train.py) imports it once its config has
composed, so a mistaken option is reported before Lightning and the model zoo load."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lm_lightning.models.capabilities import family_of
from lm_lightning.config.checks import check_train_config
from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.generation import generate_text, is_generative
from lm_lightning.generation.sampling import NonFiniteLogits
from lm_lightning.parallel.setup import build_strategy, check_precision, micro_batch_size, world_size
from lm_lightning.config.app import instantiate_group, plain, run_identity, set_threads
from lm_lightning.training.loading import resolve_checkpoint
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.tracking.provenance import now
from lm_lightning.tracking.records import plot_loss_curves
from lm_lightning.tracking.training_record import banner_lines, tracker_summary, training_record
from lm_lightning.training.checkpoint_io import AtomicCheckpointIO
from lm_lightning.training.guards import CtrlCAtStepEnd
from lm_lightning.training.job import RULE, Job
from lm_lightning.training.last_checkpoint import FinalStepCheckpoint, LoggedStepOnResume, save_last
from lm_lightning.training.setup import apply_scaling, objective_config, start_from_checkpoint

log = logging.getLogger("lm_lightning.cli.train")


def train(cfg: DictConfig, task_class: Callable[..., LanguageModelTask] = LanguageModelTask,
          extend: Callable[[dict[str, Any]], list[str]] | None = None) -> dict[str, Any]:
    """Runs one training job; returns the run record (also written to ``<run>/run.json``).
    ``task_class`` builds the LightningModule from LanguageModelTask's arguments (distillation adds a teacher);
    ``extend`` adds a command's own fields to the record and returns the banner lines it prints after train's."""
    started = now()  # the run record's start time
    start = start_from_checkpoint(cfg) if cfg.get("init_from") else None
    check_train_config(cfg)
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    checkpoint_dir = Path(HydraConfig.get().runtime.output_dir) / "checkpoints"
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), checkpoint_dir)

    check_precision(cfg.precision, cfg.trainer.accelerator)
    world = world_size(cfg.trainer.devices, cfg.trainer.num_nodes)
    if cfg.get("global_batch_tokens"):  # the micro-batch follows from the global batch, processes and accumulation
        cfg.data.batch_size = micro_batch_size(cfg.global_batch_tokens, cfg.model.block_size, world,
                                               cfg.trainer.accumulate_grad_batches)
    strategy, parallelize = build_strategy(cfg.strategy)

    datamodule: LMDataModule = hydra.utils.instantiate(cfg.data, tokenizer=plain(cfg.tokenizer))
    corpus = datamodule.corpus
    tokenizer = corpus.tokenizer()
    objective_cfg = objective_config(cfg.objective, tokenizer)
    objective = hydra.utils.instantiate(objective_cfg)
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches * world
    model_cfg = apply_scaling(cfg, {**plain(cfg.model), "vocab_size": objective.model_vocab_size(tokenizer.vocab_size)},
                              tokens_per_step)
    task = task_class(
        model=model_cfg,
        objective=objective_cfg,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler),
        bytes_per_token={split: datamodule.bytes_per_token(split) for split in ("train", "val")},
        tokens_per_step=tokens_per_step,
        tokenizer_model=Path(corpus.tokenizer_path).read_bytes(),
        parallelize=parallelize,
        compile=cfg.get("compile", False),
        text_preparation={"cleaning": plain(cfg.data.corpus.get("cleaning")) or {},
                          "document_split": cfg.data.corpus.source.get("document_split") or "file"},
    )
    if start is not None:
        start.load_into(task.model)
    params = task.model.parameter_count()
    log.info("model: %s parameters (%s non-embedding), %.3g training FLOPs/token",
             f"{params.total:,}", f"{params.non_embedding:,}", task.model.flops_per_token())

    hyperparameters = {"parameters": params.as_dict(), "corpus": corpus.metadata,
                       "run_name": run_identity(cfg.experiment_name)[0]}
    with Job(cfg, hyperparameters) as job:
        last_every = (cfg.get("callbacks") or {}).get("last_checkpoint") or {}
        final_step = FinalStepCheckpoint(checkpoint_dir / "last.ckpt", last_every.get("every_n_train_steps"))
        ctrl_c = CtrlCAtStepEnd()
        trainer = job.build_trainer(callbacks=[*instantiate_group(cfg.callbacks), final_step, LoggedStepOnResume(),
                                               ctrl_c], strategy=strategy, plugins=[AtomicCheckpointIO()])
        stopped_by_signal = interrupted = False
        try:
            job.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            # Lightning finished the batch in flight; the last-checkpoint callback saved last.ckpt. A first Ctrl-C
            # comes this way too (CtrlCAtStepEnd), and then stops the command as Ctrl-C does
            stopped_by_signal, interrupted = True, ctrl_c.pressed
        except SystemExit:
            if not trainer.interrupted:
                raise
            # a second Ctrl-C: Lightning shut down gracefully (the callbacks saved their state) and then exits 1
            # without a word; save last.ckpt and print the resume line as for SIGTERM, then stop the command (and a
            # sweep)
            stopped_by_signal = interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning left Ctrl-C ignored
        if not trainer.fast_dev_run:  # Lightning's fast dev run saves nothing (debug=fdr)
            save_last(trainer, checkpoint_dir / "last.ckpt")

        final = {} if stopped_by_signal else job.final_validation(
            task, reuse=task.last_val_step == trainer.global_step, datamodule=datamodule)
        record = training_record(cfg, job, task, corpus, tokenizer.vocab_size, family_of(cfg.model), final, started)
        record["status"] = "stopped by signal" if stopped_by_signal else "finished"
        record["seconds"] = round(job.seconds(), 1)
        if not job.is_global_zero:
            return record
        record["sample"] = None if stopped_by_signal else _sample(cfg, task, tokenizer)
        csv_dir = record["csv_dir"]
        plot = plot_loss_curves(Path(csv_dir) / "metrics.csv", job.output_dir / "loss_curves.png") if csv_dir else None
        record["loss_plot"] = str(plot) if plot else None
        extra_lines = extend(record) if extend else []
        banner = [*banner_lines(record), *([RULE, *extra_lines] if extra_lines else [])]
        outcome = job.finish(record, banner, final=final, summary=tracker_summary(record), images={"loss_curves": plot})
    if interrupted:
        raise SystemExit(130)  # the shell's status for Ctrl-C: a sweep stops here instead of starting its next job
    return outcome


def _sample(cfg: DictConfig, task: LanguageModelTask, tokenizer) -> str | None:
    if not cfg.sample.max_new_tokens or task.parallelize is not None or not is_generative(task.model):
        # a sharded model's forward needs every rank (sample from the checkpoint instead); encoders do not generate
        return None
    generator = torch.Generator().manual_seed(cfg.seed)
    try:
        return generate_text(
            task.model, tokenizer, cfg.sample.prompt, max_new_tokens=cfg.sample.max_new_tokens,
            temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, generator=generator,
        )
    except NonFiniteLogits as err:  # a diverged run still ends with its record, plot and tracker summary
        log.warning("no sample: %s", err)
        return None
