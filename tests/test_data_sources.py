"""Sources yield the documents their config names, in a fixed order; cleaning steps do what
their keys say and count what they remove."""

import gzip
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lm_lightning.data.cleaning import clean_document, clean_documents
from lm_lightning.data.sources import describe_source, iter_documents
from lm_lightning.errors import UserError

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
GUTENBERG = Path("/work/shared/data/gutenberg/gutenberg_en_prose.jsonl.gz")


def test_text_file_is_one_document_and_max_bytes_takes_a_prefix():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert list(iter_documents({"kind": "text", "path": str(SHAKESPEARE)})) == [text]
    prefix = list(iter_documents({"kind": "text", "path": str(SHAKESPEARE), "max_bytes": 200_000}))
    assert prefix == [text.encode()[:200_000].decode()]


def test_paragraph_and_line_splits(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\n\n\nthree  \n\nfour\n")
    source = {"kind": "text", "path": str(path)}
    assert list(iter_documents({**source, "document_split": "paragraph"})) == ["one\ntwo", "three  ", "four"]
    chunks = list(iter_documents({**source, "document_split": "lines:3"}))
    assert chunks == ["one\ntwo\n\n", "\n\nthree  \n", "\nfour\n"]
    assert "".join(chunks) == path.read_text()
    with pytest.raises(UserError, match="document_split"):
        list(iter_documents({**source, "document_split": "sentences"}))


def test_folder_is_walked_in_sorted_order_and_only_txt_files_are_read(tmp_path):
    for name, text in [("b.txt", "B"), ("a.txt", "A"), ("sub/c.txt", "C"), ("notes.md", "skip"), (".hidden.txt", "skip")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    source = {"kind": "text", "path": str(tmp_path)}
    assert list(iter_documents(source)) == ["A", "B", "C"]
    assert [f["name"] for f in describe_source(source)["files"]] == ["a.txt", "b.txt", "sub/c.txt"]


@pytest.mark.parametrize("name, opener", [("d.jsonl", open), ("d.jsonl.gz", gzip.open)])
def test_jsonl_records_use_the_text_field(tmp_path, name, opener):
    records = [{"body": "first doc", "id": 1}, {"body": "second\n\ndoc", "id": 2}]
    with opener(tmp_path / name, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    source = {"kind": "jsonl", "path": str(tmp_path / name), "text_field": "body"}
    assert list(iter_documents(source)) == ["first doc", "second\n\ndoc"]
    assert list(iter_documents({**source, "document_split": "paragraph"})) == ["first doc", "second", "doc"]
    with pytest.raises(UserError, match="text_field"):
        list(iter_documents({**source, "text_field": "text"}))


def test_gutenberg_jsonl_gz_streams_books_in_file_order():
    with gzip.open(GUTENBERG, "rt", encoding="utf-8") as f:
        expected = [json.loads(line)["text"] for line in itertools.islice(f, 2)]
    source = {"kind": "jsonl", "path": str(GUTENBERG)}
    assert list(itertools.islice(iter_documents(source), 2)) == expected


def test_stdlib_corpus_is_library_source_capped_by_max_bytes_and_deterministic():
    source = {"kind": "stdlib", "max_bytes": 300_000}
    docs = list(iter_documents(source))
    assert docs == list(iter_documents(source))
    assert 300_000 - 4 <= sum(len(d.encode()) for d in docs) <= 300_000  # cut at a character boundary
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    first = min(rel for p in root.rglob("*.py") if not skipped & set((rel := p.relative_to(root).as_posix()).split("/")))
    assert docs[0] == (root / first).read_text(encoding="utf-8")
    assert describe_source(source)["stdlib"] == str(root)


def test_missing_path_names_the_path():
    with pytest.raises(UserError, match="/no/such/corpus.txt"):
        list(iter_documents({"kind": "text", "path": "/no/such/corpus.txt"}))
    with pytest.raises(UserError, match="kind"):
        list(iter_documents({"kind": "csv", "path": str(SHAKESPEARE)}))


def test_optional_backends_say_what_to_install():
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(UserError, match="pip install pyarrow"):
            list(iter_documents({"kind": "parquet", "path": str(SHAKESPEARE)}))
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(UserError, match=r"lm-lightning\[hf\]"):
            list(iter_documents({"kind": "hf", "name": "wikitext"}))


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("version one")
    before = describe_source({"kind": "text", "path": str(path)})
    path.write_text("version two, longer")
    os.utime(path, ns=(1, 1))
    assert describe_source({"kind": "text", "path": str(path)}) != before


def test_fingerprint_is_the_content_not_the_location_or_mtime(tmp_path):
    """Data that is copied again (a fresh machine, a re-synced share) or moved keeps its cache key: the key holds
    the files' names, sizes and SHA-256, not their folder or mtime."""
    for folder in ("here", "there"):
        (tmp_path / folder / "sub").mkdir(parents=True)
        (tmp_path / folder / "a.txt").write_text("first")
        (tmp_path / folder / "sub" / "b.txt").write_text("second")
    os.utime(tmp_path / "there" / "a.txt", ns=(10**18, 10**18))
    here, there = (describe_source({"kind": "text", "path": str(tmp_path / f)}) for f in ("here", "there"))
    assert here == there
    assert here["files"][0] == {"name": "a.txt", "size": 5, "sha256": hashlib.sha256(b"first").hexdigest()}
    (tmp_path / "there" / "sub" / "b.txt").rename(tmp_path / "there" / "b.txt")  # same bytes, another name
    assert describe_source({"kind": "text", "path": str(tmp_path / "there")}) != here


def test_cleaning_steps_follow_their_switches_and_count_removals():
    assert clean_document("ﬁne  \n\n\n\n\nend \n", {}) == "ﬁne  \n\n\n\n\nend \n"  # empty config: unchanged
    cfg = {"unicode_normalization": "NFKC", "strip_whitespace": True, "min_chars": 5}
    assert clean_document("ﬁne  \n\n\n\n\nend \n", cfg) == "fine\n\n\nend"
    stats: dict = {}
    out = list(clean_documents(["long enough", "tiny", "   \n  "], cfg, stats))
    assert out == ["long enough"]
    assert stats == {"documents_in": 3, "bytes_in": 11 + 4 + 6, "documents_out": 1, "bytes_out": 11,
                     "removed_short": 1, "removed_short_bytes": 4, "removed_empty": 1, "removed_empty_bytes": 6}
    with pytest.raises(UserError, match="unicode_normalization"):
        clean_document("x", {"unicode_normalization": "NFX"})


# --- Parquet and Hugging Face datasets: same documents as text and JSONL, keyed by file, clear errors ----

CHAR = {"type": "char", "character_coverage": 1.0, "seed": 0, "num_threads": 1, "verbose": False}


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """The ``datasets`` module; it writes its lock files under HF_DATASETS_CACHE: keep them in the test's folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()
    return datasets


def _paragraphs(n_bytes: int) -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:n_bytes]
    return text[:text.rindex("\n\n")].split("\n\n")


def _write_parquet(path: Path, docs: list[str], column: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: docs, "n": list(range(len(docs)))}), path, row_group_size=64)
    return path


def _prepare(source: dict, cache: Path):
    from lm_lightning.data.corpus import prepare_corpus

    data = {"name": source["kind"], "source": source, "cleaning": {"strip_whitespace": True},
            "split": {"val_fraction": 0.1, "seed": 0}}
    return prepare_corpus(data, CHAR, cache)


def _pieces(corpus) -> list[str]:
    tokenizer = corpus.tokenizer()
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def test_text_jsonl_parquet_and_hf_sources_prepare_identical_token_files(tmp_path, hf_datasets):
    docs = _paragraphs(20_000)
    (tmp_path / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    with open(tmp_path / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    (tmp_path / "pq").mkdir()  # two files, read in path order: rows 0-99, then the rest
    _write_parquet(tmp_path / "pq" / "a.parquet", docs[:100])
    _write_parquet(tmp_path / "pq" / "b.parquet", docs[100:])
    hf_datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "saved")
    sources = [{"kind": "text", "path": str(tmp_path / "corpus.txt"), "document_split": "paragraph"},
               {"kind": "jsonl", "path": str(tmp_path / "corpus.jsonl")},
               {"kind": "parquet", "path": str(tmp_path / "pq")},
               {"kind": "hf", "path": str(tmp_path / "saved")},  # save_to_disk folder
               {"kind": "hf", "path": str(tmp_path / "pq")},  # data folder through load_dataset
               {"kind": "hf", "path": str(tmp_path / "corpus.jsonl")}]  # one data file through load_dataset
    corpora = [_prepare(source, tmp_path / "cache") for source in sources]
    reference = corpora[0]
    assert len(docs) == 148 and reference.metadata["splits"]["train"]["tokens"] > 15_000
    assert len({c.directory for c in corpora}) == len(sources)  # each source its own cache entry
    for corpus, source in zip(corpora[1:], sources[1:]):
        assert _pieces(corpus) == _pieces(reference), source
        for split in ("train", "val"):
            np.testing.assert_array_equal(corpus.tokens(split), reference.tokens(split), err_msg=str(source))
            np.testing.assert_array_equal(corpus.document_starts(split), reference.document_starts(split))


def test_a_changed_parquet_or_hf_file_changes_the_cache_key(tmp_path, hf_datasets):
    docs = _paragraphs(4_000)
    _write_parquet(tmp_path / "c.parquet", docs)
    hf_datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "saved")
    sources = [{"kind": "parquet", "path": str(tmp_path / "c.parquet")}, {"kind": "hf", "path": str(tmp_path / "saved")},
               {"kind": "hf", "path": str(tmp_path / "c.parquet")}]
    before = [_prepare(s, tmp_path / "cache").directory for s in sources]
    assert [_prepare(s, tmp_path / "cache").directory for s in sources] == before  # unchanged: reused
    assert describe_source(sources[1])["dataset_fingerprints"] == [json.loads((tmp_path / "saved" / "state.json").read_text())["_fingerprint"]]

    edited = docs[:-1] + ["A new last paragraph."]
    _write_parquet(tmp_path / "c.parquet", edited)
    hf_datasets.Dataset.from_dict({"text": edited}).save_to_disk(tmp_path / "saved2")
    shutil.rmtree(tmp_path / "saved")
    (tmp_path / "saved2").rename(tmp_path / "saved")
    after = [_prepare(s, tmp_path / "cache") for s in sources]
    assert not {c.directory for c in after} & set(before)
    for corpus in after:  # the new entries hold the edited text
        text = "".join(corpus.tokenizer().decode(corpus.tokens(split)) for split in corpus.metadata["splits"])
        assert "A new last paragraph." in text and docs[-1] not in text


def _reader(**source):
    return lambda: list(iter_documents(source))


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_parquet_and_hf_input_is_one_clear_error(tmp_path, hf_datasets):
    docs = ["first document", "second document"]
    _write_parquet(tmp_path / "p.parquet", docs, column="body")
    hf_datasets.Dataset.from_dict({"body": docs}).save_to_disk(tmp_path / "saved")
    hf_datasets.DatasetDict({"train": hf_datasets.Dataset.from_dict({"text": docs})}).save_to_disk(tmp_path / "dict")
    hf_datasets.Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "empty")
    _write_parquet(tmp_path / "none.parquet", [])
    (tmp_path / "no-data").mkdir()
    cases = {
        "p.parquet has no column 'text' (columns: ['body', 'n'])": _reader(kind="parquet", path=str(tmp_path / "p.parquet")),
        "saved (split train) has no column 'text' (columns: ['body'])": _reader(kind="hf", path=str(tmp_path / "saved")),
        "p.parquet (split train) has no column 'text' (columns: ['body', 'n'])": _reader(kind="hf", path=str(tmp_path / "p.parquet")),
        "'n' holds int, not text": _reader(kind="hf", path=str(tmp_path / "p.parquet"), text_field="n"),
        "dict has no split 'test' (splits: ['train'])": _reader(kind="hf", path=str(tmp_path / "dict"), split="test"),
        "empty has no records": _reader(kind="hf", path=str(tmp_path / "empty")),
        "no-data (split train) could not be read by datasets: The directory at": _reader(kind="hf", path=str(tmp_path / "no-data")),
        "data file not found: /no/such.parquet": _reader(kind="parquet", path="/no/such.parquet"),
        "data file not found: /no/such/dataset": _reader(kind="hf", path="/no/such/dataset"),
        "Hub datasets are not downloaded here": _reader(kind="hf", name="wikitext"),
        "corpus is empty: data.corpus.source (kind=parquet": lambda: _prepare({"kind": "parquet", "path": str(tmp_path / "none.parquet")},
                                                                               tmp_path / "cache"),
    }
    for expected, call in cases.items():
        assert expected in _one_line_error(call)
    assert list(iter_documents({"kind": "hf", "path": str(tmp_path / "dict")})) == docs


def test_hf_source_reads_with_the_hub_offline_and_restores_the_switch(tmp_path, hf_datasets, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hf_datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    _write_parquet(tmp_path / "p.parquet", ["one", "two"])
    documents = iter_documents({"kind": "hf", "path": str(tmp_path / "p.parquet")})
    assert next(documents) == "one"
    assert hf_datasets.config.HF_HUB_OFFLINE is True and hub.HF_HUB_OFFLINE is True
    assert list(documents) == ["two"]
    assert hf_datasets.config.HF_HUB_OFFLINE is False and hub.HF_HUB_OFFLINE is False
