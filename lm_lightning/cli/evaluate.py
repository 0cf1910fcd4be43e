"""``lm-lightning evaluate ckpt_path=<file.ckpt> text_file=<file.txt> [stride=<tokens>] [stateful=true]``:
loss, perplexity per token and per word, bits-per-byte of a checkpoint on a text file prepared as its
training corpus was. The figures are printed on one line and written to the run folder's ``run.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.errors import UserError
from lm_lightning.evaluation.objective import objective_scores
from lm_lightning.evaluation.perplexity import report, score_stream, summary_line
from lm_lightning.evaluation.text import RAW, tokenize_text, training_preparation
from lm_lightning.objectives.causal_lm import CausalLM
from lm_lightning.tracking.records import write_run_record
from lm_lightning.training.loading import load_trained


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Scores ``cfg.text_file`` with ``cfg.ckpt_path``; returns the figures (also in ``<run>/run.json``)."""
    set_threads(cfg.get("num_threads"))
    path = Path(cfg.text_file)
    if not path.is_file():
        raise UserError(f"text file not found: {path} (pass text_file=<an existing UTF-8 text file>)")
    task, tokenizer = load_trained(cfg.ckpt_path)
    preparation = training_preparation(task.hparams, cfg.ckpt_path) if cfg.as_trained else RAW
    text = tokenize_text(path, preparation, tokenizer, cfg.leading_separator)
    words = text.words + (text.line_ends if cfg.line_ends_as_words else 0)
    model = task.model
    if isinstance(task.objective, CausalLM):
        if cfg.stateful and not (getattr(model, "carries_state", False) and model.causal):
            raise UserError(f"stateful=true carries a recurrent model's state; this checkpoint is a "
                            f"{model.config.family} model: leave stateful unset (or use stride=)")
        scores = score_stream(model, text.tokens, model.context_length, cfg.stride, cfg.stateful, cfg.batch_size,
                              cfg.max_batches, cfg.accelerator)
        result = report(scores, len(text.tokens), text.bytes, words)
        line = summary_line(str(path), result)
    else:
        if cfg.stride is not None or cfg.stateful:
            raise UserError(f"stride and stateful score next-token predictions; this checkpoint's objective is "
                            f"{task.objective.name}: leave them unset to score it as validation does")
        result = objective_scores(task, text.tokens, text.bytes, cfg.batch_size, cfg.max_batches, cfg.accelerator)
        line = _objective_line(str(path), result, len(text.tokens), text.bytes, task.objective.name)
    record = {"command": "evaluate", "checkpoint": str(cfg.ckpt_path), "text_file": str(path.resolve()),
              "objective": task.objective.name, "text_preparation": preparation.origin,
              "cleaning": dict(preparation.cleaning), "document_split": preparation.document_split,
              "documents": text.documents, "documents_dropped": text.documents_dropped,
              "leading_separator": bool(cfg.leading_separator),
              "line_ends_as_words": bool(cfg.line_ends_as_words), **result}
    write_run_record(Path(HydraConfig.get().runtime.output_dir) / "run.json", record)
    print(f"{line} | text {'as trained: ' if cfg.as_trained else ''}{preparation.origin}", flush=True)
    return record


def _objective_line(name: str, metrics: dict[str, float], n_tokens: int, n_bytes: int, objective: str) -> str:
    bpb = f"bits-per-byte {metrics['bits_per_byte']:.4f}" if "bits_per_byte" in metrics else f"objective {objective}"
    accuracies = "".join(f" | {k} {v:.4f}" for k, v in metrics.items() if k.endswith("accuracy"))
    return (f"{name}: {n_tokens:,} tokens, {n_bytes:,} bytes | loss {metrics['loss']:.4f} nats/token | "
            f"perplexity {metrics['perplexity']:.3f} | {bpb}{accuracies}")


@hydra_command("evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["loss"]


if __name__ == "__main__":
    main()
