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
    #: set: every parameter (cells included) uniform in ±init_range instead, as Zaremba et al. 2014 (0.1)
    init_range: float | None = None
    head_bias: bool = False  # a bias on the vocabulary head (the paper's softmax layer has one)

    def __post_init__(self) -> None:
        require_choice(self, "family", CELLS)
        require_positive_ints(self, "vocab_size", "block_size", "n_layer", "n_embd")
        require_dropout(self)
        if self.init_range is not None and not self.init_range > 0:
            raise UserError(f"model.init_range={self.init_range} must be positive (or null for init_std)")


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

    def detach(self) -> None:
        """Cuts the graph behind the state: back-propagation stops at this window (truncated BPTT)."""
        self.h = self.h.detach()
        self.c = None if self.c is None else self.c.detach()

    def reset(self, rows: torch.Tensor) -> None:
        """Zeroes the state of the batch rows where ``rows`` (B,) is True (a lane entering a new document)."""
        keep = (~rows).to(self.h.dtype)[None, :, None]
        self.h = self.h * keep
        self.c = None if self.c is None else self.c * keep

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
    #: its state can be carried from one window to the next (data.sampling=streams) when causal
    carries_state = True

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
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.head_bias)
        if c.init_range is not None:  # the cells' weights and biases too, as Zaremba et al. initialise
            for p in self.parameters():
                nn.init.uniform_(p, -c.init_range, c.init_range)
        else:
            nn.init.normal_(self.wte.weight, std=c.init_std)
            nn.init.normal_(self.lm_head.weight, std=c.init_std)
            if self.lm_head.bias is not None:
                nn.init.zeros_(self.lm_head.bias)
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

    def forward(self, idx: torch.Tensor, caches: list[RecurrentCache] | None = None,
                resets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids; caches: ``new_caches()`` to start from and update the carried state (decoding,
        or training on streams); resets: (B, T) bool, True where a row's state is zeroed before that token."""
        x = self.drop(self.wte(idx))  # (B, T, d)
        if caches:
            if not self.causal:
                raise UserError("a bidirectional recurrent model reads the whole sequence and cannot generate")
            out = self._carry(x, caches[0], resets)
        else:
            out, _ = self.rnn(x)  # (B, T, d), or (B, T, 2d) when bidirectional
        if self.proj is not None:
            out = self.proj(out)
        return self.lm_head(self.drop(out))

    def _carry(self, x: torch.Tensor, cache: RecurrentCache, resets: torch.Tensor | None) -> torch.Tensor:
        """Reads x (B, T, d) from the cache's state, updating it; the cells run once per stretch between the
        positions where some row resets, since a fused cell cannot zero one row mid-sequence."""
        cuts = [] if resets is None else resets[:, 1:].any(0).nonzero().flatten().add(1).tolist()
        outs = []
        for start, end in zip([0, *cuts], [*cuts, x.size(1)]):
            if resets is not None:
                cache.reset(resets[:, start])
            out, state = self.rnn(x[:, start:end], cache.state())
            cache.update(state, end - start)
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

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
