"""Heuristic quality filters (after Gopher, Rae et al. 2021, appendix A): each drops a
document whose statistic is outside the range its ``data.corpus.cleaning`` keys allow.

A key that is absent or null switches its filter off. Words are whitespace-separated
tokens; lines are split on ``"\\n"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_SYMBOLS = re.compile(r"#|\.\.\.|…")
_WORD_CHARS = re.compile(r"\w")


def _limit(cfg: Mapping, key: str) -> float | None:
    value = cfg.get(key)
    return None if value is None else float(value)


def drop_by_words(text: str, cfg: Mapping) -> str | None:
    """``min_words`` <= words <= ``max_words``."""
    lo, hi = _limit(cfg, "min_words"), _limit(cfg, "max_words")
    if lo is None and hi is None:
        return text
    n = len(text.split())
    return None if (lo is not None and n < lo) or (hi is not None and n > hi) else text


def symbol_word_ratio(text: str) -> float:
    """Hash symbols and ellipses per word (Gopher keeps documents below 0.1)."""
    words = len(text.split())
    return len(_SYMBOLS.findall(text)) / max(words, 1)


def drop_by_symbols(text: str, cfg: Mapping) -> str | None:
    """``symbol_word_ratio`` <= ``max_symbol_word_ratio``."""
    hi = _limit(cfg, "max_symbol_word_ratio")
    return text if hi is None or symbol_word_ratio(text) <= hi else None


def mean_word_length(text: str) -> float:
    """Mean characters per word, counting only words with a letter or digit (0 if none)."""
    words = [w for w in text.split() if _WORD_CHARS.search(w)]
    return sum(map(len, words)) / len(words) if words else 0.0


def drop_by_word_length(text: str, cfg: Mapping) -> str | None:
    """``min_mean_word_length`` <= mean word length <= ``max_mean_word_length`` (characters)."""
    lo, hi = _limit(cfg, "min_mean_word_length"), _limit(cfg, "max_mean_word_length")
    if lo is None and hi is None:
        return text
    m = mean_word_length(text)
    return None if (lo is not None and m < lo) or (hi is not None and m > hi) else text


def repeated_line_fraction(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line of the same document."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def drop_by_repeated_lines(text: str, cfg: Mapping) -> str | None:
    """``repeated_line_fraction`` <= ``max_repeated_line_fraction``."""
    hi = _limit(cfg, "max_repeated_line_fraction")
    return text if hi is None or repeated_line_fraction(text) <= hi else None


def duplicate_ngram_fraction(text: str, n: int) -> float:
    """Share of the characters of a document's words that lie in a word ``n``-gram seen
    earlier in the same document (Gopher's "duplicate n-gram character fraction")."""
    words = text.split()
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(words))
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    total = sum(map(len, words))
    return sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0


def drop_by_repeated_ngrams(text: str, cfg: Mapping) -> str | None:
    """``duplicate_ngram_fraction(text, duplicate_ngram_size)`` <= ``max_duplicate_ngram_fraction``."""
    hi = _limit(cfg, "max_duplicate_ngram_fraction")
    if hi is None:
        return text
    return text if duplicate_ngram_fraction(text, int(cfg.get("duplicate_ngram_size") or 5)) <= hi else None
