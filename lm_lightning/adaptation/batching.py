"""Right padding of token lists: the one batching step every adaptation task shares."""

from __future__ import annotations

import torch


def right_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → right-padded ids (B, L) and lengths (B,). A tokenizer without a pad token (``pad_id`` -1: GPT-2's,
    Llama's) pads with id 0: padding is never read, the lengths mask it, but it must be a valid embedding row."""
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    ids = torch.full((len(sequences), int(lengths.max())), max(pad_id, 0), dtype=torch.long, device=device)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq, device=device)
    return ids, lengths
