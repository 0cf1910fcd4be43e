"""A prepared corpus validated on a text file of its own (``data.val_path``), as published word-level
benchmarks come: Penn Treebank's or WikiText's ``valid.txt`` beside the ``train.txt`` the corpus is prepared
from. The file is split into documents, cleaned and tokenized as the corpus's documents were, each document
followed by the end-of-sequence token (``evaluation/text.py``), and served as the ``val`` split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lm_lightning.data.prepared_corpus import PreparedCorpus
from lm_lightning.evaluation.text import TextPreparation, TokenizedText, tokenize_text


@dataclass
class CorpusWithValidationFile(PreparedCorpus):
    """``corpus`` whose val split is ``val`` (the tokenized file) instead of any split it prepared."""

    val: TokenizedText | None = None

    @classmethod
    def of(cls, corpus: PreparedCorpus, path: str, corpus_cfg: Mapping) -> CorpusWithValidationFile:
        """``corpus`` validated on the text file at ``path``, prepared with the ``data.corpus`` config ``corpus_cfg``."""
        source = corpus_cfg.get("source") or {}
        preparation = TextPreparation(dict(corpus_cfg.get("cleaning") or {}), source.get("document_split") or "file",
                                      origin="data.corpus")
        val = tokenize_text(path, preparation, corpus.tokenizer())
        split = {"tokens": len(val.tokens), "bytes": val.bytes, "words": val.words, "documents": val.documents,
                 "file": str(path)}
        metadata = {**corpus.metadata, "splits": {**corpus.metadata["splits"], "val": split}}
        return cls(corpus.directory, corpus.tokenizer_path, metadata, val=val)

    def tokens(self, split: str) -> np.ndarray:
        return self.val.tokens if split == "val" else super().tokens(split)

    def document_starts(self, split: str) -> np.ndarray:
        if split != "val":
            return super().document_starts(split)
        after_eos = np.flatnonzero(self.val.tokens[:-1] == self.tokenizer().eos_id) + 1
        return np.concatenate([[0], after_eos]).astype(np.int64)
