"""Prepare a tokenized corpus once and cache it: source → clean (+ exact hash and MinHash
signature) → dedup → split → train tokenizer (train split only) → ``<split>.bin`` token
files, memory-mapped at training time.

The source streams through the stages: cleaning and tokenization run on batches of
documents in ``num_proc`` worker processes (``parallel.py``), cleaned text waits in a
staging file on disk, so memory holds only a few batches, the dedup signatures
(``4 * num_perm`` bytes a document) and sentencepiece's training sample.

A cache entry ``<cache_dir>/<name>-<key[:12]>/`` holds::

    tokenizer.model, tokenizer.vocab   the sentencepiece model trained on the train split
    <split>.bin                        token ids, 1-D, uint16 (vocab <= 65535) else uint32;
                                       each document is followed by one EOS id
    <split>.idx.npy                    int64 token offset where each document starts
    report.json                        what the build did (``report.py``)
    metadata.json                      written last: an entry without it is not complete

``key`` hashes the source fingerprint (file sizes and mtimes), the cleaning, dedup, split
and tokenizer configs and ``FORMAT_VERSION``, so a changed config is never served stale data.
Splits with fraction 0 are left out (no files, no ``metadata["splits"]`` entry).

Byte counts (``num_bytes``) are UTF-8 bytes of the cleaned text of a split's documents; the
EOS after each document counts as 0 bytes. Bits per byte =
``loss_nats_per_token * num_tokens / (num_bytes * ln 2)``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lm_lightning.data.cleaning import clean_documents
from lm_lightning.data.dedup import DedupConfig, MinHasher, exact_duplicates, exact_hash, near_duplicates
from lm_lightning.data.parallel import batched, ordered_map
from lm_lightning.data.report import REPORT_FILE, build_report
from lm_lightning.data.sources import describe_source, iter_documents, plain_config
from lm_lightning.data.tokenizer import Tokenizer, train_tokenizer
from lm_lightning.data.hashing import file_sha256
from lm_lightning.errors import UserError
from lm_lightning.data.hashing import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
TOKEN_DTYPES = ("auto", "uint16", "uint32")
SPLITS = ("train", "val", "test")


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
        """Token offset of each document's first token, shape ``(documents,)``, int64."""
        return np.load(self.directory / self._split(split)["index_file"])

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's cleaned text (EOS separators count 0 bytes)."""
        return self._split(split)["bytes"]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

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


def prepare_corpus(data_cfg: Mapping, tokenizer_cfg: Mapping, cache_dir: str | Path, force: bool = False,
                   num_proc: int | None = None) -> PreparedCorpus:
    """Return the cached corpus for these configs, building it first if needed (or ``force``).

    ``num_proc``: worker processes for cleaning, MinHash and tokenization (default
    ``data_cfg["num_proc"]``, else 1). It does not change the result, so not the cache key.
    """
    source, cleaning = data_cfg.get("source") or {}, data_cfg.get("cleaning") or {}
    dedup = plain_config(data_cfg.get("dedup") or {})
    DedupConfig.from_cfg(dedup)  # a bad option fails before any work
    num_proc = int(num_proc or data_cfg.get("num_proc") or 1)
    split_cfg = data_cfg.get("split") or {}
    _check_split_cfg(split_cfg)
    # Log verbosity is the one tokenizer option that cannot change the result.
    tokenizer_key = {k: v for k, v in plain_config(tokenizer_cfg).items() if k != "verbose"}
    if tokenizer_key.get("model_file"):  # a re-used tokenizer is known by its content, not its path
        model_file = Path(tokenizer_key["model_file"])
        if not model_file.is_file():
            raise UserError(f"tokenizer.model_file={model_file} does not exist: pass a sentencepiece .model file")
        tokenizer_key = {"model_sha256": file_sha256(model_file)}
    fingerprint = {"format_version": FORMAT_VERSION, "source": describe_source(source), "cleaning": plain_config(cleaning),
                   "dedup": dedup, "split": plain_config(split_cfg), "tokenizer": tokenizer_key}
    token_dtype = data_cfg.get("token_dtype") or "auto"
    if token_dtype not in TOKEN_DTYPES:
        raise UserError(f"data.corpus.token_dtype={token_dtype!r} is not known: choose auto, uint16 or uint32")
    if token_dtype != "auto":  # auto keeps the keys of caches built before the option existed
        fingerprint["token_dtype"] = token_dtype
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
        _build(build, source, cleaning, dedup, split_cfg, tokenizer_cfg, {**fingerprint, "key": key}, num_proc)
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

