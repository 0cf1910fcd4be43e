"""The adapter-only checkpoint of a LoRA fine-tune: the LoRA matrices and the task's own head (a fraction
of the full checkpoint's size), with the PEFT settings and the pre-trained checkpoint they apply to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm_lightning.adaptation.peft import lora_state_dict


def save_lora_adapter(path: Path, module: nn.Module, adapted: nn.Module, peft: dict[str, Any], pretrained: str) -> Path:
    """Writes ``path``: ``adapted``'s LoRA matrices and, for classification, ``module``'s head."""
    head = getattr(getattr(module, "classifier", None), "head", None)
    torch.save({"lora": lora_state_dict(adapted), "head": head.state_dict() if head is not None else None,
                "peft": peft, "pretrained": pretrained}, path)
    return path
