"""What the reward-model, DPO and KTO LightningModules share: the optimizer and schedule from config,
and the pairwise metrics of rewards (accuracy, margin, mean reward of each side)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from lm_lightning.tasks.language_model import weight_decay_groups


class PairMetrics(nn.Module):
    """Running means over pairs of rewards (B,) each: accuracy (chosen > rejected), margin
    (chosen − rejected), and the mean chosen and rejected reward."""

    def __init__(self) -> None:
        super().__init__()
        self.accuracy, self.margin = MeanMetric(), MeanMetric()
        self.reward_chosen, self.reward_rejected = MeanMetric(), MeanMetric()

    def forward(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Adds a batch (forward, not update, so a per-step log reads this batch's values)."""
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        self.accuracy((chosen > rejected).float())
        self.margin(chosen - rejected)
        self.reward_chosen(chosen)
        self.reward_rejected(rejected)

    def as_dict(self, prefix: str) -> dict[str, MeanMetric]:
        """Metric objects by logged name, for ``LightningModule.log_dict`` (which computes and resets them)."""
        return {f"{prefix}/{name}": metric for name, metric in self.named_children()}


class AlignmentTask(L.LightningModule):
    """Base of the alignment tasks: ``trainable()`` is the module whose parameters train;
    ``optimizer(params)`` and ``scheduler(optimizer)`` are the partial callables Hydra builds from
    ``conf/optimizer`` and ``conf/scheduler`` (weight decay on matrices only)."""

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer] | None,
                 scheduler: Callable[..., Any] | None) -> None:
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.train_pairs, self.val_pairs = PairMetrics(), PairMetrics()

    def trainable(self) -> nn.Module:
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError(f"{type(self).__name__} was built without an optimizer: it can evaluate but not train")
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        optimizer = self.optimizer_factory(params=weight_decay_groups(self.trainable(), weight_decay))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of an accuracy measured on ``n`` independent pairs."""
    if n <= 0:
        return 0.0, 1.0
    spread = z * z / n
    centre = (accuracy + spread / 2) / (1 + spread)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + spread / (4 * n)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)