_BATCH_DOCS, _BATCH_CHARS = 2000, 1 << 20  # documents per worker task: ~1 MB of text
_worker: dict = {}  # per-process state set by the pool initializers


def _init_clean_worker(cleaning: Mapping, dedup: DedupConfig) -> None:
    _worker.update(cleaning=cleaning, dedup=dedup,
                   hasher=MinHasher(dedup.num_perm, dedup.ngram, dedup.seed) if dedup.near else None)


def _clean_batch(texts: list[str]) -> tuple[list[str], dict, np.ndarray, np.ndarray | None]:
    """Clean a batch; exact hashes and MinHash signatures of the documents that remain."""
    stats: dict = {}
    cleaned = list(clean_documents(texts, _worker["cleaning"], stats))
    hashes = np.fromiter((exact_hash(t) for t in cleaned), dtype=np.uint64, count=len(cleaned))
    hasher = _worker["hasher"]
    signatures = hasher.signatures(cleaned) if hasher is not None and cleaned else None
    return cleaned, stats, hashes, signatures


def _init_tokenize_worker(model: Path) -> None:
    _worker["tokenizer"] = tokenizer = Tokenizer.load(model, num_threads=1)
    _worker["fallback"] = np.asarray(tokenizer.fallback_ids(), dtype=np.uint32)


