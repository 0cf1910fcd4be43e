"""Scale-out: strategies (DDP, FSDP, FSDP2, DeepSpeed), precision checks, batch arithmetic and
sharded-checkpoint conversion. Parallelism is applied to a model from outside (``fsdp2.py``);
the models themselves know nothing about it."""

from lm_lightning.parallel.setup import build_strategy, check_precision, gpu_available, micro_batch_size

__all__ = ["build_strategy", "check_precision", "gpu_available", "micro_batch_size"]
