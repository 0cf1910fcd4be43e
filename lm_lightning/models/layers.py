"""Reusable transformer layers: norms, feed-forward, positional encodings, attention with a KV cache.

Every tensor shape is written as (batch, seq, d_model) = (B, T, C); heads split C into
(n_head, head_dim). Nothing here knows about Lightning, Hydra or a training objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.errors import UserError

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")  # gelu: exact (erf); gelu_tanh: GPT-2's tanh approximation


def build_norm(kind: str, dim: int, bias: bool, eps: float | None = None) -> nn.Module:
    """LayerNorm (optionally without bias, as nanoGPT) or RMSNorm; the model configs check ``kind``.
    ``eps`` None: LayerNorm's 1e-5, RMSNorm's machine epsilon of the input's dtype (torch's defaults)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-5 if eps is None else eps, bias=bias)
    return nn.RMSNorm(dim, eps=eps)


def hidden_width(dim: int, mlp_ratio: float, activation: str) -> int:
    """The feed-forward hidden width ``mlp_ratio · dim``; SwiGLU takes 2/3 of it, so its three matrices
    hold as many parameters as the two of a ReLU/GELU MLP."""
    hidden = int(mlp_ratio * dim)
    return int(2 * hidden / 3) if activation == "swiglu" else hidden


