"""Prepare a tokenized corpus once and cache it: source → clean → split → train tokenizer
(train split only) → ``<split>.bin`` token files, memory-mapped at training time.

A cache entry ``<cache_dir>/<name>-<key[:12]>/`` holds::

    tokenizer.model, tokenizer.vocab   the sentencepiece model trained on the train split
    <split>.bin                        token ids, 1-D, uint16 (vocab <= 65535) else uint32;
                                       each document is followed by one EOS id
    <split>.idx.npy                    int64 token offset where each document starts
    metadata.json                      written last: an entry without it is not complete

``key`` hashes the source fingerprint (file sizes and mtimes), the cleaning, split and
tokenizer configs and ``FORMAT_VERSION``, so a changed config is never served stale data.
Splits with fraction 0 are left out (no files, no ``metadata["splits"]`` entry).

Byte counts (``num_bytes``) are UTF-8 bytes of the cleaned text of a split's documents; the
EOS after each document counts as 0 bytes. Bits per byte =
``loss_nats_per_token * num_tokens / (num_bytes * ln 2)``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lm_lightning.data.cleaning import clean_documents
from lm_lightning.data.sources import describe_source, iter_documents, plain_config
from lm_lightning.data.tokenizer import Tokenizer, train_tokenizer
from lm_lightning.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_ENCODE_CHUNK_BYTES = 4 << 20  # text encoded per batch: bounds memory, keeps threads busy


@dataclass
class PreparedCorpus:
    directory: Path
    tokenizer_path: Path
    metadata: dict

    def tokens(self, split: str) -> np.memmap:
        """All token ids of ``split`` as a read-only 1-D memmap of shape ``(num_tokens,)``."""
        return np.memmap(self.directory / self._split(split)["file"], dtype=self.metadata["dtype"], mode="r")

    def document_starts(self, split: str) -> np.ndarray:
        """Token offset of each document's first token, shape ``(documents,)``, int64."""
        return np.load(self.directory / self._split(split)["index_file"])

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's cleaned text (EOS separators count 0 bytes)."""
        return self._split(split)["bytes"]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def _split(self, split: str) -> dict:
        splits = self.metadata["splits"]
        if split not in splits:
            raise UserError(f"split {split!r} was not prepared in {self.directory} (prepared: {', '.join(splits)}); "
                            f"set data.corpus.split.{split}_fraction > 0")
        return splits[split]


def prepare_corpus(data_cfg: Mapping, tokenizer_cfg: Mapping, cache_dir: str | Path, force: bool = False) -> PreparedCorpus:
    """Return the cached corpus for these configs, building it first if needed (or ``force``)."""
    source, cleaning = data_cfg.get("source") or {}, data_cfg.get("cleaning") or {}
    split_cfg = data_cfg.get("split") or {}
    _check_split_cfg(split_cfg)
    # Log verbosity is the one tokenizer option that cannot change the result.
    tokenizer_key = {k: v for k, v in plain_config(tokenizer_cfg).items() if k != "verbose"}
    fingerprint = {"format_version": FORMAT_VERSION, "source": describe_source(source), "cleaning": plain_config(cleaning),
                   "split": plain_config(split_cfg), "tokenizer": tokenizer_key}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    cache_dir = Path(cache_dir).expanduser()
    entry = cache_dir / f"{data_cfg.get('name', 'corpus')}-{key[:12]}"
    if (entry / "metadata.json").is_file() and not force:
        log.info("reusing cached corpus at %s", entry)
        return _load(entry)

    cache_dir.mkdir(parents=True, exist_ok=True)
    build = cache_dir / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    try:
        _build(build, source, cleaning, split_cfg, tokenizer_cfg, {**fingerprint, "key": key})
        _publish(build, entry)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already if published
    log.info("prepared corpus at %s", entry)
    return _load(entry)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats per token) of the empirical unigram distribution of ``tokens``: the loss
    of the best model that ignores context, a floor any trained LM should beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- building -----------------------------------------------------------------------------

def _build(folder: Path, source: Mapping, cleaning: Mapping, split_cfg: Mapping, tokenizer_cfg: Mapping, meta: dict) -> None:
    stats: dict = {}
    staged = _Staging(folder / "documents.staging")
    for doc in clean_documents(iter_documents(source), cleaning, stats):
        staged.add(doc)
    staged.close()
    if not staged.lengths:
        raise UserError(f"corpus is empty: {plain_config(source)} gave 0 documents after cleaning "
                        f"(check data.corpus.source.path and data.corpus.cleaning.min_chars)")
    assign = _assigner(split_cfg, staged)
    splits = [s for s in SPLITS if s == "train" or float(split_cfg.get(f"{s}_fraction") or 0) > 0]

    model = train_tokenizer((text for split, text in assign() if split == "train"), tokenizer_cfg, folder / "tokenizer")
    tokenizer = Tokenizer.load(model)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    writers = {s: _SplitWriter(folder, s, dtype, tokenizer) for s in splits}
    with tqdm(total=staged.total_bytes, desc="tokenizing", unit="B", unit_scale=True) as bar:
        for split, text in assign():
            writers[split].add(text)
            bar.update(len(text.encode("utf-8")))
    staged.path.unlink()

    meta.update(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), dtype=np.dtype(dtype).name,
                tokenizer={"cfg": plain_config(tokenizer_cfg), "type": tokenizer_cfg.get("type", "bpe"), "file": model.name,
                           "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                cleaning_stats=stats, splits={s: w.close() for s, w in writers.items()})
    tmp = folder / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / "metadata.json")


