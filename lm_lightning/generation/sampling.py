"""Autoregressive decoding. The KV cache keeps each step at O(T) work instead of re-running the prefix."""

from __future__ import annotations

import torch
from torch import nn


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Masks (B, V) logits outside the top-k and outside the smallest set with probability ≥ top_p."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extends token ids (B, T) by up to ``max_new_tokens``; ``temperature=0`` is greedy.

    Stops early when every sequence has produced ``eos_id``. Without a cache (or once the
    context is full) the last ``block_size`` tokens are re-run each step.
    """
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    caches = model.new_caches(idx.size(0), next(model.parameters())) if use_cache else None
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    pending = idx  # tokens not yet seen by the cache
    for _ in range(max_new_tokens):
        if caches is not None and caches[0].length + pending.size(1) > block_size:
            caches = None  # context full: fall back to a sliding window without cache
        if caches is not None:
            logits = model(pending, caches)[:, -1]
        else:
            logits = model(idx[:, -block_size:])[:, -1]
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        if eos_id is not None:
            next_id = next_id.masked_fill(finished[:, None], eos_id)
            finished |= next_id[:, 0] == eos_id
        idx = torch.cat([idx, next_id], dim=1)
        pending = next_id
        if eos_id is not None and finished.all():
            break
    model.train(was_training)
    return idx


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 200, **options) -> str:
    """Python API: the prompt's continuation as text (the prompt itself not included)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, eos_id=options.pop("eos_id", tokenizer.eos_id), **options)
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)
