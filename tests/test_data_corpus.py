"""Acceptance point 5: a tokenized corpus is stored once, memory-mapped, described by its
metadata, and never served stale: an unchanged config reuses the cache without reading the
source; a changed tokenizer or cleaning config builds a new entry."""

import hashlib
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import lm_lightning.data.corpus as corpus_module
from lm_lightning.data.cleaning import clean_documents
from lm_lightning.data.corpus import DIGEST_MEMO, prepare_corpus
from lm_lightning.data.hashing import file_sha256 as real_sha256
from lm_lightning.data.prepared_corpus import unigram_entropy
from lm_lightning.data.sources import iter_documents
from lm_lightning.errors import UserError

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
DATA = {
    "name": "shakespeare",
    "source": {"kind": "text", "path": str(SHAKESPEARE), "document_split": "paragraph", "max_bytes": 200_000},
    "cleaning": {"strip_whitespace": True},
    "split": {"val_fraction": 0.1, "test_fraction": 0.05, "seed": 0},
}
TOKENIZER = {"type": "bpe", "vocab_size": 400, "byte_fallback": True, "verbose": False}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(cache):
    return prepare_corpus(DATA, TOKENIZER, cache)


def _documents(corpus, split):
    """The split's documents, decoded back from the token file."""
    tokens, starts, tok = corpus.tokens(split), corpus.document_starts(split), corpus.tokenizer()
    ends = list(starts[1:]) + [len(tokens)]
    return [tok.decode(tokens[s:e - 1]) for s, e in zip(starts, ends)]  # e - 1: drop the EOS


def _entry_state(corpus):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in corpus.directory.iterdir()}


def test_unchanged_config_reuses_the_cache_without_reading_the_source(base, cache, monkeypatch):
    before = _entry_state(base)

    def must_not_read(source):
        raise AssertionError("the source was read although the cache entry is complete")

    monkeypatch.setattr(corpus_module, "iter_documents", must_not_read)
    again = prepare_corpus(DATA, TOKENIZER, cache)
    assert again.directory == base.directory
    assert again.metadata == base.metadata
    assert _entry_state(again) == before


def test_a_copy_of_the_source_elsewhere_reuses_the_cache_and_hashes_each_file_once(base, cache, tmp_path, monkeypatch):
    """The same bytes at another path with another mtime (data copied again to a fresh machine) are the same corpus;
    the source's SHA-256 is remembered by path, size, mtime and inode, so a second look does not read it again."""
    copy = tmp_path / "input.txt"
    copy.write_bytes(SHAKESPEARE.read_bytes())
    moved = {**DATA, "source": {**DATA["source"], "path": str(copy)}}
    read = []
    monkeypatch.setattr("lm_lightning.data.hashing.file_sha256", lambda path: read.append(path) or real_sha256(path))
    monkeypatch.setattr(corpus_module, "iter_documents", lambda source: pytest.fail("the source was read"))
    assert prepare_corpus(moved, TOKENIZER, cache).directory == base.directory
    assert prepare_corpus(moved, TOKENIZER, cache).directory == base.directory
    assert read == [copy]  # hashed once, then the memo
    copy.write_bytes(SHAKESPEARE.read_bytes()[:-1] + b"?")  # an edit: read again, a new corpus
    with pytest.raises(pytest.fail.Exception, match="the source was read"):
        prepare_corpus(moved, TOKENIZER, cache)
    assert read == [copy, copy]
    memo = json.loads((cache / DIGEST_MEMO).read_text())  # one record per path, the edit's replacing the first
    assert memo[str(copy.resolve())][-1] == real_sha256(copy) and str(SHAKESPEARE.resolve()) in memo


