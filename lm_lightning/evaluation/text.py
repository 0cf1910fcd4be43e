"""A text file as a checkpoint's training corpus was made (``data/corpus.py``): split into documents,
cleaned, tokenized, each document followed by the end-of-sequence token; with the counts that turn a
loss in nats per token into per-word perplexity and bits-per-byte.

Deduplication and the byte cap are left out on purpose: they choose which training documents to keep,
while an evaluation scores the text it is given.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lm_lightning.data.cleaning import clean_documents
from lm_lightning.data.sources import iter_documents
from lm_lightning.errors import UserError


@dataclass(frozen=True)
class TextPreparation:
    """How text becomes a token stream: ``data.corpus.cleaning`` and ``data.corpus.source.document_split``
    of the training run, and whether each document is followed by the end-of-sequence token."""

    cleaning: Mapping[str, Any] = field(default_factory=dict)  # {}: no cleaning step changes anything
    document_split: str = "file"  # file (the whole file is one document) | paragraph | lines:<N>
    separators: bool = True  # an EOS after each document, as in the training stream
    origin: str = "none"  # where the settings come from, for the report


#: the file as it is: one document, no cleaning, no end-of-sequence token
RAW = TextPreparation(separators=False, origin="the raw file (as_trained=false)")


def training_preparation(hparams: Mapping[str, Any], ckpt_path: str | Path) -> TextPreparation:
    """The cleaning and document split a checkpoint was trained with: from its hyper-parameters
    (``text_preparation``) when it carries them, else from the ``run.json`` of the run folder that
    holds it (``<run>/checkpoints/<file>``), else none (the raw file as one document, with its EOS)."""
    saved = hparams.get("text_preparation")
    if saved:
        return TextPreparation(dict(saved.get("cleaning") or {}), saved.get("document_split") or "file",
                               origin="the checkpoint")
    path = Path(ckpt_path)
    record = path.parent.parent / "run.json"
    if path.parent.name == "checkpoints" and record.is_file():
        corpus = ((json.loads(record.read_text()).get("config") or {}).get("data") or {}).get("corpus")
        if corpus:
            return TextPreparation(dict(corpus.get("cleaning") or {}),
                                   (corpus.get("source") or {}).get("document_split") or "file", origin=str(record))
    return TextPreparation(origin="none found beside the checkpoint (one document, not cleaned)")


@dataclass(frozen=True)
class TokenizedText:
    """The token stream of a text and what it holds: UTF-8 bytes, words and line ends of the cleaned
    documents (end-of-sequence tokens count 0 bytes, as in the prepared corpus)."""

    tokens: np.ndarray  # (n_tokens,) int64
    bytes: int
    words: int  # whitespace-separated
    line_ends: int  # "\n" in the documents, a document's end ending its last line
    documents: int  # after cleaning
    documents_dropped: int  # by the cleaning filters


def tokenize_text(path: str | Path, preparation: TextPreparation, tokenizer,
                  leading_separator: bool = False) -> TokenizedText:
    """The file at ``path`` split, cleaned and tokenized with ``preparation`` (by the corpus pipeline's own
    functions). ``leading_separator``: an end-of-sequence token first, so the text's first token is predicted
    too, from the separator every training document but the first follows (as lm-eval's rolling
    loglikelihood reads a document). Raises UserError when nothing is left or the stream has fewer than two tokens."""
    source = {"kind": "text", "path": str(path), "document_split": preparation.document_split}
    stats: dict = {}
    documents = list(clean_documents(iter_documents(source), preparation.cleaning, stats))
    if not documents:
        raise UserError(f"{path} has no text left after cleaning ({preparation.origin}): evaluate another file, "
                        "or as_trained=false to score it raw")
    separator = [tokenizer.eos_id] if preparation.separators else []
    ids = tokenizer.encode_batch(documents)
    first = [tokenizer.eos_id] if leading_separator else []
    tokens = np.fromiter(itertools.chain(first, *(itertools.chain(d, separator) for d in ids)), dtype=np.int64)
    if len(tokens) < 2:
        raise UserError(f"{path} is {len(tokens)} token long: at least two are needed to predict one")
    return TokenizedText(
        tokens=tokens,
        bytes=sum(len(d.encode("utf-8")) for d in documents),
        words=sum(len(d.split()) for d in documents),
        line_ends=sum(d.count("\n") + (not d.endswith("\n")) for d in documents),
        documents=len(documents),
        documents_dropped=stats["documents_in"] - stats["documents_out"],
    )
