"""Synchronous use of a Loader: a plain ``for`` loop (DataLoader workers use it too).

There is one async implementation; this module only drives it from another thread. Each
synchronous iteration runs the epoch in a background thread with its own event loop
(uvloop when installed). A pump task in that loop hands batches to the consuming thread
through a queue of at most ``prefetch`` batches (credits the consumer returns as it takes
them), so a hand-off costs one ``get`` and one non-blocking wake-up per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

if TYPE_CHECKING:
    from .loader import Loader

__all__ = ["SyncIterator"]

_END = object()


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pump:
    """The loop-side half: moves batches from the epoch iterator into the queue, one per
    credit. It must not reference the :class:`SyncIterator`, so that dropping that stops it."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # The ready batches wait in the queue, not in the epoch's stream: the consumer then
        # takes every batch that is there in one go, without waiting for the loop thread
        # to hand over the GIL for each one.
        self.iterator = loader._start_epoch(prefetch=0)
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.credit = anyio.Semaphore(max(1, loader.prefetch))

    async def run(self) -> None:
        credit, put = self.credit, self.queue.put
        try:
            while True:
                await credit.acquire()
                try:
                    item = await self.iterator.next_item()
                except StopAsyncIteration:
                    put(_END)
                    return
                put(item)
        except Exception as exc:
            put(_Raised(exc))
        finally:
            with anyio.CancelScope(shield=True):
                await self.iterator.aclose(report=False)
                await self.loader.dataset.aclose()

    def grant(self) -> None:
        """Let the pump fetch the next batch (called from the consuming thread)."""
        self.loop.call_soon_threadsafe(self.credit.release)


class SyncIterator(Iterator[Any]):
    """One epoch of ``loader`` for a plain ``for`` loop.

    The background thread stops, and the dataset's connections in its loop are released,
    when the epoch ends, when the loop is left early (the iterator is dropped), on
    :meth:`close`, or when ``loader.close()`` is called.
    """

    def __init__(self, loader: Loader) -> None:
        self._closed = False
        self.last_positions: list[int] = []  # of the batch last returned (for to_torch)
        self._cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            "asyncio", _backend_options()
        )
        portal = self._cm.__enter__()
        try:
            self._pump: _Pump = portal.call(_Pump, loader)
            self._task: Future[None] = portal.start_task_soon(self._pump.run)
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Batches ready in the queue, not yet taken."""
        return 0 if self._closed else self._pump.queue.qsize()

    def __iter__(self) -> SyncIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        item = self._pump.queue.get()
        if item is _END:
            self._pump.iterator.end()
            self.close()
            raise StopIteration
        if type(item) is _Raised:
            self.close()
            raise item.exc
        # Delivered now, not when the pump queued it: state_dict() after a break must
        # not count the batches still waiting in the queue.
        self._pump.iterator.commit(item)
        self._pump.grant()
        self.last_positions = item[1]
        return item[0]

    def close(self) -> None:
        """Cancel the epoch, release the dataset's resources, and join the thread."""
        if self._closed:
            return
        self._closed = True
        self._pump.iterator.report_end()
        if threading.get_ident() == self._pump.thread:
            return  # dropped inside its own loop (a GC cycle): that loop is ending anyway
        try:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                self._task.result()  # cancelled, or already reported through the queue
        finally:
            self._cm.__exit__(None, None, None)

    def __del__(self) -> None:
        if hasattr(self, "_task"):
            self.close()
