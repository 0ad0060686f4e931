"""The synchronous bridge: ``for batch in loader`` through a background event loop thread."""

from __future__ import annotations

import asyncio
import gc
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from conftest import asyncio_only

import asyncload as al


class Indexed(al.AsyncDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n
        self.loops: set[str] = set()
        self.threads: set[int] = set()

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        loop = asyncio.get_running_loop()
        self.loops.add(type(loop).__module__)
        self.threads.add(threading.get_ident())
        for _ in range(index % 3):
            await asyncio.sleep(0)  # a checkpoint: fetches finish out of order
        return index


class Hanging(al.AsyncDataset[int]):
    """Indices below ``free`` answer at once; the others wait until cancelled."""

    def __init__(self, n: int, free: int) -> None:
        self.n = n
        self.free = free
        self.hung = 0
        self.cancelled = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index < self.free:
            return index
        self.hung += 1
        try:
            await anyio.Event().wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


def as_lists(batches: list[Any]) -> list[list[int]]:
    return [[int(x) for x in batch] for batch in batches]


async def async_epoch(loader: al.Loader) -> list[Any]:
    async with loader:
        return [batch async for batch in loader]


class Threads:
    """The threads alive at a point; :meth:`new` gives those started since and still
    alive. (Counting threads is fragile: idle worker threads of earlier tests may end.)"""

    def __init__(self) -> None:
        self.before = set(threading.enumerate())

    def new(self) -> set[threading.Thread]:
        return set(threading.enumerate()) - self.before


@pytest.fixture
def baseline_threads() -> Threads:
    gc.collect()
    return Threads()


def test_same_batches_as_async_for() -> None:
    loader = al.Loader(Indexed(23), batch_size=4, shuffle=True, seed=3)
    expected = as_lists(anyio.run(async_epoch, loader))
    assert as_lists(list(loader)) == expected
    loader.set_epoch(1)
    other = as_lists(list(loader))
    assert other != expected
    assert sorted(i for b in other for i in b) == list(range(23))


def test_numpy_batches() -> None:
    samples = [np.full(2, i, dtype=np.int16) for i in range(5)]
    batches = list(al.Loader(al.from_sequence(samples), batch_size=2))
    assert [b.shape for b in batches] == [(2, 2), (2, 2), (1, 2)]
    assert all(isinstance(b, np.ndarray) and b.dtype == np.int16 for b in batches)


def test_runs_in_a_background_uvloop_thread() -> None:
    ds = Indexed(8)
    assert len(list(al.Loader(ds, batch_size=4))) == 2
    assert threading.get_ident() not in ds.threads
    assert ds.loops == {"uvloop"}  # uvloop is installed here


def test_thread_stops_at_the_end(baseline_threads: Threads) -> None:
    loader = al.Loader(Indexed(10), batch_size=3)
    iterator = iter(loader)
    next(iterator)
    assert baseline_threads.new()
    assert len(list(iterator)) == 3
    assert not baseline_threads.new()


def test_break_stops_the_thread(baseline_threads: Threads) -> None:
    ds = Hanging(100, free=4)
    loader = al.Loader(ds, batch_size=2, concurrency=4)
    for batch in loader:
        assert as_lists([batch]) == [[0, 1]]
        assert baseline_threads.new()
        break
    # Leaving the loop drops the iterator, which stops its thread at once.
    assert not baseline_threads.new()
    assert ds.hung > 0
    assert ds.cancelled == ds.hung


def test_exception_in_loop_body_stops_the_thread(baseline_threads: Threads) -> None:
    ds = Hanging(100, free=4)
    loader = al.Loader(ds, batch_size=2, concurrency=4)
    with pytest.raises(ZeroDivisionError):
        for _batch in loader:
            assert baseline_threads.new()
            1 / 0  # noqa: B018
    assert not baseline_threads.new()
    assert ds.cancelled == ds.hung


def test_close_stops_a_held_iterator(baseline_threads: Threads) -> None:
    ds = Hanging(100, free=4)
    loader = al.Loader(ds, batch_size=2, concurrency=4)
    iterator = iter(loader)
    assert as_lists([next(iterator)]) == [[0, 1]]
    assert baseline_threads.new()
    loader.close()
    assert not baseline_threads.new()
    assert ds.cancelled == ds.hung
    with pytest.raises(StopIteration):
        next(iterator)


def test_with_block_closes(baseline_threads: Threads) -> None:
    ds = Hanging(100, free=4)
    with al.Loader(ds, batch_size=2, concurrency=4) as loader:
        iterator = iter(loader)
        next(iterator)
        assert baseline_threads.new()
    assert not baseline_threads.new()
    del iterator


def test_two_iterators_in_turn(baseline_threads: Threads) -> None:
    loader = al.Loader(Indexed(9), batch_size=3)
    assert as_lists(list(loader)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert as_lists(list(loader)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert not baseline_threads.new()


def test_sample_error_in_for_loop(baseline_threads: Threads) -> None:
    class Broken(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 6

        async def __getitem__(self, index: int) -> int:
            if index == 4:
                raise OSError("disk on fire")
            return index

    got = []
    with pytest.raises(al.SampleError) as info:
        for batch in al.Loader(Broken(), batch_size=2):
            got.append(batch)
    assert info.value.index == 4
    assert isinstance(info.value.__cause__, OSError)
    assert as_lists(got) == [[0, 1], [2, 3]]
    assert not baseline_threads.new()


def test_len_and_statistics() -> None:
    loader = al.Loader(al.from_sequence(list(range(10))), batch_size=4)
    assert len(loader) == 3
    assert len(list(loader)) == 3
    stats = loader.statistics()
    assert stats["samples"] == 10
    assert stats["batches"] == 3


@pytest.mark.parametrize("ordered", [True, False])
def test_resume_after_break(ordered: bool) -> None:
    def build() -> al.Loader:
        return al.Loader(Indexed(30), batch_size=4, shuffle=True, seed=2, ordered=ordered)

    full = as_lists(list(build()))
    loader = build()
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == 3:
            break
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    resumed = build()
    resumed.load_state_dict(state)
    rest = as_lists(list(resumed))
    if ordered:
        assert as_lists(first) + rest == full
    else:
        got = [i for b in as_lists(first) + rest for i in b]
        assert sorted(got) == list(range(30))


class Probe(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``. The fetch of the last sample is a probe inside the background
    loop: once the test sets ``go``, it waits until every other task of that loop is
    blocked (whatever the bridge fetches ahead, it has done so), then sets ``idle``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.go = threading.Event()
        self.idle = threading.Event()

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == self.n - 1:
            # Safety bounds against a hang, never reached in a passing run.
            assert await anyio.to_thread.run_sync(self.go.wait, 30)
            await anyio.wait_all_tasks_blocked()
            self.idle.set()
        return index


@pytest.mark.parametrize("keep_going", [False, True], ids=["then-stop", "then-finish"])
def test_state_dict_mid_loop(keep_going: bool) -> None:
    """``state_dict()`` taken inside a running ``for`` loop covers exactly the batches the
    loop body has received, however far the background thread has fetched ahead."""

    def build(ds: al.AsyncDataset[int]) -> al.Loader:
        return al.Loader(ds, batch_size=2, prefetch=3, concurrency=16)

    reference = Probe(12)
    reference.go.set()
    full = as_lists(list(build(reference)))
    ds = Probe(12)
    loader = build(ds)
    seen = []
    state = None
    for i, batch in enumerate(loader):
        seen.append(batch)
        if i == 1:
            ds.go.set()
            assert ds.idle.wait(30)  # the background loop has done all it can
            state = pickle.loads(pickle.dumps(loader.state_dict()))
            if not keep_going:
                break
    assert state is not None
    assert as_lists(seen) == (full if keep_going else full[:2])
    resumed_ds = Probe(12)
    resumed_ds.go.set()
    resumed = build(resumed_ds)
    resumed.load_state_dict(state)
    assert as_lists(seen[:2]) + as_lists(list(resumed)) == full


def test_async_iteration_inside_a_running_loop_is_unaffected() -> None:
    """A sync loop may run inside a thread while another event loop runs elsewhere."""

    async def main() -> list[list[int]]:
        loader = al.Loader(Indexed(6), batch_size=3)
        return await anyio.to_thread.run_sync(lambda: as_lists(list(loader)))

    assert anyio.run(main) == [[0, 1, 2], [3, 4, 5]]


# -- in-memory datasets: the epoch in the calling thread ----------------------------------------


class InMemoryIndexed(Indexed):
    """``Indexed`` that declares it awaits no I/O (its checkpoints are only reordering)."""

    @property
    def in_memory(self) -> bool:
        return True


def test_in_memory_loaders_run_in_the_calling_thread() -> None:
    ds = InMemoryIndexed(50)
    loader = al.Loader(ds, batch_size=4, shuffle=True, seed=3, concurrency=8)
    before = set(threading.enumerate())
    inline = as_lists(list(loader))
    assert not set(threading.enumerate()) - before  # no thread was started
    assert ds.threads == {threading.get_ident()}
    assert "uvloop" not in ds.loops  # asyncio's own loop (uvloop's start-up costs per run)

    async def async_epoch() -> list[list[int]]:
        return as_lists([b async for b in al.Loader(ds, batch_size=4, shuffle=True, seed=3)])

    assert inline == asyncio.run(async_epoch())  # the same epoch as async for


def test_async_for_over_in_memory_data_fetches_in_the_consuming_task() -> None:
    """No I/O to overlap: ``async for`` starts no background task (each hand-off from one
    cost more than the in-memory fetch); a dataset that may do I/O still gets them."""

    async def tasks_seen(ds: Any) -> tuple[list[int], set[int]]:
        me = asyncio.current_task()
        values, others = [], set()
        async with al.Loader(ds, batch_size=4, concurrency=8, prefetch=2) as loader:
            async for batch in loader:
                values += [int(x) for x in batch]
                others.add(len(asyncio.all_tasks() - {me}))
        return values, others

    values, others = asyncio.run(tasks_seen(InMemoryIndexed(30)))
    assert values == list(range(30)) and others == {0}
    values, others = asyncio.run(tasks_seen(Indexed(30)))
    assert values == list(range(30)) and max(others) > 0


def test_in_memory_views_and_what_turns_the_thread_back_on() -> None:
    seq = al.from_sequence(list(range(10)))

    async def double(x: int) -> int:
        return 2 * x

    assert seq.in_memory and seq.map(str).in_memory and seq.filter(bool).in_memory
    assert (seq + seq).in_memory and al.Subset(seq, [1, 2]).in_memory
    assert not seq.map(double).in_memory and not seq.filter(double).in_memory
    assert not Indexed(3).in_memory  # a user dataset may do I/O unless it says otherwise
    from asyncload.bridge import runs_inline

    assert runs_inline(al.Loader(seq))
    assert not runs_inline(al.Loader(seq, transform=double))
    assert not runs_inline(al.Loader(seq, cache=al.LRUCache(max_bytes=1 << 20)))


def test_inline_break_counts_only_the_batches_taken() -> None:
    loader = al.Loader(al.from_sequence(list(range(100))), batch_size=5, prefetch=4)
    iterator = iter(loader)
    taken = [next(iterator) for _ in range(3)]
    assert iterator.buffered > 0  # batches taken from the epoch, not yet returned
    assert loader.statistics()["buffered"] >= iterator.buffered
    state = loader.state_dict()
    assert state["progress"]["watermark"] == 15
    del iterator
    gc.collect()
    resumed = al.Loader(al.from_sequence(list(range(100))), batch_size=5, prefetch=4)
    resumed.load_state_dict(state)
    rest = [int(x) for batch in resumed for x in batch]
    assert [int(x) for batch in taken for x in batch] + rest == list(range(100))


def test_inline_close_from_another_thread_and_from_async_code() -> None:
    loader = al.Loader(al.from_sequence(list(range(100))), batch_size=5)
    iterator = iter(loader)
    next(iterator)
    closer = threading.Thread(target=iterator.close)
    closer.start()
    closer.join()
    assert iterator.closed
    assert list(iterator) == []

    second = iter(loader)
    next(second)

    async def close_from_async() -> None:
        second.close()  # another loop runs here: ours is shut down in a thread of its own

    asyncio.run(close_from_async())
    assert second.closed and second._loop.is_closed()  # type: ignore[attr-defined]


def test_inline_errors_reach_the_loop_and_close_the_epoch() -> None:
    def fail_on_seven(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    loader = al.Loader(al.from_sequence(list(range(20))), batch_size=4, transform=fail_on_seven)
    iterator = iter(loader)
    assert [int(x) for x in next(iterator)] == [0, 1, 2, 3]
    with pytest.raises(al.SampleError, match="seven"):
        next(iterator)
    assert iterator.closed
    assert list(iterator) == []


def test_inside_a_running_loop_the_bridge_thread_is_used() -> None:
    loader = al.Loader(al.from_sequence(list(range(12))), batch_size=4)

    async def sync_iteration_inside_trio() -> list[list[int]]:
        iterator = iter(loader)
        assert type(iterator).__name__ == "SyncIterator"
        return as_lists(list(iterator))

    assert anyio.run(sync_iteration_inside_trio, backend="trio") == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]


class CountedSequence(al.AsyncDataset[int]):
    """An in-memory dataset that counts the samples fetched so far."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fetched = 0

    def __len__(self) -> int:
        return self.n

    @property
    def in_memory(self) -> bool:
        return True

    async def __getitem__(self, index: int) -> int:
        self.fetched += 1
        return index

    async def getitems(self, indices: Sequence[int]) -> list[int]:
        self.fetched += len(indices)
        return list(indices)


@pytest.mark.parametrize(("concurrency", "prefetch", "batch_size"), [(16, 2, 4), (4, 0, 8)])
def test_inline_epoch_holds_no_more_than_an_async_epoch(
    concurrency: int, prefetch: int, batch_size: int
) -> None:
    """In memory, batches are fetched a few at a time, never more than a background epoch
    would hold (its window, 4x concurrency in order, and ``prefetch`` batches), and no more
    than ``prefetch`` collated batches wait for the consumer."""
    ds = CountedSequence(2000)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=concurrency, prefetch=prefetch)
    bound = max(4 * concurrency, concurrency + batch_size) + (prefetch + 1) * batch_size
    iterator = iter(loader)
    seen: list[int] = []
    for batch in iterator:
        seen += [int(x) for x in batch]
        assert ds.fetched - len(seen) <= bound
        assert loader.statistics()["buffered"] <= prefetch  # collated batches: the contract
    assert seen == list(range(2000))


def test_inline_collate_error_ends_the_epoch_after_the_batches_before_it() -> None:
    def collate(samples: list[int]) -> list[int]:
        if 8 in samples:
            raise ValueError("cannot collate 8")
        return samples

    loader = al.Loader(al.from_sequence(list(range(20))), batch_size=4, collate_fn=collate)
    iterator = iter(loader)
    assert [next(iterator), next(iterator)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="cannot collate 8"):
        next(iterator)
    assert iterator.closed and list(iterator) == []
    assert loader.state_dict()["progress"]["watermark"] == 8


def test_inline_filtered_and_skipped_samples() -> None:
    """Chunks with dropped and skipped samples take the per-sample path, in order."""

    def fail_on_fives(x: int) -> int:
        if x % 5 == 0:
            raise ValueError("five")
        return x

    seq = al.from_sequence(list(range(40))).filter(lambda x: x % 3)
    loader = al.Loader(seq, batch_size=4, transform=fail_on_fives, on_error="skip")
    got = [int(x) for batch in loader for x in batch]
    assert got == [x for x in range(40) if x % 3 and x % 5]
    stats = loader.statistics()
    assert stats["filtered"] == len([x for x in range(40) if not x % 3])
    assert stats["skipped"] == len([x for x in range(40) if x % 3 and not x % 5])


EXIT_SCRIPT = """
import asyncload as al

class Data(al.AsyncDataset):
    def __len__(self):
        return {samples}

    @property
    def in_memory(self):
        return {in_memory}

    async def __getitem__(self, index):
        return index

    async def aclose(self):
        print("dataset closed", flush=True)

iterator = iter(al.Loader(Data(), batch_size=32))
print(int(next(iterator)[0]), flush=True)
"""


@pytest.mark.parametrize("samples", [64, 640])  # the epoch's end already queued, or not
@pytest.mark.parametrize("in_memory", [False, True])
def test_a_script_that_leaves_an_iterator_open_exits(samples: int, in_memory: bool) -> None:
    """Left open at exit, an iterator is closed by an atexit hook, while its loop thread
    still runs: closing it later, from a finalizer, waited on a frozen thread forever."""
    script = EXIT_SCRIPT.format(samples=samples, in_memory=in_memory)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # (A whole epoch fetched already closes the dataset in the loop thread, while the
    # main thread prints: the two lines may interleave.)
    assert result.stdout.count("dataset closed") == 1
    assert result.stdout.replace("dataset closed", "").split() == ["0"]


def run_script(script: str) -> list[str]:
    """The words ``script`` printed, run in a fresh interpreter that must exit cleanly."""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


KEYBOARD_INTERRUPT_SCRIPT = """
import asyncload as al

def interrupt_on_six(x):
    if x == 6:
        raise KeyboardInterrupt
    return x

loader = al.Loader(al.from_sequence(list(range(12))), batch_size=4, transform=interrupt_on_six)
iterator = iter(loader)
try:
    next(iterator)  # the first next() fetches the whole epoch ahead: 6 is in it
except KeyboardInterrupt:
    print("interrupted")
assert iterator.closed and list(iterator) == []
again = al.Loader(al.from_sequence(list(range(12))), batch_size=4)
assert [int(x) for batch in again for x in batch] == list(range(12))
print("ran again")
"""


def test_inline_keyboard_interrupt_closes_the_epoch() -> None:
    """Ctrl-C in the middle of fetching in-memory batches reaches the loop, closes the
    epoch, and the loader can run again. In a subprocess: run in pytest's process (with
    Python 3.11), it left the interpreter in a state where a later import through
    pytest's assertion rewriting failed with "AST constructor recursion depth mismatch"."""
    assert run_script(KEYBOARD_INTERRUPT_SCRIPT) == ["interrupted", "ran", "again"]


BRIDGE_KEYBOARD_INTERRUPT_SCRIPT = """
import threading
import anyio
import asyncload as al

class Fetched(al.AsyncDataset):
    def __len__(self):
        return 40

    async def __getitem__(self, index):
        await anyio.lowlevel.checkpoint()  # I/O: the epoch runs in the bridge's thread
        return index

def interrupt_at_30(x):
    if x == 30:
        raise KeyboardInterrupt
    return x

got = []
try:
    for batch in al.Loader(Fetched(), batch_size=4, transform=interrupt_at_30):
        got.extend(batch.tolist())
except KeyboardInterrupt:
    print("interrupted")
assert got == list(range(len(got))) and len(got) <= 28, got
assert threading.active_count() == 1, threading.enumerate()
again = [int(x) for batch in al.Loader(Fetched(), batch_size=4) for x in batch]
assert again == list(range(40))
print("ran again")
"""


def test_keyboard_interrupt_in_the_bridge_thread_reaches_the_loop() -> None:
    """A KeyboardInterrupt (or SystemExit) from a transform in the bridge's loop thread:
    raised in the consumer, the thread stopped. It used to stop that loop with nothing
    queued, and the consumer waited forever. In a subprocess, as the inline case above."""
    assert run_script(BRIDGE_KEYBOARD_INTERRUPT_SCRIPT) == ["interrupted", "ran", "again"]


def test_close_from_another_thread_wakes_a_waiting_for_loop(baseline_threads: Threads) -> None:
    ds = Hanging(100, free=4)
    loader = al.Loader(ds, batch_size=4, concurrency=4)
    got: list[list[int]] = []
    ended = threading.Event()

    def consume() -> None:
        for batch in loader:
            got.append([int(x) for x in batch])
        ended.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    deadline = time.monotonic() + 30
    while not (got and ds.hung) and time.monotonic() < deadline:
        time.sleep(0.001)  # until the first batch is out and the next fetches hang
    loader.close()
    consumer.join(timeout=30)
    assert ended.is_set() and got == [[0, 1, 2, 3]]
    assert ds.cancelled == ds.hung
    assert not baseline_threads.new()


@pytest.mark.parametrize("in_memory", [False, True])
def test_an_error_at_the_end_of_the_epoch_still_closes_the_iterator(in_memory: bool) -> None:
    """An on_statistics callback that raises on the final report (a DriftError raises
    there too): the error reaches the loop, and the loop thread is not left running."""

    class Boom(Exception):
        pass

    def on_statistics(snapshot: dict[str, Any]) -> None:
        if snapshot["batches"] == 10:
            raise Boom

    dataset = al.from_sequence(list(range(100))) if in_memory else Indexed(100)
    loader = al.Loader(dataset, batch_size=10, on_statistics=on_statistics, statistics_every=1000)
    iterator = iter(loader)
    with pytest.raises(Boom):
        for _ in iterator:
            pass
    assert iterator.closed  # type: ignore[attr-defined]


class BlocksItsLoop(al.AsyncDataset[int]):
    """Each fetch blocks the event loop's thread until ``gate`` is set (or 10 s pass)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.gate = threading.Event()
        self.timed_out = 0
        self.fetched = 0
        self.closed = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if not self.gate.wait(timeout=10):
            self.timed_out += 1
        self.fetched += 1
        return index

    async def aclose(self) -> None:
        self.closed += 1


def test_iter_returns_without_waiting_for_the_loop_thread_to_fetch() -> None:
    """``iter(loader)`` hands the epoch to the loop thread and returns: it must not wait
    on that thread once the fetches have started (there each wait costs the first batch
    up to a GIL switch interval). Here the first fetch holds the loop thread until the
    test goes on after ``iter()``; an ``iter()`` that waited on it would wait 10 s."""
    ds = BlocksItsLoop(8)
    loader = al.Loader(ds, batch_size=4, concurrency=4)
    iterator = iter(loader)
    ds.gate.set()
    assert as_lists(list(iterator)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds.timed_out == 0
    assert ds.closed == 1


def test_iter_sets_the_loaders_state_before_it_returns() -> None:
    """The epoch's start (the resume point taken, statistics reset) is part of ``iter()``
    even though its fetches start in the loop thread after: a state_dict() right after
    iter() is that of the epoch begun, whatever the loop thread has done yet."""
    ds = BlocksItsLoop(12)
    loader = al.Loader(ds, batch_size=4, concurrency=4)
    ds.gate.set()
    iterator = iter(loader)
    next(iterator)
    saved = loader.state_dict()
    iterator.close()  # type: ignore[attr-defined]

    resumed = al.Loader(ds, batch_size=4, concurrency=4)
    resumed.load_state_dict(saved)
    ds.gate.clear()  # nothing fetched yet while we look
    iterator = iter(resumed)
    assert resumed.state_dict() == saved
    assert resumed.statistics()["batches"] == 0
    ds.gate.set()
    assert as_lists(list(iterator)) == [[4, 5, 6, 7], [8, 9, 10, 11]]
    assert ds.timed_out == 0


@pytest.mark.parametrize("progress", [False, True])
def test_close_right_after_iter(progress: bool, baseline_threads: Threads) -> None:
    """Closed before the loop thread may have started the epoch: the thread stops, the
    dataset is closed, and the last statistics are reported once."""
    for _ in range(20):  # the close lands at different points of the epoch's start
        reports: list[dict[str, Any]] = []
        ds = BlocksItsLoop(8)
        ds.gate.set()
        loader = al.Loader(
            ds, batch_size=4, concurrency=4, progress=progress, on_statistics=reports.append
        )
        iterator = iter(loader)
        iterator.close()  # type: ignore[attr-defined]
        assert not {t for t in baseline_threads.new() if t.name != "tqdm_monitor"}
        assert ds.closed == 1
        assert len(reports) == 1 and reports[0]["batches"] == 0
        with pytest.raises(StopIteration):
            next(iterator)


@pytest.mark.parametrize("in_memory", [False, True])
def test_an_older_iterator_ending_does_not_end_the_newer_epoch(in_memory: bool) -> None:
    """Two iter() of one loader at once: the loader's state is the newer epoch's, and the
    older one running to its end must not mark it finished (a checkpoint would skip it)."""
    dataset = al.from_sequence(list(range(8))) if in_memory else Indexed(8)
    loader = al.Loader(dataset, batch_size=4)
    older = iter(loader)
    newer = iter(loader)
    assert as_lists(list(older)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert not loader.state_dict()["finished"]
    assert as_lists([next(newer)]) == [[0, 1, 2, 3]]
    state = loader.state_dict()
    assert not state["finished"] and state["progress"]["watermark"] == 4
    assert as_lists(list(newer)) == [[4, 5, 6, 7]]
    assert loader.state_dict()["finished"]


@pytest.mark.anyio
@asyncio_only  # (Indexed asks asyncio for its loop)
async def test_an_older_async_iterator_ending_does_not_end_the_newer_epoch() -> None:
    loader = al.Loader(Indexed(8), batch_size=4)
    older, newer = aiter(loader), aiter(loader)
    await anext(older)  # started first
    first = await anext(newer)
    assert as_lists([b async for b in older]) == [[4, 5, 6, 7]]
    assert not loader.state_dict()["finished"]
    assert as_lists([first, *[b async for b in newer]]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert loader.state_dict()["finished"]
    await loader.aclose()


def test_an_epoch_ending_after_set_epoch_does_not_finish_the_next() -> None:
    """set_epoch() while an epoch runs: that epoch running to its end must not mark the
    next one finished (a checkpoint would skip the whole next epoch)."""
    loader = al.Loader(Indexed(8), batch_size=4, shuffle=True, seed=1)
    running = iter(loader)
    next(running)
    loader.set_epoch(1)
    list(running)
    state = loader.state_dict()
    assert state["epoch"] == 1 and not state["finished"]
    assert state["progress"]["watermark"] == 0


class Overlap(al.AsyncDataset[int]):
    """Counts the fetches running at once (``most``: the most so far). Indices from
    ``hold`` on wait until :meth:`release` (called from another thread); ``waiting[k]``
    is set once ``k`` fetches wait so."""

    def __init__(self, n: int, hold: int) -> None:
        self.n, self.hold = n, hold
        self.running = self.most = self.held = 0
        self.waiting = {k: threading.Event() for k in range(1, 9)}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.go: asyncio.Event | None = None

    def __len__(self) -> int:
        return self.n

    def release(self) -> None:
        assert self.loop is not None and self.go is not None
        self.loop.call_soon_threadsafe(self.go.set)

    async def __getitem__(self, index: int) -> int:
        if self.go is None:
            self.loop, self.go = asyncio.get_running_loop(), asyncio.Event()
        self.running += 1
        self.most = max(self.most, self.running)
        if index >= self.hold:
            self.held += 1
            if self.held in self.waiting:  # (after release(), the later ones pass)
                self.waiting[self.held].set()
            await self.go.wait()
        await asyncio.sleep(0)
        self.running -= 1
        return index


def test_the_other_workers_start_once_the_consumer_has_its_first_batch() -> None:
    """The sync bridge: the workers beyond the first batch's start only once the consuming
    thread has taken that batch (opening their connections, the loop thread held the
    GIL the consumer needed to take it). Until then the first batch's two workers go on
    alone; then the whole concurrency runs."""
    ds = Overlap(60, hold=20)
    loader = al.Loader(ds, batch_size=2, concurrency=8, prefetch=4)
    with loader:
        batches = iter(loader)
        assert ds.waiting[2].wait(timeout=30)  # samples 0-19 done, 20 and 21 waiting
        assert ds.most == 2
        assert as_lists([next(batches)]) == [[0, 1]]
        assert ds.waiting[8].wait(timeout=30)  # 22-27 too
        assert ds.most == 8
        ds.release()
        rest = as_lists(list(batches))
    assert [x for batch in rest for x in batch] == list(range(2, 60))
