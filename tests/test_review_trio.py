"""Review: ``async for`` under trio (docs/async.md, "Event loops: asyncio, uvloop, trio").

By helper-90: each test failed before its fix (an epoch of another event loop was awaited
in aclose()); each docstring says what happened and what is expected."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
import trio

import asyncload as al

pytestmark = pytest.mark.timeout(60)


class Remote(al.AsyncDataset[int]):
    """Not in memory (each fetch awaits), so epochs run as a background task."""

    def __len__(self) -> int:
        return 40

    async def __getitem__(self, index: int) -> int:
        await anyio.lowlevel.checkpoint()
        return index


def test_aclose_under_trio_after_a_plain_for_hides_the_real_error() -> None:
    """A quick look at one batch with a plain ``for`` (the sync bridge: its epoch runs in an
    asyncio loop thread), then the training under trio in ``async with loader:`` whose body
    fails before its first ``async for`` (here a ValueError from the model's setup).

    What happens: ``Loader.aclose()`` (from ``__aexit__``) awaits the bridge's old epoch
    (still ``loader._current``): ``Epoch.aclose`` -> ``BackgroundTask.wait`` ->
    ``self._done.wait()`` on an anyio Event made in the bridge's *asyncio* loop, which on
    trio yields asyncio's bare ``None``: ``TypeError: trio.run received unrecognized yield
    message None. Are you trying to use a library written for some other framework like
    asyncio?``, which replaces the body's ValueError. (A plain ``await loader.aclose()``
    raises the same TypeError.) Under asyncio the same sequence is fine.

    Expected (docs/async.md: the loader runs under trio; ``async with loader`` / ``aclose``
    release what runs): ``aclose()`` leaves alone (or has already ended) an epoch of
    another event loop, and the body's ValueError propagates."""
    loader = al.Loader(Remote(), batch_size=4)
    for batch in loader:
        assert batch.tolist() == [0, 1, 2, 3]
        break

    async def main() -> None:
        with trio.fail_after(20):
            async with loader:
                raise ValueError("model setup failed")

    with pytest.raises(ValueError, match="model setup failed"):
        trio.run(main)


def test_aclose_under_asyncio_of_an_epoch_begun_under_trio() -> None:
    """The same loader used from one event loop and then another (docs/async.md's trio
    example runs one loader under trio, then under uvloop): an ``async for`` iterator
    begun under trio and kept (``it = aiter(loader); await anext(it)``), then
    ``await loader.aclose()`` in a later ``asyncio.run``.

    What happens: ``RuntimeError: Task got bad yield: <class
    'trio._core._traps.CancelShieldedCheckpoint'>``: aclose awaits the trio epoch's
    ``BackgroundTask._done`` (a trio Event, already set) from asyncio. (The other way round,
    asyncio then trio, gives trio's "unrecognized yield message None" TypeError.)

    Expected: the epoch of the finished trio run is over; aclose() returns."""
    loader = al.Loader(Remote(), batch_size=4)
    kept: list[Any] = []

    async def first() -> list[int]:
        iterator = aiter(loader)
        kept.append(iterator)
        return (await anext(iterator)).tolist()

    assert trio.run(first) == [0, 1, 2, 3]

    async def close() -> str:
        async with asyncio.timeout(20):
            await loader.aclose()
        return "closed"

    assert asyncio.run(close()) == "closed"