class FeedForward(nn.Module):
    """Position-wise MLP of hidden width ``hidden``: ReLU/GELU with one hidden layer, or SwiGLU with a gated one."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float) -> None:
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.c_gate = nn.Linear(dim, hidden, bias=bias)
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            h = F.silu(self.c_gate(x)) * h
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.relu(h)
        return self.dropout(self.c_proj(h))


def init_normal(model: nn.Module, std: float) -> None:
    """GPT-2's initialisation: linear and embedding weights from N(0, std), biases zero."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def scale_residual_projections(stack: nn.Module, std: float, branches: int) -> None:
    """Residual projections (``c_proj``) get std/sqrt(branches): each of the stack's residual branches
    adds to the stream, so this keeps its variance from growing with depth (GPT-2)."""
    for name, p in stack.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(branches))


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of Vaswani et al. 2017, shape (length, dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), applied to queries and keys per head: the pairs
    (2i, 2i+1) of a head's first ``dims`` features (``rotated``; None: all ``head_dim``) turn by
    position · base^(-2i/dims); the features after them pass unchanged (partial rotary, as GPT-NeoX)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0, rotated: int | None = None) -> None:
        super().__init__()
        self.dims = dims = rotated or head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, dims/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (B, n_head, T, head_dim), positions start..start+T-1."""
        if x.size(-1) > self.dims:
            return torch.cat((self._turn(x[..., : self.dims], start), x[..., self.dims :]), dim=-1)
        return self._turn(x, start)

    def _turn(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.size(-2)
        cos = self.cos[start : start + T].to(x.dtype)
        sin = self.sin[start : start + T].to(x.dtype)
        if x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling():
            # each pair as x1 + i·x2 times cos + i·sin: the same products as below in one complex multiply,
            # forward and backward ~2.5x faster on CPU than slicing and stacking
            pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return rotated.flatten(-2)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes of ALiBi (Press et al. 2022): the geometric series 2^(-8/n), 2^(-16/n), ...
    for a power-of-two head count, interleaved from the next power of two otherwise. Shape (n_head,)."""

    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = powers(closest) + powers(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def alibi_bias(slopes: torch.Tensor, query_start: int, n_query: int, n_key: int, causal: bool) -> torch.Tensor:
    """Additive attention bias (n_head, n_query, n_key): −slope·distance to each earlier key, −inf to
    later keys when causal. Query i sits at position query_start + i, key j at position j."""
    q, k = _positions(query_start, n_query, n_key, slopes.device)
    bias = -slopes[:, None, None] * (q - k).abs()[None].to(slopes.dtype)
    return _mask_future(bias, q, k, causal)


def _positions(query_start: int, n_query: int, n_key: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.arange(query_start, query_start + n_query, device=device)[:, None]
    return q, torch.arange(n_key, device=device)[None, :]


def _mask_future(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    return bias.masked_fill((k > q)[None], float("-inf")) if causal else bias


def relative_position_bucket(distance: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's buckets of ``distance = key − query``: exact for small distances, logarithmic up to
    ``max_distance``, one bucket beyond; keys before and after the query get separate halves when
    bidirectional (Raffel et al. 2020)."""
    n = -distance
    bucket = torch.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    return bucket + torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


class PositionBias(nn.Module):
    """Positions as an additive attention bias (n_head, n_query, n_key), computed once per forward
    and shared by every layer: ``alibi`` (fixed per-head slopes) or ``t5`` (learned per-head
    scalars over bucketed relative distances). The bias also carries the causal mask."""

    def __init__(self, kind: str, n_head: int, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool = False) -> None:
        super().__init__()
        self.kind, self.num_buckets, self.max_distance, self.bidirectional = kind, num_buckets, max_distance, bidirectional
        if kind == "alibi":
            self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)
        elif kind == "t5":
            self.relative_attention_bias = nn.Embedding(num_buckets, n_head)
        else:
            raise UserError(f"position bias {kind!r} is not known: choose alibi or t5")

    def forward(self, query_start: int, n_query: int, n_key: int, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        if self.kind == "alibi":
            return alibi_bias(self.slopes.to(dtype), query_start, n_query, n_key, causal)
        q, k = _positions(query_start, n_query, n_key, self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(k - q, self.bidirectional, self.num_buckets, self.max_distance)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1).to(dtype)
        return _mask_future(bias, q, k, causal)


@dataclass
class KVCache:
    """Keys and values of the positions already processed, per layer: (B, key/value heads, T_max, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, batch: int, n_head: int, max_len: int, head_dim: int, like: torch.Tensor) -> "KVCache":
        shape = (batch, n_head, max_len, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape))

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(-2)
        self.k[:, :, self.length : self.length + T] = k
        self.v[:, :, self.length : self.length + T] = v
        self.length += T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reorder(self, order: torch.Tensor) -> None:
        """Keeps batch rows ``order`` (beam search re-chooses its beams each step)."""
        self.k, self.v = self.k[order], self.v[order]


def combine_masks(bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """One ``attn_mask`` for ``scaled_dot_product_attention`` from an additive position bias
    (n_head, T, S) and a boolean "may attend" mask broadcastable to (B, n_head, T, S)."""
    if mask is None:
        return bias
    if bias is None:
        return mask
    return bias + torch.zeros((), dtype=dtype, device=bias.device).masked_fill(~mask, float("-inf"))


def prefix_mask(prefix_lengths: torch.Tensor, T: int) -> torch.Tensor:
    """Prefix-LM attention (B, 1, T, T): every position sees the whole prefix (its first
    ``prefix_lengths[b]`` tokens), and positions after the prefix also see themselves and earlier tokens."""
    positions = torch.arange(T, device=prefix_lengths.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T): key j ≤ query i
    in_prefix = positions[None, None, :] < prefix_lengths[:, None, None]  # (B, 1, T): key j inside the prefix
    return (causal[None] | in_prefix)[:, None]


def padding_mask(keep: torch.Tensor) -> torch.Tensor:
    """Keys that are not padding, as a (B, 1, 1, S) mask from ``keep`` (B, S), True = real token."""
    return keep[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention``: self-attention over ``x``, or
    cross-attention from ``x`` to ``context`` (encoder-decoder).

    ``causal=True`` masks future positions. With a KV cache the new queries attend to every
    cached key plus the causal part of the new block. ``mask`` is a boolean "may attend" mask
    broadcastable to (B, n_head, T, keys) — prefix-LM and padding masks — and ``bias`` an additive
    (n_head, T, keys) position bias that already holds the causal mask. ``scale``: the factor of the
    attention logits q·k (None: 1/sqrt(head_dim); μP uses one proportional to 1/head_dim).
    """

    def __init__(
        self, dim: int, n_head: int, bias: bool, dropout: float, rotary: Rotary | None = None, cross: bool = False,
        n_kv_head: int | None = None, scale: float | None = None,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head  # fewer: grouped-query attention, each key/value head serves a group
        self.head_dim = dim // n_head
        self.cross = cross
        if cross:
            self.c_q = nn.Linear(dim, dim, bias=bias)
            self.c_kv = nn.Linear(dim, 2 * dim, bias=bias)
        else:
            # rows [queries | keys | values], each head after head
            self.c_attn = nn.Linear(dim, dim + 2 * self.n_kv_head * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = rotary

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = True,
        cache: KVCache | None = None,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        if self.cross:
            # keys and values of the encoder output; cached once, as they never change while decoding
            q = self._heads(self.c_q(x))
            if cache is not None and cache.length:
                k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
            else:
                k, v = (self._heads(t) for t in self.c_kv(context).split(C, dim=2))
                if cache is not None:
                    k, v = cache.append(k, v)
            causal = False
        else:
            kv = self.n_kv_head * self.head_dim
            q, k, v = (self._heads(t) for t in self.c_attn(x).split([C, kv, kv], dim=2))
            start = cache.length if cache is not None else 0
            if self.rotary is not None:
                q, k = self.rotary(q, start), self.rotary(k, start)
            if cache is not None:
                k, v = cache.append(k, v)
            if causal and bias is None and T > 1 and (mask is not None or start > 0):
                # new query i sits at position start+i and sees keys 0..start+i
                future = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                mask = future if mask is None else mask & future
                causal = False
        attn_mask = combine_masks(bias, mask, q.dtype)
        is_causal = causal and attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head, scale=self.scale,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MoEFeedForward(nn.Module):
    """Mixture-of-Experts feed-forward (Shazeer et al. 2017; Fedus et al. 2022): a linear router
    sends each token to its ``top_k`` experts, whose outputs are mixed by the renormalised router
    probabilities. ``aux_loss`` holds the latest forward's load-balancing loss
    n_experts · Σ_e f_e · P_e (f_e: share of routed slots that went to expert e, P_e: mean router
    probability of e), which is 1 when routing is uniform."""

    def __init__(self, dim: int, hidden: int, activation: str, bias: bool, dropout: float, n_experts: int,
                 top_k: int) -> None:
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden, activation, bias, dropout) for _ in range(n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.size(-1))  # (N, C)
        probs = self.router(tokens).float().softmax(-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        routed = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0) / self.top_k  # f_e
        self.aux_loss = self.n_experts * (routed * probs.mean(0)).sum()
        return out.view_as(x)

    def expert_parameters(self) -> int:
        """Parameters of one expert (all experts have the same shape)."""
        return sum(p.numel() for p in self.experts[0].parameters())


def moe_inactive_parameters(model: nn.Module) -> int:
    """Parameters a token does not use: the experts it is not routed to (0 for a dense model)."""
    return sum((m.n_experts - m.top_k) * m.expert_parameters() for m in model.modules() if isinstance(m, MoEFeedForward))


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean load-balancing loss of the MoE layers in the latest forward; None for a dense model."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoEFeedForward)]
    return torch.stack(losses).mean() if losses else None


class Block(nn.Module):
    """One transformer block: self-attention, optional cross-attention to an encoder output, and a
    feed-forward (dense, or Mixture-of-Experts when ``n_experts`` > 0), each with a residual,
    pre- or post-norm. ``parallel_residual`` (pre-norm only): attention and feed-forward both read the
    block's input, x + attn(ln_1(x)) + mlp(ln_2(x)), as GPT-J and GPT-NeoX do. ``hidden``: the
    feed-forward width (None: from ``mlp_ratio``, see :func:`hidden_width`); ``attn_scale``: the self-attention's
    logit factor (see :class:`Attention`)."""

    def __init__(
        self,
        dim: int,
        n_head: int,
        mlp_ratio: float,
        activation: str,
        norm: str,
        norm_position: str,
        bias: bool,
        dropout: float,
        rotary: Rotary | None = None,
        cross_attention: bool = False,
        n_experts: int = 0,
        moe_top_k: int = 2,
        n_kv_head: int | None = None,
        parallel_residual: bool = False,
        hidden: int | None = None,
        norm_eps: float | None = None,
        attn_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.pre_norm = norm_position == "pre"
        self.parallel_residual = parallel_residual
        self.ln_1 = build_norm(norm, dim, bias, norm_eps)
        self.attn = Attention(dim, n_head, bias, dropout, rotary, n_kv_head=n_kv_head, scale=attn_scale)
        if cross_attention:
            self.ln_x = build_norm(norm, dim, bias, norm_eps)
            self.cross_attn = Attention(dim, n_head, bias, dropout, cross=True)
        else:
            self.cross_attn = None
        self.ln_2 = build_norm(norm, dim, bias, norm_eps)
        hidden = hidden or hidden_width(dim, mlp_ratio, activation)
        self.mlp = (MoEFeedForward(dim, hidden, activation, bias, dropout, n_experts, moe_top_k) if n_experts > 0
                    else FeedForward(dim, hidden, activation, bias, dropout))

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = True,
        cache: KVCache | None = None,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cross_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``context``: the encoder output (B, S, C) that cross-attention reads, ``context_mask`` its
        (B, 1, 1, S) padding mask; ``cross_cache`` keeps its keys and values while decoding."""
        if self.parallel_residual:
            return x + self.attn(self.ln_1(x), causal, cache, bias, mask) + self.mlp(self.ln_2(x))
        if self.pre_norm:
            x = x + self.attn(self.ln_1(x), causal, cache, bias, mask)
            if self.cross_attn is not None:
                x = x + self.cross_attn(self.ln_x(x), cache=cross_cache, mask=context_mask, context=context)
            return x + self.mlp(self.ln_2(x))
        x = self.ln_1(x + self.attn(x, causal, cache, bias, mask))
        if self.cross_attn is not None:
            x = self.ln_x(x + self.cross_attn(x, cache=cross_cache, mask=context_mask, context=context))
        return self.ln_2(x + self.mlp(x))
