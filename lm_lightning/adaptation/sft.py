"""Supervised fine-tuning on instructions: the model reads prompt + response and is scored on the
response tokens only.

Each row becomes ``ids = prompt_ids + response_ids + [eos]``. The model reads ``ids[:-1]`` and
predicts ``ids[1:]``; a target is scored when it is a response token (or the final end-of-sequence),
so the prompt shapes what the model reads but never what it is graded on. A prompt takes at most
half the context (it loses its start beyond that); long responses are cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lm_lightning.adaptation.classification import load_backbone
from lm_lightning.adaptation.instructions import Instruction, render_prompt
from lm_lightning.adaptation.optimization import adamw_linear_schedule

IGNORE = -100  # cross_entropy's ignore_index: targets that are not scored


def encode_example(tokenizer, row: Instruction, max_length: int) -> tuple[list[int], int]:
    """(token ids, prompt length) of one row, at most ``max_length + 1`` ids (``max_length`` model
    inputs). A prompt longer than half the room loses its start (its end, the template's response
    header, stays next to the answer); a long response is cut."""
    prompt = tokenizer.encode(render_prompt(row))
    prompt = prompt[-(max_length // 2):] if len(prompt) > max_length // 2 else prompt
    return (prompt + tokenizer.encode(row.output) + [tokenizer.eos_id])[: max_length + 1], len(prompt)


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs (B, T) and targets (B, T) with prompt and padding targets set to ``IGNORE``."""
    width = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.full((len(examples), width), max(pad_id, 0), dtype=torch.long)  # no pad token: id 0, never scored
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(examples):
        seq = torch.tensor(ids)
        inputs[row, : len(ids) - 1] = seq[:-1]
        targets[row, prompt_length - 1 : len(ids) - 1] = seq[prompt_length:]  # position t predicts token t + 1
    return {"inputs": inputs, "targets": targets}


def response_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) over the scored (response) targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


class InstructionTuningTask(L.LightningModule):
    """Fine-tunes a causal LM on prompt → response pairs; logs the response loss and perplexity."""

    def __init__(self, model: Mapping, lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 50,
                 total_steps: int = 1000, backbone_state: Mapping[str, torch.Tensor] | None = None,
                 prepare: Callable[[nn.Module], nn.Module] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone_state", "prepare"])
        self.model = load_backbone(model, backbone_state, prepare)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return response_loss(self(batch["inputs"]), batch["targets"]), int((batch["targets"] != IGNORE).sum())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, scored = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/response_tokens", float(scored), reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, scored = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=scored)  # weighted by scored tokens across batches
        self.log("val/perplexity", loss.exp(), batch_size=scored)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return adamw_linear_schedule(self.model, hp.lr, hp.weight_decay, hp.warmup_steps, hp.total_steps)


class InstructionData(L.LightningDataModule):
    """Encoded instruction rows as batches {inputs, targets}."""

    def __init__(self, train: list[tuple[list[int], int]], val: list[tuple[list[int], int]], batch_size: int,
                 pad_id: int, seed: int = 0) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.pad_id, self.seed = train, val, batch_size, pad_id, seed

    def _collate(self, examples: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        return sft_batch(examples, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=self._collate, drop_last=len(self.train) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self._collate)
