"""A background task for an ``async for`` loop.

``async for batch in loader`` needs fetches to run while the consumer is busy, yet Python's
``async for`` offers no awaitable hook when the loop is left by ``break``: the task group of
an async generator cannot be exited safely from there (trio's ``as_safe_channel`` rationale).
So each epoch runs as one background task that owns its task group, and the consumer side
cancels it synchronously (CancelScope.cancel is sync) when it is dropped or closed, and
awaits its end in ``aclose()``. It is a system task on trio and an asyncio task otherwise.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Awaitable, Callable

import anyio
import sniffio

__all__ = ["BackgroundTask"]

# asyncio keeps only weak references to tasks: hold running ones here until they end.
_RUNNING: set[object] = set()


class BackgroundTask:
    """Runs ``fn()`` in the current event loop, outside the caller's task, until it returns
    or is cancelled. ``fn`` must not raise: it reports its own errors."""

    def __init__(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._thread = threading.get_ident()
        self._library = sniffio.current_async_library()
        if self._library == "trio":
            import trio

            self._token = trio.lowlevel.current_trio_token()
            # With the caller's context variables, as asyncio's create_task copies them
            # (a system task would otherwise start from an empty context).
            trio.lowlevel.spawn_system_task(self._run, fn, context=contextvars.copy_context())
        else:
            import asyncio

            self._loop = asyncio.get_running_loop()
            _RUNNING.add(self)
            self._loop.create_task(self._run(fn))

    async def _run(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            with self._scope:
                await fn()
        finally:
            self._done.set()
            _RUNNING.discard(self)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Request cancellation; safe from any thread, and after the loop has closed."""
        if self._done.is_set():
            return
        try:
            if threading.get_ident() == self._thread:
                self._scope.cancel()
            elif self._library == "trio":
                self._token.run_sync_soon(self._scope.cancel)
            else:
                self._loop.call_soon_threadsafe(self._scope.cancel)
        except RuntimeError:
            pass  # the loop is gone, and the task with it

    async def wait(self) -> None:
        """Wait for the task's end. One of another event loop (a plain ``for``'s, or an
        earlier ``asyncio.run``/``trio.run`` over the same loader) is not waited for here:
        its events belong to that loop, and ``cancel()`` has already reached it."""
        if self._done.is_set() or not self._in_this_loop():
            await anyio.lowlevel.checkpoint()
            return
        await self._done.wait()

    def _in_this_loop(self) -> bool:
        if threading.get_ident() != self._thread:
            return False
        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return False
        if library != self._library:
            return False
        if library == "trio":
            import trio

            return bool(trio.lowlevel.current_trio_token() is self._token)
        import asyncio

        return asyncio.get_running_loop() is self._loop
