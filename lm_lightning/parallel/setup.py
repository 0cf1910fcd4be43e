"""From config to Lightning objects: the strategy, the model's parallelize callable, the precision
check and the global-batch arithmetic. Bad combinations end in one-line ``UserError``s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lm_lightning.errors import UserError


def gpu_available() -> bool:
    return torch.cuda.is_available()


def build_strategy(strategy: DictConfig) -> tuple[Any, Callable | None]:
    """``conf/strategy/<name>.yaml`` → (what the Trainer's ``strategy=`` takes, parallelize callable or None).

    A node with ``name`` only is a Lightning strategy name (``auto``); one with ``_target_`` is
    instantiated; its ``parallelize`` entry (FSDP2) is returned apart, for the task's
    ``configure_model`` hook: ``parallelize(model, device_mesh)``.
    """
    if "_target_" not in strategy:
        return strategy.name, None
    from hydra.errors import InstantiationException

    node = OmegaConf.to_container(strategy, resolve=True)
    parallelize = node.pop("parallelize", None)
    try:
        return hydra.utils.instantiate(node), hydra.utils.instantiate(parallelize) if parallelize else None
    except InstantiationException as err:  # Hydra wraps our one-line errors: unwrap them
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def check_precision(precision: DictConfig, accelerator: str) -> None:
    """GPU-only precisions (``requires_gpu: true``) fail early, with the option named, where no GPU is."""
    if precision.get("requires_gpu") and (accelerator == "cpu" or not gpu_available()):
        raise UserError(
            f"precision={precision.trainer_precision} needs a CUDA GPU and none is available here "
            "(trainer.accelerator=" + str(accelerator) + "): use precision=fp32, the CPU default"
        )


def require_gpu(strategy: str) -> None:
    """Raised by GPU-only strategy factories (fsdp, deepspeed) on a machine without a CUDA GPU."""
    if not gpu_available():
        raise UserError(
            f"strategy={strategy} needs CUDA GPUs and none is available here: use strategy=fsdp2 "
            "(FSDP2, runs on CPU too) or strategy=ddp"
        )


def world_size(devices: Any, num_nodes: int) -> int:
    """Processes in the job: ``trainer.devices`` × ``trainer.num_nodes`` (``auto``/-1 = every visible device)."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif devices in ("auto", -1, "-1"):
        per_node = torch.cuda.device_count() or 1
    else:
        per_node = int(devices)
    return per_node * int(num_nodes)


def micro_batch_size(global_batch_tokens: int, block_size: int, world: int, accumulate: int) -> int:
    """Windows per micro-batch per process so that one optimizer step sees ``global_batch_tokens`` tokens.

    global_batch_tokens = micro_batch × block_size × world × accumulate, exactly; anything else is an error.
    """
    per_micro = block_size * world * accumulate
    if global_batch_tokens <= 0 or global_batch_tokens % per_micro:
        raise UserError(
            f"global_batch_tokens={global_batch_tokens} is not a positive multiple of model.block_size "
            f"({block_size}) × processes ({world}) × trainer.accumulate_grad_batches ({accumulate}) = {per_micro}"
        )
    return global_batch_tokens // per_micro
