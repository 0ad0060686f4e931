"""The Loader: batching and collation, lengths, shuffling, ordering, concurrency and
backpressure, leaving early, statistics, state_dict round trips, argument checks, streams.

Ordering is forced with events (never sleeps): datasets whose fetches wait on per-index
events that the test sets in a chosen order.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import numpy as np
import pytest
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al

pytestmark = pytest.mark.anyio


# -- datasets -----------------------------------------------------------------------------


class Indexed(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``. Fetches finish out of index order (a fixed number of
    checkpoints per index); ``calls`` counts them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        self.calls += 1
        for _ in range((index * 7) % 5):
            await anyio.lowlevel.checkpoint()
        return index


class Gated(al.AsyncDataset[int]):
    """Fetch ``i`` waits until the test calls ``release(i)``. Events are made lazily, in the
    running loop; ``started`` fires once ``expect`` fetches are waiting."""

    def __init__(self, n: int, expect: int) -> None:
        self.n = n
        self.expect = expect
        self._gates: dict[int, anyio.Event] = {}
        self._done: dict[int, anyio.Event] = {}
        self._started: anyio.Event | None = None
        self.waiting = 0
        self.completed: list[int] = []

    def _event(self, table: dict[int, anyio.Event], index: int) -> anyio.Event:
        if index not in table:
            table[index] = anyio.Event()
        return table[index]

    @property
    def started(self) -> anyio.Event:
        if self._started is None:
            self._started = anyio.Event()
        return self._started

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        self.waiting += 1
        if self.waiting == self.expect:
            self.started.set()
        await self._event(self._gates, index).wait()
        self.completed.append(index)
        self._event(self._done, index).set()
        return index

    def open(self, index: int) -> None:
        """Let fetch ``index`` finish (whether or not it has started)."""
        self._event(self._gates, index).set()

    async def release(self, index: int) -> None:
        """Let fetch ``index`` finish, and wait until it has."""
        self._event(self._gates, index).set()
        await self._event(self._done, index).wait()


class Counting(al.AsyncDataset[int]):
    """Counts started fetches and the most ever in flight. Until ``gate`` is set, fetches
    wait on it. ``batched=True`` overrides ``getitems`` (the Loader then fetches chunks)."""

    def __init__(self, n: int, *, gated: bool = False) -> None:
        self.n = n
        self.gated = gated
        self.started = 0
        self.active = 0
        self.max_active = 0
        self._gate: anyio.Event | None = None

    @property
    def gate(self) -> anyio.Event:
        if self._gate is None:
            self._gate = anyio.Event()
        return self._gate

    def __len__(self) -> int:
        return self.n

    async def _fetch(self, indices: list[int]) -> list[int]:
        self.started += len(indices)
        self.active += len(indices)
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gated:
                await self.gate.wait()
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            return indices
        finally:
            self.active -= len(indices)

    async def __getitem__(self, index: int) -> int:
        return (await self._fetch([index]))[0]


class CountingBatched(Counting):
    async def getitems(self, indices: Any) -> list[int]:
        return await self._fetch(list(indices))


class Hanging(al.AsyncDataset[int]):
    """Indices below ``free`` answer at once; the others wait forever (until cancelled),
    counted in ``hung`` and ``cancelled``."""

    def __init__(self, n: int, free: int) -> None:
        self.n = n
        self.free = free
        self.hung = 0
        self.cancelled = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index < self.free:
            await anyio.lowlevel.checkpoint()
            return index
        self.hung += 1
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


class Numbers(al.AsyncIterableDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.n):
            await anyio.lowlevel.checkpoint()
            yield i


# -- helpers ------------------------------------------------------------------------------


def flat(batches: list[Any]) -> list[int]:
    return [int(x) for batch in batches for x in batch]


def as_lists(batches: list[Any]) -> list[list[int]]:
    return [[int(x) for x in batch] for batch in batches]


async def collect(loader: al.Loader) -> list[Any]:
    """One epoch, then ``aclose()`` so that nothing waits for garbage collection."""
    batches = [batch async for batch in loader]
    await loader.aclose()
    return batches


async def take(iterator: Any, k: int) -> list[Any]:
    return [await iterator.__anext__() for _ in range(k)]


async def settle(live: Callable[[], set[object]], baseline: set[object], rounds: int = 50) -> None:
    """A few checkpoints, until the tasks alive are back to ``baseline``."""
    for _ in range(rounds):
        if live() <= baseline:
            return
        await anyio.lowlevel.checkpoint()


# -- batching and collation ---------------------------------------------------------------


async def test_numpy_samples_are_stacked() -> None:
    samples = [np.arange(3, dtype=np.float32) + i for i in range(10)]
    batches = await collect(al.Loader(al.from_sequence(samples), batch_size=4))
    assert [b.shape for b in batches] == [(4, 3), (4, 3), (2, 3)]
    assert all(isinstance(b, np.ndarray) and b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), np.stack(samples))


async def test_nested_samples_are_collated_recursively() -> None:
    samples = [
        {"x": np.full(2, i), "meta": (i, f"name{i}".encode()), "label": f"l{i}", "f": i / 2}
        for i in range(5)
    ]
    batches = await collect(al.Loader(al.from_sequence(samples), batch_size=3))
    assert len(batches) == 2
    first = batches[0]
    assert set(first) == {"x", "meta", "label", "f"}
    np.testing.assert_array_equal(first["x"], [[0, 0], [1, 1], [2, 2]])
    ids, names = first["meta"]
    assert isinstance(first["meta"], tuple)
    np.testing.assert_array_equal(ids, [0, 1, 2])
    assert names == [b"name0", b"name1", b"name2"]
    assert first["label"] == ["l0", "l1", "l2"]
    np.testing.assert_allclose(first["f"], [0.0, 0.5, 1.0])
    assert batches[1]["label"] == ["l3", "l4"]


async def test_custom_collate_fn_and_transform() -> None:
    async def transform(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return x * 10

    loader = al.Loader(
        al.from_sequence(list(range(7))), batch_size=3, transform=transform, collate_fn=tuple
    )
    assert await collect(loader) == [(0, 10, 20), (30, 40, 50), (60,)]
    loader = al.Loader(al.from_sequence([1, 2]), batch_size=2, transform=str, collate_fn=list)
    assert await collect(loader) == [["1", "2"]]


async def test_batch_size_none_yields_single_samples() -> None:
    samples = [np.arange(3) + i for i in range(5)]
    loader = al.Loader(al.from_sequence(samples), batch_size=None)
    got = await collect(loader)
    assert len(got) == len(loader) == 5
    for sample, expected in zip(got, samples, strict=True):
        assert isinstance(sample, np.ndarray) and sample.shape == (3,)
        np.testing.assert_array_equal(sample, expected)
    loader = al.Loader(al.from_sequence([b"a", b"b"]), batch_size=None)
    assert await collect(loader) == [b"a", b"b"]


@pytest.mark.parametrize("drop_last", [False, True])
async def test_drop_last(drop_last: bool) -> None:
    loader = al.Loader(al.from_sequence(list(range(10))), batch_size=4, drop_last=drop_last)
    batches = as_lists(await collect(loader))
    expected = [[0, 1, 2, 3], [4, 5, 6, 7]] + ([] if drop_last else [[8, 9]])
    assert batches == expected
    assert len(loader) == len(expected)


@pytest.mark.parametrize(
    ("n", "batch_size", "world_size", "drop_last"),
    [
        (10, 3, 1, False),
        (10, 3, 1, True),
        (10, 3, 3, False),
        (10, 3, 3, True),
        (11, 2, 4, False),
        (11, 2, 4, True),
        (3, 5, 4, False),
        (3, 5, 4, True),
        (0, 2, 1, False),
        (16, 4, 2, False),
        (7, None, 2, False),
        (7, None, 2, True),
    ],
)
async def test_len_equals_batches_produced(
    n: int, batch_size: int | None, world_size: int, drop_last: bool
) -> None:
    all_samples = []
    for rank in range(world_size):
        loader = al.Loader(
            al.from_sequence(list(range(n))),
            batch_size=batch_size,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
        )
        batches = await collect(loader)
        assert len(batches) == len(loader)
        all_samples.append([int(x) for x in batches] if batch_size is None else flat(batches))
    counts = {len(s) for s in all_samples}
    assert len(counts) == 1, "every rank gets the same number of samples"
    if not drop_last:
        assert {i for s in all_samples for i in s} == set(range(n))


# -- order: shuffle, sampler, ordered ------------------------------------------------------


async def test_shuffle_is_reproducible_per_epoch() -> None:
    def build() -> al.Loader:
        return al.Loader(Indexed(50), batch_size=8, shuffle=True, seed=7)

    a, b = build(), build()
    epoch0 = flat(await collect(a))
    assert sorted(epoch0) == list(range(50))
    assert epoch0 != list(range(50))
    assert flat(await collect(b)) == epoch0
    assert flat(await collect(a)) == epoch0  # no set_epoch: the same epoch again
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = flat(await collect(a))
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(50))
    assert flat(await collect(b)) == epoch1
    a.set_epoch(0)
    assert flat(await collect(a)) == epoch0
    other_seed = al.Loader(Indexed(50), batch_size=8, shuffle=True, seed=8)
    assert flat(await collect(other_seed)) != epoch0


async def test_user_sampler() -> None:
    sampler = [5, 3, 3, 0, 9]
    loader = al.Loader(Indexed(10), sampler=sampler, batch_size=2)
    assert as_lists(await collect(loader)) == [[5, 3], [3, 0], [9]]
    assert len(loader) == 3
    # A torch sampler with set_epoch: the loader's epoch reaches it.
    torch_sampler = torch.utils.data.DistributedSampler(
        range(20), num_replicas=1, rank=0, shuffle=True, seed=3
    )
    loader = al.Loader(Indexed(20), sampler=torch_sampler, batch_size=4)
    loader.set_epoch(2)
    got = flat(await collect(loader))
    reference = torch.utils.data.DistributedSampler(
        range(20), num_replicas=1, rank=0, shuffle=True, seed=3
    )
    reference.set_epoch(2)
    assert got == list(reference)


async def test_ordered_output_follows_sampler_not_completion() -> None:
    n, batch_size = 6, 2
    ds = Gated(n, expect=batch_size)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=n, ordered=True)
    got: list[list[int]] = []

    async def consume() -> None:
        async for batch in loader:
            got.append([int(x) for x in batch])

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        # The first batch's fetches go out first (slow start), the rest once they are done.
        await ds.started.wait()
        await ds.release(1)
        await ds.release(0)
        await anyio.wait_all_tasks_blocked()
        assert ds.waiting == n
        for i in reversed(range(batch_size, n)):
            await ds.release(i)
    await loader.aclose()
    assert ds.completed == [1, 0, 5, 4, 3, 2]
    assert got == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("batch_size", [1, 2])
async def test_unordered_output_follows_completion(batch_size: int) -> None:
    n = 6
    # The first batch's fetches, and at least two, go out alone (slow start): they
    # complete first.
    alone = max(2, batch_size)
    first = list(reversed(range(alone)))
    rest = [i for i in [3, 0, 5, 1, 4, 2] if i >= alone]
    ds = Gated(n, expect=alone)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=n, ordered=False, prefetch=n)
    got: list[list[int]] = []

    async def consume() -> None:
        async for batch in loader:
            got.append([int(x) for x in batch])

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await ds.started.wait()
        for i in first:
            await ds.release(i)
        await anyio.wait_all_tasks_blocked()
        assert ds.waiting == n
        for i in rest:
            await ds.release(i)
    await loader.aclose()
    release_order = first + rest
    assert ds.completed == release_order
    expected = [release_order[i : i + batch_size] for i in range(0, n, batch_size)]
    assert got == expected


async def test_unordered_drop_last_drops_the_sampler_tail() -> None:
    """ordered=False changes the order, not which samples an epoch holds: with drop_last,
    the samples dropped are the tail of the sampler order (as torch's DataLoader with
    in_order=False), even when the tail completes first."""
    n, batch_size = 7, 3
    ds = Gated(n, expect=batch_size)
    loader = al.Loader(ds, batch_size=batch_size, drop_last=True, concurrency=n, ordered=False)
    got: list[list[int]] = []

    async def consume() -> None:
        async for batch in loader:
            got.append([int(x) for x in batch])

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await ds.started.wait()  # the first batch's fetches (slow start)
        for i in [*reversed(range(batch_size)), *reversed(range(batch_size, n))]:
            ds.open(i)
            await anyio.wait_all_tasks_blocked()
    await loader.aclose()
    assert ds.waiting == n - 1  # the tail past the last whole batch was never fetched
    assert len(got) == len(loader) == 2
    assert sorted(flat(got)) == list(range(6))


# -- concurrency and backpressure -----------------------------------------------------------


async def test_slow_start_first_batch_goes_out_alone() -> None:
    """An epoch starts with the first batch's fetches alone (so their requests are not
    queued behind every other fetch's connection setup), and the rest of the concurrency
    joins once as many fetches have completed, whichever they were: a straggler among
    the first holds nothing up."""
    n, batch_size, concurrency = 40, 4, 12
    ds = Gated(n, expect=batch_size)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=concurrency, prefetch=10)
    got: list[int] = []

    async def consume() -> None:
        async for batch in loader:
            got.extend(int(x) for x in batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await ds.started.wait()
        await anyio.wait_all_tasks_blocked()
        assert ds.waiting == batch_size  # samples 0-3 only
        for i in (1, 2, 3):  # 0 straggles
            await ds.release(i)
        await anyio.wait_all_tasks_blocked()
        # Their workers went on to samples 4-6; three completions are not yet four.
        assert ds.waiting == batch_size + 3
        await ds.release(4)
        await anyio.wait_all_tasks_blocked()
        assert ds.waiting - len(ds.completed) == concurrency
        assert loader.statistics()["in_flight"] == concurrency
        for i in range(n):
            ds.open(i)
    await loader.aclose()
    assert got == list(range(n))
    # Fewer samples than the first batch: its spare workers end the slow start.
    small = al.Loader(Indexed(3), batch_size=4, concurrency=8)
    assert as_lists(await collect(small)) == [[0, 1, 2]]


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "getitems"])
@pytest.mark.parametrize(("concurrency", "batch_size"), [(1, 1), (4, 1), (4, 3), (5, 8), (8, 2)])
async def test_concurrency_bound(concurrency: int, batch_size: int, batched: bool) -> None:
    n = 60
    ds = (CountingBatched if batched else Counting)(n, gated=True)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=concurrency, prefetch=100)
    got: list[int] = []

    async def consume() -> None:
        async for batch in loader:
            got.extend(int(x) for x in batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        # Everything is waiting on the gate: the first batch's fetches (at least two) went
        # out alone (slow start: the rest join once as many have completed).
        assert 0 < ds.active <= concurrency
        if not batched:
            assert ds.active == min(concurrency, max(2, batch_size))
        assert loader.statistics()["in_flight"] == ds.active
        ds.gate.set()
    await loader.aclose()
    assert got == list(range(n))
    assert ds.max_active <= concurrency
    assert ds.started == n


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "getitems"])
@pytest.mark.parametrize(
    ("batch_size", "concurrency", "prefetch"), [(4, 4, 2), (1, 8, 0), (16, 4, 1), (8, 16, 3)]
)
async def test_backpressure_bounds_fetches(
    batch_size: int, concurrency: int, prefetch: int, batched: bool
) -> None:
    n = 2000
    ds = (CountingBatched if batched else Counting)(n)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=concurrency, prefetch=prefetch)
    iterator = loader.__aiter__()
    consumed = 0
    bound_extra = prefetch * batch_size + 4 * concurrency + batch_size  # the ordered window
    for k in (1, 3):
        while consumed < k:
            await iterator.__anext__()
            consumed += 1
        # The consumer stops here: the loader fills its buffers, then waits.
        await anyio.wait_all_tasks_blocked()
        assert ds.started <= consumed * batch_size + bound_extra
        assert ds.started < n
        stats = loader.statistics()
        assert stats["buffered"] <= prefetch
        assert stats["batches"] == consumed
    await iterator.aclose()
    await loader.aclose()


# -- leaving early ---------------------------------------------------------------------------


async def test_break_leaves_no_task_behind(live_tasks: Callable[[], set[object]]) -> None:
    ds = Hanging(100, free=2)
    loader = al.Loader(ds, batch_size=2, concurrency=4)
    baseline = live_tasks()
    async for batch in loader:
        assert [int(x) for x in batch] == [0, 1]
        await anyio.wait_all_tasks_blocked()
        assert ds.hung > 0  # fetches are in flight when we leave
        assert live_tasks() > baseline  # and the check below is not vacuous
        break
    await settle(live_tasks, baseline)
    assert live_tasks() == baseline
    assert ds.cancelled == ds.hung
    await loader.aclose()
    assert live_tasks() == baseline


async def test_exception_in_loop_body_leaves_no_task_behind(
    live_tasks: Callable[[], set[object]],
) -> None:
    ds = Hanging(100, free=4)
    loader = al.Loader(ds, batch_size=2, concurrency=4)
    baseline = live_tasks()
    with pytest.raises(KeyError):
        async for _batch in loader:
            await anyio.wait_all_tasks_blocked()
            assert live_tasks() > baseline
            raise KeyError("in the loop body")
    await loader.aclose()
    assert live_tasks() == baseline
    assert ds.hung > 0
    assert ds.cancelled == ds.hung


async def test_cancelling_the_consumer_leaves_no_task_behind(
    live_tasks: Callable[[], set[object]],
) -> None:
    ds = Hanging(100, free=2)
    loader = al.Loader(ds, batch_size=2, concurrency=4)
    baseline = live_tasks()
    got: list[Any] = []
    first = anyio.Event()

    async def consume() -> None:
        async for batch in loader:
            got.append(batch)
            first.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await first.wait()
        await anyio.wait_all_tasks_blocked()
        assert len(live_tasks() - baseline) >= 2  # the consumer and the loader's
        tg.cancel_scope.cancel()
    await settle(live_tasks, baseline)
    assert live_tasks() == baseline
    assert len(got) == 1
    assert ds.hung > 0
    assert ds.cancelled == ds.hung
    await loader.aclose()
    assert live_tasks() == baseline


async def test_aclose_mid_epoch(live_tasks: Callable[[], set[object]]) -> None:
    ds = Hanging(100, free=2)
    baseline = live_tasks()
    async with al.Loader(ds, batch_size=2, concurrency=4) as loader:
        iterator = loader.__aiter__()
        assert [int(x) for x in await iterator.__anext__()] == [0, 1]
        await anyio.wait_all_tasks_blocked()
    assert live_tasks() == baseline
    assert ds.cancelled == ds.hung > 0


LEAK_CHECK = """
import gc, json, sys, warnings
import anyio
import asyncload as al

