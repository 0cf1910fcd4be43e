"""Ordered parallel map over batches with bounded memory.

``ordered_map`` runs ``fn`` on each item in ``num_proc`` worker processes and yields the
results in input order. At most ``2 * num_proc`` items are in flight, so a stream larger
than memory is read only as fast as the workers consume it (``multiprocessing.Pool.imap``
would read the whole input ahead). ``num_proc <= 1`` runs in this process.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_proc: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[Any]:
    if num_proc <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc, initializer, initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def batched(items: Iterable[Any], max_items: int, max_chars: int, size: Callable[[Any], int] = len) -> Iterator[list]:
    """Consecutive lists of at most ``max_items`` items or about ``max_chars`` characters."""
    batch, chars = [], 0
    for item in items:
        batch.append(item)
        chars += size(item)
        if len(batch) >= max_items or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
