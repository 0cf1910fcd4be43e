"""UL2's mixture of denoisers (Tay et al. 2022, §3.1): each row draws a denoiser, R and X rows are
span-corrupted at their density and mean span length, S rows are split into prefix and suffix (the
T5 transforms of ``noise_t5.py``), and every input starts with its paradigm token. Pure torch, no
model; randomness and padding follow ``noise_common.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lm_lightning.objectives.noise_common import draw_device, pad_rows
from lm_lightning.objectives.noise_t5 import prefix_split, span_corruption, span_counts
from lm_lightning.objectives.special_tokens import SpecialTokens


DEFAULT_MIXTURE: dict[str, float] = {"R": 0.5, "S": 0.25, "X": 0.25}
DEFAULT_DENOISERS: dict[str, dict[str, Any]] = {
    "R": {"noise_density": 0.15, "mean_span_length": 3.0},
    "X": {"noise_density": 0.5, "mean_span_length": 32.0},
    "S": {"min_prefix": 1},
}


def ul2_denoise(
    ids: Tensor,
    special: SpecialTokens,
    generator: torch.Generator | None,
    mixture: Mapping[str, float] | None = None,
    denoisers: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """UL2 mixture of denoisers (Tay et al. 2022, §3.1).

    Each row draws one denoiser name from `mixture` (name → weight, normalised; default DEFAULT_MIXTURE).
    A name's settings come from `denoisers`, which replaces DEFAULT_DENOISERS entries name by name:
      mode: its paradigm token "R", "S" or "X" (default: the name itself, so a name such as "X64" needs it);
      mode "S": sequential denoising (prefix LM): split by `prefix_split` with `min_prefix`, inputs = the
        prefix, targets = the suffix then eos;
      mode "R" / "X": `span_corruption` with `noise_density` and `mean_span_length` — the mean is raised
        where a row would otherwise need more than special.n_sentinels spans.
    Inputs start with mode_id(mode). Randomness: the draw of denoisers, then each name's rows in mixture order.

    ids: (B, T). Returns inputs (B, S_in) and targets (B, S_out), right-padded, and modes (B,) long: the
    index of each row's denoiser in list(mixture).
    """
    mixture = dict(DEFAULT_MIXTURE if mixture is None else mixture)
    table = {**DEFAULT_DENOISERS, **(denoisers or {})}
    names = list(mixture)
    if unknown := [name for name in names if name not in table]:
        raise ValueError(f"no settings for denoisers {unknown}: pass them in `denoisers`")
    n_rows, T = ids.shape
    weights = torch.tensor([float(mixture[name]) for name in names], device=draw_device(generator, ids.device))
    modes = torch.multinomial(weights, n_rows, replacement=True, generator=generator).to(ids.device)
    inputs: list[Tensor] = [ids.new_empty(0)] * n_rows
    targets: list[Tensor] = [ids.new_empty(0)] * n_rows
    for k, name in enumerate(names):
        rows = (modes == k).nonzero().flatten()
        if len(rows) == 0:
            continue
        settings = dict(table[name])
        mode = settings.pop("mode", name)
        mode_token = ids.new_full((1,), special.mode_id(mode))
        if mode == "S":
            prefix = prefix_split(ids[rows], generator, **settings).tolist()
            eos = ids.new_full((1,), special.eos_id)
            for r, p in zip(rows.tolist(), prefix):
                inputs[r] = torch.cat([mode_token, ids[r, :p]])
                targets[r] = torch.cat([ids[r, p:], eos])
        else:
            density, mean = settings["noise_density"], settings["mean_span_length"]
            num_noise, _ = span_counts(T, density, mean)
            mean = max(mean, num_noise / special.n_sentinels)  # at most n_sentinels spans on long rows
            corrupted, spans = span_corruption(ids[rows], special, generator, density, mean)
            for i, r in enumerate(rows.tolist()):
                inputs[r] = torch.cat([mode_token, corrupted[i]])
                targets[r] = spans[i]
    return pad_rows(inputs, special.pad_id), pad_rows(targets, special.pad_id), modes
