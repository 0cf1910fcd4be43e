"""Preparation end to end: bad input gives one clear error naming the file and line and
leaves no cache entry; num_proc does not change the result; the report adds up."""

import json
import logging
from pathlib import Path

import pytest

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.data.report import format_report
from lm_lightning.errors import UserError

from helpers import cache_entries

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")
TOKENIZER = {"type": "bpe", "vocab_size": 300, "byte_fallback": True, "verbose": False}
GOOD = [json.dumps({"text": f"Document number {i} says something about topic {i % 7}."}) for i in range(20)]


def _jsonl(tmp_path, lines, name="c.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


def _data(path, **source):
    return {"source": {"kind": "jsonl", "path": str(path), **source}, "split": {"val_fraction": 0.1}}


@pytest.mark.bad_input
@pytest.mark.parametrize("bad, message", [
    (b'{"text": "unterminated', r"line 3 is not valid JSON"),
    (b'{"body": "no text field here"}', r"line 3 has no text field 'text'"),
    (b'{"text": "caf\xe9 latin-1"}', r"line 3 is not valid UTF-8"),
], ids=["malformed-json", "missing-field", "not-utf8"])
def test_a_bad_jsonl_line_is_an_error_naming_file_and_line_and_leaves_no_cache(tmp_path, bad, message):
    path = _jsonl(tmp_path, GOOD[:2] + [bad] + GOOD[2:])
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=rf"{path} {message}.*skip_bad_records"):
        prepare_corpus(_data(path), TOKENIZER, cache, num_proc=2)
    assert cache_entries(cache) == []  # nothing a later run could take for a finished corpus


def test_skip_bad_records_warns_with_file_and_line_and_goes_on(tmp_path, caplog):
    path = _jsonl(tmp_path, GOOD[:2] + [b'{"text": "caf\xe9"}', b"not json", b'{"id": 1}'] + GOOD[2:])
    with caplog.at_level(logging.WARNING):
        corpus = prepare_corpus(_data(path, skip_bad_records=True), TOKENIZER, tmp_path / "cache")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [f"{path} line {n}" in w for n, w in zip((3, 4, 5), warned)] == [True, True, True]
    assert corpus.report()["input"]["documents"] == len(GOOD)


def test_a_non_utf8_text_file_names_file_and_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine\nstill fine\nbad \xff byte\n")
    with pytest.raises(UserError, match=rf"{tmp_path / 'a.txt'} line 3 is not valid UTF-8"):
        prepare_corpus({"source": {"kind": "text", "path": str(tmp_path)}}, TOKENIZER, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


def test_an_empty_result_after_filtering_says_which_filters_removed_what(tmp_path):
    path = _jsonl(tmp_path, GOOD)
    data = {**_data(path), "cleaning": {"min_words": 100}}
    with pytest.raises(UserError, match=r"corpus is empty: .*c\.jsonl.*\(20 documents in; removed by words: 20\)"):
        prepare_corpus(data, TOKENIZER, tmp_path / "cache")
    assert cache_entries(tmp_path / "cache") == []


DATA = {
    "name": "shakespeare",
    "source": {"kind": "text", "path": str(SHAKESPEARE), "document_split": "paragraph", "max_bytes": 300_000},
    "cleaning": {"strip_whitespace": True, "min_words": 3, "mask_email": True},
    "dedup": {"exact": True, "near": True},
    "split": {"val_fraction": 0.1, "seed": 0},
}


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    one = prepare_corpus(DATA, {**TOKENIZER, "character_coverage": 1.0, "vocab_size": 400}, cache / "one", num_proc=1)
    two = prepare_corpus(DATA, {**TOKENIZER, "character_coverage": 1.0, "vocab_size": 400}, cache / "two", num_proc=2)
    return one, two


def test_num_proc_does_not_change_the_result_or_the_cache_key(one_and_two):
    one, two = one_and_two
    assert one.directory.name == two.directory.name
    assert one.metadata["splits"] == two.metadata["splits"]  # sha256 of every token file included
    assert one.metadata["dedup_stats"] == two.metadata["dedup_stats"]
    assert (one.report()["num_proc"], two.report()["num_proc"]) == (1, 2)


def test_the_report_adds_up_and_is_saved_next_to_the_data(one_and_two):
    corpus = one_and_two[0]
    report = json.loads((corpus.directory / "report.json").read_text())
    clean, dedup, splits = report["cleaning"], report["dedup"], report["splits"]
    assert report["input"]["documents"] == clean["documents_out"] + sum(r["documents"] for r in clean["removed"].values())
    assert clean["removed"]["words"]["documents"] > 0  # one-word paragraphs such as "ROMEO:" lines are cut
    # Shakespeare repeats short speeches ("My lord?"): exact and near duplicates exist
    assert dedup["exact_removed"] > 0 and dedup["near_removed"] >= 0
    assert clean["documents_out"] - dedup["exact_removed"] - dedup["near_removed"] == sum(s["documents"] for s in splits.values())
    for name, s in splits.items():
        assert s["tokens"] == corpus.num_tokens(name) and s["bytes"] == corpus.num_bytes(name)
    tokens = sum(s["tokens"] - s["documents"] for s in splits.values())
    assert report["tokenizer"]["tokens_per_byte"] == pytest.approx(tokens / sum(s["bytes"] for s in splits.values()))
    assert report["tokenizer"]["tokens_per_word"] == pytest.approx(tokens / sum(s["words"] for s in splits.values()))
    assert set(report["seconds"]) == {"read_and_clean", "dedup", "tokenizer_training", "tokenize", "total"}
    text = format_report(report)
    assert "exact dups" in text and "tokens/byte" in text and "- words" in text
