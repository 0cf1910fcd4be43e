"""Memory and compute estimates for a model config, precision, optimizer and strategy (SPEC §4).

Units: bytes (printed as GB = 1e9 bytes, as the usual "14 + 14 + 56 = 84 GB for a 7B model") and
FLOPs. Parameters and FLOPs/token come from the model itself (``lm_lightning.models.counting``),
built on the meta device so a 70B config costs no memory.

Activations of one micro-batch (b windows of T tokens, width C, L blocks, vocabulary V), counted from
what autograd keeps for the backward pass of this GPT (pre-norm, fused attention, no dropout):
per block 17·b·T·C values — LayerNorm inputs 2, LayerNorm outputs (matmul inputs) 2, q/k/v 3,
attention output and its contiguous copy 2, attention-projection output 0, MLP input to c_fc … c_proj
4 + 4 — and the head: final norm in/out 2·b·T·C, logits, their log-softmax and the logits' gradient
3·b·T·V. With activation checkpointing a block keeps only its input (b·T·C) and one block is
recomputed at a time (+17·b·T·C).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# (weights, gradients) dtype names per Lightning precision flag
PRECISION_DTYPES = {
    "32-true": ("float32", "float32"),
    "16-mixed": ("float32", "float32"),
    "bf16-mixed": ("float32", "float32"),
    "bf16-true": ("bfloat16", "bfloat16"),
    "16-true": ("float16", "float16"),
}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0}  # full-size state tensors per parameter
BLOCK_VALUES, HEAD_VALUES = 17, 2  # activation values per token and width unit (see the module docstring)


@dataclass(frozen=True)
class Estimate:
    """One model at one precision: counts, FLOPs and memory in bytes (whole model, before sharding)."""

    parameters: int
    non_embedding: int
    flops_per_token: int
    weights: int
    gradients: int
    optimizer_states: int
    activations: int  # per micro-batch, per device
    activations_checkpointed: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def activation_bytes(batch: int, block_size: int, n_layer: int, n_embd: int, vocab_size: int, element_bytes: int,
                     checkpointing: bool = False) -> int:
    """Bytes autograd keeps for one micro-batch of ``batch`` × ``block_size`` tokens (see module docstring)."""
    tokens = batch * block_size
    per_block = BLOCK_VALUES * tokens * n_embd
    kept = n_layer * tokens * n_embd + per_block if checkpointing else n_layer * per_block
    head = HEAD_VALUES * tokens * n_embd + 3 * tokens * vocab_size
    return (kept + head) * element_bytes


def estimate(model_cfg: dict[str, Any], precision: str, optimizer: str, micro_batch: int,
             optimizer_state_dtype: str | None = None) -> Estimate:
    """Counts and memory of ``model_cfg`` (GPTConfig fields incl. vocab_size) trained at ``precision``.

    ``optimizer_state_dtype``: dtype of the optimizer's moments; None = the weights' dtype (as torch
    does). Activations are in the compute dtype: 2 bytes under any bf16/fp16 precision, else 4.
    """
    from lm_lightning.errors import UserError
    from lm_lightning.models.gpt import build_gpt

    if precision not in PRECISION_DTYPES:
        raise UserError(f"precision {precision!r} is not known: choose one of {', '.join(PRECISION_DTYPES)}")
    if optimizer not in OPTIMIZER_STATES:
        raise UserError(f"optimizer={optimizer!r} is not known: choose one of {', '.join(OPTIMIZER_STATES)}")
    with torch.device("meta"):
        model = build_gpt(**{k: v for k, v in model_cfg.items() if not k.startswith("_")})
    count = model.parameter_count()
    weight_dtype, grad_dtype = PRECISION_DTYPES[precision]
    state_bytes = BYTES[optimizer_state_dtype or weight_dtype]
    compute_bytes = 4 if precision == "32-true" else 2
    c = model.config
    args = (micro_batch, c.block_size, c.n_layer, c.n_embd, c.vocab_size, compute_bytes)
    return Estimate(
        parameters=count.total,
        non_embedding=count.non_embedding,
        flops_per_token=model.flops_per_token(),
        weights=count.total * BYTES[weight_dtype],
        gradients=count.total * BYTES[grad_dtype],
        optimizer_states=count.total * OPTIMIZER_STATES[optimizer] * state_bytes,
        activations=activation_bytes(*args),
        activations_checkpointed=activation_bytes(*args, checkpointing=True),
    )


def per_device(est: Estimate, strategy: str, devices: int, checkpointing: bool = False) -> dict[str, float]:
    """Bytes per device under ``strategy``: which of weights, gradients and optimizer states are split ``devices`` ways.

    single/ddp: nothing sharded; zero1: optimizer states; zero2: + gradients; fsdp/fsdp2/zero3: all three.
    """
    shard = {"single": (), "ddp": (), "zero1": ("optimizer_states",), "zero2": ("optimizer_states", "gradients"),
             "zero3": ("optimizer_states", "gradients", "weights"), "fsdp": ("optimizer_states", "gradients", "weights"),
             "fsdp2": ("optimizer_states", "gradients", "weights")}[strategy]
    n = 1 if strategy == "single" else devices
    out = {k: getattr(est, k) / (n if k in shard else 1) for k in ("weights", "gradients", "optimizer_states")}
    out["activations"] = est.activations_checkpointed if checkpointing else est.activations
    out["total"] = sum(out.values())
    return out


STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp2")
