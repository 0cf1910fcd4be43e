"""Preference data: pairs (a prompt, a chosen and a rejected response) and unpaired completions
(a prompt, a completion, desirable or not), read from files or made from instruction data, then
tokenized into prompt + response + end-of-sequence sequences and batched with response masks.

Three sources of pairs (``data.format``):
- ``pairs``: JSON lines ``{"prompt", "chosen", "rejected"}``;
- ``hh_rlhf``: Anthropic HH-RLHF lines ``{"chosen", "rejected"}``, each a whole conversation; the
  prompt is everything up to and including the last ``"\\n\\nAssistant:"``, the response the rest;
- ``synthetic``: Alpaca instructions with a known preference: chosen = the reference answer,
  rejected = the same words shuffled within each line (``rejected=shuffle``) or the answer to
  another instruction (``rejected=swap``).
Unpaired completions for KTO are JSON lines ``{"prompt", "completion", "desirable": bool}``, or
the pairs split into a desirable and an undesirable completion each. Files may be gzipped.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lm_lightning.adaptation.batching import right_pad
from lm_lightning.adaptation.instructions import load_instructions, render_prompt
from lm_lightning.errors import UserError

FORMATS = ("synthetic", "pairs", "hh_rlhf")
REJECTIONS = ("shuffle", "swap")
ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Completion:
    prompt: str
    completion: str
    desirable: bool


# ---- reading ----------------------------------------------------------------------------------

def read_jsonl(path: str | Path, fields: dict[str, type], what: str) -> list[dict]:
    """The rows of a JSON-lines file (``.gz`` too), each checked to hold ``fields`` with their types.
    A missing file, a bad line or a missing field is one UserError naming the file, the row
    (its line number) and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{what} file {path}, row {number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise UserError(f"{what} file {path}, row {number}: expected an object with {', '.join(fields)}")
            for field, kind in fields.items():
                if field not in record:
                    raise UserError(f"{what} file {path}, row {number}: missing field '{field}' "
                                    f"(every row needs {', '.join(fields)})")
                if not isinstance(record[field], kind):
                    raise UserError(f"{what} file {path}, row {number}: field '{field}' must be a {kind.__name__}, "
                                    f"got {type(record[field]).__name__}")
            rows.append(record)
    if not rows:
        raise UserError(f"{what} file {path} holds no rows")
    return rows


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from JSON lines ``{"prompt", "chosen", "rejected"}``."""
    rows = read_jsonl(path, {"prompt": str, "chosen": str, "rejected": str}, "preference")
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]


def split_conversation(text: str) -> tuple[str, str]:
    """An HH-RLHF conversation → (prompt up to and including the last ``"\\n\\nAssistant:"``, final assistant turn)."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        raise ValueError("no assistant turn")
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:]


def load_hh_rlhf(path: str | Path) -> list[PreferencePair]:
    """Pairs from Anthropic HH-RLHF lines ``{"chosen", "rejected"}`` (whole conversations).

    The two conversations of a row share every turn but the last; the few rows where they differ
    earlier (9 of 2,354 in helpful-base test) are not pairs over one prompt and are skipped."""
    pairs = []
    for number, row in enumerate(read_jsonl(path, {"chosen": str, "rejected": str}, "HH-RLHF"), start=1):
        try:
            prompt, chosen = split_conversation(row["chosen"])
            rejected_prompt, rejected = split_conversation(row["rejected"])
        except ValueError:
            raise UserError(f"HH-RLHF file {path}, row {number}: a conversation has no {ASSISTANT.strip()!r} turn") from None
        if prompt == rejected_prompt:
            pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def load_completions(path: str | Path) -> list[Completion]:
    """Unpaired KTO rows from JSON lines ``{"prompt", "completion", "desirable": true|false}``."""
    rows = read_jsonl(path, {"prompt": str, "completion": str, "desirable": bool}, "unpaired preference")
    return [Completion(r["prompt"], r["completion"], r["desirable"]) for r in rows]