def test_runs_that_need_the_same_corpus_at_once_prepare_it_once(tmp_path, monkeypatch, caplog):
    """Two runs starting together (a sweep's jobs, a benchmark's pair) on a cold cache: one prepares the corpus, the
    other waits for it and reuses it, instead of both spending the minutes."""
    built, started = [], threading.Event()
    real_build = corpus_module._build

    def counted_build(*args, **kwargs):
        built.append(args[0])
        started.set()
        time.sleep(0.5)  # the second run arrives while the first is still preparing
        return real_build(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "_build", counted_build)
    small = {**DATA, "source": {**DATA["source"], "max_bytes": 20_000}}
    results = []
    first = threading.Thread(target=lambda: results.append(prepare_corpus(small, TOKENIZER, tmp_path)))
    first.start()
    started.wait(60)
    with caplog.at_level("INFO", logger="lm_lightning.data.corpus_staging"):
        second = prepare_corpus(small, TOKENIZER, tmp_path)
    first.join()
    assert len(built) == 1
    assert second.directory == results[0].directory
    assert "another run is preparing" in caplog.text


@pytest.mark.parametrize("change", [
    {"tokenizer": {**TOKENIZER, "vocab_size": 512}},
    {"tokenizer": {**TOKENIZER, "type": "unigram"}},
    {"data": {**DATA, "cleaning": {"strip_whitespace": True, "min_chars": 200}}},
], ids=["tokenizer-vocab-size", "tokenizer-type", "cleaning"])
def test_a_changed_tokenizer_or_cleaning_config_builds_a_new_entry(base, cache, change):
    before = _entry_state(base)
    rebuilt = prepare_corpus(change.get("data", DATA), change.get("tokenizer", TOKENIZER), cache)
    assert rebuilt.directory != base.directory
    assert rebuilt.metadata["key"] != base.metadata["key"]
    assert rebuilt.metadata["tokenizer"]["sha256"] != base.metadata["tokenizer"]["sha256"]  # retrained
    tokenizer_cfg = change.get("tokenizer", TOKENIZER)
    assert rebuilt.tokenizer().vocab_size == tokenizer_cfg["vocab_size"]
    assert rebuilt.metadata["tokenizer"]["type"] == tokenizer_cfg["type"]
    assert _entry_state(base) == before  # the old entry is untouched


def test_metadata_counts_match_a_recomputation_from_the_source(base):
    stats: dict = {}
    cleaned = list(clean_documents(iter_documents(DATA["source"]), DATA["cleaning"], stats))
    assert base.metadata["cleaning_stats"] == stats
    tok = base.tokenizer()
    decoded = {split: _documents(base, split) for split in ("train", "val", "test")}
    assert sorted(doc for docs in decoded.values() for doc in docs) == sorted(cleaned)  # every document, once
    for split, docs in decoded.items():
        info, tokens = base.metadata["splits"][split], base.tokens(split)
        assert base.num_tokens(split) == len(tokens) == sum(len(tok.encode(d)) + 1 for d in docs)
        assert base.num_bytes(split) == sum(len(d.encode("utf-8")) for d in docs)  # EOS counts 0 bytes
        assert info["documents"] == len(docs) == int((tokens == tok.eos_id).sum())
        assert info["sha256_of_bin"] == hashlib.sha256((base.directory / info["file"]).read_bytes()).hexdigest()
    assert base.metadata["tokenizer"]["sha256"] == tok.sha256


def test_document_split_is_deterministic_sized_by_fraction_and_seeded(base, tmp_path):
    n = sum(info["documents"] for info in base.metadata["splits"].values())
    assert base.metadata["splits"]["val"]["documents"] == round(n * 0.1)
    assert base.metadata["splits"]["test"]["documents"] == round(n * 0.05)
    same = prepare_corpus(DATA, TOKENIZER, tmp_path / "elsewhere")
    assert same.metadata["splits"] == base.metadata["splits"]
    reseeded = prepare_corpus({**DATA, "split": {**DATA["split"], "seed": 1}}, TOKENIZER, tmp_path / "elsewhere")
    assert _documents(reseeded, "val") != _documents(base, "val")


def test_tiny_corpus_still_gets_a_validation_document_or_a_clear_error(tmp_path):
    (tmp_path / "three.txt").write_text("first document\n\nsecond document\n\nthird document\n")
    data = {"source": {"kind": "text", "path": str(tmp_path / "three.txt"), "document_split": "paragraph"},
            "split": {"val_fraction": 0.01}}
    tiny = prepare_corpus(data, {"type": "char", "verbose": False}, tmp_path / "cache")
    assert [tiny.metadata["splits"][s]["documents"] for s in ("train", "val")] == [2, 1]
    with pytest.raises(UserError, match="val_fraction"):
        prepare_corpus({**data, "source": {**data["source"], "document_split": "file"}}, {"type": "char", "verbose": False}, tmp_path / "cache")


