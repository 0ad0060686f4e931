"""Synchronous use of a Loader: a plain ``for`` loop (DataLoader workers use it too).

There is one async implementation; this module only drives it from another thread. Each
synchronous iteration runs the epoch in a background thread with its own event loop
(uvloop when installed), through an anyio blocking portal, one hand-off per batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

if TYPE_CHECKING:
    from .loader import Loader

__all__ = ["SyncIterator"]


def _backend_options() -> dict[str, Any]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


class SyncIterator(Iterator[Any]):
    """One epoch of ``loader`` for a plain ``for`` loop.

    The background thread stops, and the dataset's connections in its loop are released,
    when the epoch ends, when the loop is left early (the iterator is dropped), on
    :meth:`close`, or when ``loader.close()`` is called.
    """

    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        self._closed = False
        self._cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(
            "asyncio", _backend_options()
        )
        self._portal = self._cm.__enter__()
        try:
            self._iterator = self._portal.call(loader.__aiter__)
        except BaseException:
            self._cm.__exit__(None, None, None)
            raise
        self._thread = self._portal.call(threading.get_ident)

    @property
    def closed(self) -> bool:
        return self._closed

    def __iter__(self) -> SyncIterator:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            more, batch = self._portal.call(self._next)
        except BaseException:
            self.close()
            raise
        if not more:
            self.close()
            raise StopIteration
        return batch

    async def _next(self) -> tuple[bool, Any]:
        # StopAsyncIteration must not escape a coroutine run by the portal.
        try:
            return True, await self._iterator.__anext__()
        except StopAsyncIteration:
            return False, None

    async def _shutdown(self) -> None:
        await self._iterator.aclose()
        await self._loader.dataset.aclose()

    def close(self) -> None:
        """Cancel the epoch, release the dataset's resources, and join the thread."""
        if self._closed:
            return
        self._closed = True
        if threading.get_ident() == self._thread:
            return  # dropped inside its own loop (a GC cycle): that loop is ending anyway
        try:
            self._portal.call(self._shutdown)
        finally:
            self._cm.__exit__(None, None, None)

    def __del__(self) -> None:
        self.close()

