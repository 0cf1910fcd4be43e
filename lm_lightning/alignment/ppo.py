"""RLHF with PPO: a pre-trained GPT learns to raise a reward while a per-token KL penalty keeps it near
a frozen copy of itself (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

One update = one rollout + several PPO epochs over it:

1. Rollout. The policy samples a response of up to ``max_new_tokens`` to each prompt (KV cache,
   plain sampling at temperature 1: PPO optimises the distribution it samples from). The response
   ends with end-of-sequence when the model emits it.
2. Rewards. The reward (a rule, or a trained reward model) scores each (prompt, response). Each
   response token j gets ``r_j = -β (log π(a_j) - log π_ref(a_j))``, and the last one also gets the
   score. β is fixed or adapted to a KL target (Ziegler et al.).
3. Advantages. A value head (one scalar per position, on the backbone's final hidden states) gives
   V_j; GAE(γ, λ) gives the advantages (whitened over the batch) and the returns A + V.
4. PPO epochs. Shuffled minibatches; the clipped policy loss, the clipped value loss (weighted by
   ``vf_coef``) and optionally an entropy bonus. A minibatch whose KL to the reference nears the
   configured budget (``kl_guard`` x ``kl_budget``) takes a step down that KL instead (the budget guard).

Response token j sits at sequence position ``P + j`` (P prompt tokens) and is predicted by the hidden
state at ``P + j - 1``: every per-token tensor here is (batch, response tokens), gathered at those
positions, with a mask for the tokens after each response's end.
"""

from __future__ import annotations

import copy
import logging
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from lm_lightning.adaptation.batching import right_pad
from lm_lightning.alignment.policy import save_policy_checkpoint
from lm_lightning.errors import UserError
from lm_lightning.generation.sampling import generate
from lm_lightning.config.app import instantiate_group, plain, run_identity, set_threads
from lm_lightning.training.loading import load_trained
from lm_lightning.tasks.language_model import weight_decay_groups
from lm_lightning.tracking.records import plt, write_run_record

log = logging.getLogger("lm_lightning")


# --- the PPO arithmetic: pure functions on (batch, response tokens) tensors ---------------------------------------

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


# --- policy and rewards ----------------------------------------------------------------------------------------

def response_outputs(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, R, n_embd), logits (B, R, V)) at ``positions`` (B, R) of the sequences ``ids`` (B, L)."""
    hidden = model.features(ids)
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.size(-1)))
    return picked, model.lm_head(picked)


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


# --- rollouts --------------------------------------------------------------------------------------------------

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


# --- the training task -----------------------------------------------------------------------------------------

@dataclass
class PPOConfig:
    """The ``ppo:`` config node (see conf/experiment/ppo.yaml for each key's meaning)."""

    updates: int = 200
    batch_size: int = 16
    max_new_tokens: int = 16
    epochs: int = 2
    minibatch_size: int = 8
    max_grad_norm: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    kl_coef: float = 0.05
    adaptive_kl: bool = True
    kl_target: float = 4.0
    kl_adapt_rate: float = 0.1
    kl_budget: float | None = 8.0
    kl_guard: float = 0.8
    seed: int = 0

    @classmethod
    def from_node(cls, node: DictConfig | dict) -> PPOConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(node).items() if k in known})