scenario, backend, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

async def main():
    loader = al.Loader(al.from_sequence(list(range(10))), batch_size=3)
    if scenario == "whole":
        for _ in range(2):
            count = 0
            async for _batch in loader:
                count += 1
            assert count == 4
    else:
        async for _batch in loader:
            break
    for _ in range(20):
        await anyio.sleep(0)
    del loader
    gc.collect()

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    anyio.run(main, backend=backend, backend_options=options)
    gc.collect()
print(json.dumps([str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]))
"""


@pytest.mark.parametrize("scenario", ["whole", "break"])
@pytest.mark.parametrize(
    ("backend", "options"),
    [("asyncio", {}), ("asyncio", {"use_uvloop": True}), ("trio", {})],
    ids=["asyncio", "uvloop", "trio"],
)
def test_plain_async_for_leaves_nothing_unclosed(
    scenario: str, backend: str, options: dict[str, Any]
) -> None:
    """Plain ``async for`` loops without ``aclose()`` (two whole epochs, or one left by
    ``break``): once the loader is dropped, nothing is reported unclosed (no
    ResourceWarning). Run in a subprocess so that a leak cannot surface in another test."""
    result = subprocess.run(
        [sys.executable, "-c", LEAK_CHECK, scenario, backend, json.dumps(options)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


async def test_an_async_iterator_starts_its_epoch_at_the_first_anext(
    live_tasks: Callable[[], set[object]],
) -> None:
    """``aiter(loader)`` starts nothing and changes no state until the first ``anext``;
    one made before ``close()`` yields nothing."""
    ds = Counting(20)
    loader = al.Loader(ds, batch_size=4)
    resumed_from = al.Loader(Counting(20), batch_size=4)
    batches = iter(resumed_from)
    next(batches)
    resumed_from.close()
    loader.load_state_dict(resumed_from.state_dict())
    state = loader.state_dict()
    baseline = live_tasks()
    iterator = loader.__aiter__()
    await anyio.wait_all_tasks_blocked()
    assert ds.started == 0 and live_tasks() == baseline
    assert loader.state_dict() == state
    loader.close()
    assert [batch async for batch in iterator] == []
    assert flat(await collect(loader)) == list(range(4, 20))  # a new one runs the epoch


AITER_UNUSED = """
import asyncio, sys
import numpy as np
import asyncload as al

