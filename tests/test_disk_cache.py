"""DiskCache and TieredCache: round trips, keys and values, single flight in one process and
across processes, budgets and LRU order, damaged and half-written entries, the Loader over
memory-over-disk tiers (and a restarted run), pickling.

Files are real (``tmp_path``). "Another process" is sometimes a second ``DiskCache`` over the
same directory in this process: its flights are its own and its locks are its own open files,
so to the first it is exactly another process; real subprocesses cover kills and spawn.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al
import asyncload.disk_cache as disk_cache
from asyncload.cache import LRUCache
from asyncload.datasets import normalize_index
from asyncload.disk_cache import DiskCache, encode_key
from asyncload.sources import FileSource
from asyncload.tiered import TieredCache

ENTRY = re.compile(r"[0-9a-f]{64}")
HEADER = 24
REPO = Path(__file__).resolve().parent.parent


def entries(path: str | os.PathLike[str]) -> dict[str, int]:
    """Entry files in the directory, name to size."""
    return {p.name: p.stat().st_size for p in Path(path).iterdir() if ENTRY.fullmatch(p.name)}


def others(path: str | os.PathLike[str]) -> set[str]:
    """Files that are neither entries nor the cache's own bookkeeping (temp and lock files)."""
    return {
        p.name
        for p in Path(path).iterdir()
        if not ENTRY.fullmatch(p.name) and p.name not in ("usage", "locks", "CACHEDIR.TAG")
    }


