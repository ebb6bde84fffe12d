"""Dynamic micro-batching: concurrent requests share one onnxruntime call.

One asyncio task collects requests from a queue for up to `max_delay` seconds or `max_batch`
samples, runs them as one batch in a worker thread (onnxruntime releases the GIL) and hands
each request its slice of every output. Requests with different alpha values run as separate
calls of the same round (alpha is one scalar per call); per-sample targets and regions (dense
models) are merged.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import DconnxError


class QueueFull(Exception):
    """More requests are waiting than the server accepts (→ 503)."""


class ServerClosing(Exception):
    """The server shut down before the request ran (→ 503)."""


@dataclass
class Job:
    x: np.ndarray
    target: np.ndarray | None
    alpha: float | None
    future: asyncio.Future
    region: np.ndarray | None = None     # dense models: [n, *spatial] mask, None = every position
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


# run(x [N, ...], target [N] int64 or None, alpha or None[, region [N, ...] or None])
#   -> {output name: array with batch axis first}; region is passed only when some job has one
RunBatch = Callable[..., dict]


class MicroBatcher:
    def __init__(self, run: RunBatch, *, max_batch: int = 32, max_delay_s: float = 0.002,
                 max_queue: int = 1024, observe: Callable[[int, int, float], None] | None = None):
        self.run = run
        self.max_batch = int(max_batch)
        self.max_delay_s = float(max_delay_s)
        self.max_queue = int(max_queue)
        self.observe = observe or (lambda samples, requests, seconds: None)
        self._queue: asyncio.Queue[Job] | None = None
        self._carry: Job | None = None
        self._task: asyncio.Task | None = None
        # one worker: a single session call at a time keeps batches large under load
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dconnx-ort")

    @property
    def depth(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + (self._carry is not None)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dconnx-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        pending = [self._carry] if self._carry else []
        while self._queue and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(ServerClosing("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, x: np.ndarray, target=None, alpha=None, timeout: float | None = None,
                     region=None) -> dict:
        """This request's outputs (its slice of the batch it ran in)."""
        if self._queue is None:
            raise ServerClosing("the batcher is not running")
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} requests are waiting; the server accepts {self.max_queue}")
        job = Job(x, target, alpha, asyncio.get_running_loop().create_future(), region)
        self._queue.put_nowait(job)
        # on timeout wait_for cancels the future, and the batch loop skips cancelled jobs
        return await asyncio.wait_for(job.future, timeout)

    async def _next(self, timeout: float | None) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return await self._queue.get()
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[Job]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        batch, n = [first], first.n
        deadline = loop.time() + self.max_delay_s
        while n < self.max_batch:
            job = await self._next(deadline - loop.time())
            if job is None:
                break
            if n + job.n > self.max_batch:
                self._carry = job       # first in the next batch
                break
            batch.append(job)
            n += job.n
        return [j for j in batch if not j.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict = {}
            for job in batch:
                groups.setdefault(job.alpha, []).append(job)
            for alpha, jobs in groups.items():
                t0 = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._executor, self._run_group, jobs, alpha)
                except Exception as e:   # noqa: BLE001 - handed to the waiting requests
                    results = [e] * len(jobs)
                self.observe(sum(j.n for j in jobs), len(jobs), time.perf_counter() - t0)
                for job, res in zip(jobs, results):
                    if job.future.done():      # timed out meanwhile
                        continue
                    if isinstance(res, BaseException):
                        job.future.set_exception(res)
                    else:
                        job.future.set_result(res)

    def _run_group(self, jobs: list[Job], alpha) -> list:
        """Runs in the worker thread: one call for the group, sliced back per job. If the merged
        call fails, each job runs alone so that one bad request cannot fail its neighbours."""
        try:
            return self._split(jobs, self._call(jobs, alpha))
        except DconnxError:
            if len(jobs) == 1:
                raise
        out = []
        for job in jobs:
            try:
                out.append(self._split([job], self._call([job], alpha))[0])
            except Exception as e:   # noqa: BLE001
                out.append(e)
        return out

    def _call(self, jobs: list[Job], alpha) -> dict:
        x = np.concatenate([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
        if all(j.target is None for j in jobs):
            target = None
        else:
            target = np.concatenate([j.target if j.target is not None else np.full(j.n, -1, np.int64)
                                     for j in jobs])
        given = [j.region for j in jobs if j.region is not None]
        if not given:
            return self.run(x, target, alpha)
        spatial = given[0].shape[1:]      # a job without one: every position
        region = np.concatenate([j.region if j.region is not None else np.ones((j.n, *spatial), given[0].dtype)
                                 for j in jobs]) if len(jobs) > 1 else given[0]
        return self.run(x, target, alpha, region)

    @staticmethod
    def _split(jobs: list[Job], outputs: dict) -> list[dict]:
        total = sum(j.n for j in jobs)
        res, start = [], 0
        for job in jobs:
            stop = start + job.n
            res.append({k: (v[start:stop] if v.ndim and v.shape[0] == total else v)
                        for k, v in outputs.items()})
            start = stop
        return res
