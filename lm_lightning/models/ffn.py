"""Fixed-window feed-forward language model (Bengio et al. 2003).

Position t predicts token t+1 from the embeddings of tokens t-window+1..t, concatenated oldest first
(window·d features), through ``n_layer`` hidden layers and a projection back to d, then the vocabulary
head. Window slots before the start of the sequence hold one learned padding embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lm_lightning.models.base import LanguageModel, Trait
from lm_lightning.models.options import require_choice, require_dropout, require_positive_ints

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
FAMILIES = {"ffn": frozenset({Trait.CAUSAL})}  # each prediction reads the window that ends at it


@dataclass
class FFNConfig:
    vocab_size: int
    block_size: int = 128  # training window, tokens (the model itself sees only ``window`` of them)
    window: int = 8  # tokens each prediction sees, the current one included
    n_layer: int = 2  # hidden layers
    n_embd: int = 128  # embedding width d
    hidden: int = 512  # hidden-layer width
    activation: str = "tanh"  # tanh (Bengio et al.) | relu | gelu
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.1  # embeddings and linear layers; 0.02 (GPT's) makes small inputs that learn slowly
    family: str = "ffn"

    def __post_init__(self) -> None:
        require_choice(self, "family", FAMILIES)
        require_positive_ints(self, "vocab_size", "block_size", "window", "n_layer", "n_embd", "hidden")
        require_choice(self, "activation", ACTIVATIONS)
        require_dropout(self)


@dataclass
class WindowCache:
    """The last window-1 token ids before the pending ones, (B, window-1); -1 marks "before the start"."""

    tokens: torch.Tensor
    length: int = 0

    def reorder(self, order: torch.Tensor) -> None:
        """Keeps batch rows ``order`` (beam search)."""
        self.tokens = self.tokens[order]


class FFNLM(LanguageModel):
    """Token ids (B, T) → next-token logits (B, T, vocab_size); causal, with a window of ``window`` tokens."""

    families = FAMILIES
    config_class = FFNConfig

    @classmethod
    def build(cls, family: str = "ffn", **fields: Any) -> FFNLM:
        """Hydra entry point: FFNConfig fields (``family`` first, for symmetry with the recurrent builder)."""
        return cls(FFNConfig(family=family, **fields))

    def __init__(self, config: FFNConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpad = nn.Embedding(1, c.n_embd)  # stands in for tokens before the sequence start
        layers: list[nn.Module] = []
        width = c.window * c.n_embd
        for _ in range(c.n_layer):
            layers += [nn.Linear(width, c.hidden), ACTIVATIONS[c.activation](), nn.Dropout(c.dropout)]
            width = c.hidden
        self.mlp = nn.Sequential(*layers)
        self.c_proj = nn.Linear(c.hidden, c.n_embd)  # back to d so the head can share the embedding table
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, caches: list[WindowCache] | None = None) -> torch.Tensor:
        """idx: (B, T) token ids; caches: ``new_caches()`` when decoding incrementally (updated in place)."""
        B, T = idx.shape
        w = self.config.window
        history = caches[0].tokens if caches else idx.new_full((B, w - 1), -1)
        ids = torch.cat([history, idx], dim=1)  # (B, w-1+T)
        x = torch.where((ids >= 0)[..., None], self.wte(ids.clamp(min=0)), self.wpad.weight[0])
        # window ending at each new token: (B, T, d, w) → (B, T, w, d) → (B, T, w·d), oldest first
        x = x.unfold(1, w, 1).transpose(2, 3).flatten(2)
        if caches:
            caches[0].tokens = ids[:, ids.size(1) - (w - 1) :]
            caches[0].length += T
        return self.lm_head(self.c_proj(self.mlp(x)))

    def new_caches(self, batch: int, like: torch.Tensor) -> list[WindowCache]:
        """One cache with an empty history for ``batch`` sequences."""
        tokens = torch.full((batch, self.config.window - 1), -1, dtype=torch.long, device=like.device)
        return [WindowCache(tokens)]

    def embedding_tables(self) -> list[nn.Module]:
        # token table, padding vector and the (possibly tied) head are embedding
        return [self.wte, self.wpad, self.lm_head]

    def attention_layers(self) -> int:
        """None: the window is fixed, so the cost per token does not depend on the context."""
        return 0


build_ffn = FFNLM.build  # the Hydra entry point of conf/model/ffn.yaml