async def fetch(x):
    await asyncio.sleep(0)
    return x

loader = al.Loader(al.from_sequence(np.arange(200)).map(fetch), batch_size=10)

async def main(scenario):
    if scenario == "async with":
        async with loader:
            iterator = aiter(loader)
            raise RuntimeError("a bug before the first batch")
    iterator = aiter(loader)
    raise RuntimeError("a bug before the first batch")

try:
    asyncio.run(main(sys.argv[1]))
except RuntimeError:
    pass
"""


@pytest.mark.parametrize("scenario", ["plain", "async with"])
def test_an_async_iterator_never_advanced_leaves_no_warning(scenario: str) -> None:
    """An exception between ``aiter(loader)`` and the first ``anext()``: asyncio.run
    cancelled the eagerly started epoch's tasks before their first step, and their
    coroutines were reported never awaited at exit. (A subprocess, with warnings as
    errors: the report comes at interpreter exit.)"""
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", AITER_UNUSED, scenario],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# -- statistics --------------------------------------------------------------------------------

CONTRACT_KEYS = {
    "samples",
    "batches",
    "in_flight",
    "buffered",
    "errors",
    "skipped",
    "filtered",
    "retries",
    "cache_hits",
    "cache_misses",
    "samples_per_second",
}


async def test_statistics() -> None:
    ds = al.from_sequence(list(range(20))).filter(lambda x: x % 4 != 0)
    loader = al.Loader(ds, batch_size=4)
    before = loader.statistics()
    assert set(before) >= CONTRACT_KEYS
    got = flat(await collect(loader))
    assert got == [x for x in range(20) if x % 4 != 0]
    stats = loader.statistics()
    assert set(stats) >= CONTRACT_KEYS
    assert any("latency" in key or "p50" in key for key in stats), sorted(stats)
    assert stats["samples"] == 15
    assert stats["batches"] == 4
    assert stats["filtered"] == 5
    assert stats["errors"] == stats["skipped"] == stats["retries"] == 0
    assert stats["in_flight"] == 0
    assert stats["buffered"] == 0
    assert stats["samples_per_second"] >= 0
    # Each epoch counts afresh.
    await collect(loader)
    assert loader.statistics()["samples"] == 15


async def test_filtered_samples_are_not_errors() -> None:
    async def keep(x: int) -> bool:
        return x >= 3

    loader = al.Loader(Indexed(8).filter(keep), batch_size=2, on_error="raise")
    assert as_lists(await collect(loader)) == [[3, 4], [5, 6], [7]]
    stats = loader.statistics()
    assert stats["filtered"] == 3
    assert stats["errors"] == 0


# -- state_dict / load_state_dict --------------------------------------------------------------


async def resume_run(
    build: Callable[[], al.Loader], k: int
) -> tuple[list[Any], list[Any], list[Any]]:
    """(uninterrupted epoch, first k batches, batches after resuming from a saved state)."""
    full = as_lists(await collect(build()))
    first_loader = build()
    iterator = first_loader.__aiter__()
    first = as_lists(await take(iterator, k))
    state = first_loader.state_dict()
    assert isinstance(state, dict)
    state = pickle.loads(pickle.dumps(state))
    await iterator.aclose()
    await first_loader.aclose()
    second = build()
    second.load_state_dict(state)
    rest = as_lists(await collect(second))
    return full, first, rest


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["seq", "shuffled"])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
async def test_resume_mid_epoch(ordered: bool, shuffle: bool, k: int) -> None:
    def build() -> al.Loader:
        loader = al.Loader(
            Indexed(23),
            batch_size=4,
            shuffle=shuffle,
            seed=11,
            ordered=ordered,
            concurrency=5,
            rank=1,
            world_size=2,
        )
        loader.set_epoch(2)
        return loader

    full, first, rest = await resume_run(build, k)
    assert len(full) == 3
    if ordered:
        assert first + rest == full
    else:
        # The same samples, none twice, none lost.
        assert sorted(flat(first + rest)) == sorted(flat(full))


async def test_resume_without_set_epoch_on_the_new_loader() -> None:
    """The state carries the epoch: the new loader resumes epoch 3's order."""
    original = al.Loader(Indexed(30), batch_size=5, shuffle=True, seed=1)
    original.set_epoch(3)
    full = as_lists(await collect(original))
    iterator = original.__aiter__()
    first = as_lists(await take(iterator, 2))
    state = original.state_dict()
    await iterator.aclose()
    fresh = al.Loader(Indexed(30), batch_size=5, shuffle=True, seed=1)
    fresh.load_state_dict(state)
    assert first + as_lists(await collect(fresh)) == full