class PPOTask(L.LightningModule):
    """Rollouts and PPO epochs with manual optimisation: each training batch is a list of prompts (token ids)."""

    def __init__(self, model: nn.Module, reward: nn.Module, prompts: list[list[int]], config: PPOConfig,
                 optimizer: Callable[..., torch.optim.Optimizer], eos_id: int, pad_id: int) -> None:
        """``model``: the pre-trained GPT (trained in place); ``reward(prompts, responses) -> (B,)`` scores token
        lists; ``optimizer(params=...)``: the partial Hydra builds from conf/optimizer (constant learning rate)."""
        super().__init__()
        if not hasattr(model, "features") or not hasattr(model, "lm_head") or getattr(model.config, "family", "gpt") != "gpt":
            raise UserError("PPO needs a gpt checkpoint (a decoder-only model with features() and an LM head)")
        if config.minibatch_size > config.batch_size or config.batch_size % config.minibatch_size:
            raise UserError(f"ppo.minibatch_size={config.minibatch_size} must divide ppo.batch_size={config.batch_size}")
        self.automatic_optimization = False
        self.config, self.prompts, self.eos_id, self.pad_id = config, prompts, eos_id, pad_id
        self.optimizer_factory = optimizer
        self.policy = PolicyWithValue(model)
        self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        self.reward = reward
        self.kl = KLController(config.kl_coef, config.kl_target if config.adaptive_kl else None, config.kl_adapt_rate)
        self.history: list[dict[str, float]] = []  # one row of metrics per update
        self.samples: dict[str, list[list[int]]] = {}  # the first and last rollouts' first responses
        self.generator: torch.Generator | None = None  # sampling, on the task's device (set when fitting starts)
        self.shuffle: torch.Generator | None = None  # minibatch order

    def train_dataloader(self) -> DataLoader:
        c = self.config
        sampler = RandomSampler(self.prompts, num_samples=c.updates * c.batch_size,
                                generator=torch.Generator().manual_seed(c.seed))
        return DataLoader(self.prompts, batch_size=c.batch_size, sampler=sampler, collate_fn=list, drop_last=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        return self.optimizer_factory(params=weight_decay_groups(self.policy, weight_decay))

    def on_fit_start(self) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.shuffle = torch.Generator().manual_seed(self.config.seed + 1)

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> tuple[Rollout, dict[str, float]]:
        c = self.config
        responses = sample_responses(self.policy.model, prompts, c.max_new_tokens, self.eos_id, self.generator)
        ids, _ = right_pad([p + r for p, r in zip(prompts, responses)], self.pad_id, self.device)
        tokens, response_lengths = right_pad(responses, self.pad_id, self.device)
        steps = torch.arange(tokens.size(1), device=self.device)
        mask = (steps[None] < response_lengths[:, None]).float()
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        positions = (prompt_lengths[:, None] - 1 + steps[None]).clamp(max=ids.size(1) - 1)
        logits, values = self.policy(ids, positions)
        logprobs = token_logprobs(logits, tokens)
        ref_log_dist = response_outputs(self.reference, ids, positions)[1].float().log_softmax(-1)
        ref_logprobs = ref_log_dist.gather(-1, tokens[..., None]).squeeze(-1)
        answers = [r[:-1] if r and r[-1] == self.eos_id else r for r in responses]  # without end-of-sequence
        scores = self.reward(prompts, answers).to(self.device)

        # the penalty is the sampled token's log-ratio (Ziegler et al.); the KL reported, adapted to and
        # budgeted is exact at each sampled prefix, summed over the response: never negative, less noisy
        log_ratio = (logprobs - ref_logprobs) * mask
        kl = (position_kl(logits, ref_log_dist) * mask).sum(1)
        rewards = -self.kl.coef * log_ratio
        rewards[torch.arange(len(prompts), device=self.device), response_lengths - 1] += scores
        values = values * mask
        advantages, returns = gae(rewards, values, c.gamma, c.lam)
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        stats = {"ppo/score": scores.mean().item(), "ppo/kl": kl.mean().item(), "ppo/kl_coef": self.kl.coef,
                 "ppo/entropy": masked_mean(entropy(logits), mask).item(),
                 "ppo/reward": (scores - self.kl.coef * log_ratio.sum(1)).mean().item(),
                 "ppo/response_length": response_lengths.float().mean().item()}
        batch = Rollout(ids, positions, tokens, mask, logprobs, ref_log_dist, values, scores, advantages, returns)
        return batch, stats

    def training_step(self, prompts: list[list[int]], batch_idx: int) -> None:
        self.policy.eval()  # no dropout: the rollout's log-probs and the optimised ones must come from one function
        c = self.config
        started = time.perf_counter()
        batch, stats = self.rollout(prompts)
        optimizer = self.optimizers()
        sums: dict[str, float] = defaultdict(float)
        steps = guard_steps = 0
        for _ in range(c.epochs):
            order = torch.randperm(len(prompts), generator=self.shuffle).to(self.device)
            for rows in order.split(c.minibatch_size):
                logits, values = self.policy(batch.ids[rows], batch.positions[rows])
                logprobs, mask = token_logprobs(logits, batch.tokens[rows]), batch.mask[rows]
                policy = ppo_policy_loss(logprobs, batch.logprobs[rows], batch.advantages[rows], mask, c.clip_range)
                value_loss = ppo_value_loss(values, batch.values[rows], batch.returns[rows], mask, c.clip_range_value)
                loss = policy.loss + c.vf_coef * value_loss
                if c.ent_coef:
                    loss = loss - c.ent_coef * masked_mean(entropy(logits), mask)
                # the budget guard: where the policy's KL to the reference (exact at the rollout's prefixes, per
                # response) passes kl_guard x the budget, this step descends that KL instead of the PPO loss; the
                # margin absorbs the difference between a minibatch's estimate and the next rollout's KL
                kl = (position_kl(logits, batch.ref_log_dist[rows]) * mask).sum(1).mean()
                if c.kl_budget is not None and kl.item() > c.kl_guard * c.kl_budget:
                    loss, guard_steps = kl, guard_steps + 1
                optimizer.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(optimizer, gradient_clip_val=c.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                for name, value in (("policy_loss", policy.loss), ("value_loss", value_loss),
                                    ("clip_fraction", policy.clip_fraction), ("approx_kl", policy.approx_kl)):
                    sums[name] += value.item()
                steps += 1
        self.kl.update(stats["ppo/kl"])
        stats.update({f"ppo/{name}": total / steps for name, total in sums.items()})
        stats.update({"ppo/update": float(batch_idx + 1), "ppo/guard_steps": float(guard_steps),
                      "ppo/seconds": time.perf_counter() - started})
        self.history.append(stats)
        if batch_idx == 0 or batch_idx == c.updates - 1:
            self.samples["first" if batch_idx == 0 else "last"] = [t.tolist() for t in batch.tokens[:3]]
        self.log_dict(stats, on_step=True, on_epoch=False, batch_size=len(prompts))
        self.log("score", stats["ppo/score"], prog_bar=True, logger=False, batch_size=len(prompts))
        self.log("kl", stats["ppo/kl"], prog_bar=True, logger=False, batch_size=len(prompts))


# --- the command -----------------------------------------------------------------------------------------------

def load_prompts(cfg: DictConfig, tokenizer, room: int) -> list[list[int]]:
    """Prompt token ids from ``ppo.prompts`` (a list of strings) or ``ppo.prompt_file`` (Alpaca-style JSON,
    rendered with the instruction template); each keeps its last ``room`` tokens."""
    if cfg.get("prompts"):
        texts = [str(p) for p in cfg.prompts]
    else:
        from lm_lightning.adaptation.instructions import load_instructions, render_prompt

        texts = [render_prompt(row) for row in load_instructions(cfg.prompt_file)]
    return [(ids or [tokenizer.bos_id])[-room:] for ids in tokenizer.encode_batch(texts)]


def plot_curves(history: list[dict[str, float]], kl_target: float | None, kl_budget: float | None, path: Path) -> Path:
    """Score and KL to the reference against the update, as PNG."""
    updates = [row["ppo/update"] for row in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=110, sharex=True)
    top.plot(updates, [row["ppo/score"] for row in history], linewidth=1.2, label="score (reward)")
    top.plot(updates, [row["ppo/reward"] for row in history], linewidth=1.0, alpha=0.7, label="score − β·KL")
    top.set_ylabel("mean per response")
    top.legend()
    bottom.plot(updates, [row["ppo/kl"] for row in history], linewidth=1.2, label="KL(π ‖ π_ref)")
    for value, name, style in ((kl_target, "target", ":"), (kl_budget, "budget", "--")):
        if value:
            bottom.axhline(value, color="red", linestyle=style, linewidth=1.0, label=name)
    bottom.set_ylabel("nats per response")
    bottom.set_xlabel("PPO update")
    bottom.legend()
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_ppo(cfg: DictConfig) -> dict[str, Any]:
    """``lm-lightning align method=ppo ckpt_path=<pre-trained GPT>``: PPO against ``reward``; returns the run record."""
    if cfg.get("ppo") is None or cfg.get("reward") is None:
        raise UserError("method=ppo needs the ppo and reward settings: run lm-lightning align experiment=ppo ckpt_path=...")
    set_threads(cfg.get("num_threads"))
    # the frozen reference is in eval mode on purpose
    warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode")
    L.seed_everything(cfg.seed, workers=True)
    pretrained, tokenizer = load_trained(cfg.ckpt_path)
    config = PPOConfig.from_node(cfg.ppo)
    room = pretrained.model.config.block_size - config.max_new_tokens - 1  # prompt + response + eos fit the context
    if room < 1:
        raise UserError(f"ppo.max_new_tokens={config.max_new_tokens} leaves no room for a prompt in the "
                        f"context of {pretrained.model.config.block_size} tokens")
    prompts = load_prompts(cfg.ppo, tokenizer, min(room, cfg.ppo.max_prompt_tokens))
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    reward = build_reward(cfg.reward, tokenizer, pad_id, cfg.ckpt_path)
    task = PPOTask(pretrained.model, reward, prompts, config, hydra.utils.instantiate(cfg.optimizer),
                   tokenizer.eos_id, pad_id)

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    name, group = run_identity(cfg.experiment_name)
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams({"config": plain(cfg), "prompts": len(prompts)})
    trainer_cfg = cfg.get("trainer") or {"_target_": "lightning.pytorch.Trainer"}
    # one training batch is one update; PPO steps its optimizer itself, so Lightning's clipping and accumulation are off
    trainer: L.Trainer = hydra.utils.instantiate(
        trainer_cfg, logger=loggers or False, enable_checkpointing=False, max_epochs=1, max_steps=-1,
        limit_train_batches=None, limit_val_batches=0, val_check_interval=None, num_sanity_val_steps=0,
        gradient_clip_val=None, accumulate_grad_batches=1, log_every_n_steps=1)
    started = time.perf_counter()
    trainer.fit(task)
    seconds = time.perf_counter() - started

    history = task.history
    curves = plot_curves(history, config.kl_target if config.adaptive_kl else None, config.kl_budget,
                         output_dir / "ppo_curves.png")
    checkpoint = save_policy_checkpoint(task.policy.model, cfg.ckpt_path, output_dir / "checkpoints" / "policy.ckpt")
    window = max(1, min(10, len(history) // 5))  # start and end as means over a few updates: one rollout is noisy
    first = sum(row["ppo/score"] for row in history[:window]) / window
    last = sum(row["ppo/score"] for row in history[-window:]) / window
    kls = [row["ppo/kl"] for row in history]
    record = {
        "run_name": name, "group": group, "method": "ppo", "pretrained": str(cfg.ckpt_path),
        "reward": plain(cfg.reward), "updates": len(history), "prompts": len(prompts), "seconds": seconds,
        "score": {"first": first, "last": last, "window": window, "gain": last - first},
        "kl": {"final": kls[-1], "max": max(kls), "budget": config.kl_budget, "target": config.kl_target,
               "within_budget": config.kl_budget is None or max(kls) <= config.kl_budget,
               "final_coef": task.kl.coef},
        "guard_steps": int(sum(row["ppo/guard_steps"] for row in history)),
        "samples": {k: [tokenizer.decode(t) for t in v] for k, v in task.samples.items()},
        "history": history, "curves": str(curves), "checkpoint": str(checkpoint), "config": plain(cfg),
    }
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({"ppo/curves": wandb.Image(str(curves))})
            logger.experiment.summary.update({"final/score": last, "start/score": first, "kl/max": max(kls),
                                              "kl/final": kls[-1], "kl/budget": config.kl_budget})
            record["wandb_dir"] = str(Path(logger.experiment.dir).parent)
            logger.experiment.finish()
    write_run_record(output_dir / "run.json", record)
    budget = f"budget {config.kl_budget}" if config.kl_budget else "no budget"
    print("\n".join([
        "", "=" * 72,
        f"PPO on {cfg.ckpt_path}: {len(history)} updates x {config.batch_size} prompts x {config.max_new_tokens} "
        f"new tokens in {seconds:.0f}s",
        f"reward ({_describe(cfg.reward)}): {first:.3f} -> {last:.3f} (mean of the first and last {window} updates)",
        f"KL to reference: final {kls[-1]:.3f}, max {max(kls):.3f} nats per response ({budget}; "
        f"{'within' if record['kl']['within_budget'] else 'OVER'}), beta {task.kl.coef:.4f}",
        f"sample: {record['samples'].get('last', [''])[0]!r}",
        f"curves: {curves}",
        f"policy checkpoint: {checkpoint}",
        f"W&B run folder: {record.get('wandb_dir') or '(W&B off)'}",
        f"run record: {output_dir / 'run.json'}",
        "=" * 72,
    ]), flush=True)
    return record


def _describe(reward: DictConfig) -> str:
    if reward.kind == "model":
        return f"reward model {reward.ckpt_path}"
    return f"length {reward.target_length} tokens" if reward.rule == "length" else f"count of {reward.word!r}"