def shuffle_words(text: str, rng: random.Random, tries: int = 10) -> str:
    """The words of each line in a random order (line breaks kept), drawn again until the order
    changes; a text whose lines are one word each is shuffled as one line. A single word stays."""
    lines = [line.split() for line in text.split("\n")]
    if all(len(words) < 2 for words in lines):
        lines = [text.split()]
    for _ in range(tries):
        for words in lines:
            rng.shuffle(words)
        shuffled = "\n".join(" ".join(words) for words in lines)
        if shuffled.split() != text.split():
            break
    return shuffled


def synthetic_pairs(path: str | Path, rejected: str = "shuffle", seed: int = 0, per_prompt: int = 1) -> list[PreferencePair]:
    """Pairs with a known preference from Alpaca-style instructions: the prompt is the Alpaca template,
    chosen the reference answer, rejected its words shuffled (``shuffle``) or another row's answer
    (``swap``); ``per_prompt`` pairs per instruction, each with a different rejected answer. An answer
    with no other word order (a single word) makes no pair."""
    if rejected not in REJECTIONS:
        raise UserError(f"data.rejected={rejected!r}: choose one of {', '.join(REJECTIONS)}")
    rows = load_instructions(path)
    rng = random.Random(seed)
    pairs = []
    for i, row in enumerate(rows):
        seen = {tuple(row.output.split())}
        for _ in range(per_prompt):
            if rejected == "shuffle":
                worse = shuffle_words(row.output, rng)
            else:
                worse = rows[(i + rng.randrange(1, len(rows))) % len(rows)].output if len(rows) > 1 else row.output
            if tuple(worse.split()) not in seen:
                seen.add(tuple(worse.split()))
                pairs.append(PreferencePair(render_prompt(row), row.output, worse))
    return pairs


def load_preference_pairs(format: str, path: str | Path, rejected: str = "shuffle", seed: int = 0,
                          per_prompt: int = 1) -> list[PreferencePair]:
    """Pairs from ``path`` in ``format`` (see the module docstring)."""
    if format == "pairs":
        return load_pairs(path)
    if format == "hh_rlhf":
        return load_hh_rlhf(path)
    if format == "synthetic":
        return synthetic_pairs(path, rejected, seed, per_prompt)
    raise UserError(f"data.format={format!r}: choose one of {', '.join(FORMATS)}")


