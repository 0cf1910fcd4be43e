"""Every tokenizer type trains, round-trips text exactly (newlines, indentation, unseen
characters via byte fallback) and gives each special token one id."""

import hashlib
from pathlib import Path

import pytest
import sentencepiece as spm

from lm_lightning.data.tokenizer import TYPES, Tokenizer, train_tokenizer
from lm_lightning.errors import UserError

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt").read_text(encoding="utf-8")
TRAIN = SHAKESPEARE[:200_000]
HELD_OUT = SHAKESPEARE[-3_000:]  # never seen in training
SPECIALS = ["[CLS]", "[SEP]", "[MASK]"]
PYTHON = 'class A:\n    def f(self, x):\n\tif x:  # tab-indented\n            return "€"  \n\n\n\n    pass\n'


def _paragraphs(text):
    return [p for p in text.split("\n\n") if p]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    cfg = {"vocab_size": 512, "byte_fallback": True, "special_tokens": SPECIALS, "verbose": False}
    return {kind: Tokenizer.load(train_tokenizer(_paragraphs(TRAIN), {**cfg, "type": kind}, folder / kind))
            for kind in TYPES}


@pytest.mark.parametrize("kind", TYPES)
def test_round_trip_is_exact_on_held_out_text_and_python_source(tokenizers, kind):
    tok = tokenizers[kind]
    for text in [HELD_OUT, PYTHON, "  leading spaces\n\nand a trailing newline\n", "😀 emoji"]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", TYPES)
def test_special_tokens_are_single_ids(tokenizers, kind):
    tok = tokenizers[kind]
    assert [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id] == [tok.token_to_id(p) for p in ("<pad>", "<unk>", "<s>", "</s>")]
    ids = [tok.token_to_id(t) for t in SPECIALS]
    assert len(set(ids)) == 3 and all(0 <= i < tok.vocab_size for i in ids)
    for special, i in zip(SPECIALS, ids):
        assert tok.encode(special) == [i]
    assert tok.encode("\n") == [tok.newline_id]
    if kind != "word":  # the word model only knows whole space-separated words
        assert tok.encode("to[MASK]be").count(tok.token_to_id("[MASK]")) == 1
    assert tok.decode([tok.bos_id, tok.eos_id, tok.pad_id]) == ""


def test_vocab_size_is_as_configured_except_for_char(tokenizers):
    assert tokenizers["bpe"].vocab_size == tokenizers["unigram"].vocab_size == 512
    assert tokenizers["word"].vocab_size <= 512


def test_byte_fallback_encodes_unseen_characters_without_unk(tmp_path):
    lines = _paragraphs(TRAIN)
    with_bytes = Tokenizer.load(train_tokenizer(lines, {"type": "bpe", "vocab_size": 400, "byte_fallback": True, "verbose": False}, tmp_path / "b"))
    without = Tokenizer.load(train_tokenizer(lines, {"type": "bpe", "vocab_size": 400, "verbose": False}, tmp_path / "n"))
    for text in ["price: 5€", "ok 😀"]:
        assert with_bytes.unk_id not in with_bytes.encode(text)
        assert with_bytes.decode(with_bytes.encode(text)) == text
        assert without.unk_id in without.encode(text)  # the fallback is what makes the difference


def test_char_vocabulary_is_every_character_plus_specials(tmp_path):
    tok = Tokenizer.load(train_tokenizer(_paragraphs(SHAKESPEARE), {"type": "char", "vocab_size": 10, "special_tokens": SPECIALS, "verbose": False}, tmp_path / "c"))
    assert len(set(SHAKESPEARE)) == 65  # the classic Tiny Shakespeare alphabet, "\n" included
    assert tok.vocab_size == len(set(SHAKESPEARE)) + 4 + len(SPECIALS)  # + <pad> <unk> <s> </s>
    assert len(tok.encode(HELD_OUT)) == len(HELD_OUT)


def test_bpe_ids_equal_sentencepiece_on_whole_text(tokenizers):
    # Encoding line by line around the "\n" symbol is the same as sentencepiece's own encode.
    tok = tokenizers["bpe"]
    assert tok.encode(HELD_OUT) == spm.SentencePieceProcessor(model_file=str(tok.path)).encode(HELD_OUT)
    assert tok.encode_batch([HELD_OUT, PYTHON, ""]) == [tok.encode(HELD_OUT), tok.encode(PYTHON), []]


