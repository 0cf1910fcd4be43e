"""``lm-lightning estimate``: parameters, FLOPs per token and memory per device for a model config.

    lm-lightning estimate                                   # the default model (conf/model/gpt.yaml)
    lm-lightning estimate model.n_layer=32 model.n_embd=4096 model.n_head=32 model.block_size=4096 \\
        vocab_size=65536 model.tie_embeddings=false precision=bf16_true optimizer_state_dtype=float32 devices=8
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lm_lightning.models.memory import STRATEGIES, estimate, per_device
from lm_lightning.config.app import hydra_command, plain

GB = 1e9


def run(cfg: DictConfig) -> dict[str, Any]:
    model_cfg = {**plain(cfg.model), "vocab_size": cfg.vocab_size}
    est = estimate(model_cfg, cfg.precision.trainer_precision, cfg.optimizer_name, cfg.micro_batch_size,
                   cfg.optimizer_state_dtype)
    static = est.weights + est.gradients + est.optimizer_states
    lines = [
        f"parameters: {est.parameters:,} ({est.parameters / 1e9:.3f}B; {est.non_embedding:,} non-embedding)",
        f"training FLOPs per token: {est.flops_per_token:.4g} (context {cfg.model.block_size})",
        f"precision {cfg.precision.trainer_precision}, optimizer {cfg.optimizer_name}:",
        f"  weights {est.weights / GB:.2f} GB + gradients {est.gradients / GB:.2f} GB + optimizer states "
        f"{est.optimizer_states / GB:.2f} GB = {static / GB:.2f} GB before activations",
        f"  activations per micro-batch of {cfg.micro_batch_size} x {cfg.model.block_size} tokens: "
        f"{est.activations / GB:.3f} GB; with activation checkpointing {est.activations_checkpointed / GB:.3f} GB",
        f"per device with {cfg.devices} devices (GB; total without / with activation checkpointing):",
        f"  {'strategy':<9}{'weights':>10}{'grads':>10}{'optim':>10}{'total':>10}{'total+ac':>10}",
    ]
    table = {}
    for strategy in STRATEGIES:
        row, ac = per_device(est, strategy, cfg.devices), per_device(est, strategy, cfg.devices, checkpointing=True)
        table[strategy] = {"without_checkpointing": row, "with_checkpointing": ac}
        lines.append(f"  {strategy:<9}{row['weights'] / GB:>10.2f}{row['gradients'] / GB:>10.2f}"
                     f"{row['optimizer_states'] / GB:>10.2f}{row['total'] / GB:>10.2f}{ac['total'] / GB:>10.2f}")
    print("\n".join(lines), flush=True)
    return {"estimate": est.as_dict(), "per_device": table}


@hydra_command("estimate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