def first_per_prompt(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """One pair per prompt (its first): held-out synthetic pairs stay independent whatever ``per_prompt``."""
    return list({p.prompt: p for p in reversed(pairs)}.values())[::-1]


def as_completions(pairs: Sequence[PreferencePair]) -> list[Completion]:
    """Each pair as two unpaired rows: its chosen response desirable, its rejected one undesirable."""
    return [c for p in pairs for c in (Completion(p.prompt, p.chosen, True), Completion(p.prompt, p.rejected, False))]


def split_by_prompt(pairs: Sequence[PreferencePair], val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) pairs: a seeded shuffle of the distinct prompts, the last ``val_fraction`` of them
    held out with every pair they have, so no held-out prompt (or its chosen answer) is trained on.
    Deterministic."""
    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1")
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    random.Random(seed).shuffle(prompts)
    n_val = max(1, round(len(prompts) * val_fraction))
    if n_val >= len(prompts):
        raise UserError(f"{len(prompts)} distinct prompts are too few to hold out {val_fraction:.0%} and train on the rest")
    held_out = set(prompts[-n_val:])
    return [p for p in pairs if p.prompt not in held_out], [p for p in pairs if p.prompt in held_out]


# ---- tokenizing and batching ------------------------------------------------------------------

@dataclass
class Example:
    """Token sequences (prompt, response, end-of-sequence) that share one prompt, in slots: [chosen,
    rejected] for a pair, [completion, mismatched completion] for an unpaired row. The reference
    model's log-probabilities of each slot's response are filled in once, before training."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    desirable: bool | None = None
    reference_logps: list[float] | None = None


class Encoder:
    """Text → token ids. A prompt keeps its last ``max_prompt_tokens`` tokens; the response is cut so
    prompt + response + end-of-sequence fit ``max_length`` tokens."""

    def __init__(self, tokenizer, max_prompt_tokens: int, max_length: int) -> None:
        if max_prompt_tokens < 1 or max_length - max_prompt_tokens < 2:
            raise UserError(f"data.max_prompt_tokens={max_prompt_tokens} must be at least 1 and leave room for a "
                            f"response within max_length={max_length} tokens")
        self.tokenizer, self.max_prompt_tokens, self.max_length = tokenizer, max_prompt_tokens, max_length

    def sequence(self, prompt: str, response: str) -> tuple[list[int], int]:
        """(ids, prompt length in tokens)."""
        prompt_ids = (self.tokenizer.encode(prompt) or [self.tokenizer.bos_id])[-self.max_prompt_tokens:]
        room = self.max_length - len(prompt_ids) - 1
        response_ids = self.tokenizer.encode(response)[:room] + [self.tokenizer.eos_id]
        return prompt_ids + response_ids, len(prompt_ids)

    def pair(self, pair: PreferencePair) -> Example:
        (chosen, n_chosen), (rejected, n_rejected) = (self.sequence(pair.prompt, response)
                                                      for response in (pair.chosen, pair.rejected))
        return Example([chosen, rejected], [n_chosen, n_rejected])

    def unpaired(self, rows: Sequence[Completion], seed: int) -> list[Example]:
        """Each row with a mismatched completion: another row's completion after this row's prompt, the
        sample KTO's reference point z0 is estimated from. The pairing is a seeded rotation, fixed
        for the run, so the reference log-probabilities of both can be computed once."""
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        other = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
        examples = []
        for i, row in enumerate(rows):
            (ids, n), (mismatched, m) = (self.sequence(row.prompt, completion)
                                         for completion in (row.completion, rows[other[i]].completion))
            examples.append(Example([ids, mismatched], [n, m], desirable=row.desirable))
        return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples → one right-padded batch, slot-major (all chosen, then all rejected).

    ids (S·B, T); lengths (S·B,); response_mask (S·B, T), true on response tokens (end-of-sequence
    included), false on the prompt and padding; reference_logps (S·B,) once cached; desirable (B,)
    for unpaired rows."""
    slots = len(examples[0].sequences)
    sequences = [ex.sequences[s] for s in range(slots) for ex in examples]
    starts = [ex.prompt_lengths[s] for s in range(slots) for ex in examples]
    ids, lengths = right_pad(sequences, pad_id)
    positions = torch.arange(ids.size(1))[None]
    batch = {"ids": ids, "lengths": lengths,
             "response_mask": (positions >= torch.tensor(starts)[:, None]) & (positions < lengths[:, None])}
    if examples[0].reference_logps is not None:
        batch["reference_logps"] = torch.tensor([ex.reference_logps[s] for s in range(slots) for ex in examples])
    if examples[0].desirable is not None:
        batch["desirable"] = torch.tensor([ex.desirable for ex in examples])
    return batch


class PreferenceData(L.LightningDataModule):
    """Training examples (pairs, or unpaired rows for KTO) and held-out pairs, as collated batches."""

    def __init__(self, train: list[Example], val: list[Example], batch_size: int, val_batch_size: int,
                 pad_id: int, seed: int = 0) -> None:
        super().__init__()
        if len(train) < batch_size:
            raise UserError(f"{len(train)} training examples are fewer than data.batch_size={batch_size}")
        self.train, self.val = train, val
        self.batch_size, self.val_batch_size, self.pad_id, self.seed = batch_size, val_batch_size, pad_id, seed

    def _collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return collate(examples, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=self._collate, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.val_batch_size, collate_fn=self._collate)
