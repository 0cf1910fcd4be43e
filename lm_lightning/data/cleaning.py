"""Document clean-up: a fixed sequence of steps, each switched on by a ``data.corpus.cleaning`` key.

A step takes a document and returns it changed, unchanged, or ``None`` to drop it. Steps
that drop documents are counted by name (``removed_<name>`` documents and
``removed_<name>_bytes`` UTF-8 bytes of the raw document); PII masking counts what it
masked (``masked_email`` ...), boilerplate removal the lines it cut (``boilerplate_lines``).
Order: normalise → cut boilerplate lines → whitespace → mask PII → length and quality
filters (``quality.py``). An empty ``cfg`` changes nothing.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping

from lm_lightning.data import quality
from lm_lightning.data.pii import mask_pii
from lm_lightning.errors import UserError

Step = Callable[[str, Mapping, dict], "str | None"]

_NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_THREE_OR_MORE_BLANK_LINES = re.compile(r"\n{4,}")  # 3 blank lines = 4 newlines in a row


def normalize_unicode(text: str, cfg: Mapping) -> str:
    form = cfg.get("unicode_normalization")
    if not form:
        return text
    if form not in _NORMAL_FORMS:
        raise UserError(f"data.corpus.cleaning.unicode_normalization={form!r} is not valid: use one of {', '.join(_NORMAL_FORMS)} or null")
    return unicodedata.normalize(form, text)


@functools.lru_cache(maxsize=8)
def _boilerplate_regex(patterns: tuple[str, ...]) -> re.Pattern:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise UserError(f"data.corpus.cleaning.boilerplate_patterns: {p!r} is not a valid regular expression ({e}): fix or remove it") from None
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def remove_boilerplate(text: str, cfg: Mapping, counts: dict | None = None) -> str:
    """Lines that match one of ``boilerplate_patterns`` (regexes, matched at the line's first
    non-blank character) are cut, e.g. ``[Illustration]`` or ``Produced by ...``."""
    patterns = cfg.get("boilerplate_patterns")
    if not patterns:
        return text
    regex = _boilerplate_regex(tuple(patterns))
    lines = text.split("\n")
    kept = [line for line in lines if not regex.match(line.lstrip())]
    if len(kept) == len(lines):
        return text
    if counts is not None:
        counts["boilerplate_lines"] = counts.get("boilerplate_lines", 0) + len(lines) - len(kept)
    return "\n".join(kept)


def strip_whitespace(text: str, cfg: Mapping) -> str:
    """Trailing spaces on lines go, runs of 3+ blank lines become 2, the document is stripped."""
    if not cfg.get("strip_whitespace", False):
        return text
    text = _TRAILING_SPACE.sub("", text)
    return _THREE_OR_MORE_BLANK_LINES.sub("\n\n\n", text).strip()


def drop_empty(text: str, cfg: Mapping) -> str | None:
    # An empty document would add only an end-of-sequence token to the stream.
    return text if text else None


def drop_short(text: str, cfg: Mapping) -> str | None:
    """Drop documents with fewer than ``min_chars`` characters (after the steps above)."""
    return text if len(text) >= int(cfg.get("min_chars") or 0) else None


def drop_long(text: str, cfg: Mapping) -> str | None:
    """Drop documents with more than ``max_chars`` characters (null: no limit)."""
    limit = cfg.get("max_chars")
    return text if limit is None or len(text) <= int(limit) else None


def _plain(step: Callable[[str, Mapping], "str | None"]) -> Step:
    return lambda text, cfg, counts: step(text, cfg)


STEPS: list[tuple[str, Step]] = [
    ("unicode", _plain(normalize_unicode)),
    ("boilerplate", remove_boilerplate),
    ("whitespace", _plain(strip_whitespace)),
    ("pii", mask_pii),
    ("empty", _plain(drop_empty)),
    ("short", _plain(drop_short)),
    ("long", _plain(drop_long)),
    ("words", _plain(quality.drop_by_words)),
    ("symbols", _plain(quality.drop_by_symbols)),
    ("word_length", _plain(quality.drop_by_word_length)),
    ("repeated_lines", _plain(quality.drop_by_repeated_lines)),
    ("repeated_ngrams", _plain(quality.drop_by_repeated_ngrams)),
]


def clean_document(text: str, cfg: Mapping) -> str | None:
    """The cleaned document, or ``None`` if a filter drops it."""
    return _run_steps(text, cfg, {})[0]


def clean_documents(docs: Iterable[str], cfg: Mapping, stats: dict | None = None) -> Iterator[str]:
    """Clean a stream of documents lazily. ``stats`` (if given) accumulates ``documents_in``,
    ``bytes_in``, ``documents_out``, ``bytes_out`` (UTF-8 bytes) and per-filter removals."""
    stats = {} if stats is None else stats
    for key in ("documents_in", "bytes_in", "documents_out", "bytes_out", "removed_short"):
        stats.setdefault(key, 0)
    for text in docs:
        size = len(text.encode("utf-8"))
        stats["documents_in"] += 1
        stats["bytes_in"] += size
        cleaned, dropped_by = _run_steps(text, cfg, stats)
        if cleaned is None:
            stats[f"removed_{dropped_by}"] = stats.get(f"removed_{dropped_by}", 0) + 1
            stats[f"removed_{dropped_by}_bytes"] = stats.get(f"removed_{dropped_by}_bytes", 0) + size
            continue
        stats["documents_out"] += 1
        stats["bytes_out"] += len(cleaned.encode("utf-8"))
        yield cleaned


def _run_steps(text: str, cfg: Mapping, counts: dict) -> tuple[str | None, str | None]:
    for name, step in STEPS:
        result = step(text, cfg, counts)
        if result is None:
            return None, name
        text = result
    return text, None
