"""LRUCache: single flight, failures and cancellation, eviction policies, budgets, sizes."""

from __future__ import annotations

import os
import pickle
import sys
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al
from asyncload.cache import LRUCache, cache_key

ANYIO_BACKENDS = ["asyncio", "trio"]


def value_of(value: Any) -> Callable[[], Awaitable[Any]]:
    async def load() -> Any:
        return value

    return load


class Gate:
    """A load that blocks until released, and counts how often it ran."""

    def __init__(self, value: Any = "v") -> None:
        self.value = value
        self.calls = 0
        self.release = anyio.Event()
        self.error: BaseException | None = None

    async def load(self) -> Any:
        self.calls += 1
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def fill(cache: LRUCache, *keys: str) -> None:
    for key in keys:
        await cache.get_or_load(key, value_of(b"x"))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_items": 0}, ValueError, "max_items"),
        ({"max_items": 1.5}, TypeError, "max_items"),
        ({"max_bytes": -1}, ValueError, "max_bytes"),
        ({"max_bytes": True}, TypeError, "max_bytes"),
        ({"policy": "mru"}, ValueError, "policy"),
        ({"sizeof": 3}, TypeError, "sizeof"),
    ],
)
def test_bad_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        LRUCache(**kwargs)


@pytest.mark.anyio
async def test_hit_and_miss() -> None:
    cache = LRUCache()
    assert await cache.get_or_load("a", value_of(1)) == 1
    assert await cache.get_or_load("a", value_of(2)) == 1
    assert "a" in cache and "b" not in cache
    assert len(cache) == 1
    stats = cache.statistics()
    assert (stats["hits"], stats["misses"], stats["items"]) == (1, 1, 1)
    assert stats["hit_rate"] == 0.5
    assert cache.get("a") == 1
    assert cache.get("b", "dflt") == "dflt"


@pytest.mark.anyio
async def test_single_flight_runs_load_once_for_concurrent_callers() -> None:
    cache = LRUCache()
    gate = Gate("shared")
    results: list[Any] = []

    async def ask() -> None:
        results.append(await cache.get_or_load("k", gate.load))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        assert gate.calls == 1
        assert cache.statistics()["in_flight"] == 1
        gate.release.set()
    assert results == ["shared"] * 10
    stats = cache.statistics()
    assert (stats["misses"], stats["hits"], stats["coalesced"]) == (1, 9, 9)
    assert stats["in_flight"] == 0


@pytest.mark.anyio
async def test_failed_load_is_not_cached_and_waiters_see_the_error() -> None:
    cache = LRUCache()
    gate = Gate()
    gate.error = ConnectionResetError("down")
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await cache.get_or_load("k", gate.load)
        except ConnectionResetError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        gate.release.set()
    assert len(errors) == 4
    assert all(exc is gate.error for exc in errors)
    assert gate.calls == 1
    assert "k" not in cache
    assert cache.statistics()["load_errors"] == 1
    # The next call loads again.
    assert await cache.get_or_load("k", value_of("fresh")) == "fresh"


@pytest.mark.anyio
async def test_cancelled_loader_hands_over_to_a_waiter() -> None:
    cache = LRUCache()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep_forever()  # the first loader hangs until cancelled
        return "second"

    results: list[str] = []

    async def ask() -> None:
        results.append(await cache.get_or_load("k", load))

    loader_scope = anyio.CancelScope()
    loader_started = anyio.Event()

    async def first() -> None:
        with loader_scope:
            loader_started.set()
            await cache.get_or_load("k", load)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await loader_started.wait()
        for _ in range(3):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        assert calls == 1
        loader_scope.cancel()
    assert results == ["second"] * 3
    assert calls == 2
    assert cache.get("k") == "second"


@pytest.mark.anyio
async def test_cancelled_waiter_does_not_disturb_the_load() -> None:
    cache = LRUCache()
    gate = Gate("v")
    results: list[str] = []

    async def ask() -> None:
        results.append(await cache.get_or_load("k", gate.load))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await cache.get_or_load("k", gate.load)
        assert scope.cancelled_caught
        gate.release.set()
    assert results == ["v"]
    assert gate.calls == 1


@pytest.mark.anyio
async def test_lru_evicts_least_recently_used() -> None:
    cache = LRUCache(max_items=2)
    await fill(cache, "a", "b", "a", "c")  # "a" was used after "b"
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.statistics()["evictions"] == 1


@pytest.mark.anyio
async def test_fifo_evicts_oldest_insert() -> None:
    cache = LRUCache(max_items=2, policy="fifo")
    await fill(cache, "a", "b", "a", "a", "c")
    assert "a" not in cache and "b" in cache and "c" in cache


