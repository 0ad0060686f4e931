"""Review (backpressure): what an epoch holds while its consumer stops taking batches, and
after it has taken them or left.

By helper-89: each test failed before its fix (one collated batch beyond prefetch;
delivered samples kept alive in the pipeline's local variables; a loop left by break kept
what was fetched ahead alive until the next epoch). Everything is counted (collate calls,
fetches started, samples alive by weak reference); nothing sleeps or measures time. Fetches that must never finish wait forever, and the
test cancels them.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncload as al

pytestmark = pytest.mark.anyio


# -- helpers --------------------------------------------------------------------------------


class Sample:
    """A sample that a weak reference can watch."""

    def __init__(self, index: int) -> None:
        self.index = index


class Batch(list):  # type: ignore[type-arg]
    """A collated batch that a weak reference can watch."""


class Watch:
    """Weak references to every sample made and every batch collated."""

    def __init__(self) -> None:
        self.samples: list[weakref.ref[Sample]] = []
        self.batches: list[weakref.ref[Batch]] = []
        self.collated = 0

    def sample(self, index: int) -> Sample:
        sample = Sample(index)
        self.samples.append(weakref.ref(sample))
        return sample

    def collate(self, values: list[Any]) -> Batch:
        self.collated += 1
        batch = Batch(values)
        self.batches.append(weakref.ref(batch))
        return batch

    def alive_samples(self) -> list[int]:
        gc.collect()
        return sorted(s.index for ref in self.samples if (s := ref()) is not None)

    def alive_batches(self) -> list[int]:
        gc.collect()
        return [k for k, ref in enumerate(self.batches) if ref() is not None]


class Remote(al.AsyncDataset[Sample]):
    """Awaits (not in memory: a background epoch, and a loop thread under ``for``); the
    fetches of indices from ``hang_from`` on never answer. Counts fetches started (also
    from the loop thread, so under a condition)."""

    def __init__(self, watch: Watch, n: int = 1000, hang_from: int | None = None) -> None:
        self.watch = watch
        self.n = n
        self.hang_from = hang_from
        self.started = 0
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> Sample:
        with self._cond:
            self.started += 1
            self._cond.notify_all()
        if self.hang_from is not None and index >= self.hang_from:
            await anyio.sleep_forever()
        await anyio.lowlevel.checkpoint()
        return self.watch.sample(index)

    def wait_started(self, count: int) -> None:
        """Block this thread until ``count`` fetches have started (in the loop thread)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.started >= count, timeout=30)


class Stream(al.AsyncIterableDataset[Sample]):
    """``n`` samples, then a read that never answers."""

    def __init__(self, watch: Watch, n: int) -> None:
        self.watch = watch
        self.n = n

    async def __aiter__(self) -> Any:
        for index in range(self.n):
            await anyio.lowlevel.checkpoint()
            yield self.watch.sample(index)  # (no local of ours keeps it)
        await anyio.sleep_forever()


# -- prefetch: collated batches waiting -----------------------------------------------------


@pytest.mark.parametrize("prefetch", [1, 2])
async def test_async_for_collates_no_more_than_prefetch_batches_ahead(prefetch: int) -> None:
    """``prefetch`` is "ready batches buffered at most (backpressure beyond)"; docs/async.md:
    "at most ``concurrency`` fetches in flight and ``prefetch`` collated batches waiting".
    A consumer that took one batch and stopped: at most ``prefetch`` more batches may have
    been collated. Expected ``collated - 1 <= prefetch``; the background epoch collates
    ``prefetch + 1``: its sender collates the next batch and then blocks in ``send()``
    holding it (the case prefetch=0 was fixed with demand counting; the plain ``for`` and
    the in-memory epochs keep to ``prefetch``)."""
    watch = Watch()
    loader = al.Loader(
        Remote(watch), batch_size=4, concurrency=4, prefetch=prefetch, collate_fn=watch.collate
    )
    iterator = loader.__aiter__()
    await iterator.__anext__()
    await anyio.wait_all_tasks_blocked()  # the consumer stops here; the epoch fills up
    waiting = watch.collated - 1
    await iterator.aclose()
    await loader.aclose()
    assert waiting <= prefetch  # was prefetch + 1


# -- nothing kept alive once delivered ------------------------------------------------------


async def test_async_for_keeps_no_delivered_sample_alive() -> None:
    """``async for`` over a map-style dataset: the consumer takes two batches (samples
    0-7) and drops them; the next fetches (8 on) hang. Nothing the consumer has dropped
    should stay alive. Samples 4-7 do: each ``Epoch._map_worker`` keeps its last unit's
    ``outcomes`` in a local while it waits for its next fetch (or for room in the
    window), so up to ``concurrency`` delivered samples stay alive for as long as the
    next fetches take."""
    watch = Watch()
    dataset = Remote(watch, hang_from=8)
    loader = al.Loader(dataset, batch_size=4, concurrency=4, collate_fn=watch.collate)
    iterator = loader.__aiter__()
    batch = await iterator.__anext__()
    batch = await iterator.__anext__()
    assert [s.index for s in batch] == [4, 5, 6, 7]
    del batch
    await anyio.wait_all_tasks_blocked()
    samples, batches = watch.alive_samples(), watch.alive_batches()
    await iterator.aclose()
    await loader.aclose()
    assert (samples, batches) == ([], [])  # was ([4, 5, 6, 7], [])


