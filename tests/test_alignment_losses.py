"""The preference losses as numbers: Bradley–Terry and KTO against values computed by hand, DPO at
log 2 when the policy is the reference, and one SGD step of DPO moving a real model the right way."""

from __future__ import annotations

import math

import pytest
import torch

from lm_lightning.alignment.losses import (
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    response_kl,
    sequence_logprobs,
)
from lm_lightning.alignment.preference import Example, collate
from lm_lightning.alignment.task import wilson_interval
from lm_lightning.models.gpt import GPT, GPTConfig


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_matches_hand_computed_values():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 3.0]))
    expected = [-math.log(sigmoid(1.0)), -math.log(sigmoid(-1.0)), math.log(2)]  # 0.3133, 1.3133, 0.6931
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-6, rtol=0)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    logps = torch.randn(2, 5) * 20 - 40
    loss, chosen, rejected = dpo_loss(logps[0], logps[1], logps[0].clone(), logps[1].clone(), beta=0.3)
    torch.testing.assert_close(loss, torch.full((5,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_dpo_loss_matches_hand_computed_values():
    # log pi/pi_ref: chosen +2, rejected -1; beta 0.5 -> rewards 1 and -0.5, loss -log sigmoid(1.5)
    loss, chosen, rejected = dpo_loss(torch.tensor([-10.0]), torch.tensor([-13.0]), torch.tensor([-12.0]),
                                      torch.tensor([-12.0]), beta=0.5)
    assert chosen.item() == 1.0 and rejected.item() == -0.5
    assert loss.item() == pytest.approx(-math.log(sigmoid(1.5)), abs=1e-6)


def test_kto_matches_hand_computed_values():
    policy, reference = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])  # log ratios +1 (desirable), -1
    z0 = kto_reference_point(torch.tensor([-5.0, -4.0]), torch.tensor([-5.5, -4.1]))  # mean(0.5, 0.1) = 0.3
    assert z0.item() == pytest.approx(0.3)
    loss, rewards = kto_loss(policy, reference, torch.tensor([True, False]), z0, beta=0.5,
                             desirable_weight=1.0, undesirable_weight=2.0)
    # desirable: 1 - sigmoid(0.5 (1 - 0.3)); undesirable: 2 (1 - sigmoid(0.5 (0.3 - (-1))))
    torch.testing.assert_close(loss, torch.tensor([1 - sigmoid(0.35), 2 * (1 - sigmoid(0.65))]))  # 0.4134, 0.6860
    torch.testing.assert_close(rewards, torch.tensor([0.5, -0.5]))


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.tensor([-4.0, -4.0]))  # mean log ratio -1.5 -> 0
    assert z0.item() == 0.0 and not z0.requires_grad
    assert not kto_reference_point(policy, torch.tensor([-6.0, -6.0])).requires_grad


def test_only_response_tokens_are_scored():
    logits = torch.randn(1, 6, 10)
    ids = torch.tensor([[1, 2, 3, 4, 5, 0]])
    mask = torch.tensor([[False, False, False, True, True, False]])  # prompt 3 tokens, response 2, one pad
    logprobs = logits.log_softmax(-1)
    expected = logprobs[0, 2, 4] + logprobs[0, 3, 5]  # position t predicts token t + 1
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask), expected[None])
    changed = logits.clone()
    changed[0, :2] += torch.randn(2, 10)  # the positions predicting prompt tokens
    changed[0, 5] += 5.0  # the position after the last token
    torch.testing.assert_close(sequence_logprobs(changed, ids, mask), expected[None])


def test_response_kl_is_zero_for_the_same_model_and_exact_otherwise():
    logits, other = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    torch.testing.assert_close(response_kl(logits, logits, mask), torch.zeros(2))
    p, q = logits.log_softmax(-1), other.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # (2, 4): KL at every position
    torch.testing.assert_close(response_kl(logits, other, mask), torch.stack([kl[0, :3].sum(), kl[1, 1]]))


def test_one_sgd_step_of_dpo_raises_the_chosen_and_lowers_the_rejected_log_probability():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=24, block_size=16, n_layer=1, n_head=2, n_embd=16))
    prompt = [3, 7, 11, 5]
    batch = collate([Example([prompt + [9, 12, 14, 2], prompt + [15, 6, 8, 2]], [4, 4])], pad_id=0)

    def logprobs() -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logprobs(model(batch["ids"]), batch["ids"], batch["response_mask"]).chunk(2)

    chosen, rejected = logprobs()
    reference_chosen, reference_rejected = chosen.detach(), rejected.detach()
    loss, _, _ = dpo_loss(chosen, rejected, reference_chosen, reference_rejected, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1.0 * p.grad
        chosen_after, rejected_after = logprobs()
    assert chosen_after.item() > reference_chosen.item() + 1e-3
    assert rejected_after.item() < reference_rejected.item() - 1e-3


def test_wilson_interval_matches_published_values():
    low, high = wilson_interval(0.95, 100)  # 95 of 100: 0.888-0.978 (Newcombe 1998's method 3)
    assert (round(low, 4), round(high, 4)) == (0.8882, 0.9785)
    assert wilson_interval(1.0, 20)[1] == pytest.approx(1.0)
