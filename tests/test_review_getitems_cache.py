"""Review (helper-75) of 471a2ee (Loader fetches a dataset's getitems override with cache=
and breaker=): each test below failed on that commit (the throttle's, without either, on
the ones before it too) and passes since the fix. The docstrings say what happened."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

import asyncload as al

ANYIO_BACKENDS = [pytest.param("asyncio", id="asyncio")]


class Counted(al.AsyncDataset[Any]):
    """Sample ``i`` is ``i * 10``; overrides ``getitems`` (so ``ds.batched``); records calls.
    Indices in ``block`` make a call wait for ``release`` (after setting ``entered``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.chunks: list[list[int]] = []
        self.singles: list[int] = []
        self.block: set[int] = set()
        self.entered = anyio.Event()
        self.release = anyio.Event()

    def __len__(self) -> int:
        return self.n

    def key_of(self, index: int) -> str:
        return f"sample-{index}"

    def _value(self, index: int) -> Any:
        return index * 10

    async def __getitem__(self, index: int) -> Any:
        self.singles.append(index)
        await anyio.lowlevel.checkpoint()
        return self._value(index)

    async def getitems(self, indices: Sequence[int]) -> list[Any]:
        self.chunks.append(list(indices))
        await anyio.lowlevel.checkpoint()
        if self.block & set(indices):
            self.entered.set()
            await self.release.wait()
        return [self._value(i) for i in indices]


def epoch(loader: al.Loader) -> list[Any]:
    return [s for batch in loader for s in batch]


# -- 1. a user KeyboardInterrupt/SystemExit/stray CancelledError inside the gather's tasks ---

SYSTEM_EXIT_SCRIPT = """
import threading
import anyio
import asyncload as al

class Batched(al.AsyncDataset):
    def __len__(self):
        return 8

    async def __getitem__(self, index):
        await anyio.lowlevel.checkpoint()
        return index

    async def getitems(self, indices):
        await anyio.lowlevel.checkpoint()
        return list(indices)

def stop_at_5(x):
    if x == 5:
        raise SystemExit("stop at 5")
    return x

loader = al.Loader(Batched(), batch_size=4, cache=al.LRUCache(), transform=stop_at_5,
                   collate_fn=list)
try:
    for batch in loader:
        pass
except SystemExit:
    print("exited")
assert threading.active_count() == 1, threading.enumerate()
again = al.Loader(Batched(), batch_size=4, cache=al.LRUCache(), collate_fn=list)
assert [x for batch in again for x in batch] == list(range(8))
print("ran again")
"""


def test_system_exit_from_a_transform_with_cache_and_getitems_reaches_the_for_loop() -> None:
    """A transform raising SystemExit (sys.exit() in user code) under cache=LRUCache over a
    dataset that overrides getitems. Expected (as without the cache, or without getitems,
    and as Epoch._guarded promises): the plain ``for`` raises SystemExit and the loop
    thread ends. Happened: the SystemExit escapes the unguarded ``settle`` task of
    ``Fetcher._gather_misses`` and stops the bridge's event loop with nothing queued: the
    ``for`` waits forever (killed by the subprocess timeout). In a subprocess, as
    tests/test_bridge.py does for KeyboardInterrupt."""
    result = subprocess.run(
        [sys.executable, "-c", SYSTEM_EXIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["exited", "ran", "again"]


async def awaits_a_cancelled_future_at_50(x: int) -> int:
    """Raises CancelledError at 50 without its task being cancelled (as awaiting a request
    future that a client library cancelled does)."""
    if x == 50:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future
    return x


@pytest.mark.anyio
async def test_a_stray_cancelled_error_with_cache_and_getitems_fails_the_epoch() -> None:
    """A transform that lets a stray CancelledError escape (its task was not cancelled),
    with cache=LRUCache over a getitems dataset. Expected (as without the cache, see
    tests/test_loader_errors.py): the epoch fails with AsyncloadError "raised
    CancelledError without being cancelled". Happened: the ``settle`` task of that sample
    ends as if cancelled, its outcome slot stays ``None``, and the epoch completes
    delivering ``[0, 10, 20, 30, 40, None, 60, 70]``: a silently corrupted sample."""
    loader = al.Loader(
        Counted(8),
        batch_size=4,
        cache=al.LRUCache(),
        transform=awaits_a_cancelled_future_at_50,
        collate_fn=list,
    )
    got: list[Any] = []
    with anyio.fail_after(30):  # a guard, not a timing assertion
        with pytest.raises(al.AsyncloadError, match="CancelledError without being cancelled"):
            async for batch in loader:
                got.extend(batch)
    assert None not in got


# -- 2. a cache whose load outlives its caller ------------------------------------------------


class TaskCache:
    """A user cache with only ``get_or_load``: single flight through a shared, shielded task,
    so that a load goes on when the caller that started it is cancelled (a common pattern)."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.tasks: dict[Any, Any] = {}

    async def get_or_load(self, key: Any, load: Any) -> Any:
        if key in self.values:
            return self.values[key]
        task = self.tasks.get(key)
        if task is None:
            task = self.tasks[key] = asyncio.ensure_future(load())
        try:
            value = await asyncio.shield(task)
        finally:
            if task.done():
                self.tasks.pop(key, None)
        self.values[key] = value
        return value


@pytest.mark.anyio
async def test_a_cache_load_that_outlives_a_broken_off_chunk_does_not_hang_the_next_epoch() -> None:
    """``break`` out of an epoch while a chunk's getitems is in flight, with a user cache
    (only ``get_or_load``) whose loads run in a shared task. Expected (as with a dataset
    without a getitems override, which passes the same test): the next epoch yields all 8
    samples. Happened: the load the cache kept running is ``_Gather.load``, which waits for
    a round of a ``_Gather.serve`` that was cancelled with its chunk; it never finishes, so
    the next epoch's lookups of those keys wait on it forever (fail_after fires)."""
    ds = Counted(8)
    ds.block = {4}
    loader = al.Loader(ds, batch_size=4, concurrency=8, cache=TaskCache(), collate_fn=list)
    with anyio.fail_after(30):  # a guard against the hang, not a timing assertion
        async with loader:
            async for _ in loader:
                await ds.entered.wait()
                break
        ds.release.set()
        got = [s async for b in loader for s in b]
    assert got == [i * 10 for i in range(8)]


# -- 3. the throttle ---------------------------------------------------------------------------


class SlowDown(Exception):
    pass


class Peak(Counted):
    """Records the most fetch calls (getitems or single) in flight at once."""

    active = 0
    peak = 0

    async def _enter(self) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        for _ in range(50):  # stays in flight while the other workers start theirs
            await anyio.lowlevel.checkpoint()
        self.active -= 1

    async def getitems(self, indices: Sequence[int]) -> list[Any]:
        await self._enter()
        return [self._value(i) for i in indices]

    async def __getitem__(self, index: int) -> Any:
        await self._enter()
        return self._value(index)


@pytest.mark.parametrize("option", ["cache", "breaker", "none"])
def test_the_throttle_limit_holds_for_getitems_chunks(option: str) -> None:
    """The throttle lowered to 1 slot (the store said "slow down" three times; ``increase``
    tiny so it stays there). Expected (docs/resilience.md: "each attempt waits for a slot
    under the throttle's limit"; a chunk is one attempt): one fetch call in flight at a
    time. Happened: two getitems calls at once: ``Fetcher._attempt_many`` never passes the
    ConcurrencyGate (nor reports its outcome to the throttle). With cache= or breaker= this
    is new in 471a2ee: before it those loaders fetched per sample through the gate (the
    same loader with cache= over a dataset without getitems peaks at 1); plain ("none")
    has had it since chunks exist."""
    throttle = al.Throttle(signals=lambda e: isinstance(e, SlowDown), increase=1e-6)
    kw: dict[str, Any] = {}
    if option == "cache":
        kw["cache"] = al.LRUCache()
    if option == "breaker":
        kw["breaker"] = al.CircuitBreaker()
    ds = Peak(16)
    loader = al.Loader(ds, batch_size=4, concurrency=8, throttle=throttle, collate_fn=list, **kw)
    for _ in range(3):
        throttle.failed(throttle.admit(), SlowDown())
    assert loader.statistics()["concurrency_limit"] == 1
    assert epoch(loader) == [i * 10 for i in range(16)]
    assert ds.peak == 1


# -- 4. the LRUCache's in-line hit check -------------------------------------------------------


def test_a_key_of_that_raises_is_a_sample_error_with_lru_cache_and_getitems() -> None:
    """``key_of`` raises for sample 2, with cache=LRUCache and on_error="skip". Expected (as
    for the same dataset without a getitems override, or with a TieredCache/DiskCache):
    sample 2 is one skipped sample error. Happened: the KeyError escapes
    ``_chunk_cached``'s in-line ``cache_key(dataset, index) in cache`` check, outside the
    error policy, and fails the whole epoch."""

    class BadKey(Counted):
        def key_of(self, index: int) -> str:
            if index == 2:
                raise KeyError("no key for 2")
            return f"k{index}"

    loader = al.Loader(
        BadKey(8),
        batch_size=4,
        concurrency=4,
        cache=al.LRUCache(),
        on_error="skip",
        collate_fn=list,
    )
    assert epoch(loader) == [i * 10 for i in range(8) if i != 2]
    assert loader.statistics()["skipped"] == 1
