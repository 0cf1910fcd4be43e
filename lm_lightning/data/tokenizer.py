"""Sentencepiece tokenizers (BPE, unigram, char, word, byte) that round-trip text exactly.

Whitespace is kept as is (no normalisation, no extra-space removal, no dummy prefix), so
``decode(encode(text)) == text`` for any text the vocabulary covers (with
``byte_fallback: true``, for any text). Newlines are handled outside sentencepiece, which
works on one "sentence" at a time: the tokenizer is trained on lines, ``"\\n"`` is a
user-defined symbol (one id of its own), and ``encode`` encodes each line and puts the
newline id between them. For BPE this gives exactly the ids sentencepiece itself gives for
the whole text; it also works for the word model, which ignores user-defined symbols.

``byte`` is built, not trained: a sentencepiece model whose only pieces besides the specials are the 256 bytes, so
with byte fallback every character is its UTF-8 bytes, one id each (ByT5's vocabulary, 261 ids with the specials).

The types of Hugging Face ``tokenizers`` (``byte_bpe``, ``words``, ``hf``) live in
``hf_tokenizer.py`` and ``hf_tokenizer_training.py``; ``train_tokenizer`` trains either kind and
``load_tokenizer`` is the one place that tells a sentencepiece model from a ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import sentencepiece as spm
from tqdm import tqdm

from lm_lightning.data.hashing import file_sha256
from lm_lightning.errors import UserError

if TYPE_CHECKING:
    from lm_lightning.data.hf_tokenizer import HFTokenizer

TYPES = ("bpe", "unigram", "char", "word", "byte")  # sentencepiece models: trained, or for byte built
HF_TYPES = ("byte_bpe", "words", "hf")  # Hugging Face tokenizers: byte-level BPE, word vocabulary, a tokenizer.json
NEWLINE = "\n"
_META_PIECES = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}


def train_tokenizer(docs: Iterable[str], cfg: Mapping, model_prefix: Path) -> Path:
    """Train a tokenizer on ``docs``: a sentencepiece model (``<model_prefix>.model`` and ``.vocab``)
    or, for ``HF_TYPES``, a ``<model_prefix>.json`` (see ``train_hf_tokenizer``). Returns its path.

    Sentencepiece ``cfg``: ``type`` (bpe|unigram|char|word|byte), ``vocab_size`` (pieces, including the specials
    ``<pad>`` ``<unk>`` ``<s>`` ``</s>``, ``"\\n"`` and ``special_tokens``; ignored for char,
    whose vocabulary is every character seen, and for byte, built from the 256 bytes without training),
    ``byte_fallback``, ``character_coverage``, ``special_tokens``, ``max_sentence_length`` (bytes per line;
    longer lines are skipped in training), ``input_sentence_size`` (lines sampled for training; 0 = all), ``seed``,
    ``num_threads``, ``verbose`` (sentencepiece's own log; off by default). Any type: ``model_file``, an existing
    tokenizer (a ``.model`` or a ``tokenizer.json``) copied instead of training one.
    """
    model_prefix = Path(model_prefix)
    if cfg.get("model_file"):  # re-use a trained model (continued pretraining on a new corpus): no training
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        data = Path(cfg["model_file"]).read_bytes()
        target = model_prefix.with_name(model_prefix.name + (".json" if is_tokenizer_json(data) else ".model"))
        target.write_bytes(data)
        return target
    kind = cfg.get("type", "bpe")
    if kind in HF_TYPES:
        training = _hf_module("hf_tokenizer_training")
        return training.train_hf_tokenizer(docs, cfg, model_prefix.with_name(model_prefix.name + ".json"))
    if kind not in TYPES:
        raise UserError(f"tokenizer.type={kind!r} is not valid: choose one of {', '.join(TYPES + HF_TYPES)}")
    specials = [NEWLINE] + [t for t in cfg.get("special_tokens") or [] if t not in _META_PIECES and t != NEWLINE]
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    if kind == "byte":  # nothing to learn: the documents are not read
        target = model_prefix.with_name(model_prefix.name + ".model")
        target.write_bytes(byte_model(list(dict.fromkeys(specials))))
        return target
    options = dict(
        model_prefix=str(model_prefix),
        model_type=kind,
        vocab_size=int(cfg.get("vocab_size", 4096)),
        byte_fallback=bool(cfg.get("byte_fallback", False)),
        character_coverage=float(cfg.get("character_coverage") or (1.0 if kind == "char" else 0.9995)),
        user_defined_symbols=list(dict.fromkeys(specials)),
        max_sentence_length=int(cfg.get("max_sentence_length") or 16384),
        input_sentence_size=int(cfg.get("input_sentence_size") or 0),
        shuffle_input_sentence=True,
        num_threads=int(cfg.get("num_threads") or os.cpu_count() or 1),
        # Exact whitespace: what goes in comes back out.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # runs of indentation become single pieces
        pad_id=_META_PIECES["<pad>"], unk_id=_META_PIECES["<unk>"],
        bos_id=_META_PIECES["<s>"], eos_id=_META_PIECES["</s>"],
        # sentencepiece's C++ trainer logs dozens of lines of internals straight to the stderr file descriptor
        # (past Python's sys.stderr): errors only unless tokenizer.verbose=true asks for them
        minloglevel=0 if cfg.get("verbose", False) else 2,
    )
    reserved = len(_META_PIECES) + len(options["user_defined_symbols"])
    if kind not in ("char", "word") and options["vocab_size"] <= reserved:
        raise UserError(f"tokenizer.vocab_size={options['vocab_size']} leaves no learned pieces: {reserved} are reserved "
                        f"(<pad>, <unk>, <s>, </s>, the newline and special tokens), and a {kind} vocabulary also needs "
                        "every character of the text: choose a few hundred or more")
    if kind == "char":
        # Every character seen becomes a piece; vocab_size is only an upper bound here.
        options.update(vocab_size=1 << 20, hard_vocab_limit=False, use_all_vocab=True)
    elif kind == "word":
        options.update(hard_vocab_limit=False)  # the most frequent words, up to vocab_size
    spm.set_random_generator_seed(int(cfg.get("seed", 0)))
    lines = _training_lines(docs, options["max_sentence_length"])
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=lines, **options)
    except RuntimeError as e:
        lines.close()  # its progress bar ends its line, so the error line starts one
        message = str(e).split("] ", 1)[-1].strip() or "no training text"
        raise UserError(f"tokenizer training failed: {message} (check tokenizer.vocab_size, "
                        f"tokenizer.character_coverage and that the train split has text)") from None
    return model_prefix.with_name(model_prefix.name + ".model")


def byte_model(specials: Sequence[str]) -> bytes:
    """A sentencepiece model proto with no learned pieces: ``<pad> <unk> <s> </s>``, then ``specials`` (the newline
    first), then the 256 byte pieces ``<0x00>``..``<0xFF>``. Byte fallback turns every character, none of which is a
    piece, into its UTF-8 bytes; whitespace is kept as is (no ``▁``), so a space is the one byte 0x20."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model, piece = pb.ModelProto(), pb.ModelProto.SentencePiece
    for name in sorted(_META_PIECES, key=_META_PIECES.get):
        model.pieces.add(piece=name, score=0.0, type=piece.UNKNOWN if name == "<unk>" else piece.CONTROL)
    for name in specials:
        model.pieces.add(piece=name, score=0.0, type=piece.USER_DEFINED)
    for byte in range(256):
        model.pieces.add(piece=f"<0x{byte:02X}>", score=0.0, type=piece.BYTE)
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.CHAR, len(model.pieces), True
    spec.pad_id, spec.unk_id = _META_PIECES["<pad>"], _META_PIECES["<unk>"]
    spec.bos_id, spec.eos_id = _META_PIECES["<s>"], _META_PIECES["</s>"]
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix = "identity", False
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, False
    return model.SerializeToString()


def tokenizer_fingerprint(cfg: Mapping) -> dict:
    """What identifies the tokenizer ``cfg`` makes, for a corpus cache key: its options less log
    verbosity; a re-used tokenizer (``model_file``, or ``file`` for ``hf``) by its content, not its path."""
    key = {k: v for k, v in cfg.items() if k != "verbose"}
    for option, kind in (("model_file", "a sentencepiece .model or a tokenizer.json"), ("file", "a tokenizer.json")):
        if key.get(option) and not Path(key[option]).is_file():
            raise UserError(f"tokenizer.{option}={key[option]} does not exist: pass {kind} file")
    if key.get("model_file"):
        return {"model_sha256": file_sha256(Path(key["model_file"]))}
    if key.get("file"):
        key["file"] = file_sha256(Path(key["file"]))
    return key


def load_tokenizer(source: bytes | str | Path, num_threads: int | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer in ``source``: a file, or the bytes a checkpoint stores (``tokenizer_model``).
    A ``tokenizer.json`` gives an ``HFTokenizer``, anything else a sentencepiece ``Tokenizer``."""
    path = None
    if not isinstance(source, (bytes, bytearray)):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path} (train one or fix the tokenizer path)")
        source = path.read_bytes()
    if not is_tokenizer_json(source):
        return Tokenizer(source, num_threads, path)
    return _hf_module("hf_tokenizer").HFTokenizer(source, path)


def is_tokenizer_json(data: bytes) -> bool:
    """True for a ``tokenizer.json`` (a JSON object), False for a sentencepiece model (a protobuf)."""
    return data.lstrip()[:1] == b"{"


def _hf_module(name: str) -> ModuleType:
    """``lm_lightning.data.<name>``, imported on first use: Hugging Face tokenizers is an optional dependency."""
    try:
        return importlib.import_module(f"lm_lightning.data.{name}")
    except ModuleNotFoundError as err:
        if err.name != "tokenizers":
            raise
        raise UserError("tokenizer types byte_bpe, words and hf (and a checkpoint that carries a tokenizer.json) "
                        "need Hugging Face tokenizers: pip install -e \".[hf]\"") from None


def _training_lines(docs: Iterable[str], max_bytes: int = 16384) -> Iterator[str]:
    """The documents' lines; a line over ``max_bytes`` UTF-8 bytes is cut in pieces that fit (on character
    boundaries), since sentencepiece silently skips longer sentences (a text of long lines left it none)."""
    total = len(docs) if isinstance(docs, Sequence) else None
    with tqdm(docs, total=total, desc="tokenizer: reading training documents", unit="doc") as bar:
        for doc in bar:
            for line in doc.split(NEWLINE):
                data = line.encode("utf-8")
                while len(data) > max_bytes:
                    piece = data[:max_bytes].decode("utf-8", errors="ignore")  # drops a character cut in two
                    yield piece
                    data = data[len(piece.encode("utf-8")):]
                if data:
                    yield data.decode("utf-8")


class Tokenizer:
    """A trained sentencepiece model. Ids are ints in ``[0, vocab_size)``."""

    def __init__(self, model_proto: bytes, num_threads: int | None = None, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._data = bytes(model_proto)
        self.sha256: str = hashlib.sha256(self._data).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=self._data)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.newline_id = self.token_to_id(NEWLINE)
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto.FromString(self._data)
        # tokenizer=byte's kind: no learned piece besides specials and user-defined symbols; the bytes are its vocabulary
        self.byte_level = all(piece.type != piece.NORMAL for piece in proto.pieces)
        self._marks_spaces = proto.normalizer_spec.escape_whitespaces  # spaces as "▁" (not in byte_model)
        self._threads = num_threads or os.cpu_count() or 1  # sentencepiece threads in encode_batch

    @classmethod
    def load(cls, path: str | Path, num_threads: int | None = None) -> Tokenizer:
        """A sentencepiece ``.model`` file (``load_tokenizer`` also takes a tokenizer.json)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path} (train one or fix the tokenizer path)")
        return cls(path.read_bytes(), num_threads, path)

    def to_bytes(self) -> bytes:
        """The model proto: what a checkpoint stores as ``tokenizer_model``."""
        return self._data

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once; sentencepiece spreads the lines over all CPU threads."""
        lines_per_text = [text.split(NEWLINE) for text in texts]
        flat = [line for lines in lines_per_text for line in lines]
        encoded = iter(self._sp.encode(flat, num_threads=self._threads))
        out = []
        for lines in lines_per_text:
            ids = list(next(encoded))
            for _ in range(len(lines) - 1):
                ids.append(self.newline_id)
                ids.extend(next(encoded))
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control tokens (pad, bos, eos) decode to nothing."""
        lines, current = [], []
        for i in ids:
            if int(i) == self.newline_id:
                lines.append(current)
                current = []
            else:
                current.append(int(i))
        lines.append(current)
        # A byte-fallback word keeps its leading space marker as raw bytes; make it a space. A model that marks no
        # space (byte_model: a space is the byte 0x20) leaves a "▁" alone: there it is the text's own.
        if not self._marks_spaces:
            return NEWLINE.join(self._sp.decode(line) for line in lines)
        return NEWLINE.join(self._sp.decode(line).replace("\u2581", " ") for line in lines)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of UTF-8 bytes; sentencepiece reads text, so invalid UTF-8 is refused."""
        try:
            return self.encode(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(f"a sentencepiece tokenizer cannot encode invalid UTF-8 ({err.reason} at byte "
                            f"{err.start}): use tokenizer=byte_bpe") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def fallback_ids(self) -> list[int]:
        """Ids that mean the vocabulary did not cover the text: ``<unk>`` and byte-fallback pieces (a byte-level
        model's bytes are its vocabulary, not a fallback)."""
        return [i for i in range(self.vocab_size) if i == self.unk_id or (self._sp.is_byte(i) and not self.byte_level)]

    def token_to_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise UserError(f"token {piece!r} is not in tokenizer {self.path or self.sha256[:12]}: add it to tokenizer.special_tokens and retrain")
        return i

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def ids_ending_with(self, endings: Sequence[str]) -> list[int]:
        """Ids of the pieces that end with one of ``endings`` (e.g. sentence-final punctuation)."""
        return [i for i in range(self.vocab_size)
                if not self._sp.is_control(i) and self._sp.id_to_piece(i).endswith(tuple(endings))]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or self.sha256[:12]}, vocab_size={self.vocab_size})"
