"""Exact and near-duplicate removal. The near-dedup quality test runs on real Gutenberg
paragraphs: 2,000 originals, 200 unrelated paragraphs and 200 near-copies (about 10% of
words substituted, shuffled or dropped, 5-gram Jaccard above 0.8 to their source)."""

import gzip
import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from lm_lightning.data.dedup import (DedupConfig, MinHasher, exact_duplicates, exact_hash, jaccard, lsh_bands,
                                     lsh_candidate_pairs, near_duplicates)
from lm_lightning.errors import UserError

GUTENBERG = Path("/work/shared/data/gutenberg/gutenberg_en_prose.jsonl.gz")


def _shingles(text, n=5):
    """Reference shingles, independent of the implementation: lower-cased \\w+ word 5-grams."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def _paragraphs(books):
    """Distinct paragraphs of at least 40 words from the first ``books`` books."""
    seen, out = set(), []
    with gzip.open(GUTENBERG, "rt", encoding="utf-8") as f:
        for line in itertools.islice(f, books):
            for p in json.loads(line)["text"].split("\n\n"):
                p = p.strip()
                if len(p.split()) >= 40 and (key := " ".join(p.lower().split())) not in seen:
                    seen.add(key)
                    out.append(p)
    return out


def _near_copy(text, rng):
    """Substitute, shuffle or drop one span of ~10% of the words; shrink it until the
    5-gram Jaccard to the source is above 0.8."""
    words = text.split()
    for k in range(round(0.1 * len(words)), 0, -1):
        i = rng.randrange(len(words) - k)
        op = rng.choice(["substitute", "shuffle", "drop"])
        if op == "substitute":
            span = [rng.choice(["lamp", "river", "quietly", "seven", "glass", "north"]) for _ in range(k)]
        elif op == "shuffle":
            span = rng.sample(words[i:i + k], k)
        else:
            span = []
        copy = " ".join(words[:i] + span + words[i + k:])
        if copy != text and jaccard(_shingles(copy), _shingles(text)) > 0.8:
            return copy
    return None


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(0)
    paragraphs = _paragraphs(books=14)
    originals, unrelated = paragraphs[:2000], paragraphs[-200:]
    assert len(paragraphs) >= 2400
    long_ones = [p for p in originals if len(p.split()) >= 120]
    copies = []
    for source in rng.sample(long_ones, len(long_ones)):
        copy = _near_copy(source, rng)
        if copy is not None:
            copies.append(copy)
        if len(copies) == 200:
            break
    assert len(copies) == 200
    docs = originals + unrelated + copies
    return docs, len(originals) + len(unrelated)


def test_near_dedup_removes_95_percent_of_near_copies_and_at_most_1_percent_of_originals(corpus):
    docs, n_first = corpus
    cfg = DedupConfig(near=True)
    signatures = MinHasher(cfg.num_perm, cfg.ngram, cfg.seed).signatures(docs)
    keep, stats = near_duplicates(signatures, cfg, docs.__getitem__, progress=False)
    copies_removed = (~keep[n_first:]).mean()
    originals_removed = (~keep[:n_first]).mean()
    assert copies_removed >= 0.95, stats
    assert originals_removed <= 0.01, stats
    assert stats["near_removed"] == int((~keep).sum()) and stats["near_clusters"] >= 190


def test_minhash_estimates_jaccard(corpus):
    docs, n_first = corpus
    hasher = MinHasher(num_perm=256)
    sig = hasher.signatures(docs[:50] + docs[n_first:n_first + 50])
    errors = []
    for i in range(50):  # each copy against the originals: equal-value share ≈ true Jaccard
        for j in range(50):
            true = jaccard(hasher.shingle_set(docs[i]), hasher.shingle_set(docs[n_first + j]))
            errors.append(abs(np.mean(sig[i] == sig[50 + j]) - true))
    assert np.mean(errors) < 0.02 and np.max(errors) < 0.15
    assert hasher.shingle_set("One two three four five six") == hasher.shingle_set("one, two THREE four five six!")


def test_signatures_do_not_depend_on_batching():
    hasher = MinHasher(num_perm=64)
    docs = ["a b c d e f g", "short", "", "the same words in the same order here"] * 3
    together = hasher.signatures(docs)
    one_by_one = np.concatenate([MinHasher(num_perm=64).signatures([d]) for d in docs])
    assert np.array_equal(together, one_by_one)
    assert np.array_equal(hasher.signatures(docs, chunk=3), together)


def test_lsh_finds_every_pair_of_equal_signatures_and_none_of_different_ones():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(100, 128), dtype=np.uint64).astype(np.uint32)
    sig[50] = sig[3]
    sig[70] = sig[3]
    sig[60, :7] = sig[10, :7]  # agrees on the first band only
    assert lsh_candidate_pairs(sig, 17, 7).tolist() == [[3, 50], [3, 70], [10, 60]]


def test_lsh_shape_puts_the_threshold_on_the_steep_part_of_the_s_curve():
    bands, rows = lsh_bands(0.8, 128)
    assert (bands, rows) == (17, 7)
    p = lambda s: 1 - (1 - s ** rows) ** bands  # noqa: E731
    assert p(0.8) > 0.98 and p(0.3) < 0.01


def test_exact_dedup_keeps_the_first_of_each_normalised_text():
    docs = ["Hello  World", "hello world", "other", "HELLO\nWORLD", "other"]
    keep, stats = exact_duplicates(np.array([exact_hash(d) for d in docs], dtype=np.uint64))
    assert keep.tolist() == [True, False, True, False, False]
    assert stats == {"exact_clusters": 2, "exact_removed": 3}


def test_bad_dedup_options_name_the_option():
    with pytest.raises(UserError, match="data.corpus.dedup.threshold"):
        DedupConfig.from_cfg({"threshold": 1.5})
    with pytest.raises(UserError, match="unknown data.corpus.dedup option"):
        DedupConfig.from_cfg({"treshold": 0.8})
    with pytest.raises(UserError, match="bands"):
        DedupConfig.from_cfg({"bands": 20, "rows": 10})
