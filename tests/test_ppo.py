"""RLHF with PPO: GAE and the clipped losses against hand-computed numbers, the adaptive KL controller,
the rewards, rollouts that read every response at the right positions, a tiny policy that learns a
reward within its KL budget, and the command end to end (run record, curves, metrics, checkpoint)."""

from __future__ import annotations

import functools
import json
import math
import subprocess

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from helpers import run_in_process
from lm_lightning.alignment.ppo_losses import KLController, gae, ppo_policy_loss, ppo_value_loss
from lm_lightning.alignment.ppo_rewards import RuleReward, build_reward
from lm_lightning.alignment.ppo_task import PPOConfig, PPOTask
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig

torch.set_num_threads(1)
EOS, PAD = 1, 0


def test_gae_matches_hand_computed_values():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 0.0]])  # the second episode ends after two steps
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.8)
    # row 0: δ2 = 1 - 0.3 = 0.7; δ1 = 0.9·0.3 - 0.4 = -0.13, A1 = -0.13 + 0.72·0.7 = 0.374;
    #        δ0 = 0.9·0.4 - 0.5 = -0.14, A0 = -0.14 + 0.72·0.374 = 0.12928
    # row 1: A2 = 0; δ1 = 1 - 0.2 = 0.8 = A1; δ0 = 0.2 + 0.9·0.2 - 0.1 = 0.28, A0 = 0.28 + 0.72·0.8 = 0.856
    expected = torch.tensor([[0.12928, 0.374, 0.7], [0.856, 0.8, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + values)
    # γ = λ = 1: the advantage is the Monte-Carlo return minus the value
    mc, _ = gae(rewards[:1], values[:1], gamma=1.0, lam=1.0)
    torch.testing.assert_close(mc, torch.tensor([[0.5, 0.6, 0.7]]))


def test_clipped_policy_loss_matches_hand_computed_values():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.7, 9.0]])
    advantages = torch.tensor([[1.0, 1.0, -2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the fifth token is after the response: it never counts
    old = torch.zeros(1, 5)
    logprobs = ratios.log().requires_grad_()
    result = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # per token max(-Aρ, -A·clip(ρ, 0.8, 1.2)): max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5;
    # max(2.2, 2.2) = 2.2; max(0.7, 0.8) = 0.8 (clipped)  → mean 1.3 / 4
    assert result.loss.item() == pytest.approx(0.325)
    assert result.clip_fraction.item() == pytest.approx(0.5)
    assert result.approx_kl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 0.7)) / 4)
    result.loss.backward()
    # a clipped token has no gradient; an unclipped one has d(-Aρ)/d log π / 4 = -Aρ / 4
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125, 0.55, 0.0, 0.0]]))


def test_clipped_value_loss_matches_hand_computed_values():
    values = torch.tensor([[1.0, 0.0, 2.0, 7.0]])
    old = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # V_clip = (0.7, 0.3, 2.0): max((1-2)², (0.7-2)²) = 1.69; max(0, 0.3²) = 0.09; max(1, 1) = 1 → ½·2.78/3
    loss = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.78 / 3)


def test_the_adaptive_kl_coefficient_follows_ziegler_et_al():
    controller = KLController(0.1, target=4.0, rate=0.1)
    controller.update(8.0)  # e = clip(8/4 - 1, ±0.2) = 0.2 → β·1.02
    assert controller.coef == pytest.approx(0.102)
    controller.update(4.4)  # e = 0.1 → β·1.01
    assert controller.coef == pytest.approx(0.102 * 1.01)
    controller.update(0.0)  # e = -1 → -0.2 → β·0.98
    assert controller.coef == pytest.approx(0.102 * 1.01 * 0.98)
    fixed = KLController(0.1, target=None)
    fixed.update(100.0)
    assert fixed.coef == 0.1


class FakeTokenizer:
    """Token i decodes to WORDS[i]."""

    WORDS = ["", "", " the", " cat", " The", " other", " then"]

    def decode(self, ids):
        return "".join(self.WORDS[i] for i in ids)


def test_rule_rewards_score_length_and_word_counts():
    length = RuleReward("length", FakeTokenizer(), target_length=4)
    assert length([[5]] * 3, [[3, 3, 3, 3], [3, 3], []]).tolist() == [0.0, -0.5, -1.0]
    word = RuleReward("word", FakeTokenizer(), word="the")
    # " the cat The other then": "the" and "The" are whole words; "other" and "then" are not
    assert word([[5]], [[2, 3, 4, 5, 6]]).tolist() == [2.0]
    with pytest.raises(UserError, match="reward.rule='size'"):
        RuleReward("size", FakeTokenizer())
    with pytest.raises(UserError, match="target_length"):
        build_reward(OmegaConf.create({"kind": "rule", "rule": "length", "target_length": None}), FakeTokenizer())


def tiny_gpt(vocab: int = 12, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=24, n_layer=1, n_head=2, n_embd=32))


