"""Blocking calls in worker threads that a timeout or a close can walk away from, without
letting the threads left behind pile up past their limit."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import sniffio

from ._callables import PerLoop

__all__ = ["run_abandonable", "run_in_daemon_thread"]

T = TypeVar("T")

# The thread pool's own limit: none. The callers' limiters bound the threads, holding each
# token until its thread has returned.
_UNBOUNDED: PerLoop[anyio.CapacityLimiter] = PerLoop(lambda: anyio.CapacityLimiter(math.inf))


async def run_abandonable(
    fn: Callable[..., T],
    *args: Any,
    limiter: anyio.CapacityLimiter | None = None,
    discard: Callable[[T], object] | None = None,
) -> T:
    """``fn(*args)`` in a worker thread, holding a token of ``limiter`` (default: anyio's
    thread limiter) until the thread has returned.

    Cancelling the caller (a timeout, a close) abandons the thread instead of waiting for
    it, since a read from a stuck network mount may never return. anyio's own
    ``abandon_on_cancel`` gives the token back at once, so each timeout could leave one
    more stuck thread, past any limit; here the thread gives it back when it ends. A call
    abandoned before its thread began does not run ``fn`` at all; ``discard(result)``
    releases a result that nobody takes (a file opened after its caller left).
    """
    if limiter is None:
        limiter = anyio.to_thread.current_default_thread_limiter()
    call = _Call(limiter, _call_soon_threadsafe(), discard)
    await limiter.acquire_on_behalf_of(call)
    taken = False
    try:
        result: T = await anyio.to_thread.run_sync(
            call.run, fn, args, abandon_on_cancel=True, limiter=_UNBOUNDED.get()
        )
        taken = True
        return result
    finally:
        call.leave(taken)


async def run_in_daemon_thread(fn: Callable[[], object], limiter: anyio.CapacityLimiter) -> None:
    """``fn()`` in a daemon thread of its own, holding a token of ``limiter`` until the
    thread has returned; ``fn``'s exception is the caller's.

    For a call that blocks for as long as another process likes (waiting for a lock it
    holds). Cancelling the caller abandons the thread; a daemon thread, unlike anyio's
    worker threads, does not hold up the interpreter's exit: a process that stopped
    waiting can end while the other still holds the lock.
    """
    token = object()
    await limiter.acquire_on_behalf_of(token)
    call_soon = _call_soon_threadsafe()
    done = anyio.Event()
    failed: list[BaseException] = []

    def finish() -> None:  # in the event loop
        limiter.release_on_behalf_of(token)
        done.set()

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            failed.append(exc)
        finally:
            with contextlib.suppress(Exception):  # the loop has ended: nothing to wake
                call_soon(finish)

    try:
        threading.Thread(target=target, name="asyncload wait", daemon=True).start()
    except BaseException:
        limiter.release_on_behalf_of(token)
        raise
    await done.wait()
    if failed:
        raise failed[0]


def _call_soon_threadsafe() -> Callable[[Callable[[], object]], object]:
    """How a thread schedules a callback in the running event loop, without waiting."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    import asyncio

    return asyncio.get_running_loop().call_soon_threadsafe


class _Call:
    """Who gives the token back (and discards an untaken result): the caller when it
    leaves after the thread ended (or before it began), else the thread when ``fn``
    returns."""

    def __init__(
        self,
        limiter: anyio.CapacityLimiter,
        call_soon: Callable[..., object],
        discard: Callable[[Any], object] | None,
    ) -> None:
        self._limiter = limiter
        self._call_soon = call_soon
        self._discard = discard
        self._lock = threading.Lock()
        self._running = self._left = self._returned = False
        self._result: Any = None

    def run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> Any:
        """In the worker thread: ``fn(*args)``, unless the caller has left already (then
        nobody takes the result: None)."""
        with self._lock:
            if self._left:
                return None  # abandoned before it began; the caller gave the token back
            self._running = True
        try:
            result = fn(*args)
        except BaseException:
            self._end(returned=False, result=None)
            raise
        self._end(returned=True, result=result)
        return result

    def _end(self, *, returned: bool, result: Any) -> None:
        with self._lock:
            self._running = False
            self._returned, self._result = returned, result
            left = self._left
        if left:  # the caller has gone: the result is nobody's, the token this thread's
            if returned:
                self._discard_result()
            with contextlib.suppress(Exception):  # the loop has ended: nothing to free
                self._call_soon(self._limiter.release_on_behalf_of, self)

    def leave(self, taken: bool) -> None:
        """In the event loop, once the caller has its result (``taken``), its error or its
        cancellation."""
        with self._lock:
            self._left = True
            if self._running:
                return  # the thread still runs fn: it gives the token back when it returns
            untaken = self._returned and not taken
        if untaken:  # (the thread returned, but the caller was cancelled before it saw it)
            self._discard_result()
        self._limiter.release_on_behalf_of(self)

    def _discard_result(self) -> None:
        if self._discard is not None:
            with contextlib.suppress(Exception):
                self._discard(self._result)
        self._result = None