@pytest.mark.anyio
async def test_lfu_evicts_least_frequently_used() -> None:
    cache = LRUCache(max_items=3, policy="lfu")
    await fill(cache, "a", "b", "c", "a", "a", "b", "c", "c", "c")  # a: 3, b: 2, c: 4
    await fill(cache, "d")
    assert "b" not in cache
    await fill(cache, "e")  # d (1 use) goes next, before the more used a and c
    assert "d" not in cache
    assert all(k in cache for k in ("a", "c", "e"))


@pytest.mark.anyio
async def test_lfu_breaks_ties_by_recency() -> None:
    cache = LRUCache(max_items=2, policy="lfu")
    await fill(cache, "a", "b", "b", "a")  # both used twice; b's second use is older
    await fill(cache, "c")
    assert "b" not in cache and "a" in cache


@pytest.mark.anyio
async def test_max_bytes_evicts_until_it_fits() -> None:
    cache = LRUCache(max_bytes=10)
    for key, size in (("a", 4), ("b", 4), ("c", 2)):
        await cache.get_or_load(key, value_of(b"x" * size))
    assert cache.statistics()["bytes"] == 10
    await cache.get_or_load("d", value_of(b"x" * 7))  # needs a and b gone
    assert "a" not in cache and "b" not in cache
    assert "c" in cache and "d" in cache
    assert cache.statistics()["bytes"] == 9


@pytest.mark.anyio
async def test_oversize_item_is_returned_but_not_cached() -> None:
    cache = LRUCache(max_bytes=8)
    await cache.get_or_load("small", value_of(b"1234"))
    big = b"x" * 9
    assert await cache.get_or_load("big", value_of(big)) == big
    assert "big" not in cache
    assert "small" in cache  # nothing was evicted for it
    stats = cache.statistics()
    assert (stats["uncached"], stats["evictions"], stats["bytes"]) == (1, 0, 4)


@pytest.mark.anyio
async def test_numpy_arrays_are_served_read_only() -> None:
    cache = LRUCache()
    original = np.arange(6, dtype=np.int64)
    first = await cache.get_or_load("k", value_of(original))
    second = await cache.get_or_load("k", value_of(None))
    assert first is second
    assert not first.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 100
    assert original.flags.writeable  # the loader's own array is left alone
    assert np.shares_memory(first, original)  # a view, not a copy
    copy = first.copy()  # what a consumer that mutates does
    copy[0] = 100
    assert cache.statistics()["bytes"] == 48


@pytest.mark.anyio
async def test_numpy_arrays_inside_samples_are_read_only() -> None:
    cache = LRUCache()
    sample = {"image": np.zeros((2, 2), np.uint8), "label": 3, "parts": [np.ones(3)]}
    got = await cache.get_or_load("k", value_of(sample))
    assert not got["image"].flags.writeable
    assert not got["parts"][0].flags.writeable
    assert got["label"] == 3
    plain = {"a": [1, 2], "b": "text"}
    assert await cache.get_or_load("p", value_of(plain)) is plain  # nothing to freeze


@pytest.mark.anyio
async def test_sizes_of_buffers_tensors_and_containers() -> None:
    torch = pytest.importorskip("torch")
    cache = LRUCache()
    values: dict[str, tuple[Any, int]] = {
        "bytes": (b"abc", 3),
        "bytearray": (bytearray(5), 5),
        "memoryview": (memoryview(bytes(8)).cast("I"), 8),
        "array": (np.zeros((3, 4), np.float32), 48),
        "tensor": (torch.zeros(10, dtype=torch.float64), 80),
        "tuple": ((b"ab", np.zeros(2, np.uint8)), 4),
        "dict": ({b"k": b"v" * 10}, 11),
    }
    for key, (value, size) in values.items():
        before = cache.statistics()["bytes"]
        await cache.get_or_load(key, value_of(value))
        assert cache.statistics()["bytes"] - before == size, key


@pytest.mark.anyio
async def test_sizeof_hook_for_other_objects() -> None:
    class Blob:
        def __init__(self, n: int) -> None:
            self.n = n

    cache = LRUCache(max_bytes=100, sizeof=lambda obj: obj.n)
    await cache.get_or_load("a", value_of(Blob(60)))
    await cache.get_or_load("b", value_of(Blob(60)))
    assert "a" not in cache and cache.statistics()["bytes"] == 60

    fallback = LRUCache()
    await fallback.get_or_load("x", value_of(12345))
    assert fallback.statistics()["bytes"] == sys.getsizeof(12345)


