"""Synchronous use of a Loader: a plain ``for`` loop (DataLoader workers use it too).

There is one async implementation; this module only drives it. Each synchronous
iteration runs the epoch in a background thread with its own event loop (uvloop when
installed): a pump task in that loop hands batches to the consuming thread through a
queue of at most ``prefetch`` batches (credits the consumer returns as it takes them), so
a hand-off costs one ``get`` and one non-blocking wake-up per batch.

A dataset that awaits no I/O (``dataset.in_memory``) has nothing to overlap with the
training step, and there the two threads only pass the GIL back and forth, once per
batch (measured: the thread hand-off cost more than the whole epoch's async work on 1 KiB
in-memory arrays). Its epoch runs in the calling thread instead (:class:`InlineIterator`):
each ``next()`` runs a private event loop until the next batch is ready.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import os
import queue
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import anyio
import sniffio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._callables import as_failure, is_async_callable, is_cancellation
from ._pipeline import _nothing

if TYPE_CHECKING:
    from ._pipeline import EpochIterator
    from .loader import EpochStart, Loader

__all__ = ["InlineIterator", "SyncIterator"]

_FORKED = (
    "this epoch belongs to process {pid}, which forked this one: iterate the loader again "
    "in this process"
)
_END = object()
_CLOSED = object()  # put by close(), to wake a consumer waiting in next() in another thread

# Iterators still open, closed at exit: while the interpreter finalizes, a loop thread
# (a daemon) is frozen, and closing through it from a finalizer would hang the exit.
_OPEN: weakref.WeakSet[SyncIterator | InlineIterator] = weakref.WeakSet()
# The portals of open SyncIterators, held here until their close() has stopped them. An
# iterator freed in a garbage cycle would otherwise take its portal's generator with it,
# and the collector would close that generator (stop and join the loop thread) in
# whatever thread it runs in: in the loop thread itself, "cannot join current thread".
_PORTALS: set[AbstractContextManager[BlockingPortal]] = set()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_OPEN):
        with contextlib.suppress(Exception):
            iterator.close()


def _preload() -> dict[str, Any]:
    """The portal's backend options, with what its first start would import imported now:
    about 15 ms, which belongs to ``import asyncload`` rather than to the first batch."""
    with contextlib.suppress(ImportError):  # (a private module: may move)
        importlib.import_module("anyio._backends._asyncio")  # anyio's first run imports it
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


_BACKEND_OPTIONS = _preload()


def fetches_inline(loader: Loader) -> bool:
    """Whether an epoch of ``loader`` has no I/O to overlap, and so is fetched in the
    consumer's own task, on demand (:class:`~asyncload._pipeline.InlineEpoch`): the
    dataset awaits no I/O, nor do ``transform``/``validate``, and there is no cache (a
    disk tier does I/O)."""
    if not getattr(loader.dataset, "in_memory", False) or loader.cache is not None:
        return False
    return not any(is_async_callable(fn) for fn in (loader.transform, loader.validate) if fn)


def runs_inline(loader: Loader) -> bool:
    """Whether a plain ``for`` over ``loader`` runs its epoch in the calling thread: it is
    fetched inline, and no event loop runs in this thread already (a notebook's)."""
    return fetches_inline(loader) and not _loop_running_here()


def _loop_running_here() -> bool:
    """Whether an event loop (asyncio's, trio's) runs in this thread."""
    try:
        asyncio.get_running_loop()  # also inside a callback, outside any task
    except RuntimeError:
        pass
    else:
        return True
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return False
    return True


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Pump:
    """The loop-side half: starts the epoch, then moves its batches into the queue, one
    per credit. It must not reference the :class:`SyncIterator`, so that dropping that
    stops it."""

    def __init__(self, loader: Loader, epoch: EpochStart) -> None:
        self.loader = loader
        self.epoch: EpochStart | None = epoch  # (None once forgotten: see forget())
        self.iterator: EpochIterator | None = None  # (once run() has started the epoch)
        self._first_taken: Callable[[], object] = _nothing
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        # One credit per batch the queue may hold. prefetch=0 holds none: each next()
        # grants the credit for the batch it then waits for (SyncIterator.__next__).
        self.credit = anyio.Semaphore(loader.prefetch)
        self.on_demand = loader.prefetch == 0
        self.go = anyio.Event()
        # Batches put in the queue (counted by the loop thread only) and taken from it (by
        # the consuming thread only): each counter has one writer, so none is lost.
        self.put_count = 0
        self.taken = 0

    @property
    def ready(self) -> int:
        """Batches in the queue: not the end marker or an error waiting there."""
        return self.put_count - self.taken

    async def run(self) -> None:
        credit, put = self.credit, self.queue.put
        try:
            # Until the consuming thread is back from iter(): it needs the GIL to get
            # there, and this thread, once fetching, would hold it for up to a switch
            # interval (5 ms) at a time.
            await self.go.wait()
            # The ready batches wait in the queue, not in the epoch's stream: the consumer
            # then takes every batch that is there in one go, without waiting for the loop
            # thread to hand over the GIL for each one.
            assert self.epoch is not None
            self.iterator = iterator = self.epoch.start()
            self._first_taken = iterator.hold_ramp()
            while True:
                await credit.acquire()
                try:
                    item = await iterator.next_item()
                except StopAsyncIteration:
                    put(_END)
                    return
                self.put_count += 1
                put(item)
                del item  # (the consumer's now: not kept alive while the pump waits)
        except BaseException as exc:
            if is_cancellation(exc):
                raise  # close() cancelled the pump: it tells the consumer itself
            put(_Raised(as_failure(exc)))  # KeyboardInterrupt too: raised in the consumer
        finally:
            with anyio.CancelScope(shield=True):
                if self.iterator is not None:
                    await self.iterator.aclose(report=False)
                await self.loader.dataset.aclose()

    def release(self) -> None:
        """Let the epoch start (called from the consuming thread, once, without waiting)."""
        self.loop.call_soon_threadsafe(self.go.set)

    def took_first(self) -> None:
        """The consumer has its first batch: the epoch may start its other workers
        (called from the consuming thread)."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the epoch has ended
            self.loop.call_soon_threadsafe(self._first_taken)

    def grant(self) -> None:
        """Let the pump fetch the next batch (called from the consuming thread)."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the epoch has ended
            self.loop.call_soon_threadsafe(self.credit.release)

    def report_end(self) -> None:
        """Close the progress report (from the consuming thread), started or not."""
        started = self.iterator or self.epoch
        if started is not None:
            started.report_end()

    def forget(self) -> None:
        """Once the loop thread has stopped: let go of the epoch and of the batches still
        queued, so that an iterator kept after close() holds no data. (The end marker goes
        back in, for a next() that another thread may be waiting in.)"""
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.queue.put(_CLOSED)
        self.iterator = self.epoch = None
        self._first_taken = _nothing


class SyncIterator(Iterator[Any]):
    """One epoch of ``loader`` for a plain ``for`` loop.

    ``iter(loader)`` changes the loader's state (the epoch has begun) before it returns;
    the epoch's fetches start in the background thread as it returns. The background
    thread stops, and the dataset's connections in its loop are released, when the epoch
    ends, when the loop is left early (the iterator is dropped), on :meth:`close`, or
    when ``loader.close()`` is called.
    """

    def __init__(self, loader: Loader) -> None:
        self._closed = False
        self.last_positions: list[int] = []  # of the batch last returned (for to_torch)
        # A forked child inherits this object, but not the loop thread behind it.
        self._pid = os.getpid()
        epoch = loader._prepare_epoch(prefetch=0)
        self._cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            "asyncio", _BACKEND_OPTIONS
        )
        entered = False
        try:
            portal = self._cm.__enter__()  # (may fail: no thread can start)
            self._portal = portal
            entered = True
            _PORTALS.add(self._cm)
            # Both waits on the loop thread end before the epoch gives it work (release()).
            self._pump: _Pump = portal.call(_Pump, loader, epoch)
            self._task: Future[None] = portal.start_task_soon(self._pump.run)
        except BaseException:
            try:
                epoch.report_end()
            finally:
                if entered:
                    _PORTALS.discard(self._cm)
                    self._cm.__exit__(None, None, None)
            raise
        self._pump.release()
        _OPEN.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Batches ready in the queue, not yet taken (not the end of the epoch or an error
        waiting there)."""
        return 0 if self._closed else self._pump.ready

    def __iter__(self) -> SyncIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._pid != os.getpid():
            raise RuntimeError(_FORKED.format(pid=self._pid))
        if self._pump.on_demand:
            self._pump.grant()
        try:
            item = self._pump.queue.get()
        except BaseException:
            # Ctrl-C while waiting: the batch may never come (a transform stuck in the
            # loop thread), and the program must end with it, so the epoch is stopped
            # without waiting for that thread (a daemon: it cannot hold the exit).
            self.close(wait=False)
            raise
        if self._closed:  # by close() from another thread while this one waited
            raise StopIteration
        # An item in the queue was put after run() had started the epoch.
        iterator = self._pump.iterator
        if iterator is None:  # closed (and forgotten) by another thread just now
            raise StopIteration
        if item is _END:
            try:
                iterator.end()  # (may raise: a DriftError, on_statistics)
            finally:
                self.close()
            raise StopIteration
        if type(item) is _Raised:
            self.close()
            raise item.exc
        # Delivered now, not when the pump queued it: state_dict() after a break must
        # not count the batches still waiting in the queue.
        self._pump.taken += 1
        if self._pump.taken == 1:
            self._pump.took_first()
        try:
            iterator.commit(item)
        except BaseException:  # an on_statistics callback raised: the loop ends with it
            self.close()
            raise
        if not self._closed and not self._pump.on_demand:
            # (Not closed by the callback, or by another thread meanwhile.)
            self._pump.grant()
        self.last_positions = item[1]
        return item[0]

    def close(self, *, wait: bool = True) -> None:
        """Cancel the epoch, release the dataset's resources, and join the thread
        (``wait=False``: another thread waits for it)."""
        if self._closed:
            return
        self._closed = True
        if self._pid != os.getpid():
            # A forked copy: the epoch and its thread are the parent's, left to it. The
            # portal's exit would ask that thread to stop and wait for it; told that the
            # portal is not running (anyio's own flag), it only joins the thread, which in
            # a forked child counts as stopped.
            with contextlib.suppress(AttributeError):
                self._portal._event_loop_thread_id = None
            _PORTALS.discard(self._cm)
            return
        self._pump.queue.put(_CLOSED)
        try:
            self._pump.report_end()  # (may raise: a last on_statistics call)
        finally:
            if not wait or threading.get_ident() == self._pump.thread:
                # (Dropped inside its own loop, a GC cycle there: that thread cannot wait
                # for itself.)
                self._stop_elsewhere()
            elif not sys.is_finalizing():  # (else the loop thread is frozen: see _OPEN)
                self._stop()

    def _stop_elsewhere(self) -> None:
        threading.Thread(target=self._stop, name="asyncload-close", daemon=True).start()

    def _stop(self) -> None:
        """Cancel the epoch's task and join the loop thread (not from that thread)."""
        self._task.cancel()
        try:
            self._task.result()
        except Exception:
            pass  # cancelled, or already reported through the queue
        except BaseException:
            # Ctrl-C while this thread waited (a fetch stuck in the loop thread): the
            # rest is left to a daemon thread, so that the program can end.
            self._stop_elsewhere()
            raise
        try:
            _PORTALS.discard(self._cm)
            self._cm.__exit__(None, None, None)
        finally:
            self._pump.forget()

    def __del__(self) -> None:
        if hasattr(self, "_task"):
            self.close()