async def test_async_for_over_a_stream_keeps_no_delivered_sample_alive() -> None:
    """The same over a stream: 8 samples, then a read that hangs. The consumer takes both
    batches and drops them; sample 7 stays alive, held by ``Epoch._stream_worker``'s
    ``sample``/``outcome`` locals (and ``streaming.stride``'s ``item``) while the worker
    awaits the stream's next sample."""
    watch = Watch()
    loader = al.Loader(Stream(watch, 8), batch_size=4, concurrency=4, collate_fn=watch.collate)
    iterator = loader.__aiter__()
    batch = await iterator.__anext__()
    batch = await iterator.__anext__()
    assert [s.index for s in batch] == [4, 5, 6, 7]
    del batch
    await anyio.wait_all_tasks_blocked()
    samples = watch.alive_samples()
    await iterator.aclose()
    await loader.aclose()
    assert samples == []  # was [7]


def test_sync_for_keeps_no_delivered_batch_alive() -> None:
    """A plain ``for`` (loop thread): the consumer takes batches 0 and 1 and drops them
    while the next fetches (8 on) hang. Batch 1 stays alive: ``_Pump.run`` keeps it in its
    ``item`` local while it awaits the next batch, and so does ``Epoch._sender``'s ``item``
    (the batch it last sent), for as long as the next batch takes."""
    watch = Watch()
    dataset = Remote(watch, hang_from=8)
    loader = al.Loader(dataset, batch_size=4, concurrency=4, prefetch=1, collate_fn=watch.collate)
    iterator = iter(loader)
    batch = next(iterator)
    batch = next(iterator)
    assert [s.index for s in batch] == [4, 5, 6, 7]
    del batch
    dataset.wait_started(12)  # the fetches of the next batch are out (and hang)
    batches = watch.alive_batches()
    iterator.close()
    loader.close()
    assert batches == []  # was [1]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_in_memory_for_keeps_no_delivered_batch_alive(prefetch: int) -> None:
    """A plain ``for`` over an in-memory dataset (``InlineIterator``): the consumer takes
    batch 0 and drops it. It stays alive until the next ``next()`` that runs the loop:
    ``_Maker._serve`` keeps ``first`` (and ``made``, the list of the batches it handed
    over) in its locals while it waits for the next request."""
    watch = Watch()
    dataset = al.from_sequence(list(range(100))).map(watch.sample)
    loader = al.Loader(
        dataset, batch_size=4, concurrency=4, prefetch=prefetch, collate_fn=watch.collate
    )
    iterator = iter(loader)
    batch = next(iterator)
    assert [s.index for s in batch] == [0, 1, 2, 3]
    del batch
    alive = watch.alive_batches()
    iterator.close()
    assert 0 not in alive  # was alive


# -- nothing held after leaving the loop ------------------------------------------------------


async def settle() -> None:
    """Let cancelled tasks unwind: on asyncio one ``wait_all_tasks_blocked()`` can return
    while a cancellation is still on its way through nested task groups (no I/O here:
    a few rounds always suffice)."""
    for _ in range(10):
        await anyio.wait_all_tasks_blocked()
        await anyio.lowlevel.checkpoint()


def _remote_loader(watch: Watch) -> tuple[al.Loader, Remote]:
    dataset = Remote(watch)
    return al.Loader(dataset, batch_size=4, concurrency=8, collate_fn=watch.collate), dataset


def test_break_out_of_a_for_keeps_no_sample_alive() -> None:
    """docs/sync-bridge.md: leaving a ``for`` early stops the epoch. Without ``close()``
    (the loader kept for the next epoch, as in a training loop that stops each epoch at
    ``max_steps``), the stopped epoch's samples should not stay alive. They do, until the
    next epoch begins or ``close()``: ``loader._current`` keeps the cancelled ``Epoch``,
    whose ``_ready`` deque (batches fetched ahead, up to the window of 4 x concurrency
    samples) and batcher are never cleared."""
    watch = Watch()
    loader, dataset = _remote_loader(watch)
    for step, _batch in enumerate(loader):
        if step == 2:
            dataset.wait_started(40)  # the window is filling up
            break
    del _batch
    assert watch.alive_samples() == []  # was 28


def test_break_out_of_an_in_memory_for_keeps_no_sample_alive() -> None:
    """The same over an in-memory dataset (``InlineIterator``): ``loader._current`` keeps
    the cancelled ``InlineEpoch``, whose ``cancel()`` only sets flags, so its ``_ready``
    batches (fetched ahead, uncollated) stay."""
    watch = Watch()
    loader = al.Loader(
        al.from_sequence(list(range(1000))).map(watch.sample),
        batch_size=4,
        concurrency=8,
        collate_fn=watch.collate,
    )
    for step, _batch in enumerate(loader):
        if step == 2:
            break
    del _batch
    assert watch.alive_samples() == []  # was 28


@pytest.mark.parametrize("in_memory", [False, True], ids=["background", "in-memory"])
async def test_break_out_of_an_async_for_keeps_no_sample_alive(in_memory: bool) -> None:
    """``async for`` left by ``break`` without ``aclose()``: the epoch is cancelled (its
    tasks end), yet ``loader._current`` keeps it, with the samples it fetched ahead
    (the background ``Epoch``'s batcher and ``_ready``; the ``InlineEpoch``'s ``_ready``)."""
    watch = Watch()
    if in_memory:
        loader = al.Loader(
            al.from_sequence(list(range(1000))).map(watch.sample),
            batch_size=4,
            concurrency=8,
            collate_fn=watch.collate,
        )
    else:
        loader, _ = _remote_loader(watch)
    async for _batch in loader:
        await anyio.wait_all_tasks_blocked()  # the epoch fills its window
        break
    del _batch
    await settle()  # the cancelled tasks end
    alive = watch.alive_samples()
    await loader.aclose()
    assert alive == []  # was 28-36
