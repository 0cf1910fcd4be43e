"""Fixed-window feed-forward language model (Bengio et al. 2003).

Position t predicts token t+1 from the embeddings of tokens t-window+1..t, concatenated oldest first
(window·d features), through ``n_layer`` hidden layers and a projection back to d, then the vocabulary
head. Window slots before the start of the sequence hold one learned padding embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.models.base import LanguageModel

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


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
        if self.family != "ffn":
            raise UserError(f"model.family={self.family!r}: build_ffn builds only ffn")
        for name in ("vocab_size", "block_size", "window", "n_layer", "n_embd", "hidden"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"model.activation={self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")


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

    causal = True

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


def build_ffn(family: str = "ffn", **fields) -> FFNLM:
    """Hydra entry point: ``_target_: lm_lightning.models.ffn.build_ffn`` with FFNConfig fields."""
    return FFNLM(FFNConfig(family=family, **fields))