def locks_held(path: str | os.PathLike[str]) -> bool:
    """Whether any key's lock in the directory is held (by any open file, this process's
    too): a byte of ``locks`` write-locked, or a ``<digest>.lock`` file."""
    if any(p.name.endswith(".lock") for p in Path(path).iterdir()):
        return True
    try:
        fd = os.open(os.path.join(path, "locks"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        # F_OFD_GETLK over the whole file: F_UNLCK comes back when no other open file
        # holds a lock on any byte of it.
        probe = disk_cache._FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
        return disk_cache._FLOCK.unpack(answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


@pytest.fixture(params=["range", "file"])
def lock_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with each kind of key lock: byte-range locks on ``locks`` (Linux), and a lock file
    per key (elsewhere)."""
    if request.param == "range" and disk_cache._key_lock is not disk_cache._RangeLock:
        pytest.skip("open file description locks are Linux-only")
    kinds = {"range": disk_cache._RangeLock, "file": disk_cache._FileLock}
    monkeypatch.setattr(disk_cache, "_key_lock", kinds[request.param])
    return str(request.param)


def entry_size(key: Hashable, payload_size: int) -> int:
    return HEADER + len(encode_key(key)) + payload_size


def payload(key: object, size: int = 100) -> bytes:
    """Deterministic bytes for ``key``."""
    seed = hashlib.sha256(repr(key).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def value_of(value: Any) -> Callable[[], Awaitable[Any]]:
    async def load() -> Any:
        return value

    return load


async def never() -> bytes:
    raise AssertionError("the source was called for a key that should be cached")


class Source:
    """A counting source of :func:`payload` bytes."""

    def __init__(self, size: int = 100) -> None:
        self.size = size
        self.calls: list[Hashable] = []

    def load(self, key: Hashable) -> Callable[[], Awaitable[bytes]]:
        async def load() -> bytes:
            self.calls.append(key)
            return payload(key, self.size)

        return load


class Gate:
    """A load that blocks until released; ``started`` is set when it runs (after the thread
    hop that looks on disk first), ``calls`` counts runs."""

    def __init__(self, value: bytes = b"v") -> None:
        self.value = value
        self.calls = 0
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.error: BaseException | None = None

    async def load(self) -> bytes:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def until(predicate: Callable[[], bool]) -> None:
    """Yield until ``predicate()`` holds. Only for progress made in worker threads (a thread
    blocked in ``flock`` has no event to wait on); never a timing assumption."""
    with anyio.fail_after(10):
        while not predicate():
            await anyio.lowlevel.checkpoint()


# -- construction, keys, values --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_bytes": 0}, ValueError, "max_bytes"),
        ({"max_bytes": None}, TypeError, "max_bytes"),
        ({"max_bytes": 1.5}, TypeError, "max_bytes"),
        ({"max_bytes": True}, TypeError, "max_bytes"),
        ({"max_bytes": 10, "evict_to": 0}, ValueError, "evict_to"),
        ({"max_bytes": 10, "evict_to": 1.5}, ValueError, "evict_to"),
        ({"max_bytes": 10, "evict_to": "half"}, TypeError, "evict_to"),
        ({"max_bytes": 10, "namespace": 3}, TypeError, "namespace"),
    ],
)
def test_bad_arguments_name_the_argument(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        DiskCache(tmp_path, **kwargs)
    with pytest.raises(TypeError, match="path"):
        DiskCache(3, max_bytes=10)  # type: ignore[arg-type]


def test_keys_that_compare_equal_share_an_entry_and_others_never_do(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=1000)
    pair = collections.namedtuple("pair", "a b")
    assert cache.path_of(1) == cache.path_of(True)
    assert cache.path_of((1, "a")) == cache.path_of(pair(1, "a"))
    distinct = [
        "a",
        b"a",
        1,
        "1",
        -1,
        2**200,
        None,
        "None",
        (),
        ("a", "b"),
        ("ab",),
        ("a", 1),
        ("a", "1"),
        (("a",), "b"),
        ("a", ("b",)),
        "é",
        "",
        b"",
    ]
    assert len({encode_key(k) for k in distinct}) == len(distinct)
    assert len({cache.path_of(k) for k in distinct}) == len(distinct)
    other = DiskCache(tmp_path, max_bytes=1000, namespace="dataset-2")
    assert other.path_of(1) != cache.path_of(1)


@pytest.mark.parametrize("key", [1.5, object(), frozenset({1}), ("a", object()), [1]])
def test_keys_without_a_stable_encoding_are_refused(tmp_path: Path, key: Any) -> None:
    cache = DiskCache(tmp_path, max_bytes=1000)
    with pytest.raises(TypeError, match="str, bytes, int"):
        cache.path_of(key)
    with pytest.raises(TypeError, match="str, bytes, int"):
        anyio.run(cache.get_or_load, key, never)
    assert entries(tmp_path) == {}


def test_key_names_are_the_same_in_another_process(tmp_path: Path) -> None:
    keys = ["s3://bucket/a.jpg", b"raw", 7, ("shard", 3, None), 2**100]
    code = (
        "import sys, asyncload as al\n"
        f"cache = al.DiskCache(sys.argv[1], max_bytes=10)\n"
        f"for key in {keys!r}:\n"
        "    print(cache.path_of(key))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
    ).stdout.split()
    cache = DiskCache(tmp_path, max_bytes=10)
    assert out == [cache.path_of(k) for k in keys]


@pytest.mark.anyio
async def test_round_trip_hit_and_statistics(lock_kind: str, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", max_bytes=10_000)
    source = Source()
    assert await cache.get_or_load("a", source.load("a")) == payload("a")
    assert await cache.get_or_load("a", source.load("a")) == payload("a")
    assert source.calls == ["a"]
    assert "a" in cache and "b" not in cache
    assert entries(cache.path) == {os.path.basename(cache.path_of("a")): entry_size("a", 100)}
    stats = cache.statistics()
    assert (stats["hits"], stats["misses"], stats["items"]) == (1, 1, 1)
    assert stats["bytes"] == entry_size("a", 100)
    assert stats["hit_rate"] == 0.5
    assert (stats["corrupt"], stats["write_errors"], stats["in_flight"]) == (0, 0, 0)
    assert others(cache.path) == set() and not locks_held(
        cache.path
    )  # no temp or lock file left behind

    # A new cache over the directory (a restarted run) is served from it.
    again = DiskCache(tmp_path / "cache", max_bytes=10_000)
    assert await again.get_or_load("a", never) == payload("a")
    assert again.statistics()["hits"] == 1


@pytest.mark.anyio
async def test_bytes_like_values_come_back_as_bytes(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000, fsync=True)
    strided = memoryview(np.arange(8, dtype=np.uint8))[::2]  # not contiguous
    for key, value, expected in [
        ("bytearray", bytearray(b"xy"), b"xy"),
        ("memoryview", strided, b"\x00\x02\x04\x06"),
        ("empty", b"", b""),
    ]:
        got = await cache.get_or_load(key, value_of(value))
        assert type(got) is bytes and got == expected
        again = await cache.get_or_load(key, never)
        assert type(again) is bytes and again == expected


@pytest.mark.anyio
async def test_values_that_are_not_bytes_like_raise_and_are_not_stored(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    with pytest.raises(TypeError, match=r"'k' \(str\) returned str.*under the transform"):
        await cache.get_or_load("k", value_of("text"))
    with pytest.raises(TypeError, match=r"7 \(int\) returned ndarray"):
        await cache.get_or_load(7, value_of(np.zeros(3)))
    assert entries(tmp_path) == {} and others(tmp_path) == set() and not locks_held(tmp_path)
    assert cache.statistics()["load_errors"] == 2
    assert await cache.get_or_load("k", value_of(b"ok")) == b"ok"


# -- single flight in one process ------------------------------------------------------------


@pytest.mark.anyio
async def test_single_flight_runs_load_once_for_concurrent_callers(
    lock_kind: str, tmp_path: Path
) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    gate = Gate(b"shared")
    results: list[bytes] = []

    async def ask() -> None:
        results.append(await cache.get_or_load("k", gate.load))

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(ask)
        await gate.started.wait()
        await anyio.wait_all_tasks_blocked()
        assert gate.calls == 1
        assert cache.statistics()["in_flight"] == 1
        gate.release.set()
    assert results == [b"shared"] * 10
    stats = cache.statistics()
    assert (stats["misses"], stats["hits"], stats["coalesced"]) == (1, 9, 9)
    assert stats["in_flight"] == 0
    assert others(tmp_path) == set() and not locks_held(tmp_path)


@pytest.mark.anyio
async def test_failed_load_is_not_cached_and_waiters_see_the_error(
    lock_kind: str, tmp_path: Path
) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
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
        await gate.started.wait()
        await anyio.wait_all_tasks_blocked()
        gate.release.set()
    assert len(errors) == 4
    assert all(exc is gate.error for exc in errors)
    assert gate.calls == 1
    assert "k" not in cache
    assert others(tmp_path) == set() and not locks_held(tmp_path)  # the key's lock was released
    assert cache.statistics()["load_errors"] == 1
    assert await cache.get_or_load("k", value_of(b"fresh")) == b"fresh"


@pytest.mark.anyio
async def test_cancelled_loader_hands_over_to_a_waiter(lock_kind: str, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    calls = 0
    first_started = anyio.Event()

    async def load() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            first_started.set()
            await anyio.sleep_forever()  # the first loader hangs until cancelled
        return b"second"

    results: list[bytes] = []

    async def ask() -> None:
        results.append(await cache.get_or_load("k", load))

    loader_scope = anyio.CancelScope()

    async def first() -> None:
        with loader_scope:
            await cache.get_or_load("k", load)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await first_started.wait()
        for _ in range(3):
            tg.start_soon(ask)
        await anyio.wait_all_tasks_blocked()
        assert calls == 1
        loader_scope.cancel()
    assert results == [b"second"] * 3
    assert calls == 2  # the lock the cancelled loader held was released for the next one
    assert await cache.get_or_load("k", never) == b"second"
    assert others(tmp_path) == set() and not locks_held(tmp_path)


@pytest.mark.anyio
async def test_cancelled_waiter_does_not_disturb_the_load(lock_kind: str, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    gate = Gate(b"v")
    results: list[bytes] = []

    async def ask() -> None:
        results.append(await cache.get_or_load("k", gate.load))

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask)
        await gate.started.wait()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await cache.get_or_load("k", gate.load)
        assert scope.cancelled_caught
        gate.release.set()
    assert results == [b"v"]
    assert gate.calls == 1


# -- single flight across processes ----------------------------------------------------------


@pytest.mark.anyio
async def test_a_second_process_waits_for_the_first_ones_load(
    lock_kind: str, tmp_path: Path
) -> None:
    first = DiskCache(tmp_path, max_bytes=10_000)
    second = DiskCache(tmp_path, max_bytes=10_000)  # its own flights and lock files
    third = DiskCache(tmp_path, max_bytes=10_000)
    gate = Gate(b"from the first")
    got: list[bytes] = []

    async def ask_second() -> None:
        got.append(await second.get_or_load("k", never))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first.get_or_load, "k", gate.load)
        await gate.started.wait()  # the first holds the key's lock, loading
        tg.start_soon(ask_second)
        await until(lambda: second.statistics()["lock_waits"] == 1)

        # A waiter in another process can be cancelled while the load goes on (were the
        # thread blocked in flock not abandoned, this would hang until fail_after).
        with anyio.fail_after(10):
            async with anyio.create_task_group() as inner:
                inner.start_soon(third.get_or_load, "k", never)
                await until(lambda: third.statistics()["lock_waits"] == 1)
                inner.cancel_scope.cancel()
        assert gate.calls == 1
        gate.release.set()
    assert got == [b"from the first"]
    stats = second.statistics()
    assert (stats["hits"], stats["misses"], stats["lock_waits"]) == (1, 0, 1)
    assert await third.get_or_load("k", never) == b"from the first"


def _record_call(calls: str, key: str) -> None:
    # One file per source call, named by key and process: the parent counts them.
    open(os.path.join(calls, f"{key.replace('/', '_')}.{os.getpid()}"), "x").close()


def _share_worker(path: str, calls: str, order: str, barrier: Any) -> None:
    """One of the processes of test_two_processes_fetch_each_object_once."""

    async def main() -> None:
        cache = al.DiskCache(path, max_bytes=1 << 30)
        keys = [f"obj/{i}" for i in range(50)]
        if order == "reversed":
            keys.reverse()

        def load_for(key: str) -> Callable[[], Awaitable[bytes]]:
            async def load() -> bytes:
                _record_call(calls, key)
                await anyio.lowlevel.checkpoint()
                return payload(key, 4096)

            return load

        results: dict[str, bytes] = {}

        async def get(key: str) -> None:
            results[key] = await cache.get_or_load(key, load_for(key))

        barrier.wait()
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(get, key)
        for key in keys:
            if results[key] != payload(key, 4096):
                raise SystemExit(f"wrong value for {key}")

    anyio.run(main)


def test_two_processes_fetch_each_object_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    calls = tmp_path / "calls"
    calls.mkdir()
    barrier = ctx.Barrier(2)
    workers = [
        ctx.Process(target=_share_worker, args=(str(tmp_path / "c"), str(calls), order, barrier))
        for order in ("forward", "reversed")
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    made = sorted(p.name.rsplit(".", 1)[0] for p in calls.iterdir())
    assert made == sorted(f"obj_{i}" for i in range(50))  # each object fetched exactly once
    assert len(entries(tmp_path / "c")) == 50
    assert others(tmp_path / "c") == set() and not locks_held(tmp_path / "c")


_HOLDER = """
import sys, anyio
import asyncload.disk_cache as dc
dc._key_lock = {"range": dc._RangeLock, "file": dc._FileLock}[sys.argv[2]]
cache = dc.DiskCache(sys.argv[1], max_bytes=1 << 20)

async def load():
    print("loading", flush=True)
    await anyio.sleep_forever()

anyio.run(cache.get_or_load, "k", load)
"""


def test_a_process_killed_while_loading_leaves_its_key_free(lock_kind: str, tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path), lock_kind], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"loading\n"
        assert locks_held(tmp_path)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    cache = DiskCache(tmp_path, max_bytes=10_000)

    async def load_it() -> bytes:
        with anyio.fail_after(10):
            return await cache.get_or_load("k", value_of(b"mine"))

    assert anyio.run(load_it) == b"mine"
    assert cache.statistics()["lock_waits"] == 0
    assert others(tmp_path) == set() and not locks_held(tmp_path)


def test_range_locks_belong_to_their_open_file(tmp_path: Path) -> None:
    """Two locks on one key exclude each other in one process too (no single flight across
    ``DiskCache`` objects relies on being in another process); keys do not share a lock."""
    if disk_cache._key_lock is not disk_cache._RangeLock:
        pytest.skip("open file description locks are Linux-only")
    names = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    first = disk_cache._RangeLock.acquire(str(tmp_path), names[0], blocking=False)
    assert first is not None
    assert disk_cache._RangeLock.acquire(str(tmp_path), names[0], blocking=False) is None
    others_ = [disk_cache._RangeLock.acquire(str(tmp_path), n, blocking=False) for n in names[1:]]
    assert all(lock is not None for lock in others_)
    first.release()
    first.release()  # idempotent
    again = disk_cache._RangeLock.acquire(str(tmp_path), names[0], blocking=False)
    assert again is not None
    for lock in [again, *others_]:
        assert lock is not None
        lock.release()
    assert not locks_held(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks"]  # nothing made per key


# -- budget and eviction ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_evicts_least_recently_used_also_after_a_restart(tmp_path: Path) -> None:
    size = entry_size("a", 100)
    cache = DiskCache(tmp_path, max_bytes=3 * size, evict_to=1.0)
    source = Source()
    for key in ("a", "b", "c", "a", "d"):  # "a" was used after "b"
        await cache.get_or_load(key, source.load(key))
    assert {k for k in "abcde" if k in cache} == {"a", "c", "d"}
    assert cache.statistics()["evictions"] == 1

    # A restarted run sees the order through the entries' mtimes.
    restarted = DiskCache(tmp_path, max_bytes=3 * size, evict_to=1.0)
    await restarted.get_or_load("c", never)
    await restarted.get_or_load("e", source.load("e"))
    assert {k for k in "abcde" if k in restarted} == {"c", "d", "e"}
    assert restarted.statistics()["evictions"] == 1
    assert source.calls == ["a", "b", "c", "d", "e"]


@pytest.mark.anyio
async def test_eviction_makes_headroom_down_to_evict_to(tmp_path: Path) -> None:
    keys = [f"k{i:02}" for i in range(16)]  # all entries the same size
    size = entry_size(keys[0], 100)
    cache = DiskCache(tmp_path, max_bytes=10 * size, evict_to=0.5)
    source = Source()
    for key in keys[:10]:
        await cache.get_or_load(key, source.load(key))
    assert cache.statistics()["evictions"] == 0
    await cache.get_or_load(keys[10], source.load(keys[10]))
    # Room for the new entry within half the budget: the six oldest go at once...
    assert cache.statistics()["evictions"] == 6
    assert [key in cache for key in keys[:11]] == [False] * 6 + [True] * 5
    for key in keys[11:]:  # ...so the next five inserts evict nothing
        await cache.get_or_load(key, source.load(key))
    assert cache.statistics()["evictions"] == 6
    assert sum(entries(tmp_path).values()) == 10 * size


@pytest.mark.anyio
async def test_value_larger_than_the_budget_is_returned_but_not_stored(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=200)
    await cache.get_or_load("small", value_of(b"1234"))
    source = Source(size=500)
    assert await cache.get_or_load("big", source.load("big")) == payload("big", 500)
    assert "big" not in cache and "small" in cache  # nothing was evicted for it
    stats = cache.statistics()
    assert (stats["uncached"], stats["evictions"]) == (1, 0)
    assert others(tmp_path) == set() and not locks_held(tmp_path)
    await cache.get_or_load("big", source.load("big"))
    assert source.calls == ["big", "big"]


operations = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1),  # which of two caches ("processes")
        st.integers(min_value=0, max_value=11),  # key
        st.integers(min_value=0, max_value=120),  # payload size
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(
    ops=operations,
    max_bytes=st.integers(min_value=1, max_value=400),
    evict_to=st.sampled_from([0.5, 0.9, 1.0]),
)
def test_budget_is_never_exceeded_on_disk(
    ops: list[tuple[int, int, int]], max_bytes: int, evict_to: float
) -> None:
    with tempfile.TemporaryDirectory() as path:
        caches = [DiskCache(path, max_bytes=max_bytes, evict_to=evict_to) for _ in range(2)]

        async def main() -> None:
            sizes: dict[int, int] = {}  # size of the value last served for each key
            for which, key, size in ops:
                cache = caches[which]
                was_cached = key in cache
                value = await cache.get_or_load(key, value_of(bytes([key]) * size))
                assert value == bytes([key]) * (sizes[key] if was_cached else size)
                sizes[key] = len(value)
                on_disk = entries(path)
                assert sum(on_disk.values()) <= max_bytes
                stats = caches[1 - which].statistics()  # the ledger is shared
                assert (stats["bytes"], stats["items"]) == (sum(on_disk.values()), len(on_disk))
                assert others(path) == set() and not locks_held(path)
                # What was just served stays stored, unless it alone is over the budget.
                fits = entry_size(key, len(value)) <= max_bytes
                assert (key in cache) == fits

        anyio.run(main)


@pytest.mark.anyio
async def test_clear_deletes_entries_and_keeps_counters(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    source = Source()
    for key in "abc":
        await cache.get_or_load(key, source.load(key))
    cache.clear()
    assert entries(tmp_path) == {}
    stats = cache.statistics()
    assert (stats["items"], stats["bytes"], stats["misses"]) == (0, 0, 3)
    await cache.get_or_load("a", source.load("a"))
    assert source.calls == ["a", "b", "c", "a"]


# -- damaged and half-written entries --------------------------------------------------------


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _truncate(path: str, size: int) -> None:
    os.truncate(path, size)


def _append(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"junk")


DAMAGE: dict[str, Callable[[DiskCache, str], None]] = {
    "payload byte flipped": lambda cache, path: _flip(path, os.path.getsize(path) - 7),
    "key byte flipped": lambda cache, path: _flip(path, HEADER + 1),
    "length field flipped": lambda cache, path: _flip(path, 12),
    "magic flipped": lambda cache, path: _flip(path, 0),
    "last byte cut": lambda cache, path: _truncate(path, os.path.getsize(path) - 1),
    "header only": lambda cache, path: _truncate(path, HEADER),
    "half a header": lambda cache, path: _truncate(path, 10),
    "empty": lambda cache, path: _truncate(path, 0),
    "bytes appended": lambda cache, path: _append(path),
    "another key's entry": lambda cache, path: os.replace(cache.path_of("other"), path),
}


@pytest.mark.anyio
async def test_damaged_entries_are_detected_deleted_reloaded_and_counted(
    lock_kind: str, tmp_path: Path
) -> None:
    cache = DiskCache(tmp_path, max_bytes=100_000)
    source = Source()
    for n, (what, damage) in enumerate(DAMAGE.items(), 1):
        key = f"key {n}"
        await cache.get_or_load("other", value_of(payload("other")))
        await cache.get_or_load(key, source.load(key))
        damage(cache, cache.path_of(key))
        source.calls.clear()
        assert await cache.get_or_load(key, source.load(key)) == payload(key), what
        assert source.calls == [key], what  # reloaded, not served
        assert cache.statistics()["corrupt"] == n, what
        assert await cache.get_or_load(key, never) == payload(key), what  # stored again
    on_disk = entries(tmp_path)
    assert cache.statistics()["bytes"] == sum(on_disk.values())
    assert others(tmp_path) == set() and not locks_held(tmp_path)


_WRITER = """
import sys, anyio, asyncload as al
path, count = sys.argv[1], int(sys.argv[2])

def payload(i):
    return bytes([i % 251]) * (2 << 20) + i.to_bytes(4, "little")

async def store(cache, i):
    async def load():
        return payload(i)
    await cache.get_or_load(i, load)
    print(i, flush=True)

async def main():
    # Eight writes in flight: whenever one reports, others are part-way through theirs.
    cache = al.DiskCache(path, max_bytes=1 << 40)
    limit = anyio.Semaphore(8)
    async def one(i):
        async with limit:
            await store(cache, i)
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)

anyio.run(main)
"""


def test_a_killed_writer_leaves_whole_entries_or_none(tmp_path: Path) -> None:
    def expected(i: int) -> bytes:
        return bytes([i % 251]) * (2 << 20) + i.to_bytes(4, "little")

    seed = random.randrange(1 << 30)
    rounds = random.Random(seed).randint(2, 6)
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path), "200"],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    assert child.stdout is not None
    for _ in range(rounds):  # let it store a few entries, then kill it wherever it is
        assert child.stdout.readline(), f"writer died early (seed {seed})"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()

    cache = DiskCache(tmp_path, max_bytes=1 << 40)

    async def check() -> int:
        present = 0
        for i in range(200):
            if i in cache:
                present += 1
                assert await cache.get_or_load(i, never) == expected(i), f"seed {seed}"
        return present

    present = anyio.run(check)
    assert present >= rounds, f"seed {seed}"
    assert cache.statistics()["corrupt"] == 0, f"seed {seed}"
    # What the killed writer left (a temp file, a lock file) goes at the next scan: make an
    # insert need room.
    tight = DiskCache(tmp_path, max_bytes=sum(entries(tmp_path).values()) + 1)
    anyio.run(tight.get_or_load, "trigger", value_of(b"x" * 100))
    assert others(tmp_path) == set() and not locks_held(tmp_path), f"seed {seed}"
    assert tight.statistics()["bytes"] == sum(entries(tmp_path).values())


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid is free
    return process.pid


@pytest.mark.anyio
async def test_scans_delete_files_of_dead_writers_and_unheld_locks(tmp_path: Path) -> None:
    dead_temp = tmp_path / f"{'a' * 64}.{_dead_pid()}.0123abcd.tmp"
    live_temp = tmp_path / f"{'b' * 64}.{os.getpid()}.0123abcd.tmp"  # being written now
    loose_lock = tmp_path / f"{'c' * 64}.lock"
    for path in (dead_temp, live_temp, loose_lock):
        path.write_bytes(b"partial")
    size = entry_size("k0", 100)
    cache = DiskCache(tmp_path, max_bytes=2 * size, evict_to=1.0)
    source = Source()
    for key in ("k0", "k1", "k2"):  # the third insert needs room: a scan
        await cache.get_or_load(key, source.load(key))
    assert others(tmp_path) == {live_temp.name}
    assert cache.statistics()["evictions"] == 1


def refuse_writes(monkeypatch: pytest.MonkeyPatch, directory: Path, code: int) -> None:
    """Make ``directory`` answer as a read-only (EROFS) or full (ENOSPC) file system would:
    no new file, no write, no delete or rename. (A fake at the system-call boundary: a real
    read-only or full mount needs privileges the test machines may lack.)"""
    inside = str(directory) + os.sep

    def refused(path: Any) -> OSError:
        return OSError(code, os.strerror(code), os.fspath(path))

    real_open, real_unlink, real_replace = os.open, os.unlink, os.replace

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        # Full: no new files. Read-only: nothing opened for writing.
        full = code != errno.EROFS
        if os.fspath(path).startswith(inside) and writes and not (full and os.path.exists(path)):
            raise refused(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if code == errno.EROFS and os.fspath(path).startswith(inside):
            raise refused(path)
        real_unlink(path, *args, **kwargs)

    def fake_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if code == errno.EROFS and os.fspath(dst).startswith(inside):
            raise refused(dst)
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "unlink", fake_unlink)
    monkeypatch.setattr(os, "replace", fake_replace)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS], ids=["ENOSPC", "EDQUOT", "EROFS"]
)
async def test_a_directory_that_takes_no_new_files_still_serves(
    lock_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Out of inodes or quota, or read-only: hits are served, a miss is loaded and returned
    (a write error), and a damaged entry is loaded again, never served."""
    cache = DiskCache(tmp_path, max_bytes=100_000)
    source = Source()
    for key in ("good", "damaged"):
        await cache.get_or_load(key, source.load(key))
    _flip(cache.path_of("damaged"), entry_size("damaged", 100) - 7)
    source.calls.clear()
    refuse_writes(monkeypatch, tmp_path, code)
    assert await cache.get_or_load("good", never) == payload("good")
    assert await cache.get_or_load("new", source.load("new")) == payload("new")
    assert await cache.get_or_load("damaged", source.load("damaged")) == payload("damaged")
    assert source.calls == ["new", "damaged"]
    stats = cache.statistics()
    assert (stats["hits"], stats["misses"], stats["corrupt"]) == (1, 2 + 2, 1)
    assert stats["write_errors"] == 2


@pytest.mark.anyio
async def test_a_store_that_fails_still_returns_the_value(
    lock_kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    (tmp_path / "usage").mkdir()  # the ledger cannot be opened: every store fails
    source = Source()
    with caplog.at_level(logging.WARNING, logger="asyncload"):
        assert await cache.get_or_load("k", source.load("k")) == payload("k")
        assert await cache.get_or_load("k", source.load("k")) == payload("k")
    assert source.calls == ["k", "k"]
    stats = cache.statistics()
    assert (stats["write_errors"], stats["misses"], stats["items"]) == (2, 2, 0)
    assert entries(tmp_path) == {} and others(tmp_path) == set() and not locks_held(tmp_path)
    assert len([r for r in caplog.records if "could not store" in r.getMessage()]) == 1


# -- tiers and the Loader --------------------------------------------------------------------


def test_tiered_cache_arguments() -> None:
    with pytest.raises(ValueError, match="at least one tier"):
        TieredCache()
    with pytest.raises(TypeError, match="tier 1"):
        TieredCache(LRUCache(), object())  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_memory_over_disk_over_source(tmp_path: Path) -> None:
    memory = LRUCache(max_items=10)
    disk = DiskCache(tmp_path, max_bytes=10_000)
    tiers = TieredCache(memory, disk)
    source = Source()

    assert await tiers.get_or_load("a", source.load("a")) == payload("a")  # miss: both store
    assert "a" in memory and "a" in disk
    assert await tiers.get_or_load("a", never) == payload("a")  # memory hit: disk untouched
    assert (disk.statistics()["hits"], disk.statistics()["misses"]) == (0, 1)
    memory.clear()
    assert await tiers.get_or_load("a", never) == payload("a")  # disk hit, promoted
    assert "a" in memory
    assert await tiers.get_or_load("a", never) == payload("a")
    assert source.calls == ["a"]

    stats = tiers.statistics()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (3, 1, 0.75)
    mem_stats, disk_stats = stats["tiers"]
    assert (mem_stats["hits"], mem_stats["misses"]) == (2, 2)
    assert (disk_stats["hits"], disk_stats["misses"], disk_stats["items"]) == (1, 1, 1)

    async def broken() -> bytes:
        raise ConnectionResetError("down")

    with pytest.raises(ConnectionResetError):
        await tiers.get_or_load("b", broken)
    assert "b" not in memory and "b" not in disk
    assert tiers.statistics()["misses"] == 2

    tiers.clear()
    assert len(memory) == 0 and entries(tmp_path) == {}


class Remote(al.AsyncDataset[bytes]):
    """A counting remote store: object ``obj/i`` is ``payload("obj/i")``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> bytes:
        self.calls += 1
        return payload(self.key_of(index))

    def key_of(self, index: int) -> str:
        return f"obj/{normalize_index(index, self.n)}"


async def _epoch(loader: al.Loader) -> list[Any]:
    return [batch async for batch in loader]


@pytest.mark.anyio
async def test_loader_over_tiers_calls_the_source_once_also_across_runs(tmp_path: Path) -> None:
    n = 24

    def decode(blob: bytes) -> np.ndarray:
        return np.frombuffer(blob, np.uint8)

    expected = np.stack([decode(payload(f"obj/{i}")) for i in range(n)])

    def build(dataset: Remote) -> tuple[al.Loader, TieredCache]:
        tiers = TieredCache(LRUCache(max_bytes=1 << 20), DiskCache(tmp_path, max_bytes=1 << 20))
        # The tiers cache what the source returns; the transform runs on every sample.
        return al.Loader(dataset, batch_size=8, cache=tiers, transform=decode), tiers

    remote = Remote(n)
    loader, tiers = build(remote)
    for epoch in range(2):
        batches = await _epoch(loader)
        assert np.array_equal(np.concatenate(batches), expected)
        assert remote.calls == n  # epoch 2 called the source zero times
        stats = loader.statistics()  # per epoch
        assert (stats["cache_misses"], stats["cache_hits"]) == ((0, n) if epoch else (n, 0))
    await loader.aclose()

    # A restarted run: new dataset, loader and memory tier over the same directory.
    remote = Remote(n)
    loader, tiers = build(remote)
    assert np.array_equal(np.concatenate(await _epoch(loader)), expected)
    await loader.aclose()
    assert remote.calls == 0
    stats = loader.statistics()
    assert (stats["cache_misses"], stats["cache_hits"]) == (0, n)
    mem_stats, disk_stats = tiers.statistics()["tiers"]
    assert (mem_stats["misses"], disk_stats["hits"], disk_stats["misses"]) == (n, n, 0)


class Unkeyed(al.AsyncDataset[bytes]):
    """A counting dataset without ``key_of``: sample ``i`` is ``payload(f"{name}/{i}")``."""

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> bytes:
        self.calls += 1
        return payload(f"{self.name}/{normalize_index(index, self.n)}")


@pytest.mark.anyio
async def test_a_dataset_without_keys_is_cached_for_its_own_copies_only(tmp_path: Path) -> None:
    n = 6
    first = Unkeyed("first", n)
    # Pickled before any lookup, as the DataLoader sends a dataset to its workers.
    worker = pickle.loads(pickle.dumps(first))

    def loader(dataset: Unkeyed) -> al.Loader:
        cache = DiskCache(tmp_path, max_bytes=1 << 20)  # one per process, one directory
        return al.Loader(dataset, batch_size=None, cache=cache)

    expected = [payload(f"first/{i}") for i in range(n)]
    assert await _epoch(loader(first)) == expected
    assert await _epoch(loader(worker)) == expected and worker.calls == 0  # shared entries
    # Another dataset in the same directory and namespace gets its own values, never the
    # first one's under a bare index.
    second = Unkeyed("second", n)
    assert await _epoch(loader(second)) == [payload(f"second/{i}") for i in range(n)]
    # A restarted run builds its dataset again: an index names nothing across runs (the
    # data may have changed), so it fetches again rather than trust the old entries.
    restarted = Unkeyed("first", n)
    assert await _epoch(loader(restarted)) == expected and restarted.calls == n


@pytest.mark.anyio
async def test_file_sources_are_cached_by_absolute_path_also_across_runs(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
        for i in range(3):
            (root / f"{i}.bin").write_bytes(payload(f"{root.name}/{i}"))

    def loader(root: Path) -> tuple[al.Loader, DiskCache]:
        cache = DiskCache(tmp_path / "cache", max_bytes=1 << 20)
        return al.Loader(FileSource.from_directory(root), batch_size=None, cache=cache), cache

    for root in roots:  # the same relative names under two roots: two sets of entries
        load, _ = loader(root)
        assert await _epoch(load) == [payload(f"{root.name}/{i}") for i in range(3)]
    load, cache = loader(roots[0])  # a restarted run over the same root: all hits
    assert await _epoch(load) == [payload(f"a/{i}") for i in range(3)]
    assert (cache.statistics()["hits"], cache.statistics()["misses"]) == (3, 0)


# -- pickling --------------------------------------------------------------------------------


def test_copies_pickle_share_the_directory_and_bind_no_event_loop(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    assert anyio.run(cache.get_or_load, "a", value_of(b"A"), backend="asyncio") == b"A"
    copy = pickle.loads(pickle.dumps(cache))
    assert anyio.run(copy.get_or_load, "a", never, backend="trio") == b"A"
    assert anyio.run(cache.get_or_load, "a", never, backend="trio") == b"A"
    tiers = pickle.loads(pickle.dumps(TieredCache(LRUCache(), cache)))
    assert anyio.run(tiers.get_or_load, "a", never) == b"A"


@pytest.mark.anyio
async def test_pickles_without_its_loads_in_flight(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000)
    gate = Gate(b"v")
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.get_or_load, "k", gate.load)
        await gate.started.wait()
        copy = pickle.loads(pickle.dumps(cache))
        assert cache.statistics()["in_flight"] == 1
        assert copy.statistics()["in_flight"] == 0
        gate.release.set()
    assert await copy.get_or_load("k", never) == b"v"
