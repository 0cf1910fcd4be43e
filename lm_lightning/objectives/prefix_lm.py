"""Prefix language modelling (Raffel et al. 2020; Dong et al. 2019): a random prefix of each window
is read bidirectionally, and the model predicts the rest causally."""

from __future__ import annotations

import torch
from torch import nn

from lm_lightning.models.base import Trait
from lm_lightning.objectives.base import IGNORE, Objective, ObjectiveOutput, output, token_nll
from lm_lightning.objectives.noise_t5 import prefix_split


class PrefixLM(Objective):
    """Windows (B, T + 1): inputs [:, :-1]; a prefix length P per row drawn uniformly; the loss
    covers the targets after the prefix (positions ≥ P − 1 predict tokens ≥ P), which no prefix
    position can see."""

    name = "prefix_lm"
    requires = frozenset({Trait.PREFIX})
    bits_per_byte = True

    def __init__(self, min_prefix: int = 1, vocab_size: int | None = None) -> None:
        super().__init__(vocab_size)
        self.min_prefix = min_prefix

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        inputs, targets = batch[:, :-1], batch[:, 1:].clone()
        prefix = prefix_split(inputs, generator, min_prefix=self.min_prefix)  # (B,)
        positions = torch.arange(inputs.size(1), device=inputs.device)
        targets[positions[None, :] < (prefix[:, None] - 1)] = IGNORE
        nll, n_tokens = token_nll(model(inputs, prefix_lengths=prefix), targets)
        return output(nll, n_tokens)
