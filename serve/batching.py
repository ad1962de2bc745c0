"""Dynamic batching: concurrent requests coalesced into one model call, behind a bounded queue.

The vocabulary is LitServe's (``max_batch_size``, ``batch_timeout``): a request brings rows (one per image),
and rows of the same ``key`` (the sampling settings of a generation, the levels of an encode) that are
waiting when the model is free, or that keep arriving after the oldest (each within a tenth of
``batch_timeout`` of the one before, for at most ``batch_timeout``), run as one call of
``predict(key, rows) -> outputs`` (one output per row). Calls run one at a time on the service's model
thread, so the event loop keeps accepting requests while the model works, and requests pile up into the
next batch exactly when the model is busy. A request is never split; one larger than ``max_batch_size``
runs alone. The queue holds at most ``max_queue`` rows: past that, ``submit`` raises :class:`QueueFull`
(HTTP 503) instead of letting memory grow. A request whose client went away before its batch formed is
dropped, and its rows leave the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass


class QueueFull(Exception):
    """The queue has no room for the request's rows; the client should retry later."""


@dataclass
class _Request:
    key: Hashable
    rows: list
    future: asyncio.Future


class Batcher:
    """One queue and its worker: ``await batcher.submit(key, rows)`` -> the outputs of those rows."""

    def __init__(self, name: str, predict: Callable[[Hashable, list], list], executor: concurrent.futures.Executor,
                 max_batch_size: int = 64, batch_timeout: float = 0.05, max_queue: int = 512, on_batch=None):  # fmt: skip
        self.name, self.predict, self.executor = name, predict, executor
        self.max_batch_size, self.batch_timeout, self.max_queue = max_batch_size, batch_timeout, max_queue
        self.on_batch = on_batch  # called with (name, rows in the batch, rows still queued) after each call
        self.pending: deque[_Request] = deque()
        self.queued = 0  # rows waiting
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for request in self.pending:
            request.future.cancel()

    async def submit(self, key: Hashable, rows: list) -> list:
        if self._task is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        if self.queued + len(rows) > self.max_queue:
            raise QueueFull(f"the {self.name} queue is full ({self.queued} of {self.max_queue} images waiting); retry shortly")
        request = _Request(key, list(rows), asyncio.get_running_loop().create_future())
        self.pending.append(request)
        self.queued += len(rows)
        self._wakeup.set()
        return await request.future  # cancelled with the request: the worker skips it

    def _waiting(self, key: Hashable) -> int:
        return sum(len(r.rows) for r in self.pending if r.key == key and not r.future.done())

    def _take(self) -> tuple[Hashable, list[_Request]]:
        """The oldest live request's key and the requests of that key that fit in one batch, oldest first."""
        while self.pending and self.pending[0].future.done():
            self.queued -= len(self.pending.popleft().rows)
        key, taken, rows, keep = self.pending[0].key, [], 0, deque()
        for request in self.pending:
            if request.future.done():
                self.queued -= len(request.rows)
            elif request.key == key and (not taken or rows + len(request.rows) <= self.max_batch_size):
                taken.append(request)
                rows += len(request.rows)
            else:
                keep.append(request)
        self.pending = keep
        self.queued -= rows
        return key, taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not any(not r.future.done() for r in self.pending):
                self._wakeup.clear()
                await self._wakeup.wait()
            # Wait for more rows of the oldest request's key while they keep coming (each within a tenth of
            # batch_timeout of the last), at most batch_timeout, unless a full batch is already there: clients
            # whose answers came back together send again within a few milliseconds of each other, and a lone
            # client waits only the gap.
            key, deadline = next(r.key for r in self.pending if not r.future.done()), loop.time() + self.batch_timeout
            while self._waiting(key) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), min(left, self.batch_timeout / 10))
                except asyncio.TimeoutError:
                    break
            key, requests = self._take()
            rows = [row for r in requests for row in r.rows]
            try:
                outputs = await loop.run_in_executor(self.executor, self.predict, key, rows)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request, which reports it
                for r in requests:
                    if not r.future.done():
                        r.future.set_exception(e)
            else:
                start = 0
                for r in requests:
                    if not r.future.done():
                        r.future.set_result(outputs[start : start + len(r.rows)])
                    start += len(r.rows)
            if self.on_batch is not None:
                self.on_batch(self.name, len(rows), self.queued)
