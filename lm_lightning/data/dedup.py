"""Deduplication: exact (hash of normalised text) and near-duplicate (MinHash + LSH).

Near-duplicates: a document is the set of its word ``ngram``-shingles (lower-cased ``\\w+``
words). A MinHash signature of ``num_perm`` 32-bit values estimates the Jaccard similarity
of two such sets; LSH banding (``bands`` × ``rows`` of the signature) makes documents that
agree on a whole band candidates, and each candidate pair is verified with the exact
Jaccard of the two shingle sets against ``threshold``. Verified pairs are joined into
clusters; the first document of each cluster (in corpus order) is kept.

Signatures are computed a batch of documents at a time with numpy (vectorized over
shingles and permutations), so they are made in the cleaning workers as the corpus
streams past; LSH needs only the signatures in memory (``4 * num_perm`` bytes a document).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lm_lightning.errors import UserError

WORD = re.compile(r"\w+")
_PRIME = np.uint64(0x100000001B3)


def normalized_text(text: str) -> str:
    """What exact dedup compares: lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


def exact_hash(text: str) -> int:
    """64-bit hash of :func:`normalized_text`."""
    return int.from_bytes(hashlib.blake2b(normalized_text(text).encode("utf-8"), digest_size=8).digest(), "little")


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class DedupConfig:
    """``data.corpus.dedup``: ``exact`` and ``near`` switches; MinHash ``ngram`` (words per
    shingle), ``num_perm`` (signature length), ``threshold`` (Jaccard), ``seed``; ``bands`` and
    ``rows`` (null: chosen from threshold and num_perm)."""

    exact: bool = False
    near: bool = False
    ngram: int = 5
    num_perm: int = 128
    threshold: float = 0.8
    bands: int | None = None
    rows: int | None = None
    seed: int = 1

    @classmethod
    def from_cfg(cls, cfg: Mapping | None) -> DedupConfig:
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown data.corpus.dedup option(s) {', '.join(sorted(unknown))}: use {', '.join(cls.__dataclass_fields__)}")
        out = cls(**{k: v for k, v in cfg.items() if v is not None or k in ("bands", "rows")})
        if not 0 < out.threshold <= 1:
            raise UserError(f"data.corpus.dedup.threshold={out.threshold} must be in (0, 1]")
        if out.ngram < 1 or out.num_perm < 1:
            raise UserError("data.corpus.dedup.ngram and data.corpus.dedup.num_perm must be >= 1")
        if (out.bands is None) != (out.rows is None) or (out.bands and out.bands * out.rows > out.num_perm):
            raise UserError("set both data.corpus.dedup.bands and rows (bands * rows <= num_perm), or neither")
        return out

    def lsh_shape(self) -> tuple[int, int]:
        return (self.bands, self.rows) if self.bands else lsh_bands(self.threshold, self.num_perm)


