"""Preference losses as plain functions: from logits to response log-probabilities, then the
Bradley–Terry, DPO and KTO losses of those log-probabilities (or of scalar rewards).

Log-probabilities are in nats and summed over a response's tokens; the prompt is never scored.
Every loss returns one value per example (B,), so callers choose the reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the response tokens (B,).

    logits (B, T, V) from ``model(ids)`` (position t predicts token t + 1); ids (B, T);
    response_mask (B, T), true on the tokens being scored (the response, end-of-sequence included).
    """
    logprobs = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logprobs * response_mask[:, 1:]).sum(-1)


def response_kl(logits: torch.Tensor, reference_logits: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy ‖ reference) of the next-token distributions, summed over the response positions (B,).

    At every response position the two models read the same prefix (the data's); the KL of their
    full next-token distributions is summed over the response, in nats per sequence.
    """
    log_p = logits[:, :-1].float().log_softmax(-1)
    log_q = reference_logits[:, :-1].float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T - 1)
    return (kl * response_mask[:, 1:]).sum(-1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected) (B,): the negative log-likelihood of the preference under Bradley–Terry."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023) on response log-probabilities (B,).

    The implicit reward of a response is r = β·(log π − log π_ref); the loss is Bradley–Terry on
    those rewards, −log σ(r_chosen − r_rejected). Returns (loss, chosen rewards, rejected rewards),
    the rewards detached (they are for metrics). With π = π_ref the loss is log 2.
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return bradley_terry_loss(chosen, rejected), chosen.detach(), rejected.detach()


def kto_reference_point(policy_mismatched: torch.Tensor, reference_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch estimate of KL(π ‖ π_ref), max(0, mean log π/π_ref) over
    completions paired with another example's prompt (Ethayarajh et al. 2024, §4). Detached: no
    gradient flows through it. Inputs (B,), output a scalar."""
    return (policy_mismatched - reference_mismatched).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
             reference_point: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Kahneman–Tversky Optimization on unpaired examples (B,).

    With r = log π/π_ref of the completion, the value is λ_D·σ(β(r − z0)) for a desirable
    completion and λ_U·σ(β(z0 − r)) for an undesirable one; the loss is λ_y − value.
    ``desirable`` (B,) bool. Returns (loss, implicit rewards β·r detached).
    """
    logratio = policy_logps - reference_logps
    desirable = desirable.bool()
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (logratio - reference_point)),
                        undesirable_weight * torch.sigmoid(beta * (reference_point - logratio)))
    weight = torch.where(desirable, torch.full_like(value, desirable_weight), torch.full_like(value, undesirable_weight))
    return weight - value, (beta * logratio).detach()
