"""Encoder-only transformer (BERT; Devlin et al. 2019): bidirectional attention over the whole window,
token + position + segment embeddings, a masked-LM head and a [CLS] pooler for sentence-pair tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.models.base import LanguageModel, Trait
from lm_lightning.models.layers import (
    Block,
    build_norm,
    init_normal,
    padding_mask,
    scale_residual_projections,
)
from lm_lightning.models.options import require_block_options, require_choice, require_positive_ints

#: bidirectional over the whole window, with a [CLS] head for sentence pairs
FAMILIES = {"bert": frozenset({Trait.BIDIRECTIONAL, Trait.SENTENCE_PAIR})}


@dataclass
class EncoderConfig:
    vocab_size: int
    block_size: int = 128  # longest input, tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"
    norm_position: str = "post"  # post (BERT) | pre
    activation: str = "gelu"
    type_vocab_size: int = 2  # segments (sentence A / B)
    tie_embeddings: bool = True
    init_std: float = 0.02
    pad_id: int = 0
    family: str = "bert"
    n_experts: int = 0  # > 0: Mixture-of-Experts feed-forward in every block
    moe_top_k: int = 2  # experts per token
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss (read by the training task)

    def __post_init__(self) -> None:
        require_positive_ints(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "type_vocab_size")
        require_block_options(self)
        require_choice(self, "family", FAMILIES)


class Encoder(LanguageModel):
    """Token ids (B, T) → per-token vocabulary logits (B, T, V), and with ``return_pooled`` also the
    next-sentence logits (B, 2) from the [CLS] (first) position. Padding (``pad_id``) is never attended to."""

    families = FAMILIES
    config_class = EncoderConfig
    block_lists = ("h",)

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.wse = nn.Embedding(c.type_vocab_size, c.n_embd)
        # post-norm blocks normalise their inputs nowhere, so BERT normalises the embeddings
        self.ln_emb = build_norm(c.norm, c.n_embd, c.bias) if c.norm_position == "post" else nn.Identity()
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.mlp_ratio, c.activation, c.norm, c.norm_position, c.bias, c.dropout,
                  n_experts=c.n_experts, moe_top_k=c.moe_top_k)
            for _ in range(c.n_layer)
        )
        self.ln_f = build_norm(c.norm, c.n_embd, c.bias) if c.norm_position == "pre" else nn.Identity()
        # masked-LM head: transform, normalise, project to the vocabulary
        self.mlm_dense = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.mlm_norm = build_norm(c.norm, c.n_embd, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        # sentence-pair head on [CLS]
        self.pooler = nn.Linear(c.n_embd, c.n_embd)
        self.nsp_head = nn.Linear(c.n_embd, 2)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_normal(self, c.init_std)
        scale_residual_projections(self, c.init_std, 2 * c.n_layer)

    def encode(self, idx: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Contextual states (B, T, C)."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        x = x + self.wse(segment_ids if segment_ids is not None else torch.zeros_like(idx))
        x = self.drop(self.ln_emb(x))
        mask = padding_mask(idx != self.config.pad_id)
        for block in self.h:
            x = block(x, causal=False, mask=mask)
        return self.ln_f(x)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """The final hidden states (B, T, n_embd) (task heads read them)."""
        return self.encode(idx)

    def forward(self, idx: torch.Tensor, segment_ids: torch.Tensor | None = None, return_pooled: bool = False):
        x = self.encode(idx, segment_ids)
        logits = self.lm_head(self.mlm_norm(F.gelu(self.mlm_dense(x))))
        if not return_pooled:
            return logits
        return logits, self.nsp_head(torch.tanh(self.pooler(x[:, 0])))

    def embedding_tables(self) -> list[nn.Module]:
        return [self.wte, self.wpe, self.wse, self.lm_head]


build_encoder = Encoder.build  # the Hydra entry point of conf/model/bert.yaml: Encoder(EncoderConfig(**fields))