def _publish(build: Path, entry: Path) -> None:
    """Move a finished build into place with renames only, so no reader sees half an entry."""
    if entry.exists():  # forced rebuild, or a leftover without metadata.json
        old = entry.with_name(f".old-{entry.name}-{uuid.uuid4().hex[:8]}")
        os.rename(entry, old)
        os.rename(build, entry)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(build, entry)
    except OSError:
        if not (entry / "metadata.json").is_file():  # not another process finishing first
            raise


def _load(entry: Path) -> PreparedCorpus:
    metadata = json.loads((entry / "metadata.json").read_text())
    return PreparedCorpus(entry, entry / metadata["tokenizer"]["file"], metadata)


class _Staging:
    """Cleaned documents on disk (UTF-8 text back to back plus their lengths), so the
    split, tokenizer training and tokenization can each stream them again."""

    def __init__(self, path: Path) -> None:
        self.path, self._file = path, open(path, "wb")
        self.lengths: list[int] = []  # bytes per document
        self.chars: list[int] = []  # characters per document (contiguous split)
        self.total_bytes = 0

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self.lengths.append(len(data))
        self.chars.append(len(text))
        self.total_bytes += len(data)

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            for n in self.lengths:
                yield f.read(n).decode("utf-8")


class _SplitWriter:
    """Tokenizes one split in chunks and appends the ids to ``<split>.bin`` as it goes."""

    def __init__(self, folder: Path, split: str, dtype: type, tokenizer: Tokenizer) -> None:
        self.folder, self.split, self.dtype, self.tokenizer = folder, split, dtype, tokenizer
        self._file = open(folder / f"{split}.bin", "wb")
        self._hash = hashlib.sha256()
        self._pending: list[str] = []
        self._pending_bytes = 0
        self.starts: list[int] = []
        self.tokens = self.bytes = 0

    def add(self, text: str) -> None:
        self._pending.append(text)
        self._pending_bytes += len(text.encode("utf-8"))
        if self._pending_bytes >= _ENCODE_CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        for ids in self.tokenizer.encode_batch(self._pending):
            self.starts.append(self.tokens)
            data = np.asarray(ids + [self.tokenizer.eos_id], dtype=self.dtype).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self.tokens += len(ids) + 1
        self.bytes += self._pending_bytes
        self._pending, self._pending_bytes = [], 0

    def close(self) -> dict:
        self._flush()
        self._file.close()
        np.save(self.folder / f"{self.split}.idx.npy", np.asarray(self.starts, dtype=np.int64))
        return {"tokens": self.tokens, "bytes": self.bytes, "documents": len(self.starts), "file": f"{self.split}.bin",
                "index_file": f"{self.split}.idx.npy", "sha256_of_bin": self._hash.hexdigest()}


# --- splitting ----------------------------------------------------------------------------

def _check_split_cfg(cfg: Mapping) -> None:
    mode = cfg.get("mode", "document")
    if mode not in ("document", "contiguous"):
        raise UserError(f"data.corpus.split.mode={mode!r} is not valid: use document or contiguous")
    val, test = float(cfg.get("val_fraction") or 0), float(cfg.get("test_fraction") or 0)
    if val < 0 or test < 0 or val + test >= 1:
        raise UserError(f"data.corpus.split.val_fraction={val} and data.corpus.split.test_fraction={test} must be >= 0 and sum to < 1")


def _assigner(cfg: Mapping, staged: _Staging):
    """A function that streams ``(split, text)`` pairs over the staged documents."""
    val, test = float(cfg.get("val_fraction") or 0), float(cfg.get("test_fraction") or 0)
    if cfg.get("mode", "document") == "contiguous":
        # As nanoGPT: the first (1 - val - test) of the characters train, then val, then
        # test; a document that straddles a boundary is cut in two.
        total = sum(staged.chars)
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

    labels = _document_labels(len(staged.lengths), val, test, int(cfg.get("seed", 0)))
    return lambda: ((SPLITS[label], text) for label, text in zip(labels, staged))


def _document_labels(n: int, val: float, test: float, seed: int) -> np.ndarray:
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