def test_identity_and_errors(tokenizers, tmp_path):
    tok = tokenizers["unigram"]
    assert tok.sha256 == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="special_tokens"):
        tok.token_to_id("<extra_id_0>")
    with pytest.raises(UserError, match="tokenizer.type"):
        train_tokenizer(["x"], {"type": "wordpiece"}, tmp_path / "x")
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(_paragraphs(TRAIN[:2000]), {"type": "unigram", "vocab_size": 50_000, "verbose": False}, tmp_path / "big")
    with pytest.raises(UserError, match="vocab_size=3 leaves no learned pieces: 5 are reserved"):
        train_tokenizer(_paragraphs(TRAIN[:2000]), {"type": "bpe", "vocab_size": 3}, tmp_path / "small")  # was "no training text"


def test_byte_tokenizer_is_built_not_trained_and_gives_one_id_per_utf8_byte(tokenizers):
    tok = tokenizers["byte"]
    assert tok.byte_level and not tokenizers["bpe"].byte_level
    assert tok.vocab_size == 4 + 1 + len(SPECIALS) + 256  # <pad> <unk> <s> </s>, newline, specials, bytes
    first_byte = tok.token_to_id("<0x00>")
    text = "Tab\there,  two spaces, é, ∑, 🙂 and a literal <s>"  # no newline, no special: bytes only
    assert tok.encode(text) == [first_byte + b for b in text.encode("utf-8")]
    assert tok.decode(tok.encode("a▁b ▁")) == "a▁b ▁"  # no space marker: a "▁" is the text's own
    assert tok.fallback_ids() == [tok.unk_id]  # the bytes are the vocabulary, not a fallback
    assert tokenizers["bpe"].unk_id in tokenizers["bpe"].fallback_ids() and len(tokenizers["bpe"].fallback_ids()) > 256


def test_a_byte_corpus_has_as_many_tokens_as_bytes_and_full_coverage(tmp_path):
    from lm_lightning.data.corpus import prepare_corpus

    data = {"name": "bytes", "source": {"kind": "text", "path": str(tmp_path / "c.txt"), "document_split": "paragraph"},
            "split": {"val_fraction": 0.25, "seed": 0}}
    (tmp_path / "c.txt").write_text("\n\n".join(_paragraphs(SHAKESPEARE[:20_000])) + "\n\nNaïve café ∑ 🙂\n")
    corpus = prepare_corpus(data, {"type": "byte"}, tmp_path / "cache")
    for split in ("train", "val"):
        stats = corpus.metadata["splits"][split]
        assert stats["tokens"] == stats["bytes"] + stats["documents"]  # one id a byte, one EOS a document
    report = corpus.report()["tokenizer"]
    assert report["coverage"] == 1.0 and report["tokens_per_byte"] == 1.0 and report["vocab_size"] == 261


def test_train_with_the_byte_tokenizer_reports_bits_per_byte_as_its_loss_in_bits_per_token(tmp_path):
    import json
    import math

    from helpers import run_in_process

    run_in_process("train", "experiment=tiny", "tokenizer=byte", "trainer.max_steps=3", "scheduler.warmup_steps=1", "logger=csv",
                   "sample.max_new_tokens=8", "data.corpus.source.max_bytes=20000", "num_threads=1",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=tmp_path / "cache")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    final = record["final"]
    parameters = record["parameters"]
    vocab = (parameters["embedding"] - parameters["position_table"]) // record["config"]["model"]["n_embd"]
    assert vocab == 261  # <pad> <unk> <s> </s>, the newline and the 256 bytes: no learned piece
    val = json.loads((tmp_path / record["corpus_dir"] / "metadata.json").read_text())["splits"]["val"]
    assert val["tokens"] == val["bytes"] + val["documents"]  # a token a byte, and one end-of-text a document
    assert final["val/bpb"] == pytest.approx(final["val/loss"] / math.log(2) * val["tokens"] / val["bytes"], rel=1e-5)