class MinHasher:
    """MinHash over word n-gram shingles. Permutation k maps a 32-bit shingle hash x to
    ``(a_k * x + b_k) mod 2**64 >> 32`` (multiply-shift, a strongly universal family)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
        self._word_hash: dict[str, int] = {}

    def _hash_words(self, words: list[str]) -> list[int]:
        memo = self._word_hash
        if len(memo) > 2_000_000:  # bound memory on huge vocabularies
            memo.clear()
        out = []
        for w in words:
            h = memo.get(w)
            if h is None:
                h = memo[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
            out.append(h)
        return out

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit hashes (in uint64) of every document's shingles, concatenated, and the
        number of shingles per document, shape ``(documents,)``. A document with fewer
        than ``ngram`` words is one shingle of all its words."""
        n = self.ngram
        words_per_doc = [WORD.findall(t.lower()) for t in texts]
        counts = np.fromiter((len(w) for w in words_per_doc), dtype=np.int64, count=len(texts))
        words = np.fromiter(self._hash_words([w for ws in words_per_doc for w in ws]) + [0], dtype=np.uint64)
        per_doc = np.maximum(counts - n + 1, 1)
        word_start = np.cumsum(counts) - counts
        doc = np.repeat(np.arange(len(texts)), per_doc)
        first = np.cumsum(per_doc) - per_doc
        pos = word_start[doc] + (np.arange(int(per_doc.sum())) - first[doc])
        end = word_start[doc] + counts[doc]
        h = np.zeros(len(pos), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                idx = pos + j
                w = np.where(idx < end, words[np.minimum(idx, len(words) - 1)], np.uint64(0))
                h = (h + w) * _PRIME
        return _splitmix64(h) >> np.uint64(32), per_doc

    def signatures(self, texts: Sequence[str], chunk: int = 1 << 12) -> np.ndarray:
        """MinHash signatures, shape ``(documents, num_perm)``, uint32."""
        x, per_doc = self.shingles(texts)
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        bounds = np.concatenate([[0], np.cumsum(per_doc)])
        a, b = self.a[:, None], self.b[:, None]
        d = 0
        while d < len(texts):
            # whole documents, ~chunk shingles (at least one document): the (num_perm, chunk)
            # block stays in cache, and the per-document minimum runs along contiguous rows
            e = min(max(d + 1, int(np.searchsorted(bounds, bounds[d] + chunk, side="right")) - 1), len(texts))
            lo, hi = bounds[d], bounds[e]
            with np.errstate(over="ignore"):
                v = a * x[None, lo:hi]
                v += b
                v >>= np.uint64(32)
            out[d:e] = np.minimum.reduceat(v.astype(np.uint32), bounds[d:e] - lo, axis=1).T
            d = e
        return out

    def shingle_set(self, text: str) -> set[int]:
        return set(self.shingles([text])[0].tolist())


def lsh_bands(threshold: float, num_perm: int, false_negative_weight: float = 0.98) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted area of false
    positives (Jaccard < threshold) and false negatives (>= threshold) under the LSH
    S-curve ``1 - (1 - s**rows)**bands``, as datasketch does. Candidates are verified
    exactly afterwards, so false negatives weigh more by default."""
    below, above = np.linspace(0, threshold, 201), np.linspace(threshold, 1, 201)
    best, shape = np.inf, (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - below ** r) ** b, below)
            fn = np.trapezoid((1 - above ** r) ** b, above)
            err = (1 - false_negative_weight) * fp + false_negative_weight * fn
            if err < best:
                best, shape = err, (b, r)
    return shape


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Pairs ``(i, j)``, i < j, of documents whose signatures agree on some whole band,
    shape ``(pairs, 2)``: in each bucket every member is paired with the bucket's first."""
    n = len(signatures)
    found = []
    for band in range(bands):
        key = np.zeros(n, dtype=np.uint64)
        for c in range(band * rows, (band + 1) * rows):
            key = _splitmix64(key ^ signatures[:, c].astype(np.uint64))
        order = np.argsort(key, kind="stable")
        k = key[order]
        new = np.ones(n, dtype=bool)
        new[1:] = k[1:] != k[:-1]
        leader = order[np.flatnonzero(new)][np.cumsum(new) - 1]
        found.append(np.stack([leader[~new], order[~new]], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return np.unique(pairs, axis=0) if len(pairs) else pairs


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def near_duplicates(signatures: np.ndarray, cfg: DedupConfig, text_of: Callable[[int], str] | None = None,
                    progress: bool = True) -> tuple[np.ndarray, dict]:
    """Keep mask (``(documents,)`` bool) and stats for near-duplicate removal. ``text_of(i)``
    gives document i's text for exact Jaccard verification; without it, candidates are
    verified by the share of equal signature values."""
    bands, rows = cfg.lsh_shape()
    pairs = lsh_candidate_pairs(signatures, bands, rows)
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed)
    sets: dict[int, set[int]] = {}

    def shingle_set(i: int) -> set[int]:
        if i not in sets:
            if len(sets) > 100_000:
                sets.clear()
            sets[i] = hasher.shingle_set(text_of(i))
        return sets[i]

    parent = list(range(len(signatures)))
    verified = 0
    for i, j in tqdm(pairs.tolist(), desc="dedup: verifying candidate pairs", unit="pair", disable=not progress or len(pairs) < 1000):
        if text_of is not None:
            similar = jaccard(shingle_set(i), shingle_set(j)) >= cfg.threshold
        else:
            similar = float(np.mean(signatures[i] == signatures[j])) >= cfg.threshold
        if similar:
            verified += 1
            ri, rj = _find(parent, i), _find(parent, j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)  # the root is the cluster's first document
    roots = np.fromiter((_find(parent, i) for i in range(len(parent))), dtype=np.int64, count=len(parent))
    keep = roots == np.arange(len(parent))
    clustered = np.bincount(roots, minlength=len(parent))
    stats = {"near_bands": bands, "near_rows": rows, "near_candidate_pairs": int(len(pairs)), "near_verified_pairs": verified,
             "near_clusters": int((clustered > 1).sum()), "near_removed": int((~keep).sum())}
    return keep, stats


def exact_duplicates(hashes: np.ndarray) -> tuple[np.ndarray, dict]:
    """Keep mask (the first document of each hash) and stats for exact duplicates."""
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[first] = True
    return keep, {"exact_clusters": int((counts > 1).sum()), "exact_removed": int(len(hashes) - len(first))}
