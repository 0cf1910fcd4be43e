"""What ``lm-lightning quantize`` measures of each model: size, validation metrics on the checkpoint's own
corpus, and CPU tokens/s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig
from torch import nn

from lm_lightning.compression.quantize import (
    forward_tokens_per_second,
    generation_tokens_per_second,
    linear_weight_bytes,
    state_dict_bytes,
)
from lm_lightning.config.app import plain
from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.errors import UserError
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.tasks.metrics import LanguageModelMetrics


def checkpoint_data(cfg: DictConfig, task: LanguageModelTask, ckpt_path: str) -> LMDataModule:
    """The prepared corpus of ``cfg.data`` in windows of the model's context; its tokenizer must be the
    checkpoint's, or the perplexities would be of another text."""
    cfg.data.block_size = task.model.context_length
    data: LMDataModule = hydra.utils.instantiate(cfg.data, tokenizer=plain(cfg.tokenizer))
    if Path(data.corpus.tokenizer_path).read_bytes() != task.tokenizer_model:
        raise UserError(f"the tokenizer of data={cfg.data.corpus.name} with these tokenizer settings is not the one "
                        f"inside {ckpt_path}: pass the data and tokenizer settings the checkpoint was trained with "
                        "(for the gutenberg_small GPT: experiment=quant_ptq or experiment=quant_qat)")
    return data


def validation_metrics(task: LanguageModelTask, model: nn.Module, data: LMDataModule,
                       max_batches: int | None) -> dict[str, float]:
    """val/{loss, perplexity, bpb} of ``model`` under ``task``'s objective on the data's val split, as
    ``lm-lightning train`` and ``evaluate`` report them."""
    own_model, task.model = task.model, model
    task.val_metrics = LanguageModelMetrics(bytes_per_token=data.bytes_per_token("val"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, limit_val_batches=max_batches or 1.0,
                        enable_model_summary=False, enable_checkpointing=False, enable_progress_bar=False)
    try:
        metrics = trainer.validate(task, dataloaders=data.val_dataloader(), verbose=False)[0]
    finally:
        task.model = own_model
    return {k: float(v) for k, v in metrics.items()}


def measure(task: LanguageModelTask, model: nn.Module, data: LMDataModule, cfg: DictConfig) -> dict[str, Any]:
    """Size (bytes) and validation metrics of one model."""
    return {"linear_weight_bytes": linear_weight_bytes(model), "state_dict_bytes": state_dict_bytes(model),
            "val": validation_metrics(task, model, data, cfg.max_val_batches)}


def speeds(models: dict[str, nn.Module], speed: DictConfig) -> dict[str, dict[str, float | None]]:
    """CPU tokens/s of each model's forward pass over full-context windows and of greedy generation,
    the models timed in turns."""
    context = next(iter(models.values())).context_length
    forward = forward_tokens_per_second(models, speed.batch_size, context, speed.repeats)
    generation = generation_tokens_per_second(models, speed.new_tokens, speed.repeats) if speed.new_tokens else {}
    return {name: {"forward_tokens_per_s": forward[name], "generation_tokens_per_s": generation.get(name)}
            for name in models}
