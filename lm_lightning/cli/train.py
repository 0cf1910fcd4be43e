"""``lm-lightning train``: compose a config, prepare the corpus, fit, evaluate, sample, summarise.

    lm-lightning train experiment=shakespeare_char
    lm-lightning train -m model.n_layer=1,2 trainer.max_steps=30
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from lm_lightning.models.capabilities import family_of
from lm_lightning.config.checks import check_train_config
from lm_lightning.data.corpus import unigram_entropy
from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.generation import generate_text, is_generative
from lm_lightning.parallel.setup import build_strategy, check_precision, micro_batch_size, world_size
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, instantiate_group, plain, run_identity, set_threads
from lm_lightning.training.loading import load_trained, resolve_checkpoint
from lm_lightning.scaling.budget import describe_plan, plan_budget, shape_for_depth
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.tracking.records import plot_loss_curves, write_run_record
from lm_lightning.tracking.sweep import sweep_row
from lm_lightning.training.checkpoint_io import AtomicCheckpointIO

log = logging.getLogger("lm_lightning.cli.train")


def train(cfg: DictConfig, task_class: Callable[..., LanguageModelTask] = LanguageModelTask) -> dict[str, Any]:
    """Runs one training job; returns the run record (also written to ``<run>/run.json``).
    ``task_class`` builds the LightningModule from LanguageModelTask's arguments (distillation adds a teacher)."""
    start = start_from_checkpoint(cfg) if cfg.get("init_from") else None
    check_train_config(cfg)
    set_threads(cfg.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
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
    )
    if start is not None:
        start.load_into(task.model)
    params = task.model.parameter_count()
    log.info("model: %s parameters (%s non-embedding), %.3g training FLOPs/token",
             f"{params.total:,}", f"{params.non_embedding:,}", task.model.flops_per_token())

    name, group = run_identity(cfg.experiment_name)
    loggers = instantiate_group(cfg.logger)
    try:
        for logger in loggers:
            logger.log_hyperparams(
                {"config": plain(cfg), "parameters": params.as_dict(), "corpus": corpus.metadata, "run_name": name}
            )
        trainer: L.Trainer = hydra.utils.instantiate(
            cfg.trainer, logger=loggers or False, callbacks=instantiate_group(cfg.callbacks), strategy=strategy,
            plugins=[AtomicCheckpointIO()],
        )
        stopped_by_signal = False
        started = time.perf_counter()
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            # Lightning finished the batch in flight; the last-checkpoint callback saved last.ckpt
            stopped_by_signal = True
        _save_last(trainer, checkpoint_dir / "last.ckpt")

        final = {} if stopped_by_signal else _final_validation(trainer, task, datamodule)
        record = _record(cfg, trainer, task, corpus, tokenizer.vocab_size, final, output_dir, name, group)
        record["status"] = "stopped by signal" if stopped_by_signal else "finished"
        record["seconds"] = round(time.perf_counter() - started, 1)
        if trainer.is_global_zero:
            record["sample"] = None if stopped_by_signal else _sample(cfg, task, tokenizer)
            _finish_tracking(loggers, record, output_dir)
            write_run_record(output_dir / "run.json", record)
            _print_summary(record)
        return record
    except BaseException:
        _abort_tracking(loggers)  # a failed job must not leave its W&B run open for the next job of a sweep
        raise


def _abort_tracking(loggers: list) -> None:
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=1)


def _save_last(trainer: L.Trainer, path: Path) -> None:
    """Makes sure last.ckpt holds the final state (the periodic callback may have saved an earlier step)."""
    saved_steps = [getattr(cb, "_last_global_step_saved", None) for cb in trainer.checkpoint_callbacks
                   if getattr(cb, "save_last", False)]
    if trainer.global_step > 0 and trainer.global_step not in saved_steps:
        trainer.save_checkpoint(path)


