"""Decoder-only transformer (GPT), read top to bottom as the architecture.

Names follow nanoGPT (n_layer, n_head, n_embd, c_attn, c_proj) so the two are easy to compare.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.models.counting import ParameterCount, count_parameters, training_flops_per_token
from lm_lightning.models.layers import Block, KVCache, PositionBias, Rotary, build_norm, sinusoidal_table

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # context length, tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    activation: str = "gelu"  # gelu | relu | swiglu
    position: str = "learned"  # learned | sinusoidal | rope | alibi | t5 | none
    relative_buckets: int = 32  # t5: relative-distance buckets
    relative_max_distance: int = 128  # t5: distances beyond this share the last bucket
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.position not in POSITIONS:
            raise UserError(f"model.position={self.position!r}: choose one of {', '.join(POSITIONS)}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError("model.position=rope needs an even head size (n_embd / n_head)")


class GPT(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.position == "learned" else None
        if c.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
        rotary = Rotary(c.n_embd // c.n_head, c.block_size, c.rope_base) if c.position == "rope" else None
        self.position_bias = (
            PositionBias(c.position, c.n_head, c.relative_buckets, c.relative_max_distance)
            if c.position in ("alibi", "t5") else None
        )
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.mlp_ratio, c.activation, c.norm, c.norm_position, c.bias, c.dropout, rotary)
            for _ in range(c.n_layer)
        )
        # post-norm blocks end in a norm already; pre-norm needs one before the head
        self.ln_f = build_norm(c.norm, c.n_embd, c.bias) if c.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            # input and output embeddings share one matrix (Press & Wolf 2017): fewer parameters, better perplexity
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # residual projections scaled by 1/sqrt(2·n_layer): each block adds two residual branches,
        # so this keeps the residual stream's variance from growing with depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=c.init_std / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """idx: (B, T) token ids; caches: one KVCache per layer when decoding incrementally."""
        T = idx.size(1)
        start = caches[0].length if caches else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoid[start : start + T]
        x = self.drop(x)
        bias = self.position_bias(start, T, start + T, causal=True, dtype=x.dtype) if self.position_bias else None
        for i, block in enumerate(self.h):
            x = block(x, causal=True, cache=caches[i] if caches else None, bias=bias)
        return self.lm_head(self.ln_f(x))

    def new_caches(self, batch: int, like: torch.Tensor) -> list[KVCache]:
        """Empty KV caches for ``batch`` sequences up to the full context length."""
        c = self.config
        return [KVCache.empty(batch, c.n_head, c.block_size, c.n_embd // c.n_head, like) for _ in range(c.n_layer)]

    def parameter_count(self) -> ParameterCount:
        # vocabulary and position tables (learned, or T5's bucket biases) are "embedding"; an untied output head is a vocabulary
        # table too, so N (non-embedding) is the same whether or not the head is tied
        tables = [self.wte, self.lm_head] + [m for m in (self.wpe, self.position_bias) if m is not None]
        return count_parameters(self, tables)

    def flops_per_token(self, context: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token at the given (default: full) context."""
        c = self.config
        return training_flops_per_token(
            self.parameter_count().non_embedding, c.n_embd * c.vocab_size, c.n_layer, c.n_embd, context or c.block_size
        )

    @property
    def context_length(self) -> int:
        return self.config.block_size

    def describe(self) -> dict:
        return {"architecture": "gpt", **asdict(self.config), **self.parameter_count().as_dict()}


def build_gpt(**kwargs) -> GPT:
    """Hydra entry point: ``_target_: lm_lightning.models.gpt.build_gpt`` with GPTConfig fields."""
    return GPT(GPTConfig(**kwargs))
