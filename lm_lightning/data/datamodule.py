"""LightningDataModule over a prepared, memory-mapped token corpus: packed fixed-length windows.

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
from lm_lightning.errors import UserError
from lm_lightning.parallel.cuda import pin_memory_for
from lm_lightning.training.lightning_internals import batches_processed_in_epoch

SAMPLING = ("shuffled", "random", "sequential")


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
    ) -> None:
        super().__init__()
        self.corpus_cfg, self.tokenizer_cfg = corpus, tokenizer
        self.cache_dir = Path(cache_dir)
        self.block_size, self.batch_size = block_size, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.sampling, self.seed, self.num_workers = sampling, seed, num_workers
        self._corpus: PreparedCorpus | None = None
        self._train_sampler: WindowSampler | None = None
        self._resume: dict[str, int] | None = None

    @property
    def corpus(self) -> PreparedCorpus:
        """The prepared corpus, built (or found in the cache) on first use."""
        if self._corpus is None:
            self._corpus = prepare_corpus(self.corpus_cfg, self.tokenizer_cfg, self.cache_dir)
        return self._corpus

    def prepare_data(self) -> None:
        self.corpus  # noqa: B018 - builds the cache on one process before the others read it

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per token of a split: turns nats/token into bits/byte."""
        return self.corpus.num_bytes(split) / max(self.corpus.num_tokens(split), 1)

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
        self._train_sampler = WindowSampler(len(tokens), self.block_size, self.sampling, self.seed, rank, world)
        if self._resume is not None:
            self._train_sampler.set_epoch(self._resume["epoch"])
            self._train_sampler.skip = self._resume["batches"] * self.batch_size
            self._resume = None
        return self._loader(tokens, self._train_sampler, self.batch_size, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        tokens = self._tokens("val")
        rank, world = self._rank()
        sampler = WindowSampler(len(tokens), self.block_size, "sequential", self.seed, rank, world)
        return self._loader(tokens, sampler, self.val_batch_size, drop_last=False)

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
