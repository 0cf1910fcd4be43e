"""Zero-shot classification by scoring: each candidate answer's log-probability given a prompt.

A candidate's score is the sum of its tokens' log-probabilities after the prompt, read from one
forward pass of the model's decoding view (the model itself for decoders, the prompt as the
prefix for prefix LMs, the prompt as the source for encoder-decoders). The predicted class is the
candidate with the highest score.
"""

from __future__ import annotations

import torch
from torch import nn

from lm_lightning.generation import decoding_view


@torch.inference_mode()
def candidate_logprobs(model: nn.Module, prompt_ids: list[int], candidates: list[list[int]]) -> list[float]:
    """Summed log-probabilities (nats) of each candidate's tokens following ``prompt_ids``."""
    device = next(model.parameters()).device
    view, start = decoding_view(model, torch.tensor([prompt_ids], device=device))
    scores = []
    for candidate in candidates:
        if not candidate:
            raise ValueError("a candidate answer encodes to no tokens")
        ids = torch.cat([start, torch.tensor([candidate], device=device)], dim=1)
        context = getattr(view.config, "block_size", ids.size(1))
        if ids.size(1) - 1 > context:
            raise ValueError(f"prompt and candidate are {ids.size(1) - 1} tokens, beyond the context of {context}")
        logprobs = view(ids[:, :-1]).float().log_softmax(-1)[0]  # (T - 1, V): position t predicts token t + 1
        first = start.size(1) - 1  # the position that predicts the candidate's first token
        targets = ids[0, first + 1 :]
        scores.append(float(logprobs[first:].gather(-1, targets[:, None]).sum()))
    return scores


def classify(model: nn.Module, tokenizer, prompts: list[str], verbalizers: list[str]) -> list[int]:
    """For each prompt, the index of the verbalizer with the highest log-probability."""
    candidates = [tokenizer.encode(v) for v in verbalizers]
    room = getattr(model, "context_length", 10**9) - max(map(len, candidates))  # long prompts keep their end
    predictions = []
    for prompt in prompts:
        scores = candidate_logprobs(model, (tokenizer.encode(prompt) or [tokenizer.bos_id])[-room:], candidates)
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions
