"""Sources yield the documents their config names, in a fixed order; cleaning steps do what
their keys say and count what they remove."""

import gzip
import importlib.util
import itertools
import json
import os
import sysconfig
from pathlib import Path

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
    assert [f["path"] for f in describe_source(source)["files"]] == [str(tmp_path / n) for n in ("a.txt", "b.txt", "sub/c.txt")]


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
