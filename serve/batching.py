"""Batching on one replica: concurrent requests share model calls, on one model thread.

`Batcher(run, settings)` answers `await submit(model, job)`: with `settings.batching`,
`@serve.batch` groups the jobs that arrive together (up to `max_batch_size`, waiting at most
`batch_wait_timeout_s`), and whenever the model thread is free one `run(model, jobs)` answers every
group waiting, up to `max_batch_size` jobs. (@serve.batch alone forms each batch on a timer, also
while the model is still busy with the previous one, so under load batches queue up small; taking
what has gathered when the model becomes free keeps them as large as the load allows.) Without
batching every job is one call. Model work runs on one thread per replica, so the event loop stays
free for parsing, health checks and the next batch.

A job runs with the model it was submitted with (jobs of two versions in one group, during a swap,
make two calls). When a call fails, each of its jobs runs alone, so a bad job fails only its own
request. `stats` counts model calls, jobs, the largest call and model time (shown in /health).
`apply(settings)` sets the batch sizes, the wait and torch's thread count, at start and on every
`reconfigure`. Used by both deployments: GalenGeneralist (serve/served_generalist.py, one task job
per request) and GalenClip (serve/clip_deployment.py, one image or text to embed per job).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from ray import serve

from galen.serve.settings import ServeSettings

M = TypeVar("M")  # a loaded model
J = TypeVar("J")  # one job for it
R = TypeVar("R")  # its result


class Batcher(Generic[M, J, R]):
    """run(model, jobs) -> one result per job, called on the model thread."""

    def __init__(self, run: Callable[[M, list[J]], Sequence[R]], settings: ServeSettings, *,
                 thread_name: str) -> None:
        self._run = run
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)  # one model call at a time
        self._queue: deque[tuple[list[tuple[M, J]], asyncio.Future]] = deque()  # groups waiting for the model
        self._drainer: asyncio.Task | None = None
        self.stats = {"model_calls": 0, "requests": 0, "largest_batch": 0, "model_ms": 0}
        # One @serve.batch queue per Batcher (decorating a method would share one per class); it only
        # groups arrivals, so it never holds groups back (max_concurrent_batches): _drain paces the model.
        self._grouped = serve.batch(max_batch_size=settings.max_batch_size,
                                    batch_wait_timeout_s=settings.batch_wait_timeout_s,
                                    max_concurrent_batches=256)(self._join)
        self.apply(settings)

    def apply(self, settings: ServeSettings) -> None:
        import torch

        torch.set_num_threads(settings.torch_threads)
        self._grouped.set_max_batch_size(settings.max_batch_size)
        self._grouped.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.settings = settings

    async def submit(self, model: M, job: J) -> R | Exception:
        """The job's result, or the exception it failed with (returned, not raised: the caller tells a
        failed job from a failure of its own, such as a timeout)."""
        if self.settings.batching:
            return await self._grouped((model, job))
        (result,) = await self.call(self._call, [(model, job)])
        return result

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the model thread, between batches (model work that is not a job)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- on the model thread ---------------------------------------------------------------------------

    def _call(self, items: list[tuple[M, J]]) -> list[R | Exception]:
        """The results of (model, job) items, one call per model among them."""
        out: list[Any] = [None] * len(items)  # every slot is filled below
        by_model: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(items):
            by_model.setdefault(id(model), []).append(i)
        for idx in by_model.values():
            for i, result in zip(idx, self._predict(items[idx[0]][0], [items[i][1] for i in idx])):
                out[i] = result
        return out

    def _predict(self, model: M, jobs: list[J]) -> list[R | Exception]:
        """One model call for the jobs; if it fails, each job alone, so one bad job fails only itself."""
        self.stats["model_calls"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        t0 = time.perf_counter()
        try:
            return list(self._run(model, jobs))
        except Exception as e:  # noqa: BLE001 - sorted out per job below
            if len(jobs) == 1:
                return [e]
        finally:
            self.stats["model_ms"] += round((time.perf_counter() - t0) * 1000)
        out: list[R | Exception] = []
        for job in jobs:
            try:
                out.append(self._run(model, [job])[0])
            except Exception as e:  # noqa: BLE001 - handed to this job's caller
                out.append(e)
        return out

    # -- on the event loop -----------------------------------------------------------------------------

    async def _join(self, items: list[tuple[M, J]]) -> list[R | Exception]:
        """Jobs that arrived together (grouped by @serve.batch) join the model's queue."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Whenever the model is free, one call answers everything queued (up to max_batch_size)."""
        while self._queue:
            groups, size = [], 0
            while self._queue and (not groups or size + len(self._queue[0][0]) <= self.settings.max_batch_size):
                items, future = self._queue.popleft()
                if not future.done():  # a cancelled group is skipped
                    groups.append((items, future))
                    size += len(items)
            if not groups:
                continue
            try:
                results = await self.call(self._call, [item for items, _ in groups for item in items])
            except Exception as e:  # noqa: BLE001 - _call answers per job; this is a bug: tell everyone
                for _, future in groups:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for items, future in groups:
                if not future.done():
                    future.set_result(results[start:start + len(items)])
                start += len(items)
