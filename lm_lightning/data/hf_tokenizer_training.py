"""Training Hugging Face ``tokenizers`` tokenizers on the train split, written as ``tokenizer.json``:

- ``byte_bpe``: byte-level BPE as GPT-2's: text is split by GPT-2's pattern, each piece's UTF-8
  bytes are spelled in 256 byte symbols, and merges are learned over them. All 256 symbols are
  in the vocabulary whatever the text, so there is no unknown token.
- ``words``: every distinct whitespace-separated word is a token (the most frequent ``vocab_size``
  of them, when set), each line end is a token (``"\\n"``, as ``<eos>`` is in the PTB data), and
  a word not seen in training is ``<unk>``.
- ``hf``: an existing ``tokenizer.json`` (``tokenizer.file``), checked and copied; no training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lm_lightning.data.hf_tokenizer import NEWLINE, ROLE_NAMES, HFTokenizer
from lm_lightning.errors import UserError

CONTROL = ("<pad>", "<s>", "</s>")  # byte_bpe has no <unk>: every byte string has tokens
UNK = "<unk>"
_ALL_WORDS = 2**31 - 1  # the word trainer's vocab_size when every word is kept


def train_hf_tokenizer(docs: Iterable[str], cfg: Mapping, target: Path) -> Path:
    """Train (or, for ``hf``, copy) the ``cfg["type"]`` tokenizer; write ``target`` (a tokenizer.json).

    ``cfg``: ``vocab_size`` (tokens, control and special tokens included; for ``words`` 0 keeps
    every word), ``min_frequency`` (fewer occurrences in training: not learned), ``special_tokens``
    (extra tokens matched anywhere in the text, each one id), ``verbose`` (progress bars); ``file``
    for ``hf``. Returns ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = cfg.get("type")
    if kind == "hf":
        target.write_bytes(_checked_tokenizer_json(cfg.get("file")))
        return target
    specials = [t for t in dict.fromkeys(cfg.get("special_tokens") or []) if t not in (*CONTROL, UNK, NEWLINE)]
    tokenizer = _byte_bpe(docs, cfg, specials) if kind == "byte_bpe" else _words(docs, cfg, specials)
    target.write_text(tokenizer.to_str(), encoding="utf-8")
    return target


def _byte_bpe(docs: Iterable[str], cfg: Mapping, specials: list[str]) -> Tokenizer:
    vocab_size = int(cfg.get("vocab_size") or 0)
    least = len(CONTROL) + 256 + len(specials)
    if vocab_size < least:
        raise UserError(f"tokenizer.vocab_size={vocab_size} is too small for byte_bpe: it needs at least {least} "
                        f"({len(CONTROL)} control tokens, 256 byte tokens, {len(specials)} special tokens) plus merges")
    tokenizer = Tokenizer(models.BPE())  # no unk_token
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), min_frequency=int(cfg.get("min_frequency") or 0),
        special_tokens=list(CONTROL), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=bool(cfg.get("verbose", True)))
    _train(tokenizer, trainer, docs)
    # Not special: matched anywhere in the text and decoded as written, like sentencepiece's user symbols.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in specials])
    return tokenizer


def _words(docs: Iterable[str], cfg: Mapping, specials: list[str]) -> Tokenizer:
    reserved = [CONTROL[0], UNK, *CONTROL[1:], NEWLINE, *specials]  # ids 0.. : <pad> <unk> <s> </s> "\n" ...
    limit = int(cfg.get("vocab_size") or 0)
    if 0 < limit <= len(reserved):
        raise UserError(f"tokenizer.vocab_size={limit} leaves no room for words after {len(reserved)} reserved "
                        f"tokens: raise it, or 0 to keep every word")
    counting = Tokenizer(models.WordLevel(unk_token=UNK))
    counting.pre_tokenizer = _word_splitter()
    trainer = trainers.WordLevelTrainer(vocab_size=_ALL_WORDS, min_frequency=int(cfg.get("min_frequency") or 0),
                                        show_progress=bool(cfg.get("verbose", True)))
    _train(counting, trainer, docs)
    # The trainer numbers words by falling frequency (ties by spelling): keep the first ones.
    by_frequency = [w for w, _ in sorted(counting.get_vocab().items(), key=lambda item: item[1]) if w not in reserved]
    words = by_frequency[: limit - len(reserved)] if limit else by_frequency
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*reserved, *words])}, unk_token=UNK))
    tokenizer.pre_tokenizer = _word_splitter()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in specials])
    return tokenizer


def _word_splitter() -> pre_tokenizers.PreTokenizer:
    """Words are runs of non-whitespace; spaces and tabs vanish; each ``"\\n"`` is a word of its own."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
                                    pre_tokenizers.Split(NEWLINE, behavior="isolated")])


def _train(tokenizer: Tokenizer, trainer: trainers.Trainer, docs: Iterable[str]) -> None:
    """Train on the documents; ``tokenizers`` shows its own progress (reading, counting, merging)."""
    seen = [0]

    def counted(items: Iterable[str]) -> Iterator[str]:
        for doc in items:
            seen[0] += len(doc)
            yield doc

    tokenizer.train_from_iterator(counted(docs), trainer, length=len(docs) if isinstance(docs, Sequence) else None)
    if not seen[0]:
        raise UserError("tokenizer training failed: the train split has no text (check data.corpus.source and the split)")


def _checked_tokenizer_json(file: str | Path | None) -> bytes:
    if not file:
        raise UserError("tokenizer=hf needs tokenizer.file=<path of a tokenizer.json>")
    tokenizer = HFTokenizer.from_file(file)
    if tokenizer.eos_id < 0:
        raise UserError(f"tokenizer.file={file} has no end-of-text token (one of {', '.join(ROLE_NAMES['eos'])}): "
                        "the corpus ends every document with one; add it to the tokenizer.json's added_tokens")
    return tokenizer.to_bytes()
