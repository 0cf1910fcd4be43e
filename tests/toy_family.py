"""A toy model family for tests/test_capabilities.py, declared by this module alone: a bag-of-embeddings
language model. Position t predicts token t+1 from the mean embedding of tokens ≤ t, through one tanh layer,
so it is causal; it has no blocks and no ``features()``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm_lightning.models.base import LanguageModel, Trait
from lm_lightning.models.options import require_choice, require_positive_ints

FAMILIES = {"bag": frozenset({Trait.CAUSAL})}


@dataclass
class BagConfig:
    vocab_size: int
    block_size: int = 32  # training window, tokens
    n_embd: int = 16  # embedding and hidden width
    family: str = "bag"

    def __post_init__(self) -> None:
        require_choice(self, "family", FAMILIES)
        require_positive_ints(self, "vocab_size", "block_size", "n_embd")


class BagOfEmbeddingsLM(LanguageModel):
    """Token ids (B, T) → next-token logits (B, T, vocab_size)."""

    families = FAMILIES
    config_class = BagConfig

    def __init__(self, config: BagConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.mix = nn.Linear(c.n_embd, c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, idx.size(1) + 1, device=idx.device)[:, None]  # (T, 1): tokens ≤ t
        mean = self.wte(idx).cumsum(1) / counts  # (B, T, n_embd)
        return self.lm_head(torch.tanh(self.mix(mean)))

    def embedding_tables(self) -> list[nn.Module]:
        return [self.wte, self.lm_head]

    def attention_layers(self) -> int:
        return 0
