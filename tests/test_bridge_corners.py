"""Corners of the sync bridge, to_torch() and statistics (found by helper-49): iterators
collected in their own loop thread, close() when a last on_statistics call raises or
during a batch's, epochs that fail to start, unsized samplers, trailing filtered samples,
`buffered`, a loaded state under to_torch_loader()."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from typing import Any

import anyio
import pytest

import asyncload as al


class Threads:
    def __init__(self) -> None:
        gc.collect()
        self.before = set(threading.enumerate())

    def new(self) -> set[threading.Thread]:
        return set(threading.enumerate()) - self.before


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_last_snapshot_carries_trailing_filtered_samples(anyio_backend: str) -> None:
    """Samples filtered out after the last batch's snapshot: the end snapshot must say so
    (statistics() does), it was not sent since batches/samples/errors/retries had not moved."""
    gate = anyio.Event()

    async def keep(x: int) -> bool:
        if x >= 5:
            await gate.wait()
            return False
        return True

    got: list[dict[str, Any]] = []
    run = al.Loader(al.from_sequence(list(range(10))).filter(keep), batch_size=5,
                    concurrency=1, on_statistics=got.append, statistics_every=1)  # fmt: skip
    async for _batch in run:
        gate.set()
    assert run.statistics()["filtered"] == 5
    assert got[-1]["filtered"] == 5, [s["filtered"] for s in got]


def test_iterator_collected_in_its_own_loop_thread_stops_that_thread() -> None:
    """A SyncIterator in a reference cycle (e.g. held by a frame a kept traceback holds)
    is freed by whichever thread's allocation triggers the cycle collector: often its own
    loop thread, busy fetching. close() then returned early ("that loop is ending
    anyway"), but nothing ended it: the thread, the pump task and the epoch leaked."""
    arrived = threading.Event()
    collected = threading.Event()
    waiting: list[Any] = []

    class Collecting(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 1000

        async def __getitem__(self, index: int) -> int:
            if index == 10:
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                waiting.append((loop, future))
                arrived.set()
                await future
                gc.collect()  # the loop thread runs the cycle collector, as any allocation may
                collected.set()
            return index

    threads = Threads()
    gc.disable()  # (so that the collection happens in the loop thread, as arranged)
    try:
        it = iter(al.Loader(Collecting(), batch_size=4, concurrency=8))
        next(it)
        assert arrived.wait(30)
        cycle: list[Any] = [it]
        cycle.append(cycle)
        del it, cycle
        new = threads.new()
        assert len(new) == 1
        loop, future = waiting[0]
        loop.call_soon_threadsafe(future.set_result, None)
        assert collected.wait(30)
    finally:
        gc.enable()
    for thread in new:
        thread.join(5)
    for thread in threads.new():  # the thread that stopped it (it joins the loop thread)
        thread.join(5)
    assert not threads.new(), "the loop thread of a collected iterator is still running"


async def _double(x: int) -> int:
    return 2 * x  # async: a plain for runs the epoch in the bridge's thread


def test_close_during_a_batchs_statistics_callback_ends_the_loop_cleanly() -> None:
    """loader.close() while next() is committing a batch (here from the on_statistics
    callback, as a watchdog thread may at any time): the loop ends; it raised
    RuntimeError('Event loop is closed') from grant() on the stopped loop thread."""
    loader: al.Loader

    def stop_after_two(snapshot: dict[str, Any]) -> None:
        if snapshot["batches"] == 2:
            loader.close()

    loader = al.Loader(al.from_sequence(list(range(100))), batch_size=10, transform=_double,
                       on_statistics=stop_after_two, statistics_every=1)  # fmt: skip
    got = [[int(x) for x in batch] for batch in loader]
    assert 2 <= len(got) <= 3
    assert got[:2] == [[2 * i for i in range(10)], [2 * i for i in range(10, 20)]]


def test_buffered_does_not_count_the_end_of_the_epoch_as_a_batch() -> None:
    """statistics()['buffered'] under a plain for: 'ready batches not yet taken'. The
    bridge's queue also holds its end-of-epoch marker (or a raised error), which was
    counted as one more batch."""
    loader = al.Loader(al.from_sequence(list(range(4))), batch_size=4, transform=_double)
    it = iter(loader)
    try:
        it._task.result(timeout=30)  # (the pump has queued the one batch, and the end)
        assert loader.statistics()["buffered"] == 1
        assert [int(x) for x in next(it)] == [0, 2, 4, 6]
        assert loader.statistics()["buffered"] == 0
    finally:
        it.close()


class Closing(al.AsyncDataset[int]):
    """0..n-1; in memory (a plain for runs inline) or not; counts aclose() calls."""

    def __init__(self, n: int, in_memory: bool) -> None:
        self.n = n
        self._in_memory = in_memory
        self.closed = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        return index

    @property
    def in_memory(self) -> bool:
        return self._in_memory

    async def aclose(self) -> None:
        self.closed += 1


@pytest.mark.parametrize("in_memory", [False, True], ids=["thread", "inline"])
def test_a_raising_last_statistics_call_on_close_still_releases_the_epoch(
    in_memory: bool,
) -> None:
    """close() (a break drops the iterator; loader.close()) sends the last snapshot
    first; when the metrics backend raises there, close() stopped before cancelling the
    epoch: the loop thread (or the private event loop and its file descriptors) and the
    dataset's connections (aclose() never ran) leaked."""

    def export(snapshot: dict[str, Any]) -> None:
        raise ConnectionError("metrics backend down")

    threads = Threads()
    dataset = Closing(1000, in_memory)
    loader = al.Loader(dataset, batch_size=10, on_statistics=export, statistics_every=5)
    it = iter(loader)
    assert type(it).__name__ == ("InlineIterator" if in_memory else "SyncIterator")
    next(it)
    with contextlib.suppress(ConnectionError):
        it.close()
    assert it.closed
    assert dataset.closed == 1, "the dataset's connections were not released"
    assert not threads.new(), "close() left the loop thread running"


def test_a_thread_that_cannot_start_still_ends_the_progress_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """iter(loader) when the loop thread cannot start (RuntimeError: can't start new
    thread, under a pids limit): the progress report opened by the epoch must end (the
    last on_statistics call, the tqdm bar closed), as for any other early exit. The
    portal's start was outside the try that ends it."""
    got: list[dict[str, Any]] = []
    loader = al.Loader(al.from_sequence(list(range(100))), batch_size=10, transform=_double,
                       on_statistics=got.append, statistics_every=5)  # fmt: skip

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        iter(loader)
    monkeypatch.undo()
    assert len(got) == 1 and got[0]["batches"] == 0, got


def test_a_loaded_state_is_used_once_by_to_torch_loader() -> None:
    """load_state_dict(), then to_torch_loader(num_workers=2) twice without set_epoch
    (shuffle=False: no reason to call it): the first pass yields the rest of the epoch,
    the second a full pass, as a plain for does. (A plain DataLoader(loader.to_torch())
    cannot: its workers get copies, and this process never learns that the resumed pass
    ran; docs/dataloader.md says so.)"""
    pytest.importorskip("torch")
    import numpy as np

    def build() -> al.Loader:
        return al.Loader(al.from_sequence(np.arange(20)), batch_size=4)

    saved = build()
    it = iter(saved)
    next(it), next(it)
    state = saved.state_dict()
    it.close()

    loader = build()
    loader.load_state_dict(state)
    data_loader = loader.to_torch_loader(num_workers=2, multiprocessing_context="fork")
    first = sorted(int(x) for batch in data_loader for x in batch)
    assert first == list(range(8, 20))
    second = sorted(int(x) for batch in data_loader for x in batch)
    assert second == list(range(20)), "the second pass repeated the resumed tail"


class UnsizedSampler:
    """A sampler whose __len__ raises NotImplementedError (the old torch Sampler idiom,
    which Loader._plan_state already allows for)."""

    def __iter__(self) -> Any:
        return iter(range(10))

    def __len__(self) -> int:
        raise NotImplementedError


def test_progress_reporting_does_not_break_an_epoch_over_an_unsized_sampler() -> None:
    """The same loader iterates without on_statistics; with it, iter() raised the
    sampler's NotImplementedError from the progress report's total (len(loader)), where
    an unknown total is expected (only TypeError was taken for one)."""
    plain = al.Loader(al.from_sequence(list(range(10))), batch_size=4, sampler=UnsizedSampler())
    expected = [[int(x) for x in b] for b in plain]
    got: list[dict[str, Any]] = []
    loader = al.Loader(al.from_sequence(list(range(10))), batch_size=4, sampler=UnsizedSampler(),
                       on_statistics=got.append)  # fmt: skip
    assert [[int(x) for x in b] for b in loader] == expected
    assert got[-1]["samples"] == 10


def test_an_epoch_that_fails_to_start_still_ends_its_progress_report() -> None:
    """_prepare_epoch opens the progress report (the tqdm bar, the on_statistics hook)
    first, then builds the plan, which may raise (a sampler index out of range, a stream
    state saved under workers): the report was never ended (no last on_statistics call,
    the bar left open until the garbage collector found it), unlike an epoch that fails
    at its first sample."""
    got: list[dict[str, Any]] = []
    loader = al.Loader(al.from_sequence(list(range(10))), batch_size=4, sampler=[0, 1, 99],
                       on_statistics=got.append)  # fmt: skip
    with pytest.raises(IndexError, match="sampler gave index 99"):
        list(loader)
    assert len(got) == 1 and got[0]["batches"] == 0, got


def test_prefetch_0_makes_no_batch_ahead_of_the_consumer() -> None:
    """``prefetch=0``: no collated batch waits for the consumer. The epoch's sender
    collated a batch and held it, blocked in its zero-slot stream, and the bridge's queue
    took a credit of its own (``max(1, prefetch)``): a plain ``for`` held two collated
    batches ahead of each ``next()``, ``async for`` one. Now a batch is collated only
    once a consumer waits for it, so the wait below always runs out (not an ordering
    guess: the fixed code cannot set the event before the second ``next()``)."""
    from test_loader import Indexed

    made: list[int] = []
    second = threading.Event()

    def collate(samples: list[int]) -> list[int]:
        made.append(samples[0])
        if len(made) == 2:
            second.set()
        return samples

    loader = al.Loader(Indexed(6), batch_size=1, concurrency=1, prefetch=0, collate_fn=collate)
    iterator = iter(loader)
    assert next(iterator) == [0]
    assert not second.wait(0.3), "a second batch was made before next() asked for it"
    assert made == [0]
    assert list(iterator) == [[1], [2], [3], [4], [5]]
    assert made == [0, 1, 2, 3, 4, 5]

    async def consume() -> None:
        made.clear()
        async for batch in loader:
            assert made[-1:] == batch and len(made) == batch[0] + 1  # none made ahead
            await asyncio.sleep(0)  # (the sender gets its turn to run ahead, if it would)

    asyncio.run(consume())
