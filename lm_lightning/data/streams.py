"""Contiguous token streams for recurrent language models trained the classic way (Zaremba et al. 2014):
the token sequence is cut into ``lanes`` parallel lanes of equal length, read in order, one window of
``block_size`` steps after another, so each lane's hidden state can be carried from a window to the next
(truncated back-propagation through time).

Lane ``j`` holds ``tokens[j·L : (j+1)·L]`` with ``L = len(tokens) // lanes`` (the tail that does not fill a
lane is dropped, as the paper's reader does). Window ``i`` is ``lanes[:, i·T : i·T + T + 1]``: inputs
``[:, :-1]``, targets ``[:, 1:]``; consecutive windows share one token, so every token of a lane but its
first is predicted exactly once per pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from lm_lightning.errors import UserError


class TokenStreams(Dataset):
    """Item ``i`` is window ``i`` of this rank's lanes, int64 of shape (lanes, T_i + 1) with T_i = block_size
    except, with ``full_windows=False``, for the last window, which takes the lanes' remaining tokens.

    With several processes the ``lanes × world_size`` lanes of the global batch are dealt out: rank ``r`` reads
    lanes ``r, r + world_size, ...``, so the ranks' batches together are the single-process batch.

    ``document_starts`` (token offsets, sorted): :meth:`resets` marks where a lane enters a new document.
    """

    def __init__(self, tokens: np.ndarray, lanes: int, block_size: int, rank: int = 0, world_size: int = 1,
                 document_starts: np.ndarray | None = None, full_windows: bool = True) -> None:
        total_lanes = lanes * world_size
        self.lane_length = len(tokens) // total_lanes
        steps = self.lane_length - 1  # predicted tokens per lane
        if steps < (block_size if full_windows else 1):
            raise UserError(f"{len(tokens)} tokens cut into {total_lanes} lanes (data.batch_size × processes) leave "
                            f"{self.lane_length} tokens a lane, too few for a window of {block_size}: use more text, "
                            "fewer lanes or a smaller model.block_size")
        self.block_size = block_size
        self.windows = steps // block_size if full_windows else -(-steps // block_size)
        grid = np.asarray(tokens[: total_lanes * self.lane_length]).reshape(total_lanes, self.lane_length)
        self.lane_ids = np.arange(rank, total_lanes, world_size)
        self.lanes = grid[rank::world_size]  # a view: a memory-mapped corpus stays on disk
        self.document_starts = None if document_starts is None else np.asarray(document_starts, dtype=np.int64)

    def __len__(self) -> int:
        return self.windows

    def _span(self, window: int) -> tuple[int, int]:
        start = window * self.block_size
        return start, min(start + self.block_size + 1, self.lane_length)

    def __getitem__(self, window: int) -> torch.Tensor:
        start, end = self._span(window)
        return torch.from_numpy(self.lanes[:, start:end].astype(np.int64))

    def resets(self, window: int) -> torch.Tensor | None:
        """(lanes, T_i) bool: True where the input token is the first of a document, so the lane's state is
        zeroed before reading it; None when no lane of this window enters a document (or none are known)."""
        if self.document_starts is None:
            return None
        start, end = self._span(window)
        first = self.lane_ids * self.lane_length + start  # corpus offset of each lane's first input
        lo = np.searchsorted(self.document_starts, first)
        hi = np.searchsorted(self.document_starts, first + (end - 1 - start))
        if not (hi > lo).any():
            return None
        mask = torch.zeros(len(self.lane_ids), end - 1 - start, dtype=torch.bool)
        for lane in np.flatnonzero(hi > lo):
            mask[lane, self.document_starts[lo[lane]:hi[lane]] - first[lane]] = True
        return mask


class StreamSampler(Sampler[int]):
    """Window indices in order, ``0 .. windows - 1``, every epoch: a stream is read, never shuffled.

    ``skip`` windows are left out of the next pass only (a run resumed mid-epoch); ``len`` is the whole
    epoch even then, as Lightning counts the restored batches itself."""

    def __init__(self, windows: int) -> None:
        self.windows = windows
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls it every epoch; the order does not depend on the epoch."""

    def __iter__(self) -> Iterator[int]:
        start, self.skip = self.skip, 0
        return iter(range(start, self.windows))

    def __len__(self) -> int:
        return self.windows
