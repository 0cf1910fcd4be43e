"""Sequence classification on a pre-trained backbone: a pooled representation and a linear head.

By default (``pool="auto"``) a left-to-right backbone (GPT, prefix LM) is pooled at the last real
token (it has read the whole sequence there) and a bidirectional one (BERT) by the mean over real
tokens; ``pool="mean"`` averages a decoder's positions too (each has read the sequence up to it). Sequences end with the
end-of-sequence token, so the last-token pool always reads the same kind of position.

With ``lm_weight`` > 0 a decoder also keeps its next-token loss on the same texts while it learns
the classes, L = L_class + lm_weight · L_LM (Radford et al. 2018, GPT-1's fine-tuning, λ = 0.5).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lm_lightning.adaptation.batching import right_pad
from lm_lightning.adaptation.optimization import adamw_linear_schedule
from lm_lightning.errors import UserError

POOLS = ("auto", "last", "mean")


def read_labelled_tsv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise UserError(f"data file not found: {path} (pass data_file=<a TSV with a header row>)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise UserError(f"{path} has no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise UserError(f"{path} has no column {column!r}: its columns are {', '.join(rows[0])}")
    try:
        labels = [int(row[label_column]) for row in rows]
    except ValueError as err:
        raise UserError(f"{path}: column {label_column!r} must hold integer labels ({err})") from err
    return [row[text_column].strip() for row in rows], labels


class SequenceClassifier(nn.Module):
    """Token ids (B, T) with lengths (B,) → class logits (B, n_classes)."""

    def __init__(self, backbone: nn.Module, n_classes: int, dropout: float = 0.1, pool: str = "auto") -> None:
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"task.pool={pool!r}: choose one of {', '.join(POOLS)}")
        if not hasattr(backbone, "features"):
            family = getattr(getattr(backbone, "config", None), "family", type(backbone).__name__)
            raise UserError(f"a {family} checkpoint cannot take a classification head: use a gpt, prefix_lm or "
                            "bert checkpoint (models with a features() method)")
        self.backbone = backbone
        self.pool_last = getattr(backbone, "causal", True) if pool == "auto" else pool == "last"
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classify(self.backbone.features(ids), lengths)

    def classify(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits from the backbone's hidden states (B, T, C); right padding is invisible to
        real causal positions and left out of the mean."""
        if self.pool_last:
            pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
        else:
            real = (torch.arange(hidden.size(1), device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
            pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return self.head(self.dropout(pooled))

    def with_lm_loss(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, mean next-token cross-entropy over the real tokens) from one backbone pass."""
        lm_head = language_model_head(self.backbone)
        hidden = self.backbone.features(ids)
        targets = ids[:, 1:].masked_fill(torch.arange(1, ids.size(1), device=ids.device)[None] >= lengths[:, None], -100)
        logits = lm_head(hidden[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return self.classify(hidden, lengths), lm_loss


def language_model_head(backbone: nn.Module) -> nn.Module:
    """A left-to-right backbone's next-token head (a soft-prompted GPT's is its inner model's)."""
    head = getattr(backbone, "lm_head", None) or getattr(getattr(backbone, "model", None), "lm_head", None)
    if head is None or not getattr(backbone, "causal", True):
        family = getattr(getattr(backbone, "config", None), "family", type(backbone).__name__)
        raise UserError(f"task.lm_weight needs a left-to-right language model (gpt, prefix_lm); a {family} "
                        "backbone has no next-token head: set task.lm_weight=0")
    return head


class ClassificationTask(L.LightningModule):
    """Fine-tunes a classifier with cross-entropy; reports accuracy (torchmetrics)."""

    def __init__(self, model: Mapping, n_classes: int, dropout: float = 0.1, lr: float = 3e-4,
                 weight_decay: float = 0.01, warmup_steps: int = 100, total_steps: int = 1000, pool: str = "auto",
                 backbone_state: Mapping[str, torch.Tensor] | None = None,
                 prepare: Callable[[nn.Module], nn.Module] | None = None, lm_weight: float = 0.0) -> None:
        """``backbone_state``: pre-trained weights (None trains from scratch); ``prepare(backbone)``
        runs after loading them and returns the backbone to use, e.g. with LoRA and frozen weights.
        The head is added after it, so the head always trains. ``lm_weight``: weight of the auxiliary
        next-token loss on the training texts (0: classification loss only)."""
        super().__init__()
        self.save_hyperparameters(ignore=["backbone_state", "prepare"])
        self.classifier = SequenceClassifier(load_backbone(model, backbone_state, prepare), n_classes, dropout, pool)
        if lm_weight < 0:
            raise UserError(f"task.lm_weight={lm_weight} must be 0 or more")
        if lm_weight:
            language_model_head(self.classifier.backbone)  # refuse a backbone without one before training
        self.train_accuracy = MulticlassAccuracy(n_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(n_classes, average="micro")

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classifier(ids, lengths)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.lm_weight:
            logits, lm_loss = self.classifier.with_lm_loss(batch["ids"], batch["lengths"])
            self.log("train/lm_loss", lm_loss)
        else:
            logits, lm_loss = self(batch["ids"], batch["lengths"]), 0.0
        class_loss = F.cross_entropy(logits, batch["labels"])
        loss = class_loss + self.hparams.lm_weight * lm_loss
        self.train_accuracy(logits, batch["labels"])
        self.log("train/loss", class_loss, prog_bar=True)
        self.log("train/accuracy", self.train_accuracy)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["ids"], batch["lengths"])
        self.log("val/loss", F.cross_entropy(logits, batch["labels"]), prog_bar=True)
        self.val_accuracy(logits, batch["labels"])
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return adamw_linear_schedule(self.classifier, hp.lr, hp.weight_decay, hp.warmup_steps, hp.total_steps)


class TextClassificationData(L.LightningDataModule):
    """Tokenized, length-capped labelled texts as right-padded batches {ids, lengths, labels}."""

    def __init__(self, train: tuple[list[list[int]], list[int]], val: tuple[list[list[int]], list[int]],
                 batch_size: int, pad_id: int, seed: int = 0) -> None:
        super().__init__()
        self.train, self.val, self.batch_size, self.pad_id, self.seed = train, val, batch_size, pad_id, seed

    def _collate(self, rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        ids, lengths = right_pad([seq for seq, _ in rows], self.pad_id)
        return {"ids": ids, "lengths": lengths, "labels": torch.tensor([label for _, label in rows])}

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(list(zip(*self.train)), batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=self._collate, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(list(zip(*self.val)), batch_size=64, collate_fn=self._collate)


def load_backbone(model: Mapping, state: Mapping[str, torch.Tensor] | None,
                  prepare: Callable[[nn.Module], nn.Module] | None) -> nn.Module:
    """The network ``model`` describes, with the pre-trained ``state`` (None: random weights), through ``prepare``."""
    backbone = hydra.utils.instantiate(dict(model))
    if state is not None:
        backbone.load_state_dict(state)
    return prepare(backbone) if prepare is not None else backbone


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to ``max_length − 1`` tokens, then end-of-sequence."""
    return [ids[: max_length - 1] + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)]
