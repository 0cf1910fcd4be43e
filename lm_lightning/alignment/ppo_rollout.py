"""The policy side of a PPO rollout: the GPT with a value head (``PolicyWithValue``), what PPO reads at
each response position (log-probabilities of the sampled tokens, entropy, exact KL to the reference),
sampling a response to each prompt, and the ``Rollout`` that carries one batch of them into the PPO
epochs. Response token j of a prompt of P tokens sits at position ``P + j`` and is predicted by the
hidden state at ``P + j - 1``: the per-token tensors are (batch, response tokens), gathered there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from lm_lightning.generation.sampling import generate


def response_outputs(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, R, n_embd), logits (B, R, V)) at ``positions`` (B, R) of the sequences ``ids`` (B, L)."""
    hidden = model.features(ids)
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))
    return picked, model.head(picked)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) (B, R) from logits (B, R, V)."""
    return logits.float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position: logits (B, R, V) → (B, R)."""
    log_p = logits.float().log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def position_kl(logits: torch.Tensor, ref_log_dist: torch.Tensor) -> torch.Tensor:
    """Exact KL(π ‖ π_ref) of the next-token distributions at each position (B, R), in nats, from the
    policy's logits (B, R, V) and the reference's log-probabilities (B, R, V)."""
    log_p = logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - ref_log_dist)).sum(-1)


class PolicyWithValue(nn.Module):
    """A GPT and a value head: a scalar per position read from the same final hidden states as the LM head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.value_head = nn.Linear(model.config.n_embd, 1)
        nn.init.normal_(self.value_head.weight, std=0.02)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L), positions (B, R) → logits (B, R, V) and values (B, R) at those positions."""
        hidden, logits = response_outputs(self.model, ids, positions)
        return logits, self.value_head(hidden).squeeze(-1)


def sample_responses(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                     generator: torch.Generator | None = None) -> list[list[int]]:
    """A sampled response to each prompt, ending with ``eos_id`` when the model emitted it.

    Prompts of equal length are sampled together (the model reads no padding mask)."""
    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    responses: list[list[int]] = [[] for _ in prompts]
    for rows in by_length.values():
        idx = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
        new = generate(model, idx, max_new_tokens, eos_id=eos_id, generator=generator)[:, idx.size(1) :]
        for i, seq in zip(rows, new.tolist()):
            responses[i] = seq[: seq.index(eos_id) + 1] if eos_id in seq else seq
    return responses


@dataclass
class Rollout:
    """One batch of sampled responses with everything PPO needs; per-token tensors are (B, R)."""

    ids: torch.Tensor  # (B, L) prompt + response, right-padded
    positions: torch.Tensor  # (B, R) the position whose hidden state predicts response token j
    tokens: torch.Tensor  # (B, R) response tokens
    mask: torch.Tensor  # (B, R) 1 for real response tokens
    logprobs: torch.Tensor  # (B, R) log π_old of each token
    ref_log_dist: torch.Tensor  # (B, R, V) log π_ref of every vocabulary entry at each response position
    values: torch.Tensor  # (B, R) V_old, 0 after the response
    scores: torch.Tensor  # (B,) the reward's score
    advantages: torch.Tensor  # (B, R) GAE advantages (whitened if configured)
    returns: torch.Tensor  # (B, R) value targets