class TokenCount(nn.Module):
    """Score: how many times ``token`` appears in the response."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token

    def forward(self, prompts, responses):
        return torch.tensor([float(r.count(self.token)) for r in responses])


def make_task(prompts, **overrides) -> PPOTask:
    config = PPOConfig(**{"batch_size": 8, "minibatch_size": 4, "max_new_tokens": 6, "epochs": 2, **overrides})
    task = PPOTask(tiny_gpt(), TokenCount(5), prompts, config, functools.partial(torch.optim.AdamW, lr=1e-3),
                   eos_id=EOS, pad_id=PAD)
    task.on_fit_start()
    return task


def test_a_rollout_reads_each_response_where_the_model_predicted_it():
    prompts = [[3, 4, 5], [6], [7, 8], [3, 4, 5, 6, 7]]  # different lengths in one batch
    task = make_task(prompts)
    batch, stats = task.rollout(prompts)
    model = task.policy.model
    for i, prompt in enumerate(prompts):
        n = int(batch.mask[i].sum())
        response = batch.tokens[i, :n].tolist()
        assert EOS not in response[:-1] and 1 <= n <= 6
        sequence = torch.tensor([prompt + response])
        expected = model(sequence).log_softmax(-1)[0, len(prompt) - 1 : -1].gather(-1, sequence[0, len(prompt) :, None])
        torch.testing.assert_close(batch.logprobs[i, :n], expected.squeeze(-1), atol=1e-5, rtol=0)
        assert batch.values[i, n:].abs().sum() == 0  # no value after the episode ends
    # the policy starts as the reference: zero KL, so the reward is the score alone
    assert stats["ppo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["ppo/reward"] == pytest.approx(stats["ppo/score"])


def test_ppo_raises_a_learnable_reward_within_the_kl_budget():
    prompts = [[t] for t in range(2, 12)]
    task = make_task(prompts, updates=40, kl_coef=0.05, kl_target=2.0, kl_budget=6.0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(task)
    scores = [row["ppo/score"] for row in task.history]
    assert len(scores) == 40
    start, end = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert end > start + 1.5, (start, end)  # about 0.5 of 6 tokens by chance at the start
    assert max(row["ppo/kl"] for row in task.history) <= 6.0
    for name in ("entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl", "kl_coef"):
        assert all(math.isfinite(row[f"ppo/{name}"]) for row in task.history), name


PROMPTS = "ppo.prompts=[ROMEO:,JULIET:,KING:,QUEEN:]"


def align_ppo(*args: str, cwd, check: bool = True) -> subprocess.CompletedProcess:
    """``lm-lightning align experiment=ppo <args>``, in this process."""
    return run_in_process("align", "experiment=ppo", *args, cwd=cwd, cache=cwd / "cache", check=check)


SMALL = ["ppo.updates=6", "ppo.batch_size=4", "ppo.minibatch_size=2", "ppo.max_new_tokens=8", "num_threads=1"]


def test_align_ppo_command_logs_every_update_saves_curves_and_a_policy(tiny_checkpoint, tmp_path):
    out = tmp_path / "ppo"
    proc = align_ppo(f"ckpt_path={tiny_checkpoint}", PROMPTS, *SMALL, "reward.rule=word", "reward.word=e",
                     "logger=csv", f"hydra.run.dir={out}", cwd=tmp_path)
    assert "KL to reference" in proc.stdout and "within" in proc.stdout
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "ppo" and record["updates"] == 6 and len(record["history"]) == 6
    assert record["kl"]["max"] <= record["kl"]["budget"] and record["kl"]["within_budget"]
    assert (out / "ppo_curves.png").stat().st_size > 0
    metrics = (next(out.glob("csv/version_*/metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    for name in ("score", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "approx_kl"):
        assert f"ppo/{name}" in header, name
    assert len(metrics) - 1 == 6  # one row per update
    from lm_lightning.training.loading import load_trained

    tuned, _ = load_trained(record["checkpoint"])  # the tuned policy reads like any checkpoint
    pretrained, _ = load_trained(str(tiny_checkpoint))
    assert any(not torch.equal(a, b) for a, b in zip(tuned.model.parameters(), pretrained.model.parameters()))


def test_a_reward_model_scores_prompt_and_response_and_one_with_another_tokenizer_is_refused(tiny_checkpoint, tmp_path):
    from lm_lightning.alignment.reward import RewardModelTask
    from lm_lightning.data.tokenizer import train_tokenizer
    from lm_lightning.training.loading import load_trained

    pretrained, tokenizer = load_trained(str(tiny_checkpoint))

    def reward_checkpoint(path, tokenizer_model: bytes):
        task = RewardModelTask(dict(pretrained.hparams.model), backbone_state=pretrained.model.state_dict(),
                               tokenizer_model=tokenizer_model)
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                    "tokenizer_model": tokenizer_model, "reward_model": True}, path)  # as Lightning writes it
        return path

    same = reward_checkpoint(tmp_path / "same.ckpt", pretrained.tokenizer_model)
    reward = build_reward(OmegaConf.create({"kind": "model", "ckpt_path": str(same)}), tokenizer, PAD)
    prompts, responses = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]]
    # the reward model reads prompt + response + end-of-sequence, right-padded, and scores the last token
    ids = torch.tensor([[5, 6, 7, 9, 10, tokenizer.eos_id], [8, 11, 12, 13, tokenizer.eos_id, PAD]])
    torch.testing.assert_close(reward(prompts, responses), reward.reward_model(ids, torch.tensor([6, 5])))
    other_model = train_tokenizer(["other text entirely, zebra quartz"] * 20, {"type": "char", "verbose": False},
                                  tmp_path / "other")
    other = reward_checkpoint(tmp_path / "other.ckpt", other_model.read_bytes())
    with pytest.raises(UserError) as refused:  # the command prints a UserError as its one `error:` line
        build_reward(OmegaConf.create({"kind": "model", "ckpt_path": str(other)}), tokenizer, PAD, "policy.ckpt")
    message = str(refused.value)
    assert "\n" not in message and "tokenizer" in message and str(other) in message and "policy.ckpt" in message