async def test_state_saved_after_set_epoch_is_the_new_epochs_start() -> None:
    """Epoch 0 left early, then set_epoch(1) and a checkpoint: the state must not carry
    epoch 0's positions into epoch 1 (resuming would skip samples of epoch 1)."""

    def build() -> al.Loader:
        return al.Loader(Indexed(20), batch_size=4, shuffle=True, seed=1)

    loader = build()
    iterator = loader.__aiter__()
    await take(iterator, 3)
    await iterator.aclose()
    loader.set_epoch(1)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert (state["epoch"], state["finished"]) == (1, False)
    expected = build()
    expected.set_epoch(1)
    resumed = build()
    resumed.load_state_dict(state)
    assert as_lists(await collect(resumed)) == as_lists(await collect(expected))


async def test_state_after_the_end_resumes_a_full_pass() -> None:
    def build() -> al.Loader:
        return al.Loader(Indexed(10), batch_size=3, shuffle=True, seed=4)

    loader = build()
    full = as_lists(await collect(loader))
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    again = build()
    again.load_state_dict(state)
    assert as_lists(await collect(again)) == full
    # And a state saved before any iteration is a full pass too.
    fresh = build()
    fresh.load_state_dict(build().state_dict())
    assert as_lists(await collect(fresh)) == full


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 6),
    concurrency=st.integers(1, 8),
    ordered=st.booleans(),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    data=st.data(),
)
def test_resume_property(
    n: int,
    batch_size: int,
    concurrency: int,
    ordered: bool,
    shuffle: bool,
    drop_last: bool,
    data: Any,
) -> None:
    def build() -> al.Loader:
        return al.Loader(
            Indexed(n),
            batch_size=batch_size,
            concurrency=concurrency,
            ordered=ordered,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=9,
        )

    total = len(build())
    k = data.draw(st.integers(0, total))
    full, first, rest = anyio.run(resume_run, build, k)
    if ordered:
        assert first + rest == full
    else:
        got = flat(first + rest)
        assert len(got) == len(set(got))
        if drop_last:
            # Which samples fill the dropped partial batch depends on completion order
            # (see test_unordered_drop_last_drops_the_sampler_tail): compare counts.
            assert len(got) == len(flat(full))
            assert set(got) <= set(range(n))
        else:
            assert sorted(got) == sorted(flat(full))


