"""Causal language modelling: predict token t+1 from tokens ≤ t (teacher forcing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # mean negative log-likelihood over predicted tokens, nats
    nll_sum: torch.Tensor  # summed NLL over predicted tokens, nats (detached)
    n_tokens: torch.Tensor  # number of predicted tokens


class CausalLM:
    """Next-token prediction on packed windows (B, T + 1): inputs [:, :-1], targets [:, 1:]."""

    name = "causal_lm"
    #: model families this objective fits (checked when the config is composed)
    families = ("gpt",)

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def __call__(self, model: nn.Module, batch: torch.Tensor) -> ObjectiveOutput:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=self.ignore_index, reduction="sum"
        )
        n_tokens = (targets != self.ignore_index).sum()
        return ObjectiveOutput(loss=nll / n_tokens, nll_sum=nll.detach(), n_tokens=n_tokens)
