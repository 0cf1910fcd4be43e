"""The run record of ``lm-lightning train`` (and ``distill``) and its end-of-run banner: size, tokens and
compute trained, the final validation, throughput, the checkpoints, where the logs are, and the run's provenance
(code commit, package versions, host, devices, start and end times)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from lm_lightning.config.app import plain
from lm_lightning.data.prepared_corpus import unigram_entropy
from lm_lightning.tracking.provenance import now, provenance, throughput, wandb_sync_command

if TYPE_CHECKING:
    from lm_lightning.tasks.language_model import LanguageModelTask
    from lm_lightning.training.job import Job


def training_record(cfg: DictConfig, job: Job, task: LanguageModelTask, corpus, vocab_size: int, family: str,
                    final: dict[str, float], started: str) -> dict[str, Any]:
    """What ``<run>/run.json`` holds after training (``status``, ``seconds`` and ``sample`` are the caller's).
    ``started``: when the command began (ISO 8601); ``ended`` is now, after the final validation."""
    trainer = job.trainer
    params, flops_per_token = task.model.parameter_count(), task.model.flops_per_token()
    tokens = trainer.global_step * task.tokens_per_step
    checkpoint_dir = job.output_dir / "checkpoints"
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.best_model_path), "")
    last = checkpoint_dir / "last.ckpt"  # none after a fast dev run (debug=fdr) or a run stopped before its first step
    csv_dir = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    return {
        "run_name": job.run_name,
        "group": job.group,
        "family": family,
        "objective": task.objective.name,
        "initial_loss": task.initial_loss,
        "output_dir": str(job.output_dir),
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
        "val_unigram_entropy": unigram_entropy(corpus.tokens("val"), vocab_size),
        "throughput": throughput(trainer, flops_per_token),
        "checkpoints": {"best": best, "last": str(last) if last.exists() else ""},
        "wandb_dir": job.wandb_dir,
        "csv_dir": csv_dir,
        "corpus_dir": str(corpus.directory),
        "config": plain(cfg),
        "provenance": provenance(trainer),
        "started": started,
        "ended": now(),
    }


def tracker_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The record's size and compute figures for the tracker run's summary (beside ``final/*``)."""
    return {key: record[key] for key in ("parameters", "tokens_trained", "training_flops", "compute", "best",
                                         "throughput")}


def _best_score(trainer) -> float | None:
    scores = [cb.best_model_score for cb in trainer.checkpoint_callbacks if cb.best_model_score is not None]
    return float(min(scores)) if scores else None


def _position_table_size(model) -> int:
    table = getattr(model, "wpe", None)
    return table.weight.numel() if table is not None else 0


def _bits_per_byte(final: dict[str, float]) -> str:
    if "val/bpb" in final:
        return f"bits-per-byte {final['val/bpb']:.4f}"
    if "val/loss" in final:
        return "bits-per-byte n/a (the objective's targets are not the text itself)"
    return "bits-per-byte nan"


def _throughput_lines(figures: dict[str, Any] | None) -> list[str]:
    if not figures:
        return []
    mfu = f", MFU {figures['mfu']:.2%}" if figures["mfu"] is not None else ""
    batches = figures["over_batches"]
    return [f"throughput:      {figures['tokens_per_sec']:,.0f} tokens/s{mfu} "
            f"(over the last {batches} training batch{'es' if batches != 1 else ''})"]


def banner_lines(record: dict[str, Any]) -> list[str]:
    """The end-of-run banner of a training run (between the rules)."""
    final, params = record["final"], record["parameters"]
    lines = [
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
        f"last checkpoint: {record['checkpoints']['last'] or '(none)'}",
        *_throughput_lines(record.get("throughput")),
        f"W&B run folder:  {record['wandb_dir'] or '(W&B off)'}",
        *([f"W&B is offline: upload this run with `{sync}`"] if (sync := wandb_sync_command(record["wandb_dir"])) else []),
        f"CSV log:         {record['csv_dir'] or '(none)'}",
        f"loss curves:     {record.get('loss_plot') or '(none)'}",
        f"run record:      {Path(record['output_dir']) / 'run.json'}",
    ]
    if record.get("sample") is not None:
        lines += ["sample:", record["config"]["sample"]["prompt"] + record["sample"]]
    if record["status"] != "finished":
        lines += [f"{record['status']} at step {record['steps']}: resume with the same command plus "
                  f"hydra.run.dir={record['output_dir']} ckpt_path=last"]
    return lines
