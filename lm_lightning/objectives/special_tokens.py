"""The extra vocabulary of the pre-training objectives: ids for [MASK], [CLS], [SEP], UL2's paradigm
tokens and T5's sentinels, laid out after the tokenizer's vocabulary (``SpecialTokens``), and
``IGNORE_INDEX``, the label of positions that carry no loss. Every noising scheme (``noise_*.py``)
and every objective (``base.py``) reads its special ids from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the objective's extra tokens, appended after the tokenizer's vocabulary V.

    mask_id = V, cls_id = V + 1, sep_id = V + 2, mode_id("R" | "S" | "X") = V + 3 | V + 4 | V + 5,
    sentinel(i) = V + 6 + i for i < n_sentinels; total_vocab = V + 6 + n_sentinels (the model's vocab size).
    """

    vocab_size: int  # tokenizer vocabulary V
    n_sentinels: int = 100
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    first_text_id: int = 4  # ids below this are tokenizer specials (pad/unk/bos/eos)

    MODES: ClassVar[str] = "RSX"  # UL2 paradigm tokens: regular, sequential, extreme

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def cls_id(self) -> int:
        return self.vocab_size + 1

    @property
    def sep_id(self) -> int:
        return self.vocab_size + 2

    def mode_id(self, mode: str) -> int:
        if mode not in self.MODES or len(mode) != 1:
            raise ValueError(f"unknown UL2 mode {mode!r}: expected one of {list(self.MODES)}")
        return self.vocab_size + 3 + self.MODES.index(mode)

    @property
    def first_sentinel_id(self) -> int:
        return self.vocab_size + 6

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.n_sentinels:
            raise ValueError(f"sentinel index {i} outside [0, {self.n_sentinels})")
        return self.first_sentinel_id + i

    def is_sentinel(self, token: int) -> bool:
        return self.first_sentinel_id <= token < self.total_vocab

    @property
    def total_vocab(self) -> int:
        return self.first_sentinel_id + self.n_sentinels
