"""Synthetic tokens for benchmarks (``data=synthetic``): uniformly random token ids of a stated vocabulary,
in windows exactly as a prepared corpus serves them, with no text, no tokenizer training and no cache.

Random tokens carry nothing to learn (the loss floor is ln(vocab_size)); they measure speed and memory
at a real shape (``benchmarks/gpu_check.sh``: GPT-2 124M, vocabulary 50304) without preparing a corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.errors import UserError

SPLITS = ("train", "val")


class SyntheticTokenizer:
    """Stands in for a tokenizer over ids ``[0, vocab_size)``: a prompt's characters map to ids by code point
    (mod the vocabulary) and ids decode as ``<id>``, so end-of-run samples work but mean nothing."""

    bos_id = eos_id = pad_id = unk_id = -1  # none: random streams have no document boundaries

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(f"<{i}>" for i in ids)

    def ids_ending_with(self, endings: Sequence[str]) -> list[int]:
        return []


@dataclass
class SyntheticCorpus:
    """The part of :class:`~lm_lightning.data.prepared_corpus.PreparedCorpus` training reads, over random ids.

    ``tokens(split)`` is a fixed stream per (seed, split): ``train_tokens`` / ``val_tokens`` ids of dtype
    uint16 (uint32 above 65,536 ids). Bytes per token count as 1, so bits per byte read as bits per token.
    ``tokenizer_path`` is a small text file saying there is no tokenizer (checkpoints carry it in place
    of a sentencepiece model: a synthetic run's checkpoint resumes, but evaluate/generate refuse it)."""

    vocab_size: int
    train_tokens: int
    val_tokens: int
    seed: int
    directory: Path
    _streams: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.vocab_size < 2 or self.train_tokens < 2 or self.val_tokens < 2:
            raise UserError(f"data=synthetic needs vocab_size, train_tokens and val_tokens of at least 2 "
                            f"(got {self.vocab_size}, {self.train_tokens}, {self.val_tokens})")

    @property
    def tokenizer_path(self) -> Path:
        path = self.directory / "NO_TOKENIZER.txt"
        if not path.is_file():  # every rank may get here: write aside, then rename (atomic)
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}")
            tmp.write_text(f"synthetic tokens: uniform ids in [0, {self.vocab_size}), no tokenizer\n")
            os.replace(tmp, path)
        return path

    @property
    def metadata(self) -> dict[str, Any]:
        return {"name": "synthetic", "vocab_size": self.vocab_size, "seed": self.seed,
                "splits": {split: {"tokens": self.num_tokens(split)} for split in SPLITS}}

    def tokens(self, split: str) -> np.ndarray:
        """All ids of ``split``, shape ``(num_tokens,)``."""
        if split not in SPLITS:
            raise UserError(f"split {split!r}: synthetic data has {', '.join(SPLITS)}")
        if split not in self._streams:
            dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
            rng = np.random.default_rng([self.seed, SPLITS.index(split)])
            self._streams[split] = rng.integers(0, self.vocab_size, size=self.num_tokens(split), dtype=dtype)
        return self._streams[split]

    def num_tokens(self, split: str) -> int:
        return self.train_tokens if split == "train" else self.val_tokens

    def num_bytes(self, split: str) -> int:
        return self.num_tokens(split)

    def tokenizer(self) -> SyntheticTokenizer:
        return SyntheticTokenizer(self.vocab_size)


class SyntheticDataModule(LMDataModule):
    """:class:`LMDataModule` (windows, samplers by rank, resume position) over a :class:`SyntheticCorpus`.
    ``corpus`` holds ``vocab_size``, ``train_tokens``, ``val_tokens``; the ``tokenizer`` group is ignored."""

    @property
    def corpus(self) -> SyntheticCorpus:
        if self._corpus is None:
            c = self.corpus_cfg
            self._corpus = SyntheticCorpus(int(c["vocab_size"]), int(c["train_tokens"]), int(c["val_tokens"]),
                                           self.seed, self.cache_dir / f"synthetic-v{int(c['vocab_size'])}")
        return self._corpus