class Sized(Numbers):
    """A stream that knows its size."""

    def num_samples(self) -> int:
        return self.n


@pytest.mark.parametrize(
    ("saved", "resumed", "key", "values"),
    [
        # One file added to a directory: the shuffle deals other samples to each position.
        (
            lambda: al.Loader(Indexed(20), shuffle=True),
            lambda: al.Loader(Indexed(21), shuffle=True),
            "dataset_length",
            ("20", "21"),
        ),
        (
            lambda: al.Loader(Indexed(20), shuffle=True),
            lambda: al.Loader(Indexed(20)),
            "shuffle",
            ("True", "False"),
        ),
        (
            lambda: al.Loader(Indexed(20), world_size=3, rank=1),
            lambda: al.Loader(Indexed(20), world_size=3, rank=1, drop_last=True),
            "drop_last",
            ("False", "True"),
        ),
        (
            lambda: al.Loader(Indexed(20), sampler=[3, 1, 2]),
            lambda: al.Loader(Indexed(20), sampler=[3, 1, 2, 0]),
            "sampler_length",
            ("3", "4"),
        ),
        (
            lambda: al.Loader(Indexed(20), sampler=[3, 1, 2]),
            lambda: al.Loader(Indexed(20), sampler=(3, 1, 2)),
            "sampler",
            ("'list'", "'tuple'"),
        ),
        (
            lambda: al.Loader(Indexed(20), sampler=range(4)),
            lambda: al.Loader(Indexed(20)),
            "sampler",
            ("'range'", "None"),
        ),
        (
            lambda: al.Loader(Sized(20), shuffle=True, shuffle_buffer=4),
            lambda: al.Loader(Sized(20), shuffle=True, shuffle_buffer=5),
            "shuffle_buffer",
            ("4", "5"),
        ),
        (
            lambda: al.Loader(Sized(20)),
            lambda: al.Loader(Sized(21)),
            "dataset_length",
            ("20", "21"),
        ),
        (
            lambda: al.Loader(Sized(20)),
            lambda: al.Loader(Numbers(20)),
            "dataset_length",
            ("20", "None"),
        ),
        (
            lambda: al.Loader(
                Indexed(6), batch_size=4, batch_budget=4, batch_cost=[1, 2, 3, 1, 2, 3]
            ),
            lambda: al.Loader(
                Indexed(6), batch_size=4, batch_budget=4, batch_cost=[1, 2, 3, 1, 2, 2]
            ),
            "batch_plan",
            ("costs_crc32",),
        ),
        (
            lambda: al.Loader(
                Indexed(6), batch_size=4, batch_budget=4, batch_cost=[1, 2, 3, 1, 2, 3]
            ),
            lambda: al.Loader(
                Indexed(6), batch_size=3, batch_budget=4, batch_cost=[1, 2, 3, 1, 2, 3]
            ),
            "batch_plan",
            ("'batch_size': 4", "'batch_size': 3"),
        ),
    ],
    ids=[
        "dataset_grew",
        "shuffle",
        "drop_last",
        "sampler_length",
        "sampler_type",
        "sampler_dropped",
        "shuffle_buffer",
        "stream_grew",
        "stream_size_unknown",
        "batch_costs",
        "planned_batch_size",
    ],
)
def test_load_state_dict_refuses_a_state_of_another_plan(
    saved: Callable[[], al.Loader],
    resumed: Callable[[], al.Loader],
    key: str,
    values: tuple[str, ...],
) -> None:
    """sync-bridge.md: a mid-epoch state from a loader built differently is refused,
    naming what differs (its positions would mean other samples: some twice, others
    never). The refusing loader is left as it was; a merge of such states is refused
    too."""
    loader = saved()
    batches = iter(loader)
    next(batches)
    loader.close()
    state = json.loads(json.dumps(loader.state_dict()))  # (json-able, as saved to disk)
    assert state["progress"]["watermark"] > 0
    other = resumed()
    before = other.state_dict()
    with pytest.raises(ValueError, match=key) as info:
        other.load_state_dict(state)
    assert all(value in str(info.value) for value in values), str(info.value)
    assert other.state_dict() == before
    if not loader.is_streaming and loader.batch_cost is None and loader.world_size == 1:
        with pytest.raises(ValueError, match=key):
            other.merge_states([state])


