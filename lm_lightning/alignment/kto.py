"""Kahneman–Tversky Optimization (Ethayarajh et al. 2024): the policy learns from unpaired completions
marked desirable or undesirable, each judged against a reference point z0, the policy's estimated
KL to the reference (from completions paired with another row's prompt)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lm_lightning.alignment.losses import kto_loss, kto_reference_point, sequence_logprobs
from lm_lightning.alignment.policy import PolicyTask


class KTOTask(PolicyTask):
    """Batches of unpaired rows (completions, then the same prompts with mismatched completions), with
    the reference's log-probabilities of both cached in them, and ``desirable`` (B,). Logs
    ``train/loss``, ``train/kl_reference_point`` (z0, nats per sequence) and the mean implicit reward
    of the desirable and the undesirable rows; validation on held-out pairs as in :class:`PolicyTask`."""

    def __init__(self, policy: nn.Module, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 optimizer: Callable[..., Any] | None = None, scheduler: Callable[..., Any] | None = None) -> None:
        super().__init__(policy, beta, optimizer, scheduler)
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, mask = batch["ids"].chunk(2), batch["response_mask"].chunk(2)
        reference, reference_mismatched = self.cached_reference(batch).chunk(2)
        policy = sequence_logprobs(self.policy(ids[0]), ids[0], mask[0])
        with torch.no_grad():  # z0 is detached: its sequences need no backward pass
            mismatched = sequence_logprobs(self.policy(ids[1]), ids[1], mask[1])
        z0 = kto_reference_point(mismatched, reference_mismatched)
        desirable = batch["desirable"]
        losses, rewards = kto_loss(policy, reference, desirable, z0, self.beta, self.desirable_weight,
                                   self.undesirable_weight)
        loss, n = losses.mean(), desirable.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/kl_reference_point", z0, batch_size=n)
        for name, rows in (("desirable", desirable), ("undesirable", ~desirable)):
            if rows.any():
                self.log(f"train/reward_{name}", rewards[rows].mean(), batch_size=int(rows.sum()))
        return loss
