"""Encoder-decoder transformer (Vaswani et al. 2017) in two flavours, read top to bottom as the architecture.

- T5 (Raffel et al. 2020): bucketed relative position bias (one table per stack, bidirectional in the
  encoder, causal in the decoder), RMSNorm, pre-norm, no biases.
- BART (Lewis et al. 2020): learned absolute positions (one table per stack), LayerNorm, post-norm
  with a norm on the embeddings, GELU, biases.

The family only names the flavour; the options (position, norm, norm_position, ...) build it, so
``conf/model/t5.yaml`` and ``conf/model/bart.yaml`` state the choices. Both stacks read one shared
token table. Source ids equal to ``pad_id`` are padding: no position attends to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.models.base import LanguageModel, Trait
from lm_lightning.models.layers import (
    Block,
    KVCache,
    PositionBias,
    build_norm,
    init_normal,
    padding_mask,
    scale_residual_projections,
    sinusoidal_table,
)
from lm_lightning.models.options import require_block_options, require_choice, require_positive_ints

POSITIONS = ("t5", "learned", "sinusoidal")
#: both flavours encode a source and decode a target from it
FAMILIES = {"t5": frozenset({Trait.ENCODER_DECODER}), "bart": frozenset({Trait.ENCODER_DECODER})}


@dataclass
class EncoderDecoderConfig:
    vocab_size: int
    block_size: int = 128  # longest source and longest target, tokens
    n_layer: int = 2  # encoder blocks
    n_decoder_layer: int | None = None  # decoder blocks (None: as many as the encoder)
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = False
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    activation: str = "relu"  # gelu | relu | swiglu
    position: str = "t5"  # t5 (bucketed relative bias) | learned | sinusoidal
    relative_buckets: int = 32  # t5: relative-distance buckets
    relative_max_distance: int = 128  # t5: distances beyond this share the last bucket
    tie_embeddings: bool = True
    init_std: float = 0.02
    family: str = "t5"  # t5 | bart
    pad_id: int = 0  # source padding id (never attended to)
    decoder_start_id: int | None = None  # first decoder input (None: pad_id, as T5)
    n_experts: int = 0  # > 0: Mixture-of-Experts feed-forward in every block
    moe_top_k: int = 2  # experts per token
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss (read by the training task)

    def __post_init__(self) -> None:
        require_positive_ints(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", "relative_buckets",
                              "relative_max_distance")
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.n_decoder_layer <= 0:
            raise UserError(f"model.n_decoder_layer must be positive (or null for n_layer), got {self.n_decoder_layer}")
        require_block_options(self)
        require_choice(self, "position", POSITIONS)
        require_choice(self, "family", FAMILIES)
        if self.decoder_start_id is None:
            self.decoder_start_id = self.pad_id
        for name in ("pad_id", "decoder_start_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise UserError(f"model.{name}={getattr(self, name)} must be a token id below "
                                f"model.vocab_size={self.vocab_size}")


class EncoderDecoder(LanguageModel):
    """Source ids (B, S) and decoder inputs (B, T) → logits (B, T, vocab_size) of the next target token."""

    families = FAMILIES
    config_class = EncoderDecoderConfig
    block_lists = ("encoder", "decoder")

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        learned = c.position == "learned"
        self.wpe_encoder = nn.Embedding(c.block_size, c.n_embd) if learned else None
        self.wpe_decoder = nn.Embedding(c.block_size, c.n_embd) if learned else None
        if c.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(c.block_size, c.n_embd), persistent=False)
        relative = c.position == "t5"
        self.encoder_bias = (PositionBias("t5", c.n_head, c.relative_buckets, c.relative_max_distance,
                                          bidirectional=True) if relative else None)
        self.decoder_bias = (PositionBias("t5", c.n_head, c.relative_buckets, c.relative_max_distance,
                                          bidirectional=False) if relative else None)
        # post-norm blocks end in a norm but start from raw embeddings, so those are normalised (BART);
        # pre-norm blocks leave the residual stream unnormalised, so each stack ends in a norm (T5)
        post = c.norm_position == "post"
        self.ln_embed_encoder = build_norm(c.norm, c.n_embd, c.bias) if post else nn.Identity()
        self.ln_embed_decoder = build_norm(c.norm, c.n_embd, c.bias) if post else nn.Identity()
        self.drop = nn.Dropout(c.dropout)

        def blocks(n: int, cross: bool) -> nn.ModuleList:
            return nn.ModuleList(
                Block(c.n_embd, c.n_head, c.mlp_ratio, c.activation, c.norm, c.norm_position, c.bias, c.dropout,
                      cross_attention=cross, n_experts=c.n_experts, moe_top_k=c.moe_top_k)
                for _ in range(n)
            )

        self.encoder = blocks(c.n_layer, cross=False)
        self.decoder = blocks(c.n_decoder_layer, cross=True)
        self.ln_encoder = nn.Identity() if post else build_norm(c.norm, c.n_embd, c.bias)
        self.ln_decoder = nn.Identity() if post else build_norm(c.norm, c.n_embd, c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_normal(self, c.init_std)
        # an encoder block adds two residual branches, a decoder block three (self-attention,
        # cross-attention, MLP): GPT-2's rule per stack
        scale_residual_projections(self.encoder, c.init_std, 2 * c.n_layer)
        scale_residual_projections(self.decoder, c.init_std, 3 * c.n_decoder_layer)

    def _embed(self, idx: torch.Tensor, start: int, table: nn.Embedding | None, norm: nn.Module) -> torch.Tensor:
        """Token (+ absolute position) embeddings of ids (B, T) at positions start..start+T-1 → (B, T, C)."""
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
        x = self.wte(idx)
        if table is not None:
            x = x + table(torch.arange(start, start + T, device=idx.device))
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoid[start : start + T]
        return self.drop(norm(x))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: src (B, S) source ids, tgt_in (B, T) decoder inputs (the target shifted right
        behind ``decoder_start_id``) → logits (B, T, vocab_size); position t predicts target token t."""
        memory, memory_mask = self.encode(src)
        return self.decode(tgt_in, memory, memory_mask)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) → (memory (B, S, C), memory_mask (B, 1, 1, S), True where a source token is not padding)."""
        memory_mask = padding_mask(src != self.config.pad_id)
        x = self._embed(src, 0, self.wpe_encoder, self.ln_embed_encoder)
        S = src.size(1)
        bias = self.encoder_bias(0, S, S, causal=False, dtype=x.dtype) if self.encoder_bias else None
        for block in self.encoder:
            x = block(x, causal=False, bias=bias, mask=memory_mask)
        return self.ln_encoder(x), memory_mask

    def decode(
        self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        """tgt (B, T) decoder inputs → logits (B, T, vocab_size), reading the encoder output ``memory``
        (B, S, C) where ``memory_mask`` (B, 1, 1, S) allows. ``caches`` (from :meth:`new_caches`): the
        decoder's self-attention caches, then its cross-attention caches, which keep the keys and values
        of ``memory`` from the first call on."""
        L = self.config.n_decoder_layer
        start = caches[0].length if caches else 0
        T = tgt.size(1)
        x = self._embed(tgt, start, self.wpe_decoder, self.ln_embed_decoder)
        bias = self.decoder_bias(start, T, start + T, causal=True, dtype=x.dtype) if self.decoder_bias else None
        for i, block in enumerate(self.decoder):
            x = block(x, causal=True, cache=caches[i] if caches else None, bias=bias, context=memory,
                      context_mask=memory_mask, cross_cache=caches[L + i] if caches else None)
        return self.lm_head(self.ln_decoder(x))

    def new_caches(self, batch: int, like: torch.Tensor, source_length: int) -> list[KVCache]:
        """Empty caches for ``batch`` sequences: ``n_decoder_layer`` self-attention caches up to the full
        context, then as many cross-attention caches of ``source_length`` keys."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        own = [KVCache.empty(batch, c.n_head, c.block_size, head_dim, like) for _ in range(c.n_decoder_layer)]
        cross = [KVCache.empty(batch, c.n_head, source_length, head_dim, like) for _ in range(c.n_decoder_layer)]
        return own + cross

    def generation_view(self, prompt: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """Encodes ``prompt`` (B, S) once and returns (a decoder-only view of this model for
        ``generate``/``beam_search``, the start ids (B, 1) of ``decoder_start_id``). The generated
        tokens are those after the start ids."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            memory, memory_mask = self.encode(prompt)
        self.train(was_training)
        start = prompt.new_full((prompt.size(0), 1), self.config.decoder_start_id)
        return DecoderView(self, memory, memory_mask), start

    def embedding_tables(self) -> list[nn.Module]:
        # the token table, the output head and the position tables (learned, or T5's bucket biases)
        # are "embedding"; the head counts once when tied, so N is the same either way
        return [self.wte, self.lm_head] + [m for m in (self.wpe_encoder, self.wpe_decoder, self.encoder_bias,
                                                        self.decoder_bias) if m is not None]

    def attention_layers(self) -> int:
        """FLOPs per target token count a source as long as the target (S = T = context): every
        non-embedding weight runs once per source or target token, and 12·d·context per attention
        layer for QKᵀ and AV — the encoder's self-attention, the decoder's self-attention and its
        cross-attention over S keys, i.e. n_layer + 2·n_decoder_layer layers."""
        return self.config.n_layer + 2 * self.config.n_decoder_layer


class DecoderView(nn.Module):
    """The decoder of an :class:`EncoderDecoder` bound to one encoded prompt, shaped like a decoder-only
    model for :func:`lm_lightning.generation.generate` and ``beam_search``: ``forward(idx, caches)``,
    ``new_caches(batch, like)``, ``config.block_size``. A prompt of one row serves any batch (beams)."""

    def __init__(self, model: EncoderDecoder, memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.memory, self.memory_mask = memory, memory_mask  # (B, S, C), (B, 1, 1, S)

    def _context(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory.size(0) == batch:
            return self.memory, self.memory_mask
        if self.memory.size(0) != 1:
            raise ValueError(f"decoding {batch} sequences from {self.memory.size(0)} prompts: give one prompt "
                             "or one per sequence")
        return self.memory.expand(batch, -1, -1), self.memory_mask.expand(batch, -1, -1, -1)

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """idx (B, T) decoder tokens (or only the new ones with ``caches``) → logits (B, T, vocab_size)."""
        memory, memory_mask = self._context(idx.size(0))
        return self.model.decode(idx, memory, memory_mask, caches)

    def new_caches(self, batch: int, like: torch.Tensor) -> list[KVCache]:
        """Decoder caches for ``batch`` sequences; ``caches[0]`` is a self-attention cache, and every
        cache has ``length`` and ``reorder(order)``, as beam search needs."""
        return self.model.new_caches(batch, like, self.memory.size(1))


build_encoder_decoder = EncoderDecoder.build  # the Hydra entry point of conf/model/{t5,bart}.yaml
