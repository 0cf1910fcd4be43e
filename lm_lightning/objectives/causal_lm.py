"""Causal language modelling: predict token t+1 from tokens ≤ t (teacher forcing)."""

from __future__ import annotations

import torch
from torch import nn

from lm_lightning.models.base import Trait
from lm_lightning.objectives.base import Objective, ObjectiveOutput, output, token_nll

__all__ = ["CausalLM", "ObjectiveOutput"]


class CausalLM(Objective):
    """Next-token prediction on packed windows (B, T + 1): inputs [:, :-1], targets [:, 1:]."""

    name = "causal_lm"
    requires = frozenset({Trait.CAUSAL})
    bits_per_byte = True

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        nll, n_tokens = token_nll(model(inputs), targets)
        return output(nll, n_tokens)
