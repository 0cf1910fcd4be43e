"""``lm-lightning evaluate ckpt_path=<file.ckpt> text_file=<file.txt>``: loss, perplexity, bits-per-byte."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lm_lightning.data.datamodule import WindowDataset, WindowSampler
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.training.loading import load_trained
from lm_lightning.tasks.metrics import LanguageModelMetrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Scores non-overlapping context-length windows of the file; returns val/{loss,perplexity,bpb}."""
    set_threads(cfg.get("num_threads"))
    path = Path(cfg.text_file)
    if not path.is_file():
        raise UserError(f"text file not found: {path} (pass text_file=<an existing UTF-8 text file>)")
    task, tokenizer = load_trained(cfg.ckpt_path)
    text = path.read_text(encoding="utf-8")
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    block = task.model.config.block_size
    if len(tokens) <= block + 1:
        raise UserError(f"{path} has {len(tokens)} tokens, fewer than one window of {block + 1}: use a longer file")
    n_bytes = len(text.encode("utf-8"))
    # bits-per-byte only where the objective predicts the text itself
    bpt = n_bytes / len(tokens) if getattr(task.objective, "bits_per_byte", True) else None
    task.val_metrics = LanguageModelMetrics(bytes_per_token=bpt)
    sampler = WindowSampler(len(tokens), block, "sequential", seed=0)
    loader = DataLoader(WindowDataset(tokens, block), batch_size=cfg.batch_size, sampler=sampler)
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, limit_val_batches=cfg.max_batches or 1.0,
                        enable_model_summary=False, enable_checkpointing=False)
    metrics = {k: float(v) for k, v in trainer.validate(task, dataloaders=loader, verbose=False)[0].items()}
    print(
        f"{path}: {len(tokens):,} tokens, {n_bytes:,} bytes | loss {metrics['val/loss']:.4f} nats/token | "
        f"perplexity {metrics['val/perplexity']:.3f} | "
        + (f"bits-per-byte {metrics['val/bpb']:.4f}" if "val/bpb" in metrics else f"objective {task.objective.name}")
        + "".join(f" | {k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items() if k.endswith("accuracy")),
        flush=True,
    )
    return metrics


@hydra_command("evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate(cfg)["val/loss"]


if __name__ == "__main__":
    main()
