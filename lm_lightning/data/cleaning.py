"""Document clean-up: a fixed sequence of steps, each switched on by a ``data.corpus.cleaning`` key.

A step takes a document and returns it changed, unchanged, or ``None`` to drop it. Steps
that drop documents are counted by name (``removed_<name>`` documents and
``removed_<name>_bytes`` UTF-8 bytes), so quality filters, PII masking and dedup slot in
later as more entries of ``STEPS`` and report themselves. An empty ``cfg`` changes nothing.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping

from lm_lightning.errors import UserError

Step = Callable[[str, Mapping], "str | None"]

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


STEPS: list[tuple[str, Step]] = [
    ("unicode", normalize_unicode),
    ("whitespace", strip_whitespace),
    ("empty", drop_empty),
    ("short", drop_short),
]


def clean_document(text: str, cfg: Mapping) -> str | None:
    """The cleaned document, or ``None`` if a filter drops it."""
    return _run_steps(text, cfg)[0]


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
        cleaned, dropped_by = _run_steps(text, cfg)
        if cleaned is None:
            stats[f"removed_{dropped_by}"] = stats.get(f"removed_{dropped_by}", 0) + 1
            stats[f"removed_{dropped_by}_bytes"] = stats.get(f"removed_{dropped_by}_bytes", 0) + size
            continue
        stats["documents_out"] += 1
        stats["bytes_out"] += len(cleaned.encode("utf-8"))
        yield cleaned


def _run_steps(text: str, cfg: Mapping) -> tuple[str | None, str | None]:
    for name, step in STEPS:
        result = step(text, cfg)
        if result is None:
            return None, name
        text = result
    return text, None
