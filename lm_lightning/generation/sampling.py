"""Autoregressive decoding. The KV cache keeps each step at O(T) work instead of re-running the prefix."""

from __future__ import annotations

import math

import torch
from torch import nn

from lm_lightning.config.numbers import check_numbers
from lm_lightning.errors import UserError


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


class NonFiniteLogits(UserError):
    """The model gives NaN or Inf logits: nothing can be sampled from it."""


def check_sampling_options(options: dict, prefix: str = "") -> None:
    """Ranges of the decoding options present in ``options`` (``prefix``: how the user names them, e.g.
    ``sample.``); a value outside its range would otherwise decode silently or fail deep in torch."""
    check_numbers(options, {
        "max_new_tokens": (int, lambda v: v >= 0, "a whole number >= 0"),
        "num_samples": (int, lambda v: v >= 1, "a whole number >= 1"),
        "beam_width": (int, lambda v: v >= 1, "a whole number >= 1"),
        "top_k": (int, lambda v: v >= 0, "a whole number >= 0 (0 or null: all tokens)"),
        "temperature": (float, lambda v: v >= 0, "a number >= 0 (0: greedy)"),
        "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (null: off)"),
        "length_penalty": (float, math.isfinite, "a finite number"),
    }, prefix)


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
        if logits.isnan().any() or logits.isposinf().any() or logits.isneginf().all(-1).any():  # -inf alone: masked
            raise NonFiniteLogits("the model's next-token logits are not finite (NaN or Inf): its weights diverged or a "
                                  "model option makes them so; sample from an earlier checkpoint")
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


def is_generative(model: nn.Module) -> bool:
    """Whether ``model`` writes text: left-to-right models, and those with a ``generation_view``
    (prefix LMs, encoder-decoders). Encoders and bidirectional RNNs do not."""
    return hasattr(model, "generation_view") or getattr(model, "causal", True)


def decoding_view(model: nn.Module, idx: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The left-to-right model that continues prompt ``idx`` and its start tokens.

    A decoder-only model continues the prompt itself; a prefix LM reads the prompt as its
    bidirectional prefix; an encoder-decoder encodes it and starts the decoder from its start token.
    """
    if not is_generative(model):
        raise UserError(f"{type(model).__name__} is not generative (it reads both directions): it cannot write text; "
                        "generate from a gpt, prefix_lm, t5, bart, recurrent or ffn checkpoint")
    return model.generation_view(idx) if hasattr(model, "generation_view") else (model, idx)


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    beam_width: int = 1,
    length_penalty: float = 1.0,
    stop: list[str] | None = None,
    **options,
) -> str:
    """Python API: the prompt's continuation as text (the prompt itself not included).

    ``beam_width > 1`` runs :func:`beam_search`; otherwise ``options`` go to :func:`generate`
    (temperature, top_k, top_p, use_cache, generator). Text is cut at end-of-sequence and at
    the first of the ``stop`` strings.
    """
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    view, start = decoding_view(model, torch.tensor([ids], dtype=torch.long, device=device))
    eos_id = options.pop("eos_id", tokenizer.eos_id)
    if beam_width > 1:
        out = beam_search(view, start, max_new_tokens, beam_width, length_penalty, eos_id, options.get("use_cache", True))
    else:
        out = generate(view, start, max_new_tokens, eos_id=eos_id, **options)
    new = out[0, start.size(1) :].tolist()
    if eos_id in new:
        new = new[: new.index(eos_id)]
    # objectives' extra tokens (sentinels, [MASK]) sit above the tokenizer's vocabulary: not text
    new = [i for i in new if i < getattr(tokenizer, "vocab_size", i + 1)]
    text = tokenizer.decode(new)
    cuts = [text.index(s) for s in stop or [] if s and s in text]
    return text[: min(cuts)] if cuts else text


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    beam_width: int = 4,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    return_all: bool = False,
) -> torch.Tensor | list[tuple[float, torch.Tensor]]:
    """The most likely continuation of one prompt ``idx`` (1, T) under beam search.

    Hypotheses are ranked by summed log-probability / (new tokens)^length_penalty; a beam that
    emits ``eos_id`` is finished, and the search stops once ``beam_width`` hypotheses have finished
    (early stop). Returns (1, T + n) with the prompt; with ``return_all`` every finished and live
    hypothesis as (score, tokens), best first. With a KV cache each beam keeps its own
    cache, reordered as beams are chosen.
    """
    if idx.size(0) != 1:
        raise ValueError("beam_search takes one prompt, shape (1, T)")
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    beams = idx  # (beams, T + t)
    scores = torch.zeros(1, device=idx.device)  # summed log-probabilities of the new tokens
    # one cache row per beam: it starts with the single prompt row and is re-indexed as beams are chosen
    caches = model.new_caches(1, next(model.parameters())) if use_cache else None
    pending, finished = idx, []  # (normalised score, tokens)
    for step in range(1, max_new_tokens + 1):
        if caches is not None and caches[0].length + pending.size(1) > block_size:
            caches = None
        if caches is not None:
            logits = model(pending, caches)[:, -1]
        else:
            logits = model(beams[:, -block_size:])[:, -1]
        candidates = (scores[:, None] + logits.float().log_softmax(-1)).view(-1)
        top_scores, top = candidates.topk(min(2 * beam_width, candidates.numel()))
        vocab = logits.size(-1)
        keep_beam, keep_token, keep_score = [], [], []
        for score, flat in zip(top_scores.tolist(), top.tolist()):
            beam, token = divmod(flat, vocab)
            if eos_id is not None and token == eos_id:
                seq = torch.cat([beams[beam], beams.new_tensor([token])])
                finished.append((score / step**length_penalty, seq))
            else:
                keep_beam.append(beam), keep_token.append(token), keep_score.append(score)
            if len(keep_beam) == beam_width:
                break
        if len(finished) >= beam_width or not keep_beam:
            break  # early stop: enough finished hypotheses
        order = torch.tensor(keep_beam, device=idx.device)
        beams = torch.cat([beams[order], torch.tensor(keep_token, device=idx.device)[:, None]], dim=1)
        scores = torch.tensor(keep_score, device=idx.device)
        pending = beams[:, -1:]
        if caches is not None:
            for c in caches:
                c.reorder(order)
    new_tokens = max(beams.size(1) - idx.size(1), 1)
    finished += [(s / new_tokens**length_penalty, b) for s, b in zip(scores.tolist(), beams)]
    model.train(was_training)
    ranked = sorted(finished, key=lambda pair: pair[0], reverse=True)
    if return_all:  # every hypothesis, best first, as (normalised score, (1, T + n) tokens)
        return [(score, seq[None]) for score, seq in ranked]
    return ranked[0][1][None]

