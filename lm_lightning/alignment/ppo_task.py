"""PPO as a LightningModule with manual optimisation (``PPOTask``) and its typed ``ppo:`` config
(``PPOConfig``): each training batch of prompts is one update, a rollout scored by the reward with
the per-token KL penalty and GAE advantages, then several epochs of clipped-loss steps over shuffled
minibatches, where the budget guard steps down the KL to the frozen reference instead when it nears
``kl_guard`` x ``kl_budget``. The command that trains it is ``ppo.py``.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, fields

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from lm_lightning.adaptation.batching import right_pad
from lm_lightning.alignment.ppo_losses import KLController, gae, masked_mean, masked_whiten, ppo_policy_loss, \
    ppo_value_loss
from lm_lightning.alignment.ppo_rollout import PolicyWithValue, Rollout, entropy, position_kl, response_outputs, \
    sample_responses, token_logprobs
from lm_lightning.errors import UserError
from lm_lightning.models.base import LanguageModel
from lm_lightning.models.capabilities import families_where, has_features, reads_left_to_right
from lm_lightning.tasks.language_model import weight_decay_groups


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
        if not (isinstance(model, LanguageModel) and has_features(type(model)) and hasattr(model, "lm_head")
                and reads_left_to_right(model.traits)):
            families = families_where(lambda cls, traits: has_features(cls) and reads_left_to_right(traits))
            raise UserError(f"PPO needs a {' or '.join(families)} checkpoint (a decoder-only model with features() "
                            "and an LM head)")
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
