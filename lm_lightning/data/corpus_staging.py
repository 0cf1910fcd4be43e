"""The files a corpus build (``corpus.py``) writes as it streams: ``Staging`` keeps the cleaned
documents on disk with their lengths, exact hashes and MinHash signatures, so that deduplication, the
split, tokenizer training and tokenization can each read them again, and ``SplitWriter`` appends one
split's token ids to ``<split>.bin`` (with its document index and SHA-256) as tokenized batches arrive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import filelock
import numpy as np

from lm_lightning.data.dedup import DedupConfig, exact_duplicates, near_duplicates

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"  # in the cache folder: one lock file per corpus entry, held while it is prepared
OWNER_FILE = "owner.json"  # in a build folder (.tmp-<entry>-<pid>-<rand>): the machine and process building it


@contextlib.contextmanager
def build_lock(entry: Path) -> Iterator[None]:
    """Held while ``entry`` is prepared: a second run that needs the same corpus waits here (saying so) and then
    reuses the first one's result instead of preparing it again beside it. An OS lock (``filelock``) on
    ``.locks/<entry>.lock`` in the cache, let go when its holder ends, killed or not."""
    (locks := entry.parent / LOCKS_DIR).mkdir(exist_ok=True)
    lock = filelock.FileLock(locks / f"{entry.name}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("another run is preparing %s: waiting for it, to reuse its result", entry)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_owner(build: Path) -> None:
    (build / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def remove_dead_builds(cache_dir: Path) -> None:
    """Removes the build folders that killed ``prepare`` processes left in ``cache_dir``: only those written on
    this machine whose process is gone. A live one, one from another machine (a shared cache) or one whose owner
    cannot be told is left alone."""
    for folder in cache_dir.glob(".tmp-*"):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
            host, pid = owner["host"], int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # just created (no owner file yet), or not ours
        if host != socket.gethostname() or _alive(pid):
            continue
        log.info("removing %s, left by prepare process %d, which is gone", folder, pid)
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class Staging:
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


class SplitWriter:
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
