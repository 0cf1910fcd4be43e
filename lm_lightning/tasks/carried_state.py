"""The hidden state a recurrent model carries from one window of contiguous streams to the next
(``data.sampling=streams``, truncated back-propagation through time as in Zaremba et al. 2014).

Each pass over a split starts from a zero state (window 0); every later window starts from the state the
window before ended in, cut from its graph. The training state is part of the checkpoint, so a resumed run
reads on from exactly the state the uninterrupted run would have had.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class CarriedState:
    """The model's caches (``model.new_caches``) per split, "train" and "val"."""

    def __init__(self) -> None:
        self._caches: dict[str, list] = {}
        #: training: (windows of the epoch done, the caches after them), for the window in flight and the one before
        self._history: list[tuple[int, list]] = []
        self._restored: dict[str, Any] | None = None

    def caches(self, model: nn.Module, split: str, window: int, batch: torch.Tensor) -> list:
        """The caches window ``window`` of ``split`` starts from (updated in place by the model's forward)."""
        caches = self._caches.get(split) if window > 0 else None
        restored, self._restored = (self._restored, None) if split == "train" else (None, self._restored)
        if caches is None:
            caches = model.new_caches(batch.size(0), torch.empty(0, device=batch.device))
            if restored is not None and restored["windows"] == window:
                for cache, saved in zip(caches, restored["caches"]):
                    vars(cache).update({k: v.to(batch.device) if torch.is_tensor(v) else v for k, v in saved.items()})
        for cache in caches:
            cache.detach()
        self._caches[split] = caches
        if split == "train":
            self._history = [(window, [copy.copy(cache) for cache in caches]), (window + 1, caches)]
        return caches

    def state_dict(self, windows_done: int) -> dict[str, Any] | None:
        """The training state after ``windows_done`` windows of the epoch (what Lightning counts as done: a
        checkpoint written inside a step resumes before that step), or None when there is none to carry."""
        for done, caches in self._history:
            if done == windows_done:
                saved = [{k: v.detach() if torch.is_tensor(v) else v for k, v in vars(cache).items()} for cache in caches]
                return {"windows": done, "caches": saved}
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's training state, taken up by the window it was saved before."""
        self._restored = state