def _final_validation(trainer: L.Trainer, task: LanguageModelTask, datamodule: LMDataModule) -> dict[str, float]:
    """Validation metrics of the final weights (re-run unless the last validation was at the final step)."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if not metrics or task.last_val_step != trainer.global_step:
        metrics = {k: float(v) for k, v in trainer.validate(task, datamodule=datamodule, verbose=False)[0].items()}
    return metrics


def _record(cfg, trainer, task, corpus, vocab_size: int, final, output_dir: Path, name: str,
            group: str | None) -> dict[str, Any]:
    params, flops_per_token = task.model.parameter_count(), task.model.flops_per_token()
    tokens = trainer.global_step * task.tokens_per_step
    val_tokens = corpus.tokens("val")
    checkpoint_dir = output_dir / "checkpoints"
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.best_model_path), "")
    wandb_dir = next((lg.experiment.dir for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    csv_dir = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    return {
        "run_name": name,
        "group": group,
        "family": family_of(cfg.model),
        "objective": task.objective.name,
        "initial_loss": task.initial_loss,
        "output_dir": str(output_dir),
        "steps": trainer.global_step,
        "parameters": {**params.as_dict(), "position_table": _position_table_size(task.model)},
        "tokens_trained": tokens,
        "flops_per_token": flops_per_token,
        "training_flops": tokens * flops_per_token,
        "final": final,
        "best": {"val/loss": _best_score(trainer)},
        "compute": {"N": params.non_embedding, "N_total": params.total, "N_active": params.active, "D": tokens,
                    "C": tokens * flops_per_token, "C_6ND": 6 * params.non_embedding * tokens,
                    "C_attention_and_head": tokens * flops_per_token - 6 * params.active_non_embedding * tokens},
        "val_unigram_entropy": unigram_entropy(val_tokens, vocab_size),
        "checkpoints": {"best": best, "last": str(checkpoint_dir / "last.ckpt")},
        "wandb_dir": str(Path(wandb_dir).parent) if wandb_dir else None,
        "csv_dir": csv_dir,
        "corpus_dir": str(corpus.directory),
        "config": plain(cfg),
    }


def _best_score(trainer: L.Trainer) -> float | None:
    scores = [cb.best_model_score for cb in trainer.checkpoint_callbacks if cb.best_model_score is not None]
    return float(min(scores)) if scores else None


def _position_table_size(model) -> int:
    table = getattr(model, "wpe", None)
    return table.weight.numel() if table is not None else 0


def apply_scaling(cfg: DictConfig, model_cfg: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """The ``scaling`` options: the width from the depth by the aspect ratio, and the steps (and, with
    tokens per parameter, the depth) from a compute budget. Updates ``cfg`` so the run record and
    the tracker show the shape and length actually trained."""
    scaling = cfg.get("scaling") or {}
    if scaling.get("compute_budget"):
        plan = plan_budget(model_cfg, float(scaling.compute_budget), tokens_per_step, scaling.aspect_ratio,
                           scaling.head_size, scaling.tokens_per_param)
        shape = {k: getattr(plan, k) for k in ("n_layer", "n_embd", "n_head") if k in model_cfg}
        cfg.trainer.max_steps = plan.steps
        log.info("compute budget: %s", describe_plan(plan, float(scaling.compute_budget)))
    elif scaling.get("aspect_ratio"):
        shape = shape_for_depth(int(model_cfg["n_layer"]), scaling.aspect_ratio, scaling.head_size)
    else:
        return model_cfg
    cfg.model.update(shape)
    return {**model_cfg, **shape}


class Start:
    """Continued pretraining: the weights a run starts from (``init_from``)."""

    def __init__(self, path: str, state: dict[str, torch.Tensor]) -> None:
        self.path, self.state = path, state

    def load_into(self, model: torch.nn.Module) -> None:
        try:
            model.load_state_dict(self.state)
        except RuntimeError as err:
            raise UserError(f"init_from={self.path}: its weights do not fit the model this run builds "
                            f"({str(err).splitlines()[0]}); keep the checkpoint's objective family") from err
        log.info("initialised the model from %s", self.path)


def start_from_checkpoint(cfg: DictConfig) -> Start:
    """Continued pretraining: the run takes ``init_from``'s architecture (the ``model`` group is
    replaced by it) and tokenizer (the new corpus is tokenized with it), and starts from its weights;
    the optimizer, schedule and step count start afresh."""
    pretrained, _ = load_trained(cfg.init_from)
    tokenizers = Path(cfg.paths.cache_dir).expanduser() / "tokenizers"
    tokenizers.mkdir(parents=True, exist_ok=True)
    model_bytes = pretrained.tokenizer_model
    model_file = tokenizers / f"{hashlib.sha256(model_bytes).hexdigest()[:16]}.model"
    if not model_file.is_file():
        model_file.write_bytes(model_bytes)
    with open_dict(cfg):
        cfg.tokenizer = {"model_file": str(model_file)}
        cfg.model = {k: v for k, v in plain(pretrained.hparams.model).items() if k != "vocab_size"}
    return Start(str(cfg.init_from), pretrained.model.state_dict())


def objective_config(objective: DictConfig, tokenizer) -> dict[str, Any]:
    """The objective's config with what only the tokenizer knows: its vocabulary size and, for
    BART's sentence permutation when not given, the ids of pieces that end a sentence."""
    out = {**plain(objective), "vocab_size": tokenizer.vocab_size}
    if "sentence_end_ids" in out and out["sentence_end_ids"] is None:
        out["sentence_end_ids"] = tokenizer.ids_ending_with((".", "!", "?"))
    return out