def _tokenize_batch(batch: list[tuple[str, str]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch as compact arrays (cheap to send between processes): each document's split,
    its token ids with a trailing EOS (all documents concatenated, uint32), and per document
    the number of tokens, UTF-8 bytes, words and fallback tokens (``<unk>`` or bytes)."""
    tokenizer = _worker["tokenizer"]
    texts = [text for _, text in batch]
    encoded = tokenizer.encode_batch(texts)
    eos = [tokenizer.eos_id]
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    ids = np.fromiter(itertools.chain.from_iterable(itertools.chain(ids, eos) for ids in encoded), dtype=np.uint32,
                      count=int(lengths.sum()))
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    words = np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(texts))
    fallback = np.add.reduceat(np.isin(ids, _worker["fallback"]).astype(np.int64), np.cumsum(lengths) - lengths)
    return [split for split, _ in batch], ids, lengths, nbytes, words, fallback


def _build(folder: Path, source: Mapping, cleaning: Mapping, dedup_cfg: Mapping, split_cfg: Mapping,
           tokenizer_cfg: Mapping, meta: dict, num_proc: int) -> None:
    dedup = DedupConfig.from_cfg(dedup_cfg)
    seconds: dict[str, float] = {}
    stats: dict = {}

    # 1. stream the source through cleaning (and hashing/MinHash) into the staging file
    clock = time.perf_counter()
    staged = _Staging(folder / "documents.staging", dedup.num_perm if dedup.near else 0)
    batches = batched(iter_documents(source), _BATCH_DOCS, _BATCH_CHARS)
    results = ordered_map(_clean_batch, batches, num_proc, _init_clean_worker, (plain_config(cleaning), dedup))
    with tqdm(desc="cleaning", unit="doc") as bar:
        for cleaned, batch_stats, hashes, signatures in results:
            _add_counts(stats, batch_stats)
            staged.add(cleaned, hashes, signatures)
            bar.update(batch_stats.get("documents_in", 0))
    staged.close()
    seconds["read_and_clean"] = time.perf_counter() - clock
    if not staged.lengths:
        raise UserError(f"corpus is empty: {_where(source)} gave 0 documents after cleaning ({_removals(stats)}); "
                        f"check data.corpus.source.path and the data.corpus.cleaning filters")

    # 2. deduplicate: exact, then near-duplicates among what is left
    clock = time.perf_counter()
    dedup_stats = staged.deduplicate(dedup)
    seconds["dedup"] = time.perf_counter() - clock
    if not staged.kept_count:
        raise UserError(f"corpus is empty after deduplication: {_where(source)}")

    # 3. split, train the tokenizer on the train split, tokenize every split
    assign = _assigner(split_cfg, staged)
    splits = [s for s in SPLITS if s == "train" or float(split_cfg.get(f"{s}_fraction") or 0) > 0]
    clock = time.perf_counter()
    model = train_tokenizer((text for split, text in assign() if split == "train"), tokenizer_cfg, folder / "tokenizer")
    tokenizer = Tokenizer.load(model)
    seconds["tokenizer_training"] = time.perf_counter() - clock

    clock = time.perf_counter()
    dtype = _token_dtype(meta.get("token_dtype", "auto"), tokenizer.vocab_size)
    writers = {s: _SplitWriter(folder, s, dtype) for s in splits}
    batches = batched(assign(), _BATCH_DOCS, _BATCH_CHARS, size=lambda item: len(item[1]))
    with tqdm(total=staged.kept_bytes, desc="tokenizing", unit="B", unit_scale=True) as bar:
        for labels, ids, lengths, nbytes, words, fallback in ordered_map(_tokenize_batch, batches, num_proc, _init_tokenize_worker, (model,)):
            labels = np.asarray(labels)
            token_labels = np.repeat(labels, lengths)
            for split in np.unique(labels):
                docs = labels == split
                writers[split].add(ids[token_labels == split], lengths[docs], int(nbytes[docs].sum()), int(words[docs].sum()),
                                   int(fallback[docs].sum()))
            bar.update(int(nbytes.sum()))
    seconds["tokenize"] = time.perf_counter() - clock
    staged.remove()

    split_info = {s: w.close() for s, w in writers.items()}
    meta.update(created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), dtype=np.dtype(dtype).name,
                tokenizer={"cfg": plain_config(tokenizer_cfg), "type": tokenizer_cfg.get("type", "bpe"), "file": model.name,
                           "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                cleaning_stats=stats, dedup_stats=dedup_stats, splits=split_info, report_file=REPORT_FILE)
    report = build_report(meta, seconds, num_proc)
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))
    tmp = folder / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, folder / "metadata.json")  # last: an entry without it is incomplete


def _add_counts(total: dict, more: dict) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


def _where(source: Mapping) -> str:
    return f"data.corpus.source (kind={source.get('kind')}, path={source.get('path')})"


def _removals(stats: dict) -> str:
    removed = [f"{k[8:]}: {v}" for k, v in sorted(stats.items()) if k.startswith("removed_") and not k.endswith("_bytes") and v]
    return f"{stats.get('documents_in', 0)} documents in; removed by " + (", ".join(removed) or "none")


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


def _token_dtype(choice: str, vocab_size: int) -> type:
    """uint16 when every id fits (vocab ≤ 65,536), else uint32; a forced uint16 that cannot hold the ids fails."""
    fits = vocab_size <= np.iinfo(np.uint16).max + 1
    if choice == "uint16" and not fits:
        raise UserError(f"the tokenizer has {vocab_size:,} pieces, more than data.corpus.token_dtype=uint16 holds "
                        "(ids up to 65,535): use token_dtype=uint32 or auto")
    return np.uint32 if choice == "uint32" or not fits else np.uint16


def _load(entry: Path) -> PreparedCorpus:
    metadata = json.loads((entry / "metadata.json").read_text())
    return PreparedCorpus(entry, entry / metadata["tokenizer"]["file"], metadata)


class _Staging:
    """Cleaned documents on disk (UTF-8 text back to back), their lengths, exact hashes and
    MinHash signatures (a file of uint32 rows), so dedup, the split, tokenizer training and
    tokenization can each stream them again. ``keep`` marks the documents dedup kept."""

    def __init__(self, path: Path, num_perm: int) -> None:
        self.path, self._file = path, open(path, "wb")
        self.num_perm = num_perm
        self._signature_path = path.with_suffix(".signatures")
        self._signatures = open(self._signature_path, "wb") if num_perm else None
        self.lengths: list[int] = []  # bytes per document
        self.chars: list[int] = []  # characters per document (contiguous split)
        self._hashes: list[np.ndarray] = []
        self.keep: np.ndarray | None = None

    def add(self, texts: list[str], hashes: np.ndarray, signatures: np.ndarray | None) -> None:
        for text in texts:
            data = text.encode("utf-8")
            self._file.write(data)
            self.lengths.append(len(data))
            self.chars.append(len(text))
        self._hashes.append(hashes)
        if self._signatures is not None and signatures is not None:
            self._signatures.write(np.ascontiguousarray(signatures, dtype=np.uint32).tobytes())

    def close(self) -> None:
        self._file.close()
        if self._signatures is not None:
            self._signatures.close()
        self.keep = np.ones(len(self.lengths), dtype=bool)

    @property
    def kept_count(self) -> int:
        return int(self.keep.sum())

    @property
    def kept_bytes(self) -> int:
        return int(np.asarray(self.lengths, dtype=np.int64)[self.keep].sum())

    def kept_chars(self) -> list[int]:
        return [c for c, k in zip(self.chars, self.keep) if k]

    def deduplicate(self, cfg: DedupConfig) -> dict:
        """Mark exact, then near duplicates as not kept; the removal counts and bytes."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        stats: dict = {"documents_in": len(lengths), "bytes_in": int(lengths.sum())}
        if cfg.exact:
            keep, exact = exact_duplicates(np.concatenate(self._hashes))
            self.keep &= keep
            stats.update(exact, exact_removed_bytes=int(lengths[~keep].sum()))
        if cfg.near:
            index = np.flatnonzero(self.keep)
            signatures = np.memmap(self._signature_path, dtype=np.uint32, mode="r").reshape(-1, self.num_perm)[index]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            with open(self.path, "rb") as f:
                def text_of(i: int) -> str:
                    f.seek(offsets[index[i]])
                    return f.read(lengths[index[i]]).decode("utf-8")
                keep, near = near_duplicates(signatures, cfg, text_of)
            self.keep[index[~keep]] = False
            stats.update(near, near_removed_bytes=int(lengths[index[~keep]].sum()))
        stats.update(documents_out=self.kept_count, bytes_out=self.kept_bytes)
        return stats

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as f:
            for n, keep in zip(self.lengths, self.keep):
                data = f.read(n)
                if keep:
                    yield data.decode("utf-8")

    def remove(self) -> None:
        self.path.unlink()
        self._signature_path.unlink(missing_ok=True)


class _SplitWriter:
    """Appends one split's token ids to ``<split>.bin`` as they arrive."""

    def __init__(self, folder: Path, split: str, dtype: type) -> None:
        self.folder, self.split, self.dtype = folder, split, dtype
        self._file = open(folder / f"{split}.bin", "wb")
        self._hash = hashlib.sha256()
        self.starts: list[int] = []
        self.tokens = self.bytes = self.words = self.fallback = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray, nbytes: int, words: int, fallback: int) -> None:
        """``ids``: documents' token ids back to back, each with its EOS; ``lengths``: tokens
        per document; ``nbytes``, ``words``, ``fallback``: UTF-8 bytes, words and
        ``<unk>``/byte-fallback tokens of those documents."""
        self.fallback += fallback
        self.starts.extend((self.tokens + np.cumsum(lengths) - lengths).tolist())
        data = ids.astype(self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.tokens += len(ids)
        self.bytes += nbytes
        self.words += words

    def close(self) -> dict:
        self._file.close()
        np.save(self.folder / f"{self.split}.idx.npy", np.asarray(self.starts, dtype=np.int64))
        return {"tokens": self.tokens, "bytes": self.bytes, "words": self.words, "fallback_tokens": self.fallback,
                "documents": len(self.starts),
                "file": f"{self.split}.bin", "index_file": f"{self.split}.idx.npy", "sha256_of_bin": self._hash.hexdigest()}


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

    labels = _document_labels(staged.kept_count, val, test, int(cfg.get("seed", 0)))
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
