"""Factories for the GPU-only strategies, so their configs stay declarative (``conf/strategy/``)."""

from __future__ import annotations

from typing import Any

from lm_lightning.parallel.setup import require_gpu


def fsdp(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
    **kwargs: Any,
):
    """Lightning's ``FSDPStrategy`` (FSDP1) with one FSDP unit per transformer block (GPU only)."""
    require_gpu("fsdp")
    from lightning.pytorch.strategies import FSDPStrategy

    from lm_lightning.models.layers import Block

    return FSDPStrategy(
        auto_wrap_policy={Block},
        activation_checkpointing_policy={Block} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        **kwargs,
    )


def deepspeed(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False, **kwargs: Any):
    """Lightning's ``DeepSpeedStrategy`` with ZeRO stage 1, 2 or 3 (GPU only; ``pip install deepspeed``)."""
    from lm_lightning.errors import UserError

    if stage not in (1, 2, 3):
        raise UserError(f"strategy.stage={stage}: DeepSpeed ZeRO stages are 1, 2 or 3")
    require_gpu("deepspeed")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("strategy=deepspeed needs the deepspeed package: pip install deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(
        stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, **kwargs
    )
