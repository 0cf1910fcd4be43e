"""What every fine-tuning task shares: which backbone parameters stay frozen, and the optimizer
(AdamW over the trainable parameters, linear warmup then linear decay to zero)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.tasks.language_model import weight_decay_groups


def freeze(backbone: nn.Module, embeddings: bool = False, blocks: int = 0, everything: bool = False) -> None:
    """Freezes the token/position tables (``embeddings``), the first ``blocks`` repeated blocks, or
    the whole backbone (``everything``: only the task head trains)."""
    if everything:
        backbone.requires_grad_(False)
        return
    if embeddings:
        for table in backbone.embedding_tables():
            table.requires_grad_(False)
    if blocks:
        layers = backbone.blocks()  # in forward order, as the model declares them (block_lists)
        if not layers:
            raise UserError(f"freeze.blocks={blocks}: a {backbone.config.family} model has no transformer blocks to freeze")
        if not 0 <= blocks <= len(layers):
            raise UserError(f"freeze.blocks={blocks}: the model has {len(layers)} blocks")
        for block in layers[:blocks]:
            block.requires_grad_(False)


def adamw_linear_schedule(module: nn.Module, lr: float, weight_decay: float, warmup_steps: int,
                          total_steps: int) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: AdamW over ``module``'s trainable parameters
    (no decay on biases and gains), linear warmup to ``lr``, then linear decay to zero at ``total_steps``."""
    optimizer = torch.optim.AdamW(weight_decay_groups(module, weight_decay), lr=lr, betas=(0.9, 0.98))
    warmup, total = warmup_steps, max(total_steps, warmup_steps + 1)

    def factor(step: int) -> float:
        return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
