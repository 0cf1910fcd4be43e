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
state at ``P + j - 1``: every per-token tensor is (batch, response tokens), gathered at those
positions, with a mask for the tokens after each response's end.

The pieces: the arithmetic of steps 3 and 4 (``ppo_losses.py``), the policy with its value head and the
rollout (``ppo_rollout.py``), the rewards (``ppo_rewards.py``), the update as a LightningModule
(``ppo_task.py``). This module is the command, ``lm-lightning align method=ppo`` (``run_ppo``): it builds
the task, the loggers and the Trainer, trains, and writes the curves, the policy and the run record.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from lm_lightning.alignment.policy import save_policy_checkpoint
from lm_lightning.alignment.ppo_rewards import build_reward
from lm_lightning.alignment.ppo_task import PPOConfig, PPOTask
from lm_lightning.errors import UserError
from lm_lightning.config.app import plain, set_threads
from lm_lightning.training.job import Job
from lm_lightning.training.loading import load_trained
from lm_lightning.tracking.records import agg_figure

log = logging.getLogger("lm_lightning")


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
    fig = agg_figure(figsize=(7, 6), dpi=110)
    top, bottom = fig.subplots(2, 1, sharex=True)
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

    with Job(cfg, {"prompts": len(prompts)}) as job:
        # one training batch is one update; PPO steps its own optimizer: no Lightning clipping or accumulation
        job.build_trainer(enable_checkpointing=False, max_epochs=1, max_steps=-1, limit_train_batches=None,
                          limit_val_batches=0, val_check_interval=None, num_sanity_val_steps=0, gradient_clip_val=None,
                          accumulate_grad_batches=1, log_every_n_steps=1)
        job.fit(task)
        seconds = job.seconds()

        history = task.history
        curves = plot_curves(history, config.kl_target if config.adaptive_kl else None, config.kl_budget,
                             job.output_dir / "ppo_curves.png")
        checkpoint = save_policy_checkpoint(task.policy.model, cfg.ckpt_path,
                                            job.output_dir / "checkpoints" / "policy.ckpt")
        window = max(1, min(10, len(history) // 5))  # start and end as means over a few updates: one rollout is noisy
        first = sum(row["ppo/score"] for row in history[:window]) / window
        last = sum(row["ppo/score"] for row in history[-window:]) / window
        kls = [row["ppo/kl"] for row in history]
        record = {
            "run_name": job.run_name, "group": job.group, "method": "ppo", "pretrained": str(cfg.ckpt_path),
            "reward": plain(cfg.reward), "updates": len(history), "prompts": len(prompts), "seconds": seconds,
            "score": {"first": first, "last": last, "window": window, "gain": last - first},
            "kl": {"final": kls[-1], "max": max(kls), "budget": config.kl_budget, "target": config.kl_target,
                   "within_budget": config.kl_budget is None or max(kls) <= config.kl_budget,
                   "final_coef": task.kl.coef},
            "guard_steps": int(sum(row["ppo/guard_steps"] for row in history)),
            "samples": {k: [tokenizer.decode(t) for t in v] for k, v in task.samples.items()},
            "history": history, "curves": str(curves), "checkpoint": str(checkpoint), "config": plain(cfg),
        }
        budget = f"budget {config.kl_budget}" if config.kl_budget else "no budget"
        banner = [
            f"PPO on {cfg.ckpt_path}: {len(history)} updates x {config.batch_size} prompts x {config.max_new_tokens} "
            f"new tokens in {seconds:.0f}s",
            f"reward ({_describe(cfg.reward)}): {first:.3f} -> {last:.3f} (mean of the first and last {window} updates)",
            f"KL to reference: final {kls[-1]:.3f}, max {max(kls):.3f} nats per response ({budget}; "
            f"{'within' if record['kl']['within_budget'] else 'OVER'}), beta {task.kl.coef:.4f}",
            f"sample: {record['samples'].get('last', [''])[0]!r}",
            f"curves: {curves}",
            f"policy checkpoint: {checkpoint}",
            *job.where(),
        ]
        summary = {"final/score": last, "start/score": first, "kl/max": max(kls), "kl/final": kls[-1],
                   "kl/budget": config.kl_budget}
        return job.finish(record, banner, summary=summary, images={"ppo/curves": curves})


def _describe(reward: DictConfig) -> str:
    if reward.kind == "model":
        return f"reward model {reward.ckpt_path}"
    return f"length {reward.target_length} tokens" if reward.rule == "length" else f"count of {reward.word!r}"
