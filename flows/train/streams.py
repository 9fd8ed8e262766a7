"""Endless, resumable row streams over a worker's Ray Data shard (both trainers read through this).

A small shard is read once and then cycled in memory: every new epoch of a Ray Data stream starts
a new read of the Parquet files, which costs seconds, and a small demo task runs through several
epochs in a few steps. The row order is the same either way, so a resume position (rows consumed)
means the same rows after a restart.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def endless_rows(epoch: Callable[[], Iterable[Any]], skip: int = 0, cache_rows: int = 10000) -> Iterator[Any]:
    """Rows of `epoch()` (one pass over the shard) again and again, after skipping `skip` rows.

    Up to `cache_rows` rows are kept from the first pass and replayed; a larger shard is streamed
    epoch after epoch."""
    cache: list[Any] | None = []
    for row in epoch():
        if cache is not None:
            cache.append(row)
            if len(cache) > cache_rows:
                cache = None
        if skip:
            skip -= 1
            continue
        yield row
    if cache == []:  # (None: more rows than cache_rows)
        raise RuntimeError("a training shard gave no rows to this worker; it needs at least one row per worker")
    while cache is None:
        for row in epoch():
            if skip:
                skip -= 1
                continue
            yield row
    if skip:  # resuming several epochs in: skip whole replays arithmetically
        skip %= len(cache)
    while True:
        for row in cache:
            if skip:
                skip -= 1
                continue
            yield row


def prefetched(rows: Iterator[Any], size: int = 256) -> Iterator[Any]:
    """`rows`, pulled by a background thread into a bounded queue from the moment this is called.

    A Ray Data stream's first rows take seconds (its executor and read tasks start: ~9 s on a 2-core
    machine), and a training loop that asks each task for its first row in turn pays that once per
    task, one after another (and a curriculum's mixture only at its first mixture step). Prefetching
    starts every task's stream at once; each stream keeps its own order, so resume positions hold.
    An error in the stream is raised to the reader."""
    buffer: queue.Queue = queue.Queue(maxsize=size)

    def produce() -> None:
        try:
            for row in rows:
                buffer.put((True, row))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
            buffer.put((False, exc))

    threading.Thread(target=produce, name="galen-prefetch", daemon=True).start()

    def read() -> Iterator[Any]:
        while True:
            ok, item = buffer.get()
            if not ok:
                raise item
            yield item

    return read()
