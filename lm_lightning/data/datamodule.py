"""LightningDataModule over a prepared, memory-mapped token corpus: packed fixed-length windows, or
(``sampling: streams``, recurrent models) contiguous streams read in order (``streams.py``).

Training order is a pure function of (seed, epoch, rank), so a run resumed from a
checkpoint mid-epoch sees exactly the batches the uninterrupted run would have seen:
the module's state records how many batches of the current epoch were consumed, and the
sampler skips them on restore.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.data.prepared_corpus import PreparedCorpus
from lm_lightning.data.streams import StreamSampler, TokenStreams
from lm_lightning.data.validation_file import CorpusWithValidationFile
from lm_lightning.errors import UserError
from lm_lightning.parallel.cuda import pin_memory_for
from lm_lightning.training.lightning_internals import batches_processed_in_epoch

SAMPLING = ("shuffled", "random", "sequential")  # window modes (WindowSampler)
STREAMS = "streams"  # contiguous lanes read in order, the state carried across batches (TokenStreams)


class WindowDataset(Dataset):
    """Item ``start`` is the window tokens[start : start + block_size + 1] as int64, shape (block_size + 1,)."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return max(len(self.tokens) - self.block_size, 0)

    def __getitem__(self, start: int) -> torch.Tensor:
        window = self.tokens[start : start + self.block_size + 1]
        return torch.from_numpy(window.astype(np.int64))


