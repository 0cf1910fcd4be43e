"""A prepared corpus as training reads it: ``PreparedCorpus`` opens one finished cache entry of
``corpus.py`` and serves each split's token ids as a read-only memmap (refusing a token file whose size
or SHA-256 no longer matches its metadata), the token offset of each document, the split's token and
UTF-8 byte counts (for bits per byte), the tokenizer and the build report; ``unigram_entropy`` gives
the loss floor of a model that ignores context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lm_lightning.data.hashing import file_sha256
from lm_lightning.data.report import REPORT_FILE
from lm_lightning.data.tokenizer import Tokenizer, load_tokenizer
from lm_lightning.errors import UserError

if TYPE_CHECKING:
    from lm_lightning.data.hf_tokenizer import HFTokenizer


@dataclass
class PreparedCorpus:
    directory: Path
    tokenizer_path: Path
    metadata: dict
    _verified: set = field(default_factory=set, repr=False)  # splits whose token file passed its SHA-256

    def tokens(self, split: str) -> np.memmap:
        """All token ids of ``split`` as a read-only 1-D memmap of shape ``(num_tokens,)``.

        The file's size and (once per process) its SHA-256 are checked against the metadata:
        a truncated or edited token file is refused, naming the file.
        """
        info = self._split(split)
        path = self.directory / info["file"]
        expected = info["tokens"] * np.dtype(self.metadata["dtype"]).itemsize
        size = path.stat().st_size if path.exists() else None
        if size != expected:
            raise UserError(f"token file {path} has {size} bytes, metadata says {expected}: it is truncated or "
                            f"replaced; delete {self.directory} (or prepare with force=true) to rebuild it")
        if split not in self._verified and info.get("sha256_of_bin"):
            if file_sha256(path) != info["sha256_of_bin"]:
                raise UserError(f"token file {path} does not match the SHA-256 in its metadata: it was modified; "
                                f"delete {self.directory} (or prepare with force=true) to rebuild it")
            self._verified.add(split)
        return np.memmap(path, dtype=self.metadata["dtype"], mode="r")

    def document_starts(self, split: str) -> np.ndarray:
        """Token offset of each document's first token, shape ``(documents,)``, int64; an index file that is
        unreadable or does not fit the token file is refused, naming it."""
        path = self.directory / self._split(split)["index_file"]
        try:
            starts = np.load(path)  # allow_pickle=False: numbers only
        except (OSError, ValueError, EOFError) as err:
            problem = f"is unreadable ({type(err).__name__}: {err})"
        else:
            tokens = self.num_tokens(split)
            fits = starts.ndim == 1 and starts.dtype == np.int64 and (
                starts.size == 0 or (starts[0] >= 0 and starts[-1] < max(tokens, 1) and bool(np.all(np.diff(starts) >= 0))))
            if fits:
                return starts
            problem = f"does not index the {tokens:,} tokens of {split}"
        raise UserError(f"document index {path} {problem}: delete {self.directory} (or prepare with force=true) "
                        "to rebuild it")

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's cleaned text (EOS separators count 0 bytes)."""
        return self._split(split)["bytes"]

    def tokenizer(self) -> Tokenizer | HFTokenizer:
        return load_tokenizer(self.tokenizer_path)

    def report(self) -> dict:
        """What the build did (``report.json``): documents and bytes in, removals per filter
        and by dedup, tokens per split, tokenizer fertility, seconds per stage."""
        return json.loads((self.directory / self.metadata.get("report_file", REPORT_FILE)).read_text())

    def _split(self, split: str) -> dict:
        splits = self.metadata["splits"]
        if split not in splits:
            raise UserError(f"split {split!r} was not prepared in {self.directory} (prepared: {', '.join(splits)}); "
                            f"set data.corpus.split.{split}_fraction > 0")
        return splits[split]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats per token) of the empirical unigram distribution of ``tokens``: the loss
    of the best model that ignores context, a floor any trained LM should beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
