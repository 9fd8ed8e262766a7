"""The resumable row streams both trainers read their Ray Data shards through (no Ray needed)."""

from __future__ import annotations

import threading
from itertools import islice

import pytest

from galen.flows.train.streams import endless_rows, prefetched


class Shard:
    """A stand-in for a Ray Data shard's `iter_rows`: counts how often the files are read."""

    def __init__(self, n: int):
        self.rows, self.reads = list(range(n)), 0

    def iter_rows(self):
        self.reads += 1
        yield from self.rows


@pytest.mark.parametrize("cache_rows", [10_000, 3])  # a small shard cached, a large one streamed
def test_rows_cycle_in_shard_order_and_resume_at_any_position(cache_rows):
    shard = Shard(5)
    first = list(islice(endless_rows(shard.iter_rows, 0, cache_rows), 23))
    assert first == [i % 5 for i in range(23)]
    for consumed in (0, 3, 5, 12, 23):  # a restart skips what was consumed, several epochs in included
        assert list(islice(endless_rows(Shard(5).iter_rows, consumed, cache_rows), 7)) == \
            [(consumed + i) % 5 for i in range(7)]


def test_a_small_shard_is_read_once_and_a_large_one_every_epoch():
    small, large = Shard(5), Shard(5)
    list(islice(endless_rows(small.iter_rows, 0, cache_rows=5), 50))
    list(islice(endless_rows(large.iter_rows, 0, cache_rows=4), 50))
    assert small.reads == 1
    assert large.reads == 10


def test_an_empty_shard_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="no rows to this worker"):
        next(endless_rows(Shard(0).iter_rows))


def test_prefetched_streams_start_reading_at_once_keep_their_order_and_raise_errors():
    started = threading.Event()

    def epoch():
        started.set()
        yield from range(5)

    rows = prefetched(endless_rows(epoch, 2), size=4)
    assert started.wait(10)                    # read before anyone asked for a row
    assert list(islice(rows, 9)) == [2, 3, 4, 0, 1, 2, 3, 4, 0]
    empty = prefetched(endless_rows(Shard(0).iter_rows))
    with pytest.raises(RuntimeError, match="gave no rows to this worker"):
        next(empty)
