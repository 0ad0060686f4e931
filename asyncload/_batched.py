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

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.to_thread
import sniffio

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

    ``await batcher.run(fn, *args)`` returns what ``fn`` returns or raises what it raises,
    as ``anyio.to_thread.run_sync(fn, *args)`` does. Cancellation: a call cancelled before
    a batch took it never runs. Once taken it runs to its end whatever happens to its
    caller or to the task that runs the batch (an asyncio ``task.cancel()`` too, which
    anyio's shields do not stop), and nothing it acquired (a lock) is lost: a caller
    cancelled meanwhile gets the cancellation, and ``release(result)`` is called; only the
    task running the batch, cancelled through an anyio scope, gets the result and then the
    cancellation at its next checkpoint. Calls run one after another: one that blocks for
    long holds up those behind it, so batch short calls only.

    ``batches``: how many batches may run at once, each in its own thread (1: the calls
    are short; more where some block on the disk, as ``fsync`` does).

    Holds no event loop between batches: usable from one event loop at a time, in turn
    from several.
    """

    __slots__ = ("_batch_done", "_batches", "_queue", "_running")

    def __init__(self, batches: int = 1) -> None:
        self._batches = batches  # at once, at most
        self._queue: list[_Call[Any]] = []
        self._running = 0
        self._batch_done: anyio.Event | None = None

    async def run(
        self, fn: Callable[..., T], *args: Any, release: Callable[[T], object] | None = None
    ) -> T:
        call: _Call[T] = _Call(fn, args)
        self._queue.append(call)
        try:
            while not call.finished:
                if call.taken or self._running >= self._batches:
                    await self._wait_batch()
                else:
                    await self._run_batch()
        except BaseException:
            if not call.taken:
                self._queue.remove(call)
                raise
            # Cancelled once a batch took it: it runs to its end (its batch, which always
            # finishes its calls, is running), and what it got goes.
            with anyio.CancelScope(shield=True):
                while not call.finished:
                    try:
                        await self._wait_batch()
                    except anyio.get_cancelled_exc_class():
                        continue  # an asyncio task.cancel() again: the first one is raised
            if call.error is None and release is not None:
                release(call.result)  # type: ignore[arg-type]
            raise
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    async def _wait_batch(self) -> None:
        """Until a batch ends."""
        if self._batch_done is None:
            self._batch_done = anyio.Event()
        await self._batch_done.wait()

    async def _run_batch(self) -> None:
        """Run the queued calls; returns (or raises a cancellation) once they have run, and
        every call it took is finished: run, or failed with what kept it from running."""
        calls, self._queue = self._queue, []
        for call in calls:
            call.taken = True
        self._running += 1
        try:
            await _in_thread(calls)
        except BaseException as exc:
            for call in calls:
                if not call.finished:  # no thread ran it (none could be started)
                    call.error, call.finished = exc, True
            raise
        finally:
            self._running -= 1
            done, self._batch_done = self._batch_done, None
            if done is not None:
                done.set()


async def _in_thread(calls: list[_Call[Any]]) -> None:
    """Run ``calls`` in a worker thread, to their end whatever happens to this task: an
    anyio cancellation waits (shielded), and so does an asyncio ``task.cancel()``, which
    gets through anyio's shield (and would make anyio drop a job no thread has started
    yet). Either is raised once the calls have run."""
    with anyio.CancelScope(shield=True):
        if sniffio.current_async_library() != "asyncio":
            await anyio.to_thread.run_sync(_run_all, calls)
            return
        # A thread pool's job, awaited through asyncio.shield: it runs, and is waited for,
        # whatever happens to the task awaiting it.
        job = asyncio.get_running_loop().run_in_executor(None, _run_all, calls)
        cancelled: BaseException | None = None
        while not job.done():
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError as exc:
                cancelled = exc
    if cancelled is not None:
        raise cancelled
