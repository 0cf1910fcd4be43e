"""Prepare a tokenized corpus once and cache it: source → clean (+ exact hash and MinHash
signature) → dedup → split → train tokenizer (train split only) → ``<split>.bin`` token
files, memory-mapped at training time.

The source streams through the stages: cleaning and tokenization run on batches of
documents in ``num_proc`` worker processes (``parallel.py``), cleaned text waits in a
staging file on disk, so memory holds only a few batches, the dedup signatures
(``4 * num_perm`` bytes a document) and sentencepiece's training sample.

A cache entry ``<cache_dir>/<name>-<key[:12]>/`` holds::

    tokenizer.model, tokenizer.vocab   the sentencepiece model trained on the train split
                                       (tokenizer.json instead for byte_bpe, words and hf)
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
import multiprocessing as mp
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lm_lightning.data.cleaning import clean_documents
from lm_lightning.data.corpus_split import SPLITS, check_split_cfg, split_assigner
from lm_lightning.data.corpus_staging import (
    LOCKS_DIR,
    OWNER_FILE,
    SplitWriter,
    Staging,
    build_lock,
    remove_dead_builds,
    write_owner,
)
from lm_lightning.data.dedup import DedupConfig, MinHasher, exact_hash
from lm_lightning.data.hashing import DigestMemo, file_sha256
from lm_lightning.data.parallel import batched, ordered_map
from lm_lightning.data.prepared_corpus import PreparedCorpus
from lm_lightning.data.report import REPORT_FILE, build_report
from lm_lightning.data.sources import describe_source, iter_documents, plain_config
from lm_lightning.data.tokenizer import (
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from lm_lightning.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
DIGEST_MEMO = "file-digests.json"  # in the cache folder: the source files' SHA-256 by path, size, mtime and inode
BOOKKEEPING = (LOCKS_DIR, DIGEST_MEMO)  # what the cache folder holds besides corpus entries and builds (.tmp-*)
TOKEN_DTYPES = ("auto", "uint16", "uint32")


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
    check_split_cfg(split_cfg)
    tokenizer_key = tokenizer_fingerprint(plain_config(tokenizer_cfg))  # a re-used tokenizer by its content
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    digests = DigestMemo(cache_dir / DIGEST_MEMO)
    source_key = describe_source(source, digests.sha256)  # the files by their content, not their path or mtime
    fingerprint = {"format_version": FORMAT_VERSION, "source": source_key, "cleaning": plain_config(cleaning),
                   "dedup": dedup, "split": plain_config(split_cfg), "tokenizer": tokenizer_key}
    token_dtype = data_cfg.get("token_dtype") or "auto"
    if token_dtype not in TOKEN_DTYPES:
        raise UserError(f"data.corpus.token_dtype={token_dtype!r} is not known: choose auto, uint16 or uint32")
    if token_dtype != "auto":  # auto keeps the keys of caches built before the option existed
        fingerprint["token_dtype"] = token_dtype
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    entry = cache_dir / f"{data_cfg.get('name', 'corpus')}-{key[:12]}"
    digests.save()
    if not force and (cached := _reuse(entry)):
        return cached
    with build_lock(entry):  # runs that need the same corpus at once: one prepares it, the others wait and reuse it
        if not force and (cached := _reuse(entry)):
            return cached
        return _prepare(entry, source, cleaning, dedup, split_cfg, tokenizer_cfg, {**fingerprint, "key": key}, num_proc)


def _reuse(entry: Path) -> PreparedCorpus | None:
    """The cached corpus at ``entry`` if it is there and whole; None when it must be prepared."""
    if not (entry / "metadata.json").is_file():
        return None
    if (problem := _entry_problem(entry)) is None:
        log.info("reusing cached corpus at %s", entry)
        return open_prepared(entry)
    # a damaged entry (cut short, edited) is rebuilt: _publish moves it aside once the new one is ready
    log.warning("cached corpus %s is damaged (%s): preparing it again", entry, problem)
    return None


def _prepare(entry: Path, source: Mapping, cleaning: Mapping, dedup: Mapping, split_cfg: Mapping, tokenizer_cfg: Mapping,
             metadata: dict, num_proc: int) -> PreparedCorpus:
    cache_dir = entry.parent
    remove_dead_builds(cache_dir)
    build = cache_dir / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    write_owner(build)
    try:
        _build(build, source, cleaning, dedup, split_cfg, tokenizer_cfg, metadata, num_proc)
        (build / OWNER_FILE).unlink()
        _publish(build, entry)
    finally:
        shutil.rmtree(build, ignore_errors=True)  # gone already if published
    log.info("prepared corpus at %s", entry)
    return open_prepared(entry)


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
    if mp.parent_process() is not None:  # one worker per core already; and no fork-after-threads warning
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["tokenizer"] = tokenizer = load_tokenizer(model, num_threads=1)
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
    staged = Staging(folder / "documents.staging", dedup.num_perm if dedup.near else 0)
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
    assign = split_assigner(split_cfg, staged)
    splits = [s for s in SPLITS if s == "train" or float(split_cfg.get(f"{s}_fraction") or 0) > 0]
    clock = time.perf_counter()
    model = train_tokenizer((text for split, text in assign() if split == "train"), tokenizer_cfg, folder / "tokenizer")
    tokenizer = load_tokenizer(model)
    seconds["tokenizer_training"] = time.perf_counter() - clock

    clock = time.perf_counter()
    dtype = _token_dtype(meta.get("token_dtype", "auto"), tokenizer.vocab_size)
    writers = {s: SplitWriter(folder, s, dtype) for s in splits}
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


def _entry_problem(entry: Path) -> str | None:
    """Why a finished entry cannot be used (unreadable metadata.json, a tokenizer file that is missing or
    not the one its SHA-256 names), or None. Token files are checked by ``PreparedCorpus.tokens``."""
    try:
        metadata = json.loads((entry / "metadata.json").read_text())
        tokenizer = metadata["tokenizer"]
        path, expected = entry / tokenizer["file"], tokenizer.get("sha256")
        metadata["splits"], metadata["dtype"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"metadata.json unreadable: {type(err).__name__}: {err}"
    if not path.is_file():
        return f"{path.name} is missing"
    # the tokenizer's own hash (tokenizer.py hashes the file's bytes) against the one recorded at build time
    if expected and file_sha256(path) != expected:
        return f"{path.name} does not match the SHA-256 in metadata.json"
    return None


def open_prepared(entry: Path) -> PreparedCorpus:
    """A finished cache entry (a run.json's corpus_dir), its files checked against its metadata."""
    if problem := _entry_problem(entry):
        raise UserError(f"cached corpus {entry} is damaged ({problem}): rm -rf {entry} and prepare again")
    metadata = json.loads((entry / "metadata.json").read_text())
    return PreparedCorpus(entry, entry / metadata["tokenizer"]["file"], metadata)
