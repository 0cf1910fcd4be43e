"""Device-dependent speed settings, decided from the device: fused AdamW kernels (CUDA and CPU), and on CUDA only
TF32 matmuls for the fp32 parts and pinned host memory for batches (Lightning already copies batches to a CUDA
device with ``non_blocking=True``; pinned pages make that copy asynchronous)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from lm_lightning.training.muon import MuonAdamW

# torch's fused kernels: one launch for every parameter (MuonAdamW: for its AdamW half; Muon's half has none)
FUSABLE = (torch.optim.Adam, torch.optim.AdamW, MuonAdamW)
# torch defaults to a Python loop over the parameters on CPU and to foreach kernels on CUDA; its fused kernels
# exist for both (on CPU since torch 2.4) and are the fastest: on CPU at nanoGPT's Shakespeare shape the step of
# clip + AdamW takes ~2.6 ms fused against ~4.1 ms foreach and ~4.2 ms looped (benchmarks/throughput.py)
FUSED_DEVICES = ("cuda", "cpu")


def optimizer_kwargs_for(factory: Any, device: torch.device) -> dict[str, Any]:
    """Extra arguments for ``factory(params=...)`` on ``device``: ``fused=True`` for Adam, AdamW and MuonAdamW on CUDA
    and CPU unless the config already chose an implementation (``fused`` or ``foreach``); nothing anywhere else."""
    func = factory.func if isinstance(factory, functools.partial) else factory
    chosen = getattr(factory, "keywords", {})
    if torch.device(device).type not in FUSED_DEVICES or func not in FUSABLE or "fused" in chosen or "foreach" in chosen:
        return {}
    return {"fused": True}


def use_tf32_on_cuda(device: torch.device) -> bool:
    """On CUDA, lets fp32 matmuls and convolutions use TF32 tensor cores (``float32_matmul_precision``
    ``high``; bf16/fp16 autocast regions are unaffected). Returns whether it did; CPU runs are left alone."""
    if torch.device(device).type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")  # also sets torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    return True


def pin_memory_for(accelerator: Any) -> bool:
    """Whether the DataLoaders should pin host memory: only for a CUDA accelerator (a Lightning
    ``CUDAAccelerator``); pinning on CPU would cost copies for nothing."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    return isinstance(accelerator, CUDAAccelerator)