def _sample(cfg: DictConfig, task: LanguageModelTask, tokenizer) -> str | None:
    if not cfg.sample.max_new_tokens or task.parallelize is not None or not is_generative(task.model):
        # a sharded model's forward needs every rank (sample from the checkpoint instead); encoders do not generate
        return None
    generator = torch.Generator().manual_seed(cfg.seed)
    return generate_text(
        task.model, tokenizer, cfg.sample.prompt, max_new_tokens=cfg.sample.max_new_tokens,
        temperature=cfg.sample.temperature, top_k=cfg.sample.top_k, top_p=cfg.sample.top_p, generator=generator,
    )


def _finish_tracking(loggers: list, record: dict[str, Any], output_dir: Path) -> None:
    """Loss-curve PNG next to the CSV log and in W&B; final figures in the W&B summary; W&B run closed."""
    csv_dir = record.get("csv_dir")
    plot = plot_loss_curves(Path(csv_dir) / "metrics.csv", output_dir / "loss_curves.png") if csv_dir else None
    record["loss_plot"] = str(plot) if plot else None
    for logger in loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            if plot:
                logger.log_image("loss_curves", [str(plot)])
            run.summary.update({f"final/{k}": v for k, v in record["final"].items()})
            run.summary.update({"parameters": record["parameters"], "tokens_trained": record["tokens_trained"],
                                "training_flops": record["training_flops"], "compute": record["compute"],
                                "best": record["best"]})
            run.finish()  # in a multirun each job's run ends before the next job starts


def _bits_per_byte(final: dict[str, float]) -> str:
    if "val/bpb" in final:
        return f"bits-per-byte {final['val/bpb']:.4f}"
    if "val/loss" in final:
        return "bits-per-byte n/a (the objective's targets are not the text itself)"
    return "bits-per-byte nan"


def _print_summary(record: dict[str, Any]) -> None:
    final, params = record["final"], record["parameters"]
    lines = [
        "",
        "=" * 72,
        f"run {record['run_name']}: {record['steps']} steps, {record['tokens_trained']:,} tokens, "
        f"{record['training_flops']:.3g} training FLOPs"
        + (f", continued from {record['config']['init_from']}" if record["config"].get("init_from") else ""),
        f"parameters: {params['total']:,} ({params['total'] / 1e6:.2f}M; {params['non_embedding']:,} non-embedding; "
        f"{params['total'] - params['position_table']:,} = {(params['total'] - params['position_table']) / 1e6:.2f}M "
        "without the position table, as nanoGPT counts)",
        f"final validation ({record['objective']}): loss {final.get('val/loss', math.nan):.4f} nats/token, "  # nan when stopped early
        f"perplexity {final.get('val/perplexity', math.nan):.3f}, " + _bits_per_byte(final),
        *[f"{name.removeprefix('val/')}: {value:.4f}" for name, value in final.items() if name.endswith("accuracy")],
        f"unigram entropy of the validation tokens: {record['val_unigram_entropy']:.4f} nats/token",
        f"best checkpoint: {record['checkpoints']['best'] or '(none)'}",
        f"last checkpoint: {record['checkpoints']['last']}",
        f"W&B run folder:  {record['wandb_dir'] or '(W&B off)'}",
        f"CSV log:         {record['csv_dir']}",
        f"loss curves:     {record.get('loss_plot')}",
        f"run record:      {Path(record['output_dir']) / 'run.json'}",
    ]
    if record.get("sample") is not None:
        lines += ["sample:", record["config"]["sample"]["prompt"] + record["sample"]]
    if record["status"] != "finished":
        lines += [f"{record['status']} at step {record['steps']}: resume with the same command plus "
                  f"hydra.run.dir={record['output_dir']} ckpt_path=last"]
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


@hydra_command("train")
def main(cfg: DictConfig) -> float | None:
    record = train(cfg)
    return sweep_row(record)


if __name__ == "__main__":
    main()