def test_contiguous_split_reproduces_nanogpt_90_10_by_characters(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    data = {"source": {"kind": "text", "path": str(SHAKESPEARE)}, "split": {"mode": "contiguous", "val_fraction": 0.1}}
    corpus = prepare_corpus(data, {"type": "char", "verbose": False}, tmp_path)
    n = int(len(text) * 0.9)  # nanoGPT: train_data = data[:int(n*0.9)]
    assert _documents(corpus, "train") == [text[:n]]
    assert _documents(corpus, "val") == [text[n:]]
    assert corpus.num_bytes("train") == len(text[:n].encode()) and corpus.num_tokens("train") == n + 1  # one char per token + EOS
    assert "test" not in corpus.metadata["splits"]
    with pytest.raises(UserError, match="test_fraction"):
        corpus.tokens("test")


def test_empty_corpus_raises_and_leaves_the_existing_entry_intact(base, cache, tmp_path):
    before = _entry_state(base)
    (tmp_path / "empty.txt").write_text("")
    for data in [{**DATA, "source": {"kind": "text", "path": str(tmp_path / "empty.txt")}},
                 {**DATA, "cleaning": {"min_chars": 10**9}}]:
        with pytest.raises(UserError, match="corpus is empty"):
            prepare_corpus(data, TOKENIZER, cache)
    assert _entry_state(base) == before
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # no half-built folders left


def test_an_interrupted_build_leaves_no_entry(cache, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module, "train_tokenizer", interrupted)
    data = {**DATA, "name": "interrupted"}
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(data, TOKENIZER, cache)
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", "interrupted"))]


def test_tokens_are_a_read_only_uint16_memmap(base):
    tokens = base.tokens("train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
    assert not tokens.flags.writeable
    assert int(tokens.max()) < base.tokenizer().vocab_size


def test_unigram_entropy_in_nats_per_token(base):
    assert unigram_entropy(np.array([0, 1, 2, 3] * 10), vocab_size=8) == pytest.approx(math.log(4))
    assert unigram_entropy(np.zeros(5, dtype=np.uint16), vocab_size=8) == 0.0
    vocab = base.tokenizer().vocab_size
    assert 0 < unigram_entropy(base.tokens("train"), vocab) < math.log(vocab)


def test_force_rebuilds_in_place(base, cache):
    rebuilt = prepare_corpus(DATA, TOKENIZER, cache, force=True)
    assert rebuilt.directory == base.directory
    assert rebuilt.metadata["splits"] == base.metadata["splits"]


def test_omegaconf_configs_give_the_same_entry_as_plain_dicts(base, cache):
    from omegaconf import OmegaConf

    same = prepare_corpus(OmegaConf.create(DATA), OmegaConf.create(TOKENIZER), cache)
    assert same.directory == base.directory


def test_a_damaged_document_index_is_named_not_loaded(base, tmp_path):
    """``<split>.idx.npy`` (document starts, read by recurrent streams and document-aware loaders): garbage, a pickle
    or offsets past the tokens are refused with the file and the fix, the good one is returned as written."""
    import shutil

    from lm_lightning.data.prepared_corpus import PreparedCorpus
    from lm_lightning.errors import UserError

    copy = tmp_path / base.directory.name
    shutil.copytree(base.directory, copy)
    corpus = PreparedCorpus(copy, copy / base.tokenizer_path.name, base.metadata)
    good = corpus.document_starts("train")
    assert good[0] == 0 and (np.diff(good) > 0).all()
    index = copy / "train.idx.npy"
    for damage in (b"garbage", None):
        if damage is None:  # a well-formed array that does not fit the tokens
            np.save(index, good + corpus.num_tokens("train"))
        else:
            index.write_bytes(damage)
        with pytest.raises(UserError, match=f"document index {index} .*delete {copy}"):
            corpus.document_starts("train")
    np.save(index, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # a pickle is never loaded
    with pytest.raises(UserError, match="unreadable"):
        corpus.document_starts("train")
