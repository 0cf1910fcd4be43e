"""Tokenizers of Hugging Face ``tokenizers``, stored as their ``tokenizer.json``: byte-level BPE
(GPT-2's kind) and a word-level vocabulary trained here (``hf_tokenizer_training.py``), or any
existing ``tokenizer.json`` (GPT-2, GPT-NeoX, Llama, ...).

``HFTokenizer`` answers to the same calls as the sentencepiece ``Tokenizer`` (``encode``,
``encode_batch``, ``decode``, the pad/unk/bos/eos ids, ...), so the corpus, training and every
command that loads a checkpoint take either. Its bytes (``to_bytes``) are what a checkpoint stores.

Raw bytes. Text is ``str`` everywhere in the pipeline, but a byte-level model can hold any byte
string, valid UTF-8 or not: ``encode_bytes`` encodes each valid UTF-8 run as text (the ids
``encode`` gives) and each run of invalid bytes with the BPE model directly over its byte
symbols; ``decode_bytes`` maps every id back to its exact bytes, so
``decode_bytes(encode_bytes(b)) == b`` for every ``b``. ``decode`` is ``decode_bytes`` read as
UTF-8 (a sequence cut inside a character shows U+FFFD there).

Roles. A ``tokenizer.json`` names no BOS/EOS/padding token, so they are found by name
(``ROLE_NAMES``: ``<s>``/``</s>``/``<pad>`` as trained here, ``<|endoftext|>`` for GPT-2 and
GPT-NeoX, ``<|begin_of_text|>``/``<|end_of_text|>`` for Llama 3); the same bytes always give the
same ids. Control tokens (these and every *special* added token) decode to nothing, as
sentencepiece's do, and text that spells one is read as ordinary characters.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models

from lm_lightning.errors import UserError

ROLE_NAMES = {
    "pad": ("<pad>", "<|padding|>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>", "[CLS]"),
    "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]"),
}
NEWLINE = "\n"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece-style byte-fallback tokens (Llama)
_INVALID_RUN = re.compile("([\udc80-\udcff]+)")  # invalid UTF-8 bytes, as surrogateescape writes them


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (what byte-level BPE tokens are spelled in):
    printable Latin-1 characters stand for themselves, the 68 others for U+0100 onwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


_SYMBOLS = byte_alphabet()
_BYTE_OF = {char: bytes([b]) for b, char in enumerate(_SYMBOLS)}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer. Ids are ints in ``[0, vocab_size)``; ``-1`` for a role it lacks."""

    def __init__(self, data: bytes, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._data = bytes(data)
        try:
            self._tok = _HFTokenizer.from_str(self._data.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception for every parse failure
            raise UserError(f"{self.path or 'the tokenizer'} is not a tokenizer.json that HF tokenizers reads "
                            f"({str(err).splitlines()[0][:200]}); pass a tokenizer.json file") from None
        self._tok.encode_special_tokens = True  # "</s>" in the text is characters, as in sentencepiece
        self.sha256: str = hashlib.sha256(self._data).hexdigest()
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        model_unk = getattr(self._tok.model, "unk_token", None)
        self.pad_id, self.bos_id, self.eos_id = (self._find(ROLE_NAMES[role]) for role in ("pad", "bos", "eos"))
        self.unk_id = self._find((model_unk,) if model_unk else ROLE_NAMES["unk"])
        self._control = {i for i, t in added.items() if t.special} | {i for i in (self.pad_id, self.bos_id, self.eos_id) if i >= 0}
        self.byte_level = _has_type(json.loads(self._data).get("decoder"), "ByteLevel")
        self.word_level = isinstance(self._tok.model, models.WordLevel)
        newline = self.encode(NEWLINE)
        self.newline_id = newline[0] if len(newline) == 1 else -1

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Read a ``tokenizer.json`` (e.g. a transformers folder's, for ``lm-lightning import``)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path} (pass the path of a tokenizer.json)")
        return cls(path.read_bytes(), path)

    @classmethod
    def from_bytes(cls, data: bytes) -> HFTokenizer:
        return cls(data)

    def to_bytes(self) -> bytes:
        """The ``tokenizer.json`` exactly as read: what a checkpoint stores as ``tokenizer_model``."""
        return self._data

    def _find(self, names: Iterable[str]) -> int:
        ids = (self._tok.token_to_id(name) for name in names)
        return next((i for i in ids if i is not None), -1)

    # --- text -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (``tokenizers`` spreads them over the CPU threads)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; control tokens decode to nothing. A word-level vocabulary puts one space
        between the words of a line (its ``"\\n"`` tokens end lines)."""
        kept = [int(i) for i in ids if int(i) not in self._control]
        if self.byte_level:
            return self.decode_bytes(kept).decode("utf-8", errors="replace")
        if self.word_level:
            lines = " ".join(self._tok.id_to_token(i) for i in kept).split(NEWLINE)
            return NEWLINE.join(line.strip(" ") for line in lines)
        return self._tok.decode(kept, skip_special_tokens=False)

    # --- bytes ------------------------------------------------------------------------------

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of any byte string (exact for a byte-level model; other models need valid UTF-8)."""
        if not self.byte_level:
            try:
                return self.encode(data.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise UserError(f"tokenizer {self.path or self.sha256[:12]} is not byte-level and cannot encode "
                                f"invalid UTF-8 ({err.reason} at byte {err.start}): use tokenizer=byte_bpe") from None
        parts = _INVALID_RUN.split(data.decode("utf-8", errors="surrogateescape"))
        texts = parts[0::2]  # valid runs (possibly empty) around each run of invalid bytes
        encoded = self.encode_batch(texts)
        ids = list(encoded[0])
        for invalid, text_ids in zip(parts[1::2], encoded[1:]):
            symbols = "".join(_SYMBOLS[b] for b in invalid.encode("utf-8", errors="surrogateescape"))
            ids += [token.id for token in self._tok.model.tokenize(symbols)]
            ids += text_ids
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids``: exact for a byte-level model (control tokens give none)."""
        if not self.byte_level:
            return self.decode(ids).encode("utf-8")
        table = self._token_bytes
        return b"".join(table[int(i)] for i in ids if int(i) not in self._control)

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """Each id's bytes: a learned token's byte symbols mapped back, an added token's text in UTF-8."""
        added = self._tok.get_added_tokens_decoder()
        table = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i) or ""
            table.append(token.encode("utf-8") if i in added else b"".join(_BYTE_OF.get(c, c.encode()) for c in token))
        return table

    # --- vocabulary -------------------------------------------------------------------------

    def fallback_ids(self) -> list[int]:
        """Ids that mean the vocabulary did not cover the text: ``<unk>`` and byte-fallback pieces (none
        for byte-level BPE, whose 256 byte tokens are ordinary vocabulary)."""
        byte_fallback = bool(getattr(self._tok.model, "byte_fallback", False))
        return [i for i in range(self.vocab_size)
                if i == self.unk_id or (byte_fallback and _BYTE_PIECE.fullmatch(self._tok.id_to_token(i) or ""))]

    def token_to_id(self, piece: str) -> int:
        i = self._tok.token_to_id(piece)
        if i is None:
            raise UserError(f"token {piece!r} is not in tokenizer {self.path or self.sha256[:12]}: "
                            f"add it to tokenizer.special_tokens and retrain")
        return i

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def ids_ending_with(self, endings: Sequence[str]) -> list[int]:
        """Ids whose text ends with one of ``endings`` (e.g. sentence-final punctuation); no control ids."""
        suffixes = tuple(e.encode("utf-8") for e in endings)
        spell = (lambda i: self._token_bytes[i]) if self.byte_level else (lambda i: self.id_to_token(i).encode("utf-8"))
        return [i for i in range(self.vocab_size) if i not in self._control and spell(i).endswith(suffixes)]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path or self.sha256[:12]}, vocab_size={self.vocab_size})"


def _has_type(component: dict | None, name: str) -> bool:
    """Whether a tokenizer.json component (e.g. the decoder), or one inside its Sequence, is of type ``name``."""
    if not component:
        return False
    return component.get("type") == name or any(_has_type(c, name) for c in component.get("decoders", []))
