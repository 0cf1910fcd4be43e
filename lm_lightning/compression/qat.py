"""Quantization-aware training: a checkpoint fine-tuned on its own objective through fake int8 rounding."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from lm_lightning.compression.quantize import prepare_qat
from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.training.job import Job


def quantization_aware_training(cfg: DictConfig, pretrained: LanguageModelTask, data: LMDataModule, activations: bool,
                                layers: list[str] | None, job: Job, checkpoint: Path) -> LanguageModelTask:
    """Fine-tunes a copy of the checkpoint on its own objective with fake int8 linear layers, in ``job``'s
    Trainer (the ``trainer`` group); saves it as an ordinary (fp32) Lightning checkpoint, which ``evaluate``
    and ``generate`` read."""
    task = LanguageModelTask(
        pretrained.hparams.model, pretrained.hparams.objective, optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler),
        bytes_per_token={split: data.bytes_per_token(split) for split in ("train", "val")},
        tokenizer_model=pretrained.tokenizer_model,
    )
    task.model.load_state_dict(pretrained.model.state_dict())
    prepare_qat(task.model, activations, layers)
    trainer = job.build_trainer(enable_checkpointing=False)
    job.fit(task, datamodule=data)
    trainer.save_checkpoint(checkpoint)
    return task.eval()
