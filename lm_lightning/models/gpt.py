"""Decoder-only transformer (GPT), read top to bottom as the architecture.

Names follow nanoGPT (n_layer, n_head, n_embd, c_attn, c_proj) so the two are easy to compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.models.base import LanguageModel, Trait
from lm_lightning.models.layers import (
    Block,
    KVCache,
    PositionBias,
    Rotary,
    build_norm,
    init_normal,
    prefix_mask,
    scale_residual_projections,
    sinusoidal_table,
)
from lm_lightning.models.options import (
    require_block_options,
    require_choice,
    require_positive_ints,
    require_positive_numbers,
)

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "t5", "none")
PARAMETRIZATIONS = ("standard", "mup")
#: gpt reads left to right; a prefix LM also reads a prefix of each window bidirectionally
FAMILIES = {"gpt": frozenset({Trait.CAUSAL}), "prefix_lm": frozenset({Trait.CAUSAL, Trait.PREFIX})}


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # context length, tokens
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int | None = None  # key/value heads, dividing n_head (grouped-query attention); None = n_head
    mlp_ratio: float = 4.0
    mlp_hidden: int | None = None  # feed-forward hidden width; None = from mlp_ratio (2/3 of mlp_ratio·n_embd for swiglu)
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    norm_eps: float | None = None  # None = LayerNorm's 1e-5, RMSNorm's machine epsilon of the dtype
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), as GPT-NeoX (pre-norm only)
    activation: str = "gelu"  # gelu | gelu_tanh | relu | swiglu
    position: str = "learned"  # learned | sinusoidal | rope | alibi | t5 | none
    relative_buckets: int = 32  # t5: relative-distance buckets
    relative_max_distance: int = 128  # t5: distances beyond this share the last bucket
    rope_base: float = 10000.0
    rope_fraction: float = 1.0  # share of each head's features that rope turns (GPT-NeoX/Pythia: 0.25)
    tie_embeddings: bool = True
    init_std: float = 0.02
    n_experts: int = 0  # > 0: Mixture-of-Experts feed-forward in every block
    moe_top_k: int = 2  # experts per token
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss (read by the training task)
    family: str = "gpt"  # gpt (causal) | prefix_lm (bidirectional over a prefix, causal after it)
    parametrization: str = "standard"  # standard | mup (maximal update parametrization, Yang et al. 2021)
    mup_base_width: int = 128  # mup: the width n_embd at which mup is exactly standard; others scale from it

    def __post_init__(self) -> None:
        require_positive_ints(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        require_block_options(self)
        require_choice(self, "position", POSITIONS)
        require_choice(self, "family", FAMILIES)
        require_choice(self, "parametrization", PARAMETRIZATIONS)
        require_positive_ints(self, "mup_base_width")
        if self.parametrization == "mup" and self.tie_embeddings:
            # μP gives the input table and the head different scalings; one shared matrix fits neither (measured:
            # tied, the blocks' outputs after 3 steps shrink 3x from width 64 to 512 where untied ones stay flat)
            raise UserError("model.parametrization=mup needs model.tie_embeddings=false: μP scales the token "
                            "embedding and the output head differently, so they cannot share one matrix")
        if self.parametrization == "mup" and self.mup_base_width % self.n_head:
            raise UserError(f"model.n_head={self.n_head} does not divide model.mup_base_width={self.mup_base_width}: "
                            "mup scales attention from the head size of the base width; choose one it divides")
        require_positive_numbers(self, "rope_base")  # 0 or less: inverse frequencies of inf, then NaN everywhere
        rotated = self.rotary_dims()
        if self.position == "rope" and not (0 < self.rope_fraction <= 1 and rotated >= 2 and rotated % 2 == 0):
            raise UserError(f"model.position=rope turns int(head size {self.n_embd // self.n_head} x model.rope_fraction="
                            f"{self.rope_fraction}) = {rotated} features of each head: choose a head size and a "
                            "rope_fraction in (0, 1] that give an even number, at least 2")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise UserError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (or be null)")
        if self.mlp_hidden is not None:
            require_positive_ints(self, "mlp_hidden")
        if self.parallel_residual and self.norm_position != "pre":
            raise UserError("model.parallel_residual=true needs model.norm_position=pre")

    def width_multiplier(self) -> float:
        """μP's m = n_embd / mup_base_width (1 under the standard parametrization)."""
        return self.n_embd / self.mup_base_width if self.parametrization == "mup" else 1.0

    def attention_scale(self) -> float | None:
        """The attention-logit factor: None (1/sqrt(head size)) under standard; under mup 1/head size, times
        sqrt(base head size) so it is standard's at the base width. q·k of aligned vectors (as training makes
        them) grows like the head size, not its square root: 1/head size keeps the logits constant in width."""
        if self.parametrization != "mup":
            return None
        return math.sqrt(self.mup_base_width // self.n_head) / (self.n_embd // self.n_head)

    def rotary_dims(self) -> int:
        """Features of each head that rope turns (GPT-NeoX's rule: int(head size · rope_fraction))."""
        return int(self.n_embd // self.n_head * self.rope_fraction)


class GPT(LanguageModel):
    """Token ids (B, T) → next-token logits (B, T, vocab_size)."""

    families = FAMILIES
    config_class = GPTConfig
    block_lists = ("h",)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.position == "learned" else None
        if c.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
        rotary = Rotary(c.n_embd // c.n_head, c.block_size, c.rope_base, c.rotary_dims()) if c.position == "rope" else None
        self.position_bias = (
            PositionBias(c.position, c.n_head, c.relative_buckets, c.relative_max_distance)
            if c.position in ("alibi", "t5") else None
        )
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList(
            Block(c.n_embd, c.n_head, c.mlp_ratio, c.activation, c.norm, c.norm_position, c.bias, c.dropout, rotary,
                  n_experts=c.n_experts, moe_top_k=c.moe_top_k, n_kv_head=c.n_kv_head,
                  parallel_residual=c.parallel_residual, hidden=c.mlp_hidden, norm_eps=c.norm_eps,
                  attn_scale=c.attention_scale())
            for _ in range(c.n_layer)
        )
        # post-norm blocks end in a norm already; pre-norm needs one before the head
        self.ln_f = build_norm(c.norm, c.n_embd, c.bias, c.norm_eps) if c.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            # input and output embeddings share one matrix (Press & Wolf 2017): fewer parameters, better perplexity
            self.lm_head.weight = self.wte.weight
        init_normal(self, c.init_std)
        # μP: hidden matrices (fan-in ∝ width) start with variance ∝ 1/fan-in, so each one's output keeps its
        # scale as the width grows; embeddings and the head keep init_std (the head is scaled by 1/m in forward)
        hidden_std = c.init_std / math.sqrt(c.width_multiplier())
        if hidden_std != c.init_std:  # not at the base width, where mup is standard (and draws the same numbers)
            init_normal(self.h, hidden_std)
        scale_residual_projections(self, hidden_std, 2 * c.n_layer)  # two residual branches per block
        # μP's output multiplier 1/m: the logits sum n_embd terms that training correlates with the head's
        # rows, so they would grow like the width; with it the head's init and Adam learning rate stay constant
        self.output_multiplier = 1.0 / c.width_multiplier()

    def forward(
        self, idx: torch.Tensor, caches: list[KVCache] | None = None, prefix_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx: (B, T) token ids; caches: one KVCache per layer when decoding incrementally;
        prefix_lengths (B,): a prefix LM's bidirectional prefix per sequence (tokens after it stay causal)."""
        return self.head(self.features(idx, caches, prefix_lengths))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return logits if self.output_multiplier == 1.0 else logits * self.output_multiplier

    def features(
        self, idx: torch.Tensor, caches: list[KVCache] | None = None, prefix_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final hidden states (B, T, n_embd) that the head reads (task heads read them too)."""
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
        causal = prefix_lengths is None
        mask = None if causal else prefix_mask(prefix_lengths, T)
        bias = self.position_bias(start, T, start + T, causal=causal, dtype=x.dtype) if self.position_bias else None
        for i, block in enumerate(self.h):
            x = block(x, causal=causal, cache=caches[i] if caches else None, bias=bias, mask=mask)
        return self.ln_f(x)

    def generation_view(self, prompt: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """The model that continues ``prompt`` (B, P): itself for GPT; for a prefix LM, a view that
        reads the prompt as the bidirectional prefix, with or without a cache."""
        return (PrefixLMView(self, prompt.size(1)) if self.config.family == "prefix_lm" else self), prompt

    def new_caches(self, batch: int, like: torch.Tensor) -> list[KVCache]:
        """Empty KV caches for ``batch`` sequences up to the full context length."""
        c = self.config
        heads = c.n_kv_head or c.n_head  # grouped-query attention caches only the key/value heads
        return [KVCache.empty(batch, heads, c.block_size, c.n_embd // c.n_head, like) for _ in range(c.n_layer)]

    def embedding_tables(self) -> list[nn.Module]:
        # vocabulary and position tables (learned, or T5's bucket biases) are "embedding"; an untied output head is a vocabulary
        # table too, so N (non-embedding) is the same whether or not the head is tied
        return [self.wte, self.lm_head] + [m for m in (self.wpe, self.position_bias) if m is not None]


class PrefixLMView(nn.Module):
    """A prefix LM continuing a prompt of ``prefix`` tokens: the prompt attends bidirectionally
    within itself, every later token causally — the same attention with or without a KV cache."""

    def __init__(self, model: GPT, prefix: int) -> None:
        super().__init__()
        self.model, self.prefix, self.config = model, prefix, model.config

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        start = caches[0].length if caches else 0
        if start >= self.prefix:  # the prefix is in the cache: the new tokens are plain causal
            return self.model(idx, caches)
        if start or idx.size(1) > self.config.block_size:
            raise ValueError("a prefix LM must read its whole prompt in one call, within its context")
        prefix = torch.full((idx.size(0),), min(self.prefix, idx.size(1)), device=idx.device)
        return self.model(idx, caches, prefix_lengths=prefix)

    def new_caches(self, batch: int, like: torch.Tensor) -> list[KVCache]:
        return self.model.new_caches(batch, like)


build_gpt = GPT.build  # the Hydra entry point of conf/model/gpt.yaml and of older checkpoints: GPT(GPTConfig(**fields))