async def test_a_state_without_positions_fits_any_plan() -> None:
    """A state saved at an epoch's start or after its end holds no position: it loads into
    a loader of another plan (a dataset that grew between epochs), which then runs full
    passes of its own."""
    loader = al.Loader(Indexed(20), batch_size=4, shuffle=True)
    fresh = loader.state_dict()
    await collect(loader)
    finished = loader.state_dict()
    assert finished["finished"]
    for state in (fresh, finished):
        grown = al.Loader(Indexed(21), batch_size=4)
        grown.load_state_dict(state)
        assert sorted(flat(await collect(grown))) == list(range(21))
    merged = al.Loader(Indexed(21)).merge_states([finished])
    assert merged["finished"] and merged["plan"]["dataset_length"] == 21


async def test_a_state_resumes_under_settings_that_keep_positions() -> None:
    """batch_size, ordered and concurrency do not change which sample a position means:
    a state resumes under others, each sample once."""

    def build(**kwargs: Any) -> al.Loader:
        return al.Loader(Indexed(30), shuffle=True, seed=2, world_size=2, rank=1, **kwargs)

    first = build(batch_size=4)
    iterator = first.__aiter__()
    taken = flat(await take(iterator, 2))
    await iterator.aclose()
    resumed = build(batch_size=3, ordered=False, concurrency=2)
    resumed.load_state_dict(first.state_dict())
    assert sorted(taken + flat(await collect(resumed))) == sorted(flat(await collect(build())))