class _Maker:
    """The loop-side half of an :class:`InlineIterator`: one task that makes batches each
    time ``next()`` asks. Like :class:`_Pump`, it must not reference its iterator, so
    that dropping the iterator (``break``) closes it at once, not at the next GC."""

    def __init__(self, iterator: EpochIterator, prefetch: int) -> None:
        self.iterator = iterator
        self._prefetch = prefetch
        self._loop = asyncio.get_running_loop()
        self._wanted = self._loop.create_future()
        self._made: list[Any] | BaseException | None = None
        self._task = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        iterator, loop = self.iterator, self._loop
        while True:
            await self._wanted
            self._wanted = loop.create_future()
            made: list[Any] | BaseException
            try:
                first = await iterator.next_item()
                made = [first, *iterator.take_ready(self._prefetch)]
                del first
            except BaseException as exc:  # StopAsyncIteration too: next() sorts them out
                if is_cancellation(exc):
                    raise  # from close(), whose own run of the loop must not be stopped
                made = as_failure(exc)
            self._made = made
            del made  # (next() takes the batches: not kept alive while this waits)
            loop.stop()

    def want(self) -> None:
        """Ask for batches (before running the loop, which the task stops when done)."""
        self._made = None
        self._wanted.set_result(None)

    def take(self) -> list[Any]:
        """What the task made, or its error raised."""
        made, self._made = self._made, None
        if isinstance(made, BaseException):
            raise made
        if made is None:  # (the task ended without a word: a bug of ours)
            raise RuntimeError("asyncload: the in-memory epoch stopped without a batch")
        return made

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class InlineIterator(Iterator[Any]):
    """One epoch of an in-memory ``loader`` for a plain ``for`` loop, in the calling
    thread: a ``next()`` that finds no batch fetched runs a private event loop while the
    epoch fetches the next few (:class:`~asyncload._pipeline.InlineEpoch`), and batches
    are collated as ``next()`` takes them, at most ``1 + prefetch`` at a time; with no
    I/O there is nothing to wait on in between. The same interface as
    :class:`SyncIterator`; ``close()`` may come from any thread.

    One task serves the whole epoch, woken by each ``next()`` that needs batches: a task
    per ``next()`` (``run_until_complete``) cost twice as much loop overhead, about a
    third of a 32-sample batch's whole cost. The loop is asyncio's own, not uvloop:
    uvloop sets up its signal wake-up (a socket pair) each time it starts running in the
    main thread. Batches are committed only as ``next()`` returns them."""

    def __init__(self, loader: Loader) -> None:
        self._closed = False
        self.last_positions: list[int] = []
        self._loader = loader
        self._pid = os.getpid()  # (a forked child's copy is the parent's epoch)
        # Held while the loop runs: close() from another thread waits for the next() in
        # progress, since a loop runs in one thread at a time.
        self._lock = threading.RLock()
        self._loop = asyncio.new_event_loop()
        self._ready: deque[Any] = deque()
        try:
            self._maker: _Maker = self._loop.run_until_complete(self._start())
        except BaseException:
            self._loop.close()
            raise
        self._iterator = self._maker.iterator
        _OPEN.add(self)

    async def _start(self) -> _Maker:
        prefetch = self._loader.prefetch
        return _Maker(self._loader._start_epoch(prefetch=prefetch, inline=True), prefetch)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Batches taken from the epoch, not yet returned."""
        return len(self._ready)

    def __iter__(self) -> InlineIterator:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._closed:
                raise StopIteration
            if self._pid != os.getpid():
                raise RuntimeError(_FORKED.format(pid=self._pid))
            try:
                if not self._ready:
                    # Batches already fetched are collated here, without running the loop.
                    self._ready.extend(self._iterator.take_ready(1 + self._loader.prefetch))
                if not self._ready:
                    self._ready.extend(self._run())
                item = self._ready.popleft()
                self._iterator.commit(item)  # (may raise: an on_statistics callback)
            except StopAsyncIteration:
                try:
                    self._iterator.end()  # (may raise: a DriftError, on_statistics)
                finally:
                    self.close()
                raise StopIteration from None
            except BaseException:
                self.close()
                raise
            self.last_positions = item[1]
            return item[0]

    def _run(self) -> list[Any]:
        """Wake the maker and run the loop until it has made batches."""
        self._maker.want()
        # (asyncio's own C lookup, not _loop_running_here(): this runs every few batches,
        # and only a running asyncio loop refuses to let ours run in its thread.)
        if asyncio._get_running_loop() is not None:
            # Iterated from asyncio code (an iterator made outside it): a thread runs one
            # asyncio loop at a time, so ours runs in a thread of its own meanwhile.
            runner = threading.Thread(target=self._loop.run_forever, name="asyncload-inline")
            runner.start()
            runner.join()
        else:
            self._loop.run_forever()
        return self._maker.take()

    def close(self) -> None:
        """Cancel the epoch, release the dataset's resources, and close the loop."""
        with self._lock:
            if self._closed or self._loop.is_running():
                return  # (running: called back from inside next(), which will see the end)
            self._closed = True
            if self._pid != os.getpid():
                return  # a forked copy: the epoch, and its report, are the parent's
            self._ready.clear()  # (not delivered: nothing buffered in the last report)
            try:
                self._iterator.report_end()  # (may raise: a last on_statistics call)
            finally:
                if sys.is_finalizing():
                    pass  # too late to run a loop; the process is ending anyway
                elif _loop_running_here():
                    # Another loop runs in this thread (close() from async code): ours
                    # cannot run here, but it may in a thread of its own.
                    finisher = threading.Thread(target=self._finish, name="asyncload-close")
                    finisher.start()
                    finisher.join()
                else:
                    self._finish()

    def _finish(self) -> None:
        try:
            self._loop.run_until_complete(self._shutdown())
        finally:
            self._loop.close()

    async def _shutdown(self) -> None:
        await self._maker.aclose()
        with anyio.CancelScope(shield=True):
            await self._iterator.aclose(report=False)
            await self._loader.dataset.aclose()

    def __del__(self) -> None:
        if hasattr(self, "_iterator") and not self._closed:
            with contextlib.suppress(Exception):
                self.close()
