"""Tokenizers of Hugging Face ``tokenizers``: byte-level BPE encodes and decodes every byte string
exactly and has no unknown token; the word vocabulary has every training word, line ends and
``<unk>``; a ``tokenizer.json`` is reused as ``tokenizer=hf``, known to the corpus cache by its
content, carried by the checkpoint and exported with it; loading tells the formats apart by content."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA, run_command
from tokenizers import Tokenizer as HF

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.data.hf_tokenizer import HFTokenizer, byte_alphabet
from lm_lightning.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint, train_tokenizer
from lm_lightning.errors import UserError

SHAKESPEARE = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
TRAIN = [p for p in SHAKESPEARE[:100_000].split("\n\n") if p]
HELD_OUT = SHAKESPEARE[-3_000:]
PYTHON = 'class A:\n    def f(self, x):\n\tif x:  # tab-indented\n            return "€"  \n\n\n\n    pass\n'


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory) -> HFTokenizer:
    cfg = {"type": "byte_bpe", "vocab_size": 400, "min_frequency": 2, "special_tokens": ["[MASK]"], "verbose": False}
    return load_tokenizer(train_tokenizer(TRAIN, cfg, tmp_path_factory.mktemp("bbpe") / "tokenizer"))


def _random_bytes(rng: random.Random) -> bytes:
    pieces = [bytes(rng.randrange(256) for _ in range(rng.randrange(12))),  # mostly invalid UTF-8
              "😀👩‍👩‍👧 é €".encode()[: rng.randrange(20)],  # emoji, possibly cut inside a character
              rng.choice([b"\xed\xa0\x80", b"\xc0\x80", b"\xf5\xff", b"</s>", b"\n\n", b"  ", b"[MASK]", b""]),
              HELD_OUT[rng.randrange(2000):][: rng.randrange(30)].encode()]
    rng.shuffle(pieces)
    return b"".join(pieces)


def test_byte_bpe_round_trips_every_byte_string_exactly(byte_bpe):
    tok, rng = byte_bpe, random.Random(0)
    samples = [bytes([b]) for b in range(256)] + [bytes(range(256)), b""] + [_random_bytes(rng) for _ in range(600)]
    assert any(not _is_utf8(s) for s in samples) and any(_is_utf8(s) and len(s) > 10 for s in samples)
    for data in samples:
        ids = tok.encode_bytes(data)
        assert tok.decode_bytes(ids) == data, data
        assert all(0 <= i < tok.vocab_size for i in ids)
    for text in [HELD_OUT, PYTHON, "😀 emoji\r\n", "  leading\n\nand trailing\n", "</s><s><pad>"]:
        assert tok.encode_bytes(text.encode()) == tok.encode(text)  # text and bytes meet at the same ids
        assert tok.decode(tok.encode(text)) == text
        assert HF.from_str(tok.to_bytes().decode()).decode(tok.encode(text)) == text  # and tokenizers' own decoder agrees
    assert tok.decode_bytes(tok.encode_bytes(b"ab\xff")[:-1]) == b"ab"


def test_byte_bpe_has_every_byte_and_no_unknown_token(byte_bpe):
    tok = byte_bpe
    assert tok.vocab_size == 400 and tok.unk_id == -1 and tok.fallback_ids() == []
    assert [tok.pad_id, tok.bos_id, tok.eos_id] == [0, 1, 2]
    assert len({tok.encode_bytes(bytes([b]))[0] for b in range(256)}) == 256  # one token per byte, whatever the text
    assert all(len(tok.encode_bytes(bytes([b]))) == 1 for b in range(256))
    assert sorted(byte_alphabet()) == sorted(set(byte_alphabet())) and len(byte_alphabet()) == 256
    assert len(tok.encode(HELD_OUT)) < 0.7 * len(HELD_OUT.encode())  # it learned merges
    # Control tokens spelled in the text are characters; their ids decode to nothing; a special token is one id.
    assert tok.eos_id not in tok.encode("a</s>b") and tok.decode([tok.bos_id, tok.eos_id, tok.pad_id]) == ""
    assert tok.encode("to[MASK]be").count(tok.token_to_id("[MASK]")) == 1
    with pytest.raises(UserError, match="vocab_size=200 is too small for byte_bpe"):
        train_tokenizer(TRAIN, {"type": "byte_bpe", "vocab_size": 200, "verbose": False}, Path("/nonexistent/x"))


def test_words_are_the_vocabulary_with_line_ends_and_unk(tmp_path):
    text = "the cat sat\nthe dog  sat\n\tthe end\n"
    tok = load_tokenizer(train_tokenizer([text], {"type": "words", "verbose": False}, tmp_path / "w"))
    assert [tok.id_to_token(i) for i in range(5)] == ["<pad>", "<unk>", "<s>", "</s>", "\n"]
    assert set(HF.from_str(tok.to_bytes().decode()).get_vocab()) == {"<pad>", "<unk>", "<s>", "</s>", "\n", *text.split()}
    assert tok.id_to_token(5) == "the"  # most frequent first
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.newline_id) == (0, 1, 2, 3, 4)
    ids = tok.encode("the bird sat\nend")
    assert [tok.id_to_token(i) for i in ids] == ["the", "<unk>", "sat", "\n", "end"]
    assert tok.decode(ids) == "the <unk> sat\nend" and tok.fallback_ids() == [tok.unk_id]
    assert tok.decode(tok.encode(text)) == "the cat sat\nthe dog sat\nthe end\n"
    small = load_tokenizer(train_tokenizer([text], {"type": "words", "vocab_size": 7, "verbose": False}, tmp_path / "s"))
    assert small.vocab_size == 7 and small.encode("the sat cat") == [5, 6, small.unk_id]


def test_loading_tells_a_sentencepiece_model_from_a_tokenizer_json_by_content(byte_bpe, tmp_path):
    spm_path = train_tokenizer(TRAIN, {"type": "bpe", "vocab_size": 300, "verbose": False}, tmp_path / "spm")
    assert isinstance(load_tokenizer(spm_path.read_bytes()), Tokenizer)
    assert load_tokenizer(spm_path.read_bytes()).encode(HELD_OUT) == Tokenizer.load(spm_path).encode(HELD_OUT)
    disguised = tmp_path / "0123.model"  # continued pretraining stores a checkpoint's tokenizer under this name
    disguised.write_bytes(byte_bpe.to_bytes())
    for source in (byte_bpe.to_bytes(), disguised):
        again = load_tokenizer(source)
        assert isinstance(again, HFTokenizer) and again.sha256 == byte_bpe.sha256
        assert again.encode(HELD_OUT) == byte_bpe.encode(HELD_OUT)
    copied = train_tokenizer([], {"model_file": str(disguised)}, tmp_path / "copy" / "tokenizer")
    assert copied.name == "tokenizer.json" and copied.read_bytes() == byte_bpe.to_bytes()
    with pytest.raises(UserError, match="not a tokenizer.json"):
        load_tokenizer(b'{"not": "a tokenizer"}')


def test_the_cache_key_knows_a_tokenizer_json_by_content(byte_bpe, tmp_path):
    first, moved, other = tmp_path / "a.json", tmp_path / "moved" / "b.json", tmp_path / "c.json"
    moved.parent.mkdir()
    first.write_bytes(byte_bpe.to_bytes())
    moved.write_bytes(byte_bpe.to_bytes())
    other.write_bytes(byte_bpe.to_bytes().replace(b'"<pad>"', b'"<PAD>"'))
    def key(path: Path) -> dict:
        return tokenizer_fingerprint({"type": "hf", "file": str(path), "verbose": True})

    assert key(first) == key(moved) != key(other)
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE[:5000])
    data = {"name": "t", "source": {"kind": "text", "path": str(text)}, "split": {"mode": "contiguous", "val_fraction": 0.1}}
    entries = [prepare_corpus(data, {"type": "hf", "file": str(path)}, tmp_path / "cache").directory for path in (first, moved, other)]
    assert entries[0] == entries[1] != entries[2]  # the corpus cache key follows the file's content, not its path
    assert tokenizer_fingerprint({"type": "byte_bpe", "vocab_size": 300}) != tokenizer_fingerprint({"type": "byte_bpe", "vocab_size": 301})
    with pytest.raises(UserError, match="tokenizer.file=.* does not exist"):
        tokenizer_fingerprint({"type": "hf", "file": str(tmp_path / "missing.json")})
    with pytest.raises(UserError, match="needs tokenizer.file"):
        train_tokenizer([], {"type": "hf", "file": None}, tmp_path / "t")


@pytest.mark.parametrize("kind", ["byte_bpe", "words"])
def test_a_trained_tokenizer_exports_as_its_tokenizer_json(kind, byte_bpe, tmp_path):
    import transformers

    from lm_lightning.interop.hf_export import save_hf
    from lm_lightning.models.gpt import GPT, GPTConfig

    ours = byte_bpe if kind == "byte_bpe" else load_tokenizer(
        train_tokenizer(TRAIN, {"type": "words", "special_tokens": ["[MASK]"], "verbose": False}, tmp_path / "w"))
    model = GPT(GPTConfig(vocab_size=ours.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_hf(model, tmp_path / "hf", ours.to_bytes())
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = HELD_OUT[:500] + " </s> to [MASK] be"
    assert theirs(text)["input_ids"] == ours.encode(text)  # control tokens in the text stay characters in both
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (ours.bos_id, ours.eos_id, ours.pad_id)
    if kind == "byte_bpe":
        assert theirs.decode(ours.encode(text)) == text


def _gpt2_like_tokenizer_json(path: Path) -> Path:
    """A GPT-2-style tokenizer.json trained here by ``tokenizers`` itself: byte-level BPE, <|endoftext|>."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def test_a_tokenizer_json_is_reused_as_hf_trained_on_and_loaded_back_from_the_checkpoint(tmp_path):
    from lm_lightning.interop.hf_export import save_hf
    from lm_lightning.training.loading import load_trained

    file = _gpt2_like_tokenizer_json(tmp_path / "tokenizer.json")
    theirs = HFTokenizer.from_file(file)
    assert theirs.bos_id == theirs.eos_id == 0 and theirs.pad_id == theirs.unk_id == -1  # GPT-2's one special token
    cache, run = tmp_path / "cache", tmp_path / "run"
    record = run_command("train", "experiment=tiny", "tokenizer=hf", f"tokenizer.file={file}", "data.corpus.source.max_bytes=30000",
                         "trainer.max_steps=2", "scheduler.warmup_steps=1", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                         "sample.max_new_tokens=3", "logger=csv", run_dir=run, cache=cache)
    corpus = json.loads((Path(record["corpus_dir"]) / "metadata.json").read_text())
    assert corpus["tokenizer"]["file"] == "tokenizer.json" and corpus["tokenizer"]["sha256"] == theirs.sha256
    train_ids = np.fromfile(Path(record["corpus_dir"]) / "train.bin", dtype=corpus["dtype"])
    assert train_ids.tolist() == theirs.encode(SHAKESPEARE[:27000]) + [theirs.eos_id]  # the 90% train split, then EOS
    assert corpus["splits"]["train"]["bytes"] == 27000  # bits per byte still counts UTF-8 bytes of the text

    task, tokenizer = load_trained(str(run / "checkpoints" / "last.ckpt"))
    assert isinstance(tokenizer, HFTokenizer) and task.tokenizer_model == file.read_bytes()
    assert tokenizer.encode(HELD_OUT) == theirs.encode(HELD_OUT) and task.model.config.vocab_size == theirs.vocab_size

    save_hf(task.model, tmp_path / "hf", task.tokenizer_model)  # export: the tokenizer.json goes along
    import transformers

    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported(HELD_OUT + "<|endoftext|>")["input_ids"] == theirs.encode(HELD_OUT + "<|endoftext|>")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == theirs.eos_id and not (tmp_path / "hf" / "tokenizer.model").exists()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([theirs.encode(HELD_OUT)[:16]])
    torch.testing.assert_close(hf_model(ids).logits, task.model.float()(ids), atol=1e-4, rtol=0)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
