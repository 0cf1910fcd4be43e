"""Evaluation through a checkpoint's own training objective (masked, prefix, span-corruption, denoising):
non-overlapping windows scored as validation scores them, with the objective's masks and accuracies;
the tail that does not fill a window is left out, since these objectives corrupt whole windows."""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader

from lm_lightning.data.datamodule import WindowDataset, WindowSampler
from lm_lightning.errors import UserError
from lm_lightning.evaluation.perplexity import validation_trainer
from lm_lightning.tasks.metrics import LanguageModelMetrics


def objective_scores(task, tokens: np.ndarray, n_bytes: int, batch_size: int = 16, max_batches: int | None = None,
                     accelerator: str = "auto") -> dict[str, float]:
    """loss (nats per predicted token), perplexity, bits_per_byte (objectives that predict the text itself)
    and the objective's accuracies, over the non-overlapping windows of ``tokens``."""
    block = task.model.context_length
    if len(tokens) <= block + 1:
        raise UserError(f"the text has {len(tokens)} tokens, fewer than one window of {block + 1}: use a longer file")
    bytes_per_token = n_bytes / len(tokens) if getattr(task.objective, "bits_per_byte", True) else None
    task.val_metrics = LanguageModelMetrics(bytes_per_token=bytes_per_token)
    sampler = WindowSampler(len(tokens), block, "sequential", seed=0)
    loader = DataLoader(WindowDataset(tokens, block), batch_size=batch_size, sampler=sampler)
    metrics = validation_trainer(accelerator, max_batches).validate(task, dataloaders=loader, verbose=False)[0]
    names = {"val/bpb": "bits_per_byte"}
    return {names.get(k, k.removeprefix("val/")): float(v) for k, v in metrics.items()}
