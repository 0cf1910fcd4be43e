"""The rewards PPO raises, each scoring a batch of (prompt, response) token lists as a (B,) tensor: a
rule a small model can learn from the response alone (its length against a target, or how often a
word appears), or a trained Bradley–Terry reward model's score of prompt + response + end-of-sequence
(``reward.py``); ``build_reward`` picks one from the ``reward:`` config node.
"""

from __future__ import annotations

import re

import torch
from omegaconf import DictConfig
from torch import nn

from lm_lightning.adaptation.batching import right_pad
from lm_lightning.errors import UserError


class RuleReward(nn.Module):
    """A reward a small model can learn, computed from the response alone.

    ``length``: ``-|n - target_length| / target_length`` for a response of n tokens (end-of-sequence not
    counted): 0 at the target, -1 at twice or none of it. ``word``: how often ``word`` appears in the
    response text as a whole word, any case.
    """

    RULES = ("length", "word")

    def __init__(self, rule: str, tokenizer, target_length: int | None = None, word: str | None = None) -> None:
        super().__init__()
        if rule not in self.RULES:
            raise UserError(f"reward.rule={rule!r}: choose one of {', '.join(self.RULES)}")
        if rule == "length" and not (target_length and target_length > 0):
            raise UserError("reward.rule=length needs reward.target_length > 0 (tokens)")
        if rule == "word" and not (word and word.strip()):
            raise UserError("reward.rule=word needs reward.word (the word to count)")
        self.rule, self.tokenizer, self.target_length = rule, tokenizer, target_length
        self.pattern = re.compile(rf"\b{re.escape(word.strip())}\b", re.IGNORECASE) if rule == "word" else None

    def forward(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        if self.rule == "length":
            scores = [-abs(len(r) - self.target_length) / self.target_length for r in responses]
        else:
            scores = [len(self.pattern.findall(self.tokenizer.decode(r))) for r in responses]
        return torch.tensor(scores, dtype=torch.float)


class ModelReward(nn.Module):
    """A trained reward model's score of prompt + response + end-of-sequence (its training format)."""

    def __init__(self, reward_model: nn.Module, eos_id: int, pad_id: int) -> None:
        super().__init__()
        self.reward_model = reward_model.eval().requires_grad_(False)
        self.eos_id, self.pad_id = eos_id, pad_id

    @torch.no_grad()
    def forward(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        sequences = [p + r + [self.eos_id] for p, r in zip(prompts, responses)]
        device = next(self.reward_model.parameters()).device
        ids, lengths = right_pad(sequences, self.pad_id, device)
        return self.reward_model(ids, lengths).float()


def build_reward(cfg: DictConfig, tokenizer, pad_id: int = 0, policy_path: str = "") -> nn.Module:
    """``reward.kind=rule`` (``reward.rule=length|word``) or ``reward.kind=model reward.ckpt_path=<reward model>``."""
    if cfg.kind == "rule":
        return RuleReward(cfg.rule, tokenizer, cfg.get("target_length"), cfg.get("word"))
    if cfg.kind == "model":
        if not cfg.get("ckpt_path"):
            raise UserError("reward.kind=model needs reward.ckpt_path=<a reward model checkpoint from lm-lightning align method=reward_model>")
        from lm_lightning.alignment.reward import load_reward_model

        # the reward model reads the policy's token ids: a different tokenizer is one UserError
        reward_model, _ = load_reward_model(cfg.ckpt_path, policy_tokenizer=tokenizer, policy_path=policy_path)
        return ModelReward(reward_model, tokenizer.eos_id, pad_id)
    raise UserError(f"reward.kind={cfg.kind!r}: choose rule or model")
