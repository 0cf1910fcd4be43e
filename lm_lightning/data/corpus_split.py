"""How a corpus build (``corpus.py``) assigns its deduplicated documents to the train, val and test
splits: ``document`` mode ranks documents by a fixed hash of (seed, index) so the split is the same on
every machine, ``contiguous`` mode cuts the concatenated text by character fractions as nanoGPT does
(a document that straddles a boundary is cut in two). Fractions are checked before any work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from lm_lightning.data.corpus_staging import Staging
from lm_lightning.errors import UserError

SPLITS = ("train", "val", "test")


def check_split_cfg(cfg: Mapping) -> None:
    mode = cfg.get("mode", "document")
    if mode not in ("document", "contiguous"):
        raise UserError(f"data.corpus.split.mode={mode!r} is not valid: use document or contiguous")
    val, test = float(cfg.get("val_fraction") or 0), float(cfg.get("test_fraction") or 0)
    if val < 0 or test < 0 or val + test >= 1:
        raise UserError(f"data.corpus.split.val_fraction={val} and data.corpus.split.test_fraction={test} must be >= 0 and sum to < 1")


def split_assigner(cfg: Mapping, staged: Staging):
    """A function that streams ``(split, text)`` pairs over the staged documents."""
    val, test = float(cfg.get("val_fraction") or 0), float(cfg.get("test_fraction") or 0)
    if cfg.get("mode", "document") == "contiguous":
        # As nanoGPT: the first (1 - val - test) of the characters train, then val, then
        # test; a document that straddles a boundary is cut in two.
        total = sum(staged.kept_chars())
        train_end, val_end = int(total * (1 - val - test)), int(total * (1 - test))
        ranges = {"train": (0, train_end), "val": (train_end, val_end), "test": (val_end, total)}
        for split, (lo, hi) in ranges.items():
            if lo >= hi and (split == "train" or float(cfg.get(f"{split}_fraction") or 0) > 0):
                raise UserError(f"the corpus has only {total} characters, too few for a non-empty {split} split "
                                f"with data.corpus.split.val_fraction={val}, test_fraction={test}")

        def contiguous() -> Iterator[tuple[str, str]]:
            offset = 0
            for text in staged:
                for split, (lo, hi) in ranges.items():
                    start, end = max(lo, offset), min(hi, offset + len(text))
                    if start < end:
                        yield split, text[start - offset:end - offset]
                offset += len(text)
        return contiguous

    labels = document_labels(staged.kept_count, val, test, int(cfg.get("seed", 0)))
    return lambda: ((SPLITS[label], text) for label, text in zip(labels, staged))


def document_labels(n: int, val: float, test: float, seed: int) -> np.ndarray:
    """Split label (0 train, 1 val, 2 test) per document. Documents are ranked by a hash of
    (seed, index); the lowest ``round(n * val)`` (at least 1 if val > 0) go to val, then test."""
    n_val = max(1, round(n * val)) if val > 0 else 0
    n_test = max(1, round(n * test)) if test > 0 else 0
    if n - n_val - n_test < 1:
        raise UserError(f"the corpus has only {n} documents, too few for data.corpus.split.val_fraction={val} and "
                        f"test_fraction={test}: lower them, add text, or use more documents (data.corpus.source.document_split)")
    rank = np.argsort(_splitmix64(np.arange(n, dtype=np.uint64), seed), kind="stable")
    labels = np.zeros(n, dtype=np.int8)
    labels[rank[:n_val]] = 1
    labels[rank[n_val:n_val + n_test]] = 2
    return labels


def _splitmix64(x: np.ndarray, seed: int) -> np.ndarray:
    """A fixed integer hash (SplitMix64): the same on every machine and numpy version."""
    with np.errstate(over="ignore"):
        z = x + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