@pytest.mark.anyio
async def test_self_referencing_values_are_sized_once() -> None:
    cache = LRUCache()
    cyclic: list[Any] = [b"abcd"]
    cyclic.append(cyclic)
    await cache.get_or_load("k", value_of(cyclic))
    assert cache.statistics()["bytes"] == 4


@pytest.mark.anyio
async def test_clear_keeps_counters() -> None:
    cache = LRUCache(max_items=2)
    await fill(cache, "a", "b")
    cache.clear()
    assert len(cache) == 0
    assert cache.statistics()["bytes"] == 0
    assert cache.statistics()["misses"] == 2
    await fill(cache, "c", "d", "e")
    assert len(cache) == 2


def test_construction_binds_no_event_loop_and_pickles() -> None:
    cache = LRUCache(max_items=4)
    for backend in ("asyncio", "trio"):
        assert anyio.run(cache.get_or_load, backend, value_of(backend), backend=backend) == backend
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.get("trio") == "trio"
    assert len(copy) == 2


# Budgets hold whatever the sizes and access order: a property test.

operations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=15), st.integers(min_value=0, max_value=40)),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(
    ops=operations,
    max_items=st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    max_bytes=st.one_of(st.none(), st.integers(min_value=1, max_value=80)),
    policy=st.sampled_from(["lru", "lfu", "fifo"]),
)
def test_budgets_are_never_exceeded(
    ops: list[tuple[int, int]], max_items: int | None, max_bytes: int | None, policy: Any
) -> None:
    cache = LRUCache(max_items=max_items, max_bytes=max_bytes, policy=policy)

    async def main() -> None:
        sizes: dict[int, int] = {}  # size of the value last served for each key
        for step, (key, size) in enumerate(ops, 1):
            was_cached = key in cache
            value = await cache.get_or_load(key, value_of(b"x" * size))
            assert len(value) == (sizes[key] if was_cached else size)
            sizes[key] = len(value)
            stats = cache.statistics()
            assert stats["hits"] + stats["misses"] == step
            assert stats["items"] == len(cache)
            assert stats["bytes"] == sum(n for k, n in sizes.items() if k in cache)
            if max_items is not None:
                assert stats["items"] <= max_items
            if max_bytes is not None:
                assert stats["bytes"] <= max_bytes
            # What was just served stays cached, unless it alone is over the budget.
            assert (key in cache) == (max_bytes is None or len(value) <= max_bytes)

    anyio.run(main)


# -- keys of views: a cache shared by a source and its views ------------------------------


class Keyed(al.AsyncDataset[bytes]):
    """``n`` byte strings, keyed by name, as a file or HTTP source would be."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fetches = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> bytes:
        self.fetches += 1
        return b"raw%d" % index

    def key_of(self, index: int) -> str:
        return f"{index}.bin"


def _epoch(dataset: al.AsyncDataset[Any], cache: LRUCache) -> list[Any]:
    return [sample for sample in al.Loader(dataset, batch_size=None, cache=cache)]


@pytest.mark.parametrize("mapped_first", [False, True])
def test_a_map_view_never_shares_entries_with_its_source(mapped_first: bool) -> None:
    source, cache = Keyed(3), LRUCache(max_items=100)
    raw, upper = source, source.map(bytes.upper)
    runs = [(upper, [b"RAW0", b"RAW1", b"RAW2"]), (raw, [b"raw0", b"raw1", b"raw2"])]
    for dataset, expected in runs if mapped_first else runs[::-1]:
        assert _epoch(dataset, cache) == expected
    assert upper.key_of(0) == raw.key_of(0) == "0.bin"  # messages still name the file
    # Views of a source, by a named function: the same entries; other views: their own.
    named = source.map(zlib.compress)
    assert cache_key(named, 0) == cache_key(source.map(zlib.compress), 0)
    assert cache_key(named, 0) == ("map", "zlib.compress", "0.bin")
    assert cache_key(upper, 0) != cache_key(source.map(bytes.upper), 0)
    assert cache_key(al.Subset(upper, [2, 0]), 1) == cache_key(upper, 0)
    assert cache_key((source + upper), 3) == (1, cache_key(upper, 0))
    # A filter view drops samples: its own entries, or the source's would skip the predicate.
    assert cache_key(upper.filter(callable), 0) == (
        "filter",
        "builtins.callable",
        cache_key(upper, 0),
    )
    assert pickle.loads(pickle.dumps(named))._cache_key(1) == named._cache_key(1)


def test_a_mapped_view_through_concat_and_subset_keeps_its_values() -> None:
    source, cache = Keyed(2), LRUCache(max_items=100)
    both = al.Subset(source + source.map(bytes.upper), [0, 1, 2, 3])
    assert _epoch(both, cache) == [b"raw0", b"raw1", b"RAW0", b"RAW1"]
    assert _epoch(source, cache) == [b"raw0", b"raw1"]  # not the same entries
    assert source.fetches == 6


def test_a_filter_view_never_serves_what_its_source_cached() -> None:
    source, cache = Keyed(4), LRUCache(max_items=100)
    assert _epoch(source, cache) == [b"raw0", b"raw1", b"raw2", b"raw3"]
    even = source.filter(lambda b: int(b[3:]) % 2 == 0)
    assert _epoch(even, cache) == [b"raw0", b"raw2"]  # not the source's entries for 1 and 3
    assert _epoch(source, cache) == [b"raw0", b"raw1", b"raw2", b"raw3"]


# -- keys of datasets without key_of: one namespace per dataset object ----------------------


class Unkeyed(al.AsyncDataset[str]):
    """``n`` strings ``"{name}-{i}"`` and no ``key_of``, as most users' own datasets."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.n = n
        self.fetches = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> str:
        self.fetches += 1
        return f"{self.name}-{index}"


