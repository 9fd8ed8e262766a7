"""The Batcher both deployments share, without Ray: concurrent jobs share model calls, a job runs
with the model it was submitted with, a bad job fails alone, and jobs that arrive while the model
is busy are answered together once it is free."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from galen.serve.batching import Batcher
from galen.serve.settings import ServeSettings


@pytest.fixture(autouse=True)
def _outside_a_replica(monkeypatch):
    from ray import serve

    # @serve.batch reads the replica's max_ongoing_requests (to warn when batches cannot fill)
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    n = torch.get_num_threads()  # Batcher.apply sets serve.torch_threads, process-wide
    yield
    torch.set_num_threads(n)


def test_concurrent_jobs_share_calls_one_per_model_and_a_bad_job_fails_alone():
    calls = []

    def run(model, jobs):
        calls.append((model, list(jobs)))
        if "bad" in jobs:
            raise ValueError("a bad job")
        return [f"{model}:{job}" for job in jobs]

    async def main():
        batcher = Batcher(run, ServeSettings(max_batch_size=8, batch_wait_timeout_s=0.05), thread_name="test-model")
        jobs = [("v1", "a"), ("v1", "b"), ("v1", "bad"), ("v2", "c"), ("v1", "d")]
        return batcher, await asyncio.gather(*(batcher.submit(model, job) for model, job in jobs))

    batcher, results = asyncio.run(main())
    assert results[:2] == ["v1:a", "v1:b"] and results[3:] == ["v2:c", "v1:d"]
    assert isinstance(results[2], ValueError)  # handed back, not raised: the caller decides
    # one call per model for the batch, then the failed call's jobs one by one
    assert calls == [("v1", ["a", "b", "bad", "d"]), ("v1", ["a"]), ("v1", ["b"]), ("v1", ["bad"]), ("v1", ["d"]),
                     ("v2", ["c"])]
    assert {k: batcher.stats[k] for k in ("model_calls", "requests", "largest_batch")} == \
        {"model_calls": 2, "requests": 5, "largest_batch": 4}


def test_without_batching_every_job_is_one_call():
    calls = []

    def run(model, jobs):
        calls.append(list(jobs))
        return [job * 2 for job in jobs]

    async def main():
        batcher = Batcher(run, ServeSettings(batching=False), thread_name="test-model")
        return batcher, await asyncio.gather(*(batcher.submit("m", k) for k in range(4)))

    batcher, results = asyncio.run(main())
    assert results == [0, 2, 4, 6] and sorted(calls) == [[0], [1], [2], [3]]
    assert batcher.stats["model_calls"] == 4 and batcher.stats["largest_batch"] == 1


def test_jobs_arriving_while_the_model_is_busy_are_answered_together():
    calls, release = [], threading.Event()

    def run(model, jobs):
        calls.append(list(jobs))
        if len(calls) == 1:
            assert release.wait(10)  # the model is busy with the first job
        return list(jobs)

    async def main():
        batcher = Batcher(run, ServeSettings(max_batch_size=16, batch_wait_timeout_s=0.005), thread_name="test-model")
        first = asyncio.ensure_future(batcher.submit("m", 0))
        while not calls:
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit("m", k)) for k in range(1, 7)]
        for _ in rest:  # each its own @serve.batch group
            await asyncio.sleep(0.02)
        release.set()
        return await asyncio.gather(first, *rest)

    t0 = time.time()
    assert asyncio.run(main()) == list(range(7))
    assert calls == [[0], [1, 2, 3, 4, 5, 6]], calls
    assert time.time() - t0 < 10


def test_apply_changes_the_batch_size_of_a_running_batcher():
    calls = []

    def run(model, jobs):
        calls.append(len(jobs))
        return list(jobs)

    async def main():
        batcher = Batcher(run, ServeSettings(max_batch_size=16, batch_wait_timeout_s=0.05), thread_name="test-model")
        await asyncio.gather(*(batcher.submit("m", k) for k in range(6)))
        batcher.apply(ServeSettings(max_batch_size=2, batch_wait_timeout_s=0.05))  # what reconfigure does
        await asyncio.gather(*(batcher.submit("m", k) for k in range(6)))

    asyncio.run(main())
    assert calls[0] == 6 and max(calls[1:]) <= 2 and sum(calls[1:]) == 6
