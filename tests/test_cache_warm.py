"""LRUCache.warm: loads samples under the Loader's keys, so that the next epoch never calls
the dataset; bounded concurrency; stops (never evicts) at the budget; ordered progress."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import anyio
import numpy as np
import pytest

import asyncload as al
from asyncload.cache import LRUCache, WarmResult, cache_key

pytestmark = pytest.mark.anyio


def value(index: int) -> np.ndarray:
    return np.full(2, index, dtype=np.int64)  # 16 bytes


class Counting(al.AsyncDataset[np.ndarray]):
    """Counts fetches and the most in flight at once; with ``gated``, each fetch waits until
    the test releases its index (``release``) or everything (``open``)."""

    def __init__(
        self, n: int, *, keyed: bool = False, gated: bool = False, fail: int | None = None
    ) -> None:
        self.n = n
        self.keyed = keyed
        self.fail = fail
        self.calls: list[int] = []
        self.in_flight = self.peak = 0
        self.waiting: list[int] = []
        self._gates: dict[int, anyio.Event] | None = {} if gated else None
        self._open = False

    def __len__(self) -> int:
        return self.n

    def key_of(self, index: int) -> Hashable | None:
        return f"key-{index}" if self.keyed else None

    def release(self, index: int) -> None:
        assert self._gates is not None
        self._gates.setdefault(index, anyio.Event()).set()

    def open(self) -> None:
        assert self._gates is not None
        self._open = True
        for event in self._gates.values():
            event.set()

    async def _fetch(self, indices: Sequence[int]) -> list[np.ndarray]:
        self.calls.extend(indices)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self._gates is not None and not self._open:
                self.waiting.extend(indices)
                for i in indices:
                    if not self._open:
                        await self._gates.setdefault(i, anyio.Event()).wait()
                for i in indices:
                    self.waiting.remove(i)
            if self.fail is not None and self.fail in indices:
                raise OSError(f"cannot read {self.fail}")
            return [value(al.datasets.normalize_index(i, self.n)) for i in indices]
        finally:
            self.in_flight -= 1

    async def __getitem__(self, index: int) -> np.ndarray:
        return (await self._fetch([index]))[0]


class Batched(Counting):
    """Fetches a whole chunk per call (``batched`` is True), as a file source does."""

    def __init__(self, n: int, **kwargs: Any) -> None:
        super().__init__(n, **kwargs)
        self.getitems_calls: list[list[int]] = []

    async def getitems(self, indices: Sequence[int]) -> list[np.ndarray]:
        self.getitems_calls.append(list(indices))
        return await self._fetch(indices)


async def epoch(loader: al.Loader) -> list[Any]:
    async with loader:
        return [batch async for batch in loader]


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("kind", [Counting, Batched])
async def test_warmed_epoch_never_calls_the_dataset(keyed: bool, kind: type[Counting]) -> None:
    ds = kind(21, keyed=keyed)
    cache = LRUCache()
    result = await cache.warm(ds, chunk_size=4)
    assert result == WarmResult(
        total=21, warmed=21, already_cached=0, filtered=0, bytes=21 * 16, full=False
    )
    assert result.done == 21
    assert sorted(ds.calls) == list(range(21))
    assert cache.statistics()["items"] == 21
    ds.calls.clear()

    loader = al.Loader(ds, batch_size=5, shuffle=True, seed=2, cache=cache)
    batches = await epoch(loader)
    assert ds.calls == []
    stats = loader.statistics()
    assert (stats["cache_hits"], stats["cache_misses"]) == (21, 0)
    expected = await epoch(
        al.Loader(
            al.from_sequence([value(i) for i in range(21)]), batch_size=5, shuffle=True, seed=2
        )
    )
    for got, want in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(got, want)


async def test_batched_dataset_warms_a_chunk_per_call() -> None:
    ds = Batched(10)
    await LRUCache().warm(ds, chunk_size=4, concurrency=1)
    assert ds.getitems_calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_keys_are_the_loaders_keys() -> None:
    plain, keyed = Counting(5), Counting(5, keyed=True)
    # Without keys: the index under a token of the dataset object, never a bare index that
    # another dataset sharing the cache would also look up.
    assert cache_key(plain, 3) == cache_key(plain, 3) != cache_key(Counting(5), 3)
    assert cache_key(keyed, 3) == "key-3"
    cache = LRUCache()
    result = await cache.warm(plain, indices=[-1, 4, 0])  # -1 is 4: one entry, as the Loader's
    assert (result.warmed, result.already_cached) == (2, 1)
    assert len(cache) == 2 and cache_key(plain, 4) in cache and cache_key(plain, 0) in cache
    plain.calls.clear()
    await epoch(al.Loader(plain, sampler=[4, 0], batch_size=2, cache=cache))
    assert plain.calls == []


async def test_subset_of_indices_and_what_is_already_cached() -> None:
    ds = Counting(8, keyed=True)
    cache = LRUCache()
    await cache.get_or_load("key-2", lambda: ds[2])
    ds.calls.clear()
    result = await cache.warm(ds, indices=[1, 2, 3, 3], concurrency=1)
    assert ds.calls == [1, 3]  # 2 was cached, and so was 3 when it came again
    assert (result.total, result.warmed, result.already_cached) == (4, 2, 2)
    assert cache.statistics()["items"] == 3


async def test_concurrency_bound_per_sample() -> None:
    ds = Counting(10, gated=True)
    cache = LRUCache()
    results: list[WarmResult] = []

    async def run() -> None:
        results.append(await cache.warm(ds, concurrency=3))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert sorted(ds.waiting) == [0, 1, 2]
        assert ds.in_flight == 3
        ds.release(1)  # done, but held for its turn: its slot is still taken
        await anyio.wait_all_tasks_blocked()
        assert sorted(ds.waiting) == [0, 2]
        ds.release(0)  # 0 and 1 are stored: two slots free up
        await anyio.wait_all_tasks_blocked()
        assert sorted(ds.waiting) == [2, 3, 4]
        assert cache.statistics()["items"] == 2
        ds.open()
    assert ds.peak == 3
    assert results[0].warmed == 10


async def test_concurrency_bound_per_chunk() -> None:
    ds = Batched(10, gated=True)
    results: list[WarmResult] = []

    async def run() -> None:
        results.append(await LRUCache().warm(ds, concurrency=2, chunk_size=3))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        assert ds.getitems_calls == [[0, 1, 2], [3, 4, 5]]
        ds.open()
    assert ds.peak == 2
    assert results[0].warmed == 10


async def test_stops_at_max_items_with_a_prefix_however_loads_complete() -> None:
    """Loads finish newest first, yet what is stored is the first samples asked for."""
    ds = Counting(12, gated=True)
    cache = LRUCache(max_items=5)
    order = [9, 3, 7, 1, 5, 0, 11, 2, 4, 6, 8, 10]
    results: list[WarmResult] = []

    async def run() -> None:
        results.append(await cache.warm(ds, indices=order, concurrency=4))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        while not results:
            newest = max(ds.waiting, key=order.index)
            ds.release(newest)
            await anyio.wait_all_tasks_blocked()
    result = results[0]
    assert result.full and result.warmed == 5 and result.done == 5
    assert sorted(k for k in order if cache_key(ds, k) in cache) == sorted(order[:5])
    assert cache.statistics()["evictions"] == 0


async def test_stops_at_max_bytes_and_never_evicts_what_was_there() -> None:
    cache = LRUCache(max_bytes=100)
    await cache.get_or_load("old", lambda: _value(b"x" * 20))
    seen: list[tuple[int, int]] = []
    ds = Batched(10)
    result = await cache.warm(ds, chunk_size=4, progress=lambda d, t: seen.append((d, t)))
    # 20 bytes were there; 5 samples of 16 fit in the remaining 80.
    assert (result.warmed, result.bytes, result.full) == (5, 80, True)
    assert "old" in cache and cache.statistics()["evictions"] == 0
    assert [k for k in range(10) if cache_key(ds, k) in cache] == [0, 1, 2, 3, 4]
    assert seen == [(0, 10), (4, 10), (5, 10)]  # the last call says how far it got


async def test_a_sample_larger_than_the_whole_budget_stops_it() -> None:
    class Sized(Counting):
        async def __getitem__(self, index: int) -> np.ndarray:
            return np.zeros(100 if index == 2 else 1, np.uint8)

    result = await LRUCache(max_bytes=50).warm(Sized(5))
    assert (result.warmed, result.full) == (2, True)


async def test_progress_counts_grow_to_total() -> None:
    seen: list[tuple[int, int]] = []
    ds = Counting(9, gated=True)

    async def run() -> None:
        await LRUCache().warm(ds, concurrency=3, progress=lambda d, t: seen.append((d, t)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        for index in (2, 1, 0, 5, 4, 3, 8, 7, 6):  # out of order
            await anyio.wait_all_tasks_blocked()
            ds.release(index)
    done = [d for d, _ in seen]
    assert all(t == 9 for _, t in seen)
    assert done == sorted(done) and done[0] == 0 and done[-1] == 9
    assert done == list(range(10))  # one call per settled sample, each exactly once


async def test_progress_default_is_silent(capsys: pytest.CaptureFixture[str]) -> None:
    await LRUCache().warm(Counting(3))
    assert capsys.readouterr() == ("", "")


async def test_filtered_samples_are_counted_not_cached() -> None:
    ds = Batched(10)
    odd = ds.filter(lambda x: int(x[0]) % 2 == 1)
    cache = LRUCache()
    result = await cache.warm(odd, chunk_size=3)
    assert (result.warmed, result.filtered, result.full) == (5, 5, False)
    assert [k for k in range(10) if cache_key(odd, k) in cache] == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("kind", [Counting, Batched])
async def test_a_failing_sample_raises_a_sample_error(kind: type[Counting]) -> None:
    ds = kind(10, keyed=True, fail=6)
    cache = LRUCache()
    with pytest.raises(al.SampleError) as info:
        await cache.warm(ds, chunk_size=4, concurrency=1)
    assert (info.value.index, info.value.key) == (6, "key-6")
    assert isinstance(info.value.__cause__, OSError)
    cached = [k for k in range(10) if f"key-{k}" in cache]
    if kind is Batched:
        # The failed chunk was fetched again sample by sample to find the culprit; none of
        # it is stored, the chunks before it are.
        assert ds.calls[4:] == [4, 5, 6, 7, 4, 5, 6]
        assert cached == [0, 1, 2, 3]
    else:
        assert cached == [0, 1, 2, 3, 4, 5]


async def test_bad_arguments_are_refused_before_loading() -> None:
    ds = Counting(3)
    cache = LRUCache()
    with pytest.raises(ValueError, match="concurrency"):
        await cache.warm(ds, concurrency=0)
    with pytest.raises(TypeError, match="chunk_size"):
        await cache.warm(ds, chunk_size=True)
    with pytest.raises(TypeError, match="progress"):
        await cache.warm(ds, progress=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dataset"):
        await cache.warm([1, 2])  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        await cache.warm(ds, indices=[0, 3])
    assert ds.calls == [] and len(cache) == 0


async def test_empty_dataset() -> None:
    seen: list[tuple[int, int]] = []
    result = await LRUCache().warm(Counting(0), progress=lambda d, t: seen.append((d, t)))
    assert result.done == result.total == 0 and not result.full
    assert seen == [(0, 0)]


async def _value(v: Any) -> Any:
    return v