def test_datasets_without_keys_and_their_views_never_share_values() -> None:
    base = Unkeyed("x", 4)
    cache = LRUCache(max_items=100)
    assert _epoch(base.map(lambda s: s + "-aug"), cache) == [
        "x-0-aug",
        "x-1-aug",
        "x-2-aug",
        "x-3-aug",
    ]
    assert _epoch(base.map(lambda s: s), cache) == ["x-0", "x-1", "x-2", "x-3"]
    assert _epoch(Unkeyed("val", 2), cache) == ["val-0", "val-1"]  # another dataset
    a, b = al.from_sequence(["a0", "a1"]), al.from_sequence(["b0", "b1"])
    assert _epoch(a, cache) == ["a0", "a1"] and _epoch(b, cache) == ["b0", "b1"]
    assert _epoch(al.from_torch(["t0", "t1"]), cache) == ["t0", "t1"]


def test_a_subset_shares_its_parents_entries_without_keys() -> None:
    base, cache = Unkeyed("x", 6), LRUCache(max_items=100)
    assert _epoch(al.Subset(base, [4, 5]), cache) == ["x-4", "x-5"]
    assert _epoch(base, cache) == [f"x-{i}" for i in range(6)]  # its own index 0 is x-0
    assert base.fetches == 6  # 4 and 5 were the subset's entries: the same samples
    assert _epoch(base + base, cache) == [f"x-{i}" for i in range(6)] * 2
    assert cache_key(al.Subset(base, [4, 5]), 0) == cache_key(base, 4)
    assert cache_key(base.filter(bool), 4) != cache_key(base, 4)


def test_the_token_of_a_dataset_without_keys_goes_with_its_copies() -> None:
    base = Unkeyed("x", 4)
    # Pickled before any lookup (a DataLoader worker's copy): the same keys, so workers
    # sharing a DiskCache share its entries; a forked worker inherits the same token.
    copy = pickle.loads(pickle.dumps(base))
    assert [cache_key(copy, i) for i in range(4)] == [cache_key(base, i) for i in range(4)]
    mapped = base.map(str.upper)
    assert pickle.loads(pickle.dumps(mapped))._cache_key(1) == cache_key(mapped, 1)
    # Another dataset, even an equal one (a restarted run's), never finds these entries.
    assert cache_key(Unkeyed("x", 4), 1) != cache_key(base, 1)
    assert cache_key(base, 1) != 1 and cache_key(base, 1) != cache_key(base, 2)


def test_file_sources_over_two_roots_never_share_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
        for i in range(3):
            (root / f"{i}.bin").write_bytes(root.name.encode() * (i + 1))
    cache = LRUCache(max_items=100)
    a, b = (al.sources.FileSource.from_directory(root) for root in roots)
    assert a.key_of(0) == b.key_of(0) == "0.bin"  # messages and labels: as given
    assert _epoch(a, cache) == [b"a", b"aa", b"aaa"]
    assert _epoch(b, cache) == [b"b", b"bb", b"bbb"]
    # Keyed by the absolute path: the same file through the same root is one entry, in
    # any process or run.
    assert cache_key(a, 1) == os.path.join(os.path.realpath(roots[0]), "1.bin")
    assert cache_key(al.sources.FileSource(["1.bin"], root=roots[0]), 0) == cache_key(a, 1)
    # Without a root, relative paths name files in the working directory, as reads do.
    monkeypatch.chdir(roots[1])
    assert cache_key(al.sources.FileSource(["1.bin"]), 0) == os.path.join(os.getcwd(), "1.bin")