async def test_state_versions() -> None:
    """Version 2 records the plan. A version 1 state (saved before plans were recorded)
    still loads and resumes; a later version is refused, naming the versions read."""

    def build() -> al.Loader:
        return al.Loader(Indexed(20), batch_size=4, shuffle=True, seed=5)

    loader = build()
    iterator = loader.__aiter__()
    taken = flat(await take(iterator, 2))
    await iterator.aclose()
    state = loader.state_dict()
    assert state["version"] == 2 and state["plan"]["dataset_length"] == 20
    old = {key: value for key, value in state.items() if key != "plan"}
    resumed = build()
    resumed.load_state_dict({**old, "version": 1})
    assert sorted(taken + flat(await collect(resumed))) == list(range(20))
    with pytest.raises(ValueError, match=r"missing keys \['plan'\]"):
        build().load_state_dict(old)
    with pytest.raises(ValueError, match="version 3: this asyncload reads state versions 1, 2"):
        build().load_state_dict({**state, "version": 3})
    with pytest.raises(ValueError, match="version 3"):
        build().merge_states([{**state, "version": 3, "rank": 0}])


def test_merge_states_carries_the_plan() -> None:
    """Every rank's state must record the same plan, this loader's; the merged state
    records it, so that a loader of another plan refuses it."""

    def build(n: int = 20, **kwargs: Any) -> al.Loader:
        return al.Loader(Indexed(n), batch_size=2, shuffle=True, **kwargs)

    def one_batch(loader: al.Loader) -> dict[str, Any]:
        batches = iter(loader)
        next(batches)
        loader.close()
        return loader.state_dict()

    states = [one_batch(build(rank=r, world_size=2)) for r in range(2)]
    merged = build().merge_states(states)
    assert merged["plan"] == build().state_dict()["plan"] and merged["excluded"]
    with pytest.raises(ValueError, match="dataset_length=20, this one has dataset_length=21"):
        build(21).load_state_dict(merged)
    with pytest.raises(ValueError, match="dataset_length=20, this one has dataset_length=21"):
        build(21).merge_states(states)
    mixed = [states[0], one_batch(build(21, rank=1, world_size=2))]
    with pytest.raises(ValueError, match="disagree on 'plan'"):
        build().merge_states(mixed)
    # Version 1 states (no plan) merge over this loader's plan.
    old = [{**{k: v for k, v in s.items() if k != "plan"}, "version": 1} for s in states]
    assert build().merge_states(old)["plan"] == merged["plan"]


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -2}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"concurrency": 0}, "concurrency"),
        ({"prefetch": -1}, "prefetch"),
        ({"on_error": "bogus"}, "on_error"),
        ({"on_error": 3}, "on_error"),
        ({"max_errors": -1, "on_error": "skip"}, "max_errors"),
        ({"max_errors": 1.5, "on_error": "skip"}, "max_errors"),
        ({"seed": -1}, "seed"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"sampler": [0, 1], "shuffle": True}, "s"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 0, "rank": 0}, "world_size"),
        ({"transform": 5}, "transform"),
        ({"collate_fn": "x"}, "collate_fn"),
        ({"validate": 1}, "validate"),
        ({"retry": object()}, "retry"),
        ({"cache": object()}, "cache"),
        # Not truthiness: shuffle="no" would shuffle.
        ({"shuffle": "no"}, "shuffle"),
        ({"shuffle": 1}, "shuffle"),
        ({"shuffle": None}, "shuffle"),
        ({"drop_last": 1}, "drop_last"),
        ({"drop_last": None}, "drop_last"),
        ({"ordered": None}, "ordered"),
        ({"ordered": 2}, "ordered"),
        ({"progress": "yes"}, "progress"),
        # Iterable, but of characters: it failed only when the epoch started.
        ({"sampler": "abc"}, "sampler"),
        ({"sampler": b"ab"}, "sampler"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        al.Loader(al.from_sequence([1, 2, 3]), **kwargs)
    message = str(info.value)
    if name == "s":  # sampler with shuffle: either name will do
        assert "sampler" in message or "shuffle" in message
    else:
        assert name in message


def test_flags_take_bools_and_numpy_bools() -> None:
    """TypeError for anything else; numpy bools are stored as bools (a json-able state)."""
    loader = al.Loader(
        al.from_sequence([1, 2, 3]), shuffle=np.True_, drop_last=np.False_, ordered=np.True_
    )
    assert (loader.shuffle, loader.drop_last, loader.ordered) == (True, False, True)
    assert type(loader.shuffle) is bool and type(loader.drop_last) is bool
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(TypeError, match="sampler"):
        al.Loader(al.from_sequence([1, 2, 3]), sampler="012")


def test_dataset_must_be_a_dataset() -> None:
    with pytest.raises(TypeError, match="dataset"):
        al.Loader([1, 2, 3])  # type: ignore[arg-type]


# -- streaming datasets -----------------------------------------------------------------------


async def test_stream_batches() -> None:
    loader = al.Loader(Numbers(10), batch_size=4)
    assert as_lists(await collect(loader)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader = al.Loader(Numbers(10), batch_size=4, drop_last=True)
    assert as_lists(await collect(loader)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loader = al.Loader(Numbers(3), batch_size=None)
    assert [int(x) for x in await collect(loader)] == [0, 1, 2]


async def test_stream_map_and_filter() -> None:
    async def double(x: int) -> int:
        return 2 * x

    stream = Numbers(12).filter(lambda x: x % 3 != 0).map(double)
    loader = al.Loader(stream, batch_size=3, transform=lambda x: x + 1)
    batches = as_lists(await collect(loader))
    assert flat(batches) == [2 * x + 1 for x in range(12) if x % 3 != 0]
    stats = loader.statistics()
    assert stats["filtered"] == 4
    assert stats["errors"] == 0
    assert stats["samples"] == 8


@pytest.mark.parametrize("k", [0, 1, 2, 3])
async def test_stream_resume(k: int) -> None:
    def build() -> al.Loader:
        return al.Loader(Numbers(11).filter(lambda x: x != 4), batch_size=3)

    full, first, rest = await resume_run(build, k)
    assert first + rest == full


async def test_stream_ranks_cover_the_stream() -> None:
    shares = [
        flat(await collect(al.Loader(Numbers(12), batch_size=2, rank=r, world_size=3)))
        for r in range(3)
    ]
    assert sorted(i for share in shares for i in share) == list(range(12))
    assert all(len(share) == 4 for share in shares)


class BrokenStream(al.AsyncIterableDataset[int]):
    """Yields ``0 .. fail_at - 1``, then its iterator raises."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.fail_at):
            await anyio.lowlevel.checkpoint()
            yield i
        raise FileNotFoundError(2, "No such file or directory", "/data/shard-7.bin")


async def test_stream_failure_is_a_sample_error() -> None:
    loader = al.Loader(BrokenStream(5), batch_size=2)
    got: list[Any] = []
    with pytest.raises(al.SampleError) as info:
        try:
            async for batch in loader:
                got.append(batch)
        finally:
            await loader.aclose()
    assert isinstance(info.value.__cause__, FileNotFoundError)
    # The message names the file, as str(exc) does and repr(exc) does not.
    assert "FileNotFoundError" in str(info.value) and "/data/shard-7.bin" in str(info.value)
    assert as_lists(got) == [[0, 1], [2, 3]][: len(got)]


async def test_stream_sample_errors_follow_on_error() -> None:
    def transform(x: int) -> int:
        if x % 4 == 1:
            raise ValueError(f"bad {x}")
        return x

    loader = al.Loader(Numbers(10), batch_size=3, transform=transform, on_error="skip")
    assert flat(await collect(loader)) == [0, 2, 3, 4, 6, 7, 8]
    stats = loader.statistics()
    assert stats["skipped"] == stats["errors"] == 3
    loader = al.Loader(Numbers(10), batch_size=3, transform=transform)
    with pytest.raises(al.SampleError) as info:
        await collect(loader)
    assert isinstance(info.value.__cause__, ValueError)
    await loader.aclose()


async def test_stream_and_sampler_are_exclusive() -> None:
    with pytest.raises(ValueError, match="sampler"):
        al.Loader(Numbers(3), sampler=[0, 1])


# -- misc -------------------------------------------------------------------------------------


async def test_len_matches_math() -> None:
    loader = al.Loader(al.from_sequence(list(range(101))), batch_size=10, world_size=4, rank=3)
    assert len(loader) == math.ceil(math.ceil(101 / 4) / 10)


@pytest.mark.parametrize("concurrency", [1, 16])
@pytest.mark.parametrize("prefetch", [0, 2])
async def test_collate_error_ends_the_epoch_after_the_batches_before_it(
    concurrency: int, prefetch: int
) -> None:
    """A collate_fn that raises ends the epoch with its error, after the batches before
    it, whether the sender collated the batch or the worker that completed it did (when
    the consumer was already waiting)."""

    def collate(samples: list[int]) -> list[int]:
        if 8 in samples:
            raise ValueError("cannot collate 8")
        return list(samples)

    loader = al.Loader(
        Indexed(20), batch_size=4, concurrency=concurrency, prefetch=prefetch, collate_fn=collate
    )
    got: list[list[int]] = []
    with pytest.raises(ValueError, match="cannot collate 8"):
        async for batch in loader:
            got.append(batch)
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loader.state_dict()["progress"]["watermark"] == 8


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_collate_error_names_the_batch_dataset_indices() -> None:
    """The error keeps its type; a note names the batch's samples by dataset index (here
    shuffled), both from a plain ``for`` and through the background loop."""
    samples = [np.zeros(3)] * 40
    samples[17] = np.zeros(4)

    async def same(sample: Any) -> Any:  # async: the epoch runs in the background loop
        return sample

    for transform in (None, same):
        loader = al.Loader(
            al.from_sequence(samples), batch_size=4, shuffle=True, seed=3, transform=transform
        )
        order = list(loader.plan())
        at = order.index(17) // 4 * 4
        batch = order[at : at + 4]
        with pytest.raises(ValueError, match="differ in shape") as info:
            for _ in loader:
                pass
        notes = getattr(info.value, "__notes__", [])
        assert notes == [f"asyncload: collate_fn failed on the batch of dataset indices {batch}"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
async def test_collate_error_in_a_stream_names_its_positions() -> None:
    class Arrays(al.AsyncIterableDataset[Any]):
        async def _arrays(self) -> AsyncIterator[Any]:
            for i in range(21):
                yield np.zeros(5 if i == 20 else 2)

        def __aiter__(self) -> AsyncIterator[Any]:
            return self._arrays()

    loader = al.Loader(Arrays(), batch_size=16, collate_fn=np.stack)
    with pytest.raises(ValueError) as info:
        async for _ in loader:
            pass
    assert info.value.__notes__ == [
        "asyncload: collate_fn failed on the batch of stream positions [16, 17, 18, 19, 20]"
    ]


def test_numpy_integers_in_settings_leave_a_plain_state() -> None:
    """np.int64 passes the integer checks; stored as is, state_dict() would hold it, and
    neither json nor torch.load(weights_only=True) would take the checkpoint."""
    loader = al.Loader(
        al.from_sequence(list(range(10))), batch_size=np.int64(2), seed=np.int64(4), shuffle=True
    )
    loader.set_epoch(np.int64(1))  # type: ignore[arg-type]
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert type(state["epoch"]) is int and type(state["seed"]) is int
    assert type(loader.batch_size) is int
