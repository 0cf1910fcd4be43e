"""The adapter-only checkpoint of a LoRA fine-tune: the LoRA matrices and the task's own head (a fraction
of the full checkpoint's size), with the PEFT settings and the pre-trained checkpoint they apply to. Written as every
checkpoint is (``save_checkpoint_file``: atomically, its SHA-256 sealed inside and in a sidecar), so
``load_checkpoint_file`` verifies it and reads it with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lm_lightning.adaptation.peft import lora_state_dict
from lm_lightning.training.checkpoint_io import save_checkpoint_file


def save_lora_adapter(path: Path, module: nn.Module, adapted: nn.Module, peft: dict[str, Any], pretrained: str) -> Path:
    """Writes ``path``: ``adapted``'s LoRA matrices and, for classification, ``module``'s head."""
    head = getattr(getattr(module, "classifier", None), "head", None)
    return save_checkpoint_file({"lora": lora_state_dict(adapted), "head": head.state_dict() if head is not None else None,
                                 "peft": peft, "pretrained": pretrained}, path)
