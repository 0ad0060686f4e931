"""Blocking calls run in a worker thread, many per thread hop.

``anyio.to_thread.run_sync`` costs a hop per call: a queue hand-off to a worker thread, a
wake-up of the event loop to hand the result back, and the GIL passed to and fro at every
system call the worker makes while the loop is busy. For many small file operations
(:class:`~asyncload.DiskCache`: a ``pread`` or a rename each) the hops cost more than the
work: at 64 fetches in flight on 2 cores, hits served one hop each ran at ~4,000/s and
~250 µs of CPU each; batched, ~10,000/s at ~60-110 µs. A :class:`ThreadBatcher` runs the
calls queued while its previous batch ran as one thread call, one after another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread

__all__ = ["ThreadBatcher"]

T = TypeVar("T")


class _Call(Generic[T]):
    __slots__ = ("args", "error", "finished", "fn", "result", "taken")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.taken = False  # handed to a batch: it runs (or ran), whatever its caller does
        self.finished = False
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the caller, whatever it is
            self.error = exc
        self.finished = True


def _run_all(calls: list[_Call[Any]]) -> None:
    for call in calls:
        call.run()


class ThreadBatcher:
    """Run blocking calls in a worker thread, at most one batch at a time: the calls made
    while a batch runs wait and go together in the next one, in the order they were made.

    ``await batcher.run(fn, *args)`` behaves as ``anyio.to_thread.run_sync(fn, *args)``:
    it returns what ``fn`` returns or raises what it raises; a call cancelled before its
    batch took it never runs; once taken it runs to its end and its caller gets the result
    (a cancellation is then delivered at the caller's next checkpoint, as anyio's cancel
    scopes do), so a resource the call acquired is never lost. Calls run one after another:
    one that blocks for long holds up those behind it, so batch short calls only.

    Holds no event loop between batches: usable from one event loop at a time, in turn
    from several.
    """

    __slots__ = ("_batch_done", "_queue", "_running")

    def __init__(self) -> None:
        self._queue: list[_Call[Any]] = []
        self._running = False
        self._batch_done: anyio.Event | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        call: _Call[T] = _Call(fn, args)
        self._queue.append(call)
        try:
            while not call.finished:
                if self._running:
                    if self._batch_done is None:
                        self._batch_done = anyio.Event()
                    await self._batch_done.wait()
                else:
                    await self._run_batch()
        except BaseException:
            if not call.taken:
                self._queue.remove(call)
                raise
            # Cancelled while its batch runs: wait for it, so the result is not lost.
            with anyio.CancelScope(shield=True):
                while not call.finished:
                    if self._batch_done is None:
                        self._batch_done = anyio.Event()
                    await self._batch_done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    async def _run_batch(self) -> None:
        calls, self._queue = self._queue, []
        for call in calls:
            call.taken = True
        self._running = True
        try:
            # Shielded: the calls are taken, their callers wait for them.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_run_all, calls)
        except BaseException as exc:  # no thread ran them: their callers must not wait on
            for call in calls:
                if not call.finished:
                    call.error, call.finished = exc, True
            raise
        finally:
            self._running = False
            done, self._batch_done = self._batch_done, None
            if done is not None:
                done.set()
