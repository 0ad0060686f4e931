"""The shared contract's ``getitems`` line: a dataset that overrides ``getitems`` is fetched
through it by the Loader, with a ``cache=`` and a ``breaker=`` too (was: both made the
Loader await ``ds[i]`` per index, the override never called)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncload as al


class Counted(al.AsyncDataset[Any]):
    """Sample ``i`` is ``i * 10`` (or its bytes); records every call. Indices in ``bad``
    fail, alone or in a chunk; ``short`` makes ``getitems`` return one sample too few."""

    def __init__(
        self, n: int, *, bad: Sequence[int] = (), as_bytes: bool = False, short: bool = False
    ) -> None:
        self.n = n
        self.bad = set(bad)
        self.as_bytes = as_bytes
        self.short = short
        self.chunks: list[list[int]] = []
        self.singles: list[int] = []

    def __len__(self) -> int:
        return self.n

    def key_of(self, index: int) -> str:
        return f"sample-{index}"

    def _value(self, index: int) -> Any:
        return str(index * 10).encode() if self.as_bytes else index * 10

    async def __getitem__(self, index: int) -> Any:
        self.singles.append(index)
        await anyio.lowlevel.checkpoint()
        if index in self.bad:
            raise ConnectionError(f"sample {index} is bad")
        return self._value(index)

    async def getitems(self, indices: Sequence[int]) -> list[Any]:
        self.chunks.append(list(indices))
        await anyio.lowlevel.checkpoint()
        if self.bad & set(indices):
            raise ConnectionError("a bad sample in the chunk")
        values = [self._value(i) for i in indices]
        return values[:-1] if self.short else values


def epoch(loader: al.Loader) -> list[Any]:
    return [sample for batch in loader for sample in batch]


def test_lru_cache_misses_are_fetched_with_getitems_and_hits_not_at_all() -> None:
    ds = Counted(16)
    cache = al.LRUCache()
    loader = al.Loader(ds, batch_size=4, concurrency=4, cache=cache, collate_fn=list)
    assert ds.batched
    assert epoch(loader) == [i * 10 for i in range(16)]
    assert ds.singles == []
    assert sorted(i for chunk in ds.chunks for i in chunk) == list(range(16))
    assert all(len(chunk) == 4 for chunk in ds.chunks)
    calls = len(ds.chunks)

    assert epoch(loader) == [i * 10 for i in range(16)]
    assert len(ds.chunks) == calls and ds.singles == []
    assert loader.statistics()["cache_hits"] == 16


def test_a_partly_warm_cache_fetches_only_its_misses_in_one_call_per_chunk() -> None:
    ds = Counted(8)
    cache = al.LRUCache()
    epoch(al.Loader(ds, sampler=[1, 3, 5, 7], batch_size=4, cache=cache, collate_fn=list))
    ds.chunks.clear()
    full = al.Loader(ds, batch_size=4, concurrency=4, cache=cache, collate_fn=list)
    assert epoch(full) == [i * 10 for i in range(8)]
    assert ds.chunks == [[0, 2], [4, 6]]
    assert ds.singles == []


def test_a_failing_chunk_falls_back_to_single_fetches_and_caches_the_good_samples() -> None:
    ds = Counted(8, bad=[5])
    cache = al.LRUCache()
    loader = al.Loader(
        ds, batch_size=4, concurrency=4, cache=cache, collate_fn=list, on_error="skip"
    )
    assert epoch(loader) == [i * 10 for i in range(8) if i != 5]
    assert ds.chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sorted(ds.singles) == [4, 5, 6, 7]

    ds.chunks.clear()
    ds.singles.clear()
    assert epoch(loader) == [i * 10 for i in range(8) if i != 5]
    # Only the bad sample is a miss: its chunk is itself, then it is retried alone.
    assert ds.chunks == [[5]]
    assert ds.singles == [5]
    assert loader.statistics()["skipped"] == 1


def test_retry_applies_to_the_samples_of_a_failed_chunk() -> None:
    attempts = 0

    class HealsOnRetry(Counted):
        async def __getitem__(self, index: int) -> Any:
            nonlocal attempts
            if index == 2:
                attempts += 1
                if attempts == 2:
                    self.bad.discard(2)
            return await super().__getitem__(index)

    ds = HealsOnRetry(4, bad=[2])
    retry = al.Retry(attempts=3, sleep=lambda delay: anyio.lowlevel.checkpoint())
    loader = al.Loader(
        ds, batch_size=4, concurrency=4, cache=al.LRUCache(), retry=retry, collate_fn=list
    )
    assert epoch(loader) == [0, 10, 20, 30]
    assert attempts == 2


def test_filtered_samples_are_dropped_and_not_cached() -> None:
    ds = Counted(8)
    view = ds.filter(lambda x: x % 20 == 0)
    assert view.batched
    loader = al.Loader(view, batch_size=4, concurrency=4, cache=al.LRUCache(), collate_fn=list)
    assert epoch(loader) == [0, 20, 40, 60]
    assert ds.singles == []
    assert loader.statistics()["filtered"] == 4
    ds.chunks.clear()
    assert epoch(loader) == [0, 20, 40, 60]
    # The kept samples are hits; the dropped ones are asked again (one call per chunk).
    assert ds.chunks == [[1, 3], [5, 7]]


def test_a_getitems_that_returns_too_few_samples_fails_the_epoch_with_a_cache() -> None:
    loader = al.Loader(
        Counted(4, short=True), batch_size=4, concurrency=4, cache=al.LRUCache(), collate_fn=list
    )
    with pytest.raises(TypeError, match="returned 3 samples for 4 indices"):
        epoch(loader)


def test_the_same_index_in_two_chunks_at_once_is_loaded_once() -> None:
    ds = Counted(3)

    async def main() -> list[Any]:
        loader = al.Loader(
            ds,
            sampler=[0, 1, 1, 0, 2, 2],
            batch_size=2,
            concurrency=2,
            cache=al.LRUCache(),
            collate_fn=list,
        )
        with anyio.fail_after(30):  # a guard against a deadlock, not a timing assertion
            async with loader:
                return [s async for batch in loader for s in batch]

    assert anyio.run(main) == [0, 10, 10, 0, 20, 20]
    assert sorted(i for chunk in ds.chunks for i in chunk) == [0, 1, 2]


@pytest.mark.parametrize("tiered", [False, True])
def test_disk_and_tiered_caches_fetch_misses_with_getitems(tmp_path: Path, tiered: bool) -> None:
    ds = Counted(12, as_bytes=True)
    disk = al.DiskCache(tmp_path / "cache", max_bytes=1 << 20)
    cache: Any = al.TieredCache(al.LRUCache(), disk) if tiered else disk
    loader = al.Loader(ds, batch_size=4, concurrency=4, cache=cache, collate_fn=list)
    expected = [str(i * 10).encode() for i in range(12)]
    assert epoch(loader) == expected
    assert ds.singles == []
    assert sorted(i for chunk in ds.chunks for i in chunk) == list(range(12))

    ds.chunks.clear()
    fresh = al.Loader(
        ds,
        batch_size=4,
        concurrency=4,
        cache=al.DiskCache(tmp_path / "cache", max_bytes=1 << 20),
        collate_fn=list,
    )
    assert epoch(fresh) == expected
    assert ds.chunks == [] and ds.singles == []


def test_a_breaker_passes_chunks_to_getitems() -> None:
    ds = Counted(8)
    breaker = al.CircuitBreaker(failure_threshold=2)
    loader = al.Loader(ds, batch_size=4, concurrency=4, breaker=breaker, collate_fn=list)
    assert epoch(loader) == [i * 10 for i in range(8)]
    assert ds.chunks == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.singles == []
    assert breaker.state == "closed"


def test_an_open_breaker_refuses_chunks_without_calling_the_dataset() -> None:
    now = [0.0]
    breaker = al.CircuitBreaker(failure_threshold=1, recovery_timeout=10, clock=lambda: now[0])

    async def fail() -> None:
        raise ConnectionError("down")

    with pytest.raises(OSError):
        anyio.run(breaker.call, fail)
    assert breaker.state == "open"
    ds = Counted(8)
    loader = al.Loader(
        ds, batch_size=4, concurrency=4, breaker=breaker, collate_fn=list, on_error="skip"
    )
    assert epoch(loader) == []
    assert ds.chunks == [] and ds.singles == []
    assert loader.statistics()["skipped"] == 8


def test_chunks_wait_for_a_half_open_probe_chunk_instead_of_being_refused() -> None:
    now = [0.0]
    breaker = al.CircuitBreaker(
        failure_threshold=1, recovery_timeout=10, half_open_max_calls=1, clock=lambda: now[0]
    )

    async def fail() -> None:
        raise ConnectionError("down")

    with pytest.raises(OSError):
        anyio.run(breaker.call, fail)
    now[0] = 11.0
    assert breaker.state == "half_open"
    ds = Counted(8)
    loader = al.Loader(ds, batch_size=4, concurrency=8, breaker=breaker, collate_fn=list)
    # Both chunks start together: the first is the probe, the second waits for its outcome.
    assert epoch(loader) == [i * 10 for i in range(8)]
    assert sorted(ds.chunks) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.singles == []
    assert breaker.state == "closed"
