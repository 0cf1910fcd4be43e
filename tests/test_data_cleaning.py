"""Each cleaning filter and PII rule removes or masks what it should and keeps what it should,
on crafted input; the counts land in the stats under the filter's name."""

import pytest

from lm_lightning.data import quality
from lm_lightning.data.cleaning import clean_document, clean_documents
from lm_lightning.data.pii import mask_pii
from lm_lightning.errors import UserError

PROSE = "The old house stood at the end of the lane, and nobody had lived in it for years."


@pytest.mark.parametrize("cfg, dropped, kept", [
    ({"max_chars": 20}, "x" * 21, "x" * 20),
    ({"min_words": 3}, "two words", "now three words"),
    ({"max_words": 3}, "one two three four", "one two three"),
    ({"max_symbol_word_ratio": 0.1}, "# one # two # three ...", PROSE),
    ({"min_mean_word_length": 3}, "a b c d e f g h i j", PROSE),
    ({"max_mean_word_length": 10}, "supercalifragilistic antidisestablishmentarianism", PROSE),
    ({"max_repeated_line_fraction": 0.3}, "buy now\nbuy now\nbuy now\nreal line", "line one\nline two\nline three\nline one"),
    ({"max_duplicate_ngram_fraction": 0.2}, "click here to win big " * 4, PROSE),
], ids=["max_chars", "min_words", "max_words", "symbols", "short_words", "long_words", "repeated_lines", "repeated_ngrams"])
def test_each_quality_filter_drops_what_it_should_and_keeps_the_rest(cfg, dropped, kept):
    assert clean_document(dropped, cfg) is None
    assert clean_document(kept, cfg) == kept
    assert clean_document(dropped, {}) == dropped  # the filter is off without its key


def test_quality_statistics_are_the_documented_numbers():
    assert quality.symbol_word_ratio("a # b ... c …") == pytest.approx(3 / 6)
    assert quality.mean_word_length("ab abcd -- abc") == pytest.approx(3.0)  # "--" has no letter: not a word
    assert quality.repeated_line_fraction("a\nb\na\n\na") == pytest.approx(2 / 4)
    # "a b c a b c": the second "a b" 2-gram repeats; its words cover 2 of 6 characters, then "b c" adds "c"
    assert quality.duplicate_ngram_fraction("a b c a b c", 2) == pytest.approx(3 / 6)
    assert quality.duplicate_ngram_fraction("a b c d", 2) == 0.0


def test_filters_report_documents_and_bytes_removed_by_name():
    cfg = {"min_words": 3, "max_symbol_word_ratio": 0.1}
    stats: dict = {}
    out = list(clean_documents([PROSE, "too short", "# # # # words"], cfg, stats))
    assert out == [PROSE]
    assert (stats["removed_words"], stats["removed_words_bytes"]) == (1, 9)
    assert (stats["removed_symbols"], stats["removed_symbols_bytes"]) == (1, 13)
    assert stats["documents_out"] == 1 and stats["documents_in"] == 3


@pytest.mark.parametrize("key, text, masked", [
    ("mask_email", "write to jane.doe+news@mail.example.co.uk today", "write to <EMAIL> today"),
    ("mask_email", "or J_Smith@uni-bonn.de.", "or <EMAIL>."),
    ("mask_ip", "server 192.168.0.17 and 10.0.0.1:8080", "server <IP> and <IP>:8080"),
    ("mask_ip", "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 or fe80::1", "v6 <IP> or <IP>"),
    ("mask_phone", "call (555) 123-4567 or 555.123.4567", "call <PHONE> or <PHONE>"),
    ("mask_phone", "in London +44 20 7946 0958, in Paris +33142685300", "in London <PHONE>, in Paris <PHONE>"),
], ids=["email", "email-dotted", "ipv4", "ipv6", "phone-us", "phone-intl"])
def test_pii_rules_mask_their_kind(key, text, masked):
    counts: dict = {}
    assert mask_pii(text, {key: True}, counts) == masked
    assert counts == {f"masked_{key[5:]}": masked.count("<")}
    assert mask_pii(text, {}) == text  # off without its key


def test_pii_rules_keep_look_alikes():
    cfg = {"mask_email": True, "mask_ip": True, "mask_phone": True}
    for text in ["In 1887, on page 123 of chapter 12, pi is 3.14159 and it is 10:30.",
                 "Version 1.2.3.4.5 and 999.1.1.1 are not addresses.",
                 "Reply @john on the forum; ISBN 0140449132; 25 x 4 = 100.",
                 "the years 1914-1918 and the score 3-2"]:
        assert mask_pii(text, cfg) == text


def test_pii_masking_runs_inside_cleaning_and_is_counted():
    stats: dict = {}
    out = list(clean_documents(["mail a@b.org from 1.2.3.4"], {"mask_email": True, "mask_ip": True}, stats))
    assert out == ["mail <EMAIL> from <IP>"]
    assert stats["masked_email"] == 1 and stats["masked_ip"] == 1


def test_boilerplate_lines_are_cut_and_counted():
    cfg = {"boilerplate_patterns": [r"\[Illustration", r"(\*\s*){3,}$"], "strip_whitespace": True}
    text = "First line.\n[Illustration: a ship]\n*       *       *\nLast line."
    stats: dict = {}
    assert list(clean_documents([text], cfg, stats)) == ["First line.\nLast line."]
    assert stats["boilerplate_lines"] == 2
    assert clean_document("A line about * * * stars", cfg) == "A line about * * * stars"  # only at line start
    assert clean_document("[Illustration]", cfg) is None  # nothing left: dropped as empty
    with pytest.raises(UserError, match="boilerplate_patterns"):
        clean_document("x", {"boilerplate_patterns": ["(unclosed"]})


def test_unicode_and_whitespace_normalisation():
    cfg = {"unicode_normalization": "NFKC", "strip_whitespace": True}
    assert clean_document("\ufb01ne\u3000caf\u0065\u0301  \n\n\n\n\nend ", cfg) == "fine café\n\n\nend"
