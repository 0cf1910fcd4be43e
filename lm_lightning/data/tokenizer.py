"""Sentencepiece tokenizers (BPE, unigram, char, word) that round-trip text exactly.

Whitespace is kept as is (no normalisation, no extra-space removal, no dummy prefix), so
``decode(encode(text)) == text`` for any text the vocabulary covers (with
``byte_fallback: true``, for any text). Newlines are handled outside sentencepiece, which
works on one "sentence" at a time: the tokenizer is trained on lines, ``"\\n"`` is a
user-defined symbol (one id of its own), and ``encode`` encodes each line and puts the
newline id between them. For BPE this gives exactly the ids sentencepiece itself gives for
the whole text; it also works for the word model, which ignores user-defined symbols.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from lm_lightning.errors import UserError

TYPES = ("bpe", "unigram", "char", "word")
NEWLINE = "\n"
_META_PIECES = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}


def train_tokenizer(docs: Iterable[str], cfg: Mapping, model_prefix: Path) -> Path:
    """Train a sentencepiece model on ``docs``; write ``<model_prefix>.model`` and ``.vocab``.

    ``cfg``: ``type`` (bpe|unigram|char|word), ``vocab_size`` (pieces, including the specials
    ``<pad>`` ``<unk>`` ``<s>`` ``</s>``, ``"\\n"`` and ``special_tokens``; ignored for char,
    whose vocabulary is every character seen), ``byte_fallback``, ``character_coverage``,
    ``special_tokens``, ``max_sentence_length`` (bytes per line; longer lines are skipped in
    training), ``input_sentence_size`` (lines sampled for training; 0 = all), ``seed``,
    ``num_threads``, ``verbose`` (sentencepiece's own log); or ``model_file``, an existing
    ``.model`` copied instead of training one. Returns the ``.model`` path.
    """
    model_prefix = Path(model_prefix)
    if cfg.get("model_file"):  # re-use a trained model (continued pretraining on a new corpus): no training
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        target = model_prefix.with_suffix(".model")
        shutil.copyfile(cfg["model_file"], target)
        return target
    kind = cfg.get("type", "bpe")
    if kind not in TYPES:
        raise UserError(f"tokenizer.type={kind!r} is not valid: choose one of {', '.join(TYPES)}")
    specials = [NEWLINE] + [t for t in cfg.get("special_tokens") or [] if t not in _META_PIECES and t != NEWLINE]
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
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
        minloglevel=0 if cfg.get("verbose", True) else 2,
    )
    if kind == "char":
        # Every character seen becomes a piece; vocab_size is only an upper bound here.
        options.update(vocab_size=1 << 20, hard_vocab_limit=False, use_all_vocab=True)
    elif kind == "word":
        options.update(hard_vocab_limit=False)  # the most frequent words, up to vocab_size
    spm.set_random_generator_seed(int(cfg.get("seed", 0)))
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_lines(docs), **options)
    except RuntimeError as e:
        message = str(e).split("] ", 1)[-1].strip() or "no training text"
        raise UserError(f"tokenizer training failed: {message} (check tokenizer.vocab_size, "
                        f"tokenizer.character_coverage and that the train split has text)") from None
    return model_prefix.with_name(model_prefix.name + ".model")


def _training_lines(docs: Iterable[str]) -> Iterator[str]:
    total = len(docs) if isinstance(docs, Sequence) else None
    for doc in tqdm(docs, total=total, desc="tokenizer: reading training documents", unit="doc"):
        yield from (line for line in doc.split(NEWLINE) if line)


class Tokenizer:
    """A trained sentencepiece model. Ids are ints in ``[0, vocab_size)``."""

    def __init__(self, path: Path, num_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"tokenizer model not found: {self.path} (train one or fix the tokenizer path)")
        data = self.path.read_bytes()
        self.sha256: str = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.newline_id = self.token_to_id(NEWLINE)
        self._threads = num_threads or os.cpu_count() or 1  # sentencepiece threads in encode_batch

    @classmethod
    def load(cls, path: str | Path, num_threads: int | None = None) -> Tokenizer:
        return cls(Path(path), num_threads)

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
        # A byte-fallback word keeps its leading space marker as raw bytes; make it a space.
        return NEWLINE.join(self._sp.decode(line).replace("\u2581", " ") for line in lines)

    def fallback_ids(self) -> list[int]:
        """Ids that mean the vocabulary did not cover the text: ``<unk>`` and byte-fallback pieces."""
        return [i for i in range(self.vocab_size) if i == self.unk_id or self._sp.is_byte(i)]

    def token_to_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise UserError(f"token {piece!r} is not in tokenizer {self.path}: add it to tokenizer.special_tokens and retrain")
        return i

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def ids_ending_with(self, endings: Sequence[str]) -> list[int]:
        """Ids of the pieces that end with one of ``endings`` (e.g. sentence-final punctuation)."""
        return [i for i in range(self.vocab_size)
                if not self._sp.is_control(i) and self._sp.id_to_piece(i).endswith(tuple(endings))]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"