class WindowSampler(Sampler[int]):
    """Yields window start offsets, deterministic in (seed, epoch, rank).

    - ``shuffled``: non-overlapping windows at a random phase each epoch, in random order
      (each token seen about once per epoch);
    - ``random``: uniformly random starts, with replacement (as nanoGPT's ``get_batch``);
    - ``sequential``: non-overlapping windows from the start (validation, evaluation).
    """

    def __init__(
        self, n_tokens: int, block_size: int, mode: str, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if mode not in SAMPLING:
            raise UserError(f"data.sampling={mode!r} is not known: choose one of {', '.join(SAMPLING)}")
        self.n_starts = n_tokens - block_size  # last valid start is n_starts - 1
        self.block_size, self.mode, self.seed = block_size, mode, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # samples of this epoch already consumed (set on resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _starts(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "random":
            starts = rng.integers(0, self.n_starts, size=self.n_starts // self.block_size)
        else:
            phase = 0 if self.mode == "sequential" else int(rng.integers(self.block_size))
            starts = np.arange(phase, self.n_starts, self.block_size)
            if self.mode == "shuffled":
                starts = rng.permutation(starts)
        # rank r takes every world_size-th window from r: the ranks' i-th micro-batches together hold
        # exactly the i-th global batch of a single process, so losses and resumes match across world sizes
        per_rank = len(starts) // self.world_size  # equal share per rank, so ranks stay in step
        return starts[: per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        starts = self._starts()[self.skip :]
        self.skip = 0
        return iter(starts.tolist())

    def __len__(self) -> int:
        # the whole epoch, even while resuming: Lightning counts the restored batches itself,
        # and a shorter length would make it end the resumed epoch early
        return len(self._starts())


class LMDataModule(L.LightningDataModule):
    """Packed language-modelling batches of shape (batch_size, block_size + 1) from a prepared corpus.

    The corpus (cleaning, tokenizer, memory-mapped splits) is prepared once and cached; see
    :func:`lm_lightning.data.corpus.prepare_corpus`.

    ``sampling: streams``: training batches are the windows of ``batch_size`` contiguous lanes in order
    (truncated BPTT), validation the windows of ``val_batch_size`` lanes of the whole split, tail included (of
    ``val_block_size`` tokens: the state runs on across them, so their length changes the speed, not the result);
    ``reset_at_documents`` marks where a lane enters a new document (:meth:`stream_resets`). ``val_path``: a
    text file to validate on instead of the corpus's val split, prepared as the corpus's documents were.
    """

    def __init__(
        self,
        corpus: Mapping,
        tokenizer: Mapping,
        cache_dir: str,
        block_size: int,
        batch_size: int,
        val_batch_size: int | None = None,
        sampling: str = "shuffled",
        seed: int = 1337,
        num_workers: int = 0,
        reset_at_documents: bool = False,
        val_path: str | None = None,
        val_block_size: int | None = None,
    ) -> None:
        super().__init__()
        if sampling not in (*SAMPLING, STREAMS):
            raise UserError(f"data.sampling={sampling!r} is not known: choose one of {', '.join((*SAMPLING, STREAMS))}")
        if reset_at_documents and sampling != STREAMS:
            raise UserError("data.reset_at_documents=true resets a carried state: it needs data.sampling=streams")
        if val_block_size is not None and sampling != STREAMS:
            raise UserError("data.val_block_size is for data.sampling=streams, whose validation carries the state across "
                            "windows; windows of other modes are model.block_size long")
        self.corpus_cfg, self.tokenizer_cfg = corpus, tokenizer
        self.cache_dir = Path(cache_dir)
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.sampling, self.seed, self.num_workers = sampling, seed, num_workers
        self._corpus: PreparedCorpus | None = None
        self._train_sampler: WindowSampler | None = None
        self._resume: dict[str, int] | None = None
        self.reset_at_documents, self.val_path = reset_at_documents, val_path
        self.val_block_size = val_block_size or block_size
        self._streams: dict[str, TokenStreams] = {}
        self._words_per_token: dict[str, float | None] = {}

    @property
    def streams(self) -> bool:
        """Batches are contiguous streams whose recurrent state the model carries from batch to batch."""
        return self.sampling == STREAMS

    @property
    def corpus(self) -> PreparedCorpus:
        """The prepared corpus, built (or found in the cache) on first use."""
        if self._corpus is None:
            self._corpus = prepare_corpus(self.corpus_cfg, self.tokenizer_cfg, self.cache_dir)
            if self.val_path:
                self._corpus = CorpusWithValidationFile.of(self._corpus, self.val_path, self.corpus_cfg)
        return self._corpus

    def prepare_data(self) -> None:
        self.corpus  # noqa: B018 - builds the cache on one process before the others read it

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token of a split: turns nats/token into bits/byte."""
        return self.corpus.num_bytes(split) / max(self.corpus.num_tokens(split), 1)

    def words_per_token(self, split: str) -> float | None:
        """Words per predicted token of a split, a line end counting as a word (the ``<eos>`` of Penn Treebank's
        data): turns nats/token into per-word perplexity. None when the corpus does not count words."""
        if split not in self._words_per_token:
            self._words_per_token[split] = self._count_words(split)
        return self._words_per_token[split]

    def _count_words(self, split: str) -> float | None:
        words = self.corpus.metadata["splits"].get(split, {}).get("words")
        newline = getattr(self.corpus.tokenizer(), "newline_id", -1)
        if words is None or newline is None or newline < 0:  # a corpus without words or a tokenizer without line ends
            return None
        tokens = self._tokens(split)
        ends = np.append(self.corpus.document_starts(split)[1:], len(tokens)) - 1  # each document's EOS
        unterminated = int((tokens[np.maximum(ends - 1, 0)] != newline).sum())  # a document's end ends its last line
        # over the predictions of the split read as one stream (all its tokens but the first): exact for the
        # one-lane stateful validation, as Penn Treebank results are computed
        return (words + int((tokens == newline).sum()) + unterminated) / (len(tokens) - 1)

    def _tokens(self, split: str) -> np.ndarray:
        tokens = self.corpus.tokens(split)
        if len(tokens) <= self.block_size + 1:
            raise UserError(
                f"the {split} split has {len(tokens)} tokens, fewer than one window of model.block_size="
                f"{self.block_size} + 1: use more data, a larger data.split fraction or a smaller block_size"
            )
        return tokens

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        tokens = self._tokens("train")
        rank, world = self._rank()
        if self.streams:
            return self._stream_loader("train", tokens, self.batch_size, self.block_size, full_windows=True)
        self._train_sampler = WindowSampler(len(tokens), self.block_size, self.sampling, self.seed, rank, world)
        if self._resume is not None:
            self._train_sampler.set_epoch(self._resume["epoch"])
            self._train_sampler.skip = self._resume["batches"] * self.batch_size
            self._resume = None
        return self._loader(tokens, self._train_sampler, self.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        tokens = self._tokens("val")
        rank, world = self._rank()
        if self.streams:
            return self._stream_loader("val", tokens, self.val_batch_size, self.val_block_size, full_windows=False)
        sampler = WindowSampler(len(tokens), self.block_size, "sequential", self.seed, rank, world)
        return self._loader(tokens, sampler, self.val_batch_size, drop_last=False)

    def _stream_loader(self, split: str, tokens: np.ndarray, lanes: int, window: int, full_windows: bool) -> DataLoader:
        rank, world = self._rank()
        starts = self.corpus.document_starts(split) if self.reset_at_documents else None
        streams = self._streams[split] = TokenStreams(tokens, lanes, window, rank, world, starts, full_windows)
        sampler = StreamSampler(len(streams))
        if split == "train" and self._resume is not None:
            epoch_done = self._resume["batches"] >= len(streams)  # saved at the end of its epoch: the next starts
            sampler.skip = 0 if epoch_done else self._resume["batches"]
            self._resume = None
        # each item is a whole batch already: no collation
        return DataLoader(streams, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          pin_memory=self.trainer is not None and pin_memory_for(self.trainer.accelerator))

    def stream_resets(self, split: str, window: int) -> torch.Tensor | None:
        """(lanes, T) bool of stream window ``window`` of ``split`` ("train" or "val"): True where a lane's
        state is zeroed before that input (a document starts); None when nothing resets."""
        return self._streams[split].resets(window)

    def _loader(self, tokens: np.ndarray, sampler: Sampler, batch_size: int, drop_last: bool) -> DataLoader:
        return DataLoader(
            WindowDataset(tokens, self.block_size),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.trainer is not None and pin_memory_for(self.trainer.accelerator),  # CUDA only
        )

    def state_dict(self) -> dict[str, Any]:
        """Position in the training stream: the epoch and the batches of it already trained on."""
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"epoch": trainer.current_epoch, "batches": batches_processed_in_epoch(trainer)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}
