"""The PPO arithmetic, pure functions on (batch, response tokens) tensors with a mask for the tokens
after each response's end: masked mean and whitening, generalized advantage estimation (Schulman et
al. 2016), PPO's clipped policy and value losses (Schulman et al. 2017), and the KL coefficient β,
fixed or adapted towards a target KL (Ziegler et al. 2019). No model and no Lightning here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``x`` shifted and scaled to mean 0 and variance 1 over the masked positions."""
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_mean((x - mean) ** 2, mask) + eps)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over (batch, steps) rewards and values.

    ``δ_t = r_t + γ V_{t+1} - V_t`` and ``A_t = δ_t + γλ A_{t+1}``, with V and A zero after the last
    step; the returns (value targets) are ``A + V``. Values after a sequence's end must be 0 there too
    (the episode is over), and rewards 0. Returns (advantages, returns), both (batch, steps).
    """
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, advantages + values


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # the clipped surrogate, to minimise
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was the larger loss
    approx_kl: torch.Tensor  # ½ E[(log π − log π_old)²]: how far this step has moved from the rollout policy


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float) -> PolicyLoss:
    """PPO's clipped objective, ``E[max(-A ρ, -A clip(ρ, 1-ε, 1+ε))]`` with ``ρ = π/π_old``, over masked tokens."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return PolicyLoss(masked_mean(torch.maximum(unclipped, clipped), mask),
                      masked_mean((clipped > unclipped).float(), mask),
                      0.5 * masked_mean(log_ratio**2, mask))


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float) -> torch.Tensor:
    """``½ E[max((V - R)², (V_clip - R)²)]`` with ``V_clip = V_old + clip(V - V_old, -ε, ε)``, over masked tokens."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class KLController:
    """The KL coefficient β: fixed, or adapted towards a target KL per response (Ziegler et al. 2019):
    ``β ← β (1 + K e)`` with ``e = clip(KL / target - 1, -0.2, 0.2)``."""

    def __init__(self, coef: float, target: float | None = None, rate: float = 0.1) -> None:
        self.coef, self.target, self.rate = coef, target, rate

    def update(self, kl: float) -> None:
        if self.target:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + self.rate * error
