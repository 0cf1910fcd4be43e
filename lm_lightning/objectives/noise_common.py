"""What the noising schemes share (BERT in ``noise_bert.py``, T5 in ``noise_t5.py``, BART in
``noise_bart.py``, UL2 in ``noise_ul2.py``): every scheme draws all its randomness from the
``generator`` it is given, on the generator's device, so a seed fixes the output whatever the device
of ``ids`` (generator=None draws from torch's global RNG on the device of ``ids``); results are on the
device of ``ids``. Outputs are right-padded with ``special.pad_id``; label positions that carry no
loss hold IGNORE_INDEX (``special_tokens.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence


def draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random numbers are drawn: the generator's device, or `device` for torch's global RNG."""
    return generator.device if generator is not None else device


def rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on `device`."""
    return torch.rand(tuple(shape), generator=generator, device=draw_device(generator, device)).to(device)


def randint(
    low: int, high: int, shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform integers in [low, high) drawn on the generator's device, returned on `device`."""
    drawn_on = draw_device(generator, device)
    return torch.randint(low, high, tuple(shape), generator=generator, device=drawn_on).to(device)


def pad_rows(rows: list[Tensor], pad_id: int) -> Tensor:
    """Stack 1-D rows of different lengths into (len(rows), longest), right-padded with pad_id."""
    return pad_sequence(rows, batch_first=True, padding_value=pad_id)
