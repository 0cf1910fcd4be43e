"""Recurrent language models: tanh Elman RNN, LSTM (Hochreiter & Schmidhuber 1997) and GRU (Cho et al. 2014).

Token ids (B, T) → embedding (B, T, d) → ``n_layer`` stacked recurrent layers of width d → vocabulary head.
Unidirectional models are causal and generate with a cache that holds the hidden state; a bidirectional
model reads the whole sequence both ways (for masked LM) and cannot generate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.models.base import LanguageModel, Trait
from lm_lightning.models.options import require_choice, require_dropout, require_positive_ints

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}  # nn.RNN is the tanh Elman cell
#: each cell reads left to right, or (model.bidirectional=true, its own family) both ways
FAMILIES = {**{cell: frozenset({Trait.CAUSAL}) for cell in CELLS},
            **{f"bidirectional {cell}": frozenset({Trait.BIDIRECTIONAL}) for cell in CELLS}}


@dataclass
class RecurrentConfig:
    vocab_size: int
    family: str = "lstm"  # rnn | lstm | gru
    block_size: int = 128  # training window, tokens (a recurrence has no hard context limit)
    n_layer: int = 2
    n_embd: int = 128  # embedding and hidden-state width d
    dropout: float = 0.0  # on embeddings, between layers and before the head
    bidirectional: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.1  # embeddings and linear layers; 0.02 (GPT's) makes small inputs that learn slowly

    def __post_init__(self) -> None:
        require_choice(self, "family", CELLS)
        require_positive_ints(self, "vocab_size", "block_size", "n_layer", "n_embd")
        require_dropout(self)


@dataclass
class RecurrentCache:
    """The recurrent state after ``length`` tokens: h (and c for an LSTM), each (n_layer, B, d)."""

    h: torch.Tensor
    c: torch.Tensor | None = None
    length: int = 0

    def state(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.h if self.c is None else (self.h, self.c)

    def update(self, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor], consumed: int) -> None:
        self.h, self.c = state if isinstance(state, tuple) else (state, None)
        self.length += consumed

    def reorder(self, order: torch.Tensor) -> None:
        """Keeps batch rows ``order`` (beam search): the batch is dimension 1 of the state."""
        self.h = self.h[:, order]
        if self.c is not None:
            self.c = self.c[:, order]


class RecurrentLM(LanguageModel):
    """Token ids (B, T) → logits (B, T, vocab_size): next-token logits when causal, per-position
    logits from both directions when bidirectional."""

    families = FAMILIES
    config_class = RecurrentConfig

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.rnn = CELLS[c.family](
            c.n_embd, c.n_embd, c.n_layer, batch_first=True,
            dropout=c.dropout if c.n_layer > 1 else 0.0, bidirectional=c.bidirectional,
        )
        # both directions' states (2d) are projected back to d so the head can share the embedding table
        self.proj = nn.Linear(2 * c.n_embd, c.n_embd) if c.bidirectional else None
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, std=c.init_std)
        nn.init.normal_(self.lm_head.weight, std=c.init_std)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=c.init_std)
            nn.init.zeros_(self.proj.bias)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # Press & Wolf 2017; the recurrent cells keep PyTorch's init

    @classmethod
    def build(cls, family: str = "lstm", **fields: Any) -> RecurrentLM:
        """Hydra entry point: ``family`` (rnn | lstm | gru) and RecurrentConfig fields."""
        return cls(RecurrentConfig(family=family, **fields))

    @classmethod
    def family_key(cls, fields: Mapping[str, Any]) -> str:
        """The cell, or ``bidirectional <cell>``: a model that reads both ways trains for other objectives."""
        return f"bidirectional {fields['family']}" if fields.get("bidirectional") else str(fields["family"])

    def forward(self, idx: torch.Tensor, caches: list[RecurrentCache] | None = None) -> torch.Tensor:
        """idx: (B, T) token ids; caches: ``new_caches()`` when decoding incrementally (updated in place)."""
        x = self.drop(self.wte(idx))  # (B, T, d)
        if caches:
            if not self.causal:
                raise UserError("a bidirectional recurrent model reads the whole sequence and cannot generate")
            out, state = self.rnn(x, caches[0].state())
            caches[0].update(state, idx.size(1))
        else:
            out, _ = self.rnn(x)  # (B, T, d), or (B, T, 2d) when bidirectional
        if self.proj is not None:
            out = self.proj(out)
        return self.lm_head(self.drop(out))

    def new_caches(self, batch: int, like: torch.Tensor) -> list[RecurrentCache]:
        """One cache holding the zero initial state of every layer for ``batch`` sequences."""
        if not self.causal:
            raise UserError("a bidirectional recurrent model is not generative and cannot generate; "
                            "set model.bidirectional=false")
        c = self.config
        zeros = like.new_zeros(c.n_layer, batch, c.n_embd)
        return [RecurrentCache(zeros, zeros.clone() if c.family == "lstm" else None)]

    def embedding_tables(self) -> list[nn.Module]:
        # the token table and the (possibly tied) head are embedding; cells and projection are non-embedding
        return [self.wte, self.lm_head]

    def attention_layers(self) -> int:
        """None: every weight is used once per token, whatever the context."""
        return 0


build_recurrent = RecurrentLM.build  # the Hydra entry point of conf/model/{rnn,lstm,gru}.yaml
