"""Loader corners: buckets with drop_last keep their tail, an unordered epoch resumed past
many delivered chunks, aclose() of every open async epoch, a stream failing at once.

Each test states the contract it checks; ordering is forced with events, never sleeps.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from test_loader import Hanging, Indexed

import asyncload as al


class Straggler(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``. With ``slow`` given, that one index waits (until cancelled)
    while every other answers after one checkpoint: a straggler in the store."""

    def __init__(self, n: int, slow: int | None = None) -> None:
        self.n = n
        self.slow = slow

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == self.slow:
            await anyio.Event().wait()
        await anyio.lowlevel.checkpoint()
        return index


# -- bucket + drop_last: len(loader) and the samples fetched ------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
def test_bucket_with_drop_last_yields_len_batches_and_keeps_the_tail(world_size: int) -> None:
    # docs/batching.md: "Fixed counts, with or without bucket: every rank yields
    # len(loader) batches" and "drop_last applies to fixed counts without buckets";
    # api.md: drop_last drops "the last incomplete batch (fixed counts without bucket)".
    # So with a bucket, drop_last only trims the rank shares (n // world_size): every
    # sample of the rank's share is fetched, and len(loader) batches come.
    n, batch_size = 10 * world_size, 4
    data = [np.zeros(i % 5 + 1) for i in range(n)]
    for rank in range(world_size):
        loader = al.Loader(
            al.from_sequence(data),
            batch_size=batch_size,
            bucket=8,
            drop_last=True,
            collate_fn=list,
            rank=rank,
            world_size=world_size,
        )
        batches = list(loader)
        samples = sum(len(b) for b in batches)
        assert samples == n // world_size, (
            f"rank {rank}: {samples} samples of the share of {n // world_size} came"
        )
        assert len(batches) == len(loader)


# -- unordered resume after a straggler ----------------------------------------------------


@pytest.mark.anyio
async def test_unordered_resume_after_a_straggler_delivers_the_rest() -> None:
    # ordered=False: one slow sample holds the watermark while the others keep coming
    # (that is the point of unordered output), so a state saved then holds a long run of
    # delivered positions above the watermark. Resuming it must yield exactly the rest.
    n, taken = 3000, 2000

    def build(ds: al.AsyncDataset[int]) -> al.Loader:
        return al.Loader(ds, batch_size=None, ordered=False, concurrency=4)

    first = build(Straggler(n, slow=1))
    iterator = first.__aiter__()
    got = [int(await iterator.__anext__()) for _ in range(taken)]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    await iterator.aclose()
    await first.aclose()
    assert 1 not in got and state["progress"]["watermark"] == 1

    resumed = build(Straggler(n))
    resumed.load_state_dict(state)
    rest = [int(x) async for x in resumed]
    assert sorted(got + rest) == list(range(n))


# -- aclose with two async iterators open --------------------------------------------------


@pytest.mark.anyio
async def test_aclose_cancels_every_running_async_epoch(
    live_tasks: Callable[[], set[object]],
) -> None:
    # api.md: "await loader.aclose(): close(), then waits for the running epoch to end";
    # async.md: "async with loader (or await loader.aclose()) cancels an epoch still
    # running, waits until they have ended". An older async iterator of the same loader,
    # still open (two at once are supported: see state_dict), is an epoch still running
    # too: its fetches must be cancelled and its task must not outlive aclose().
    ds = Hanging(100, free=2)
    baseline = live_tasks()
    loader = al.Loader(ds, batch_size=2, concurrency=2)
    older = loader.__aiter__()
    assert [int(x) for x in await older.__anext__()] == [0, 1]
    newer = loader.__aiter__()
    assert [int(x) for x in await newer.__anext__()] == [0, 1]
    await anyio.wait_all_tasks_blocked()
    await loader.aclose()
    assert ds.cancelled == ds.hung > 0, f"{ds.hung - ds.cancelled} fetches left hanging"
    assert live_tasks() == baseline
    # (Held until here, so that only aclose() may have ended their epochs.)
    del older, newer


# -- the message of a stream that fails before its first sample ----------------------------


class FailsAtOnce(al.AsyncIterableDataset[int]):
    """A stream whose first read fails (its first shard cannot be opened)."""

    def __aiter__(self) -> Any:
        return self

    async def __anext__(self) -> int:
        raise FileNotFoundError(2, "No such file or directory", "/data/shard-0.tar")


@pytest.mark.anyio
async def test_a_stream_failing_before_its_first_sample_says_so() -> None:
    # The error names where the stream broke off: with no sample read yet, "after sample
    # -1" names a sample that does not exist (the index, 0, is right).
    loader = al.Loader(FailsAtOnce(), batch_size=2)
    with pytest.raises(al.SampleError) as info:
        try:
            async for _ in loader:
                pass
        finally:
            await loader.aclose()
    assert info.value.index == 0
    assert "-1" not in str(info.value), str(info.value)


class FirstHangs(al.AsyncDataset[int]):
    """Index 0 waits for ``release``; the others answer at once and are counted."""

    def __init__(self, n: int, enough: int) -> None:
        self.n, self.enough = n, enough
        self.release = anyio.Event()
        self.others = 0
        self.others_enough = anyio.Event()

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == 0:
            await self.release.wait()
        else:
            self.others += 1
            if self.others >= self.enough:
                self.others_enough.set()
        await anyio.lowlevel.checkpoint()
        return index


@pytest.mark.anyio
@pytest.mark.parametrize("batch_size", [1, None])
async def test_a_hung_first_sample_does_not_hold_back_the_others(batch_size: int | None) -> None:
    """One-sample batches: the slow start sent the first sample alone and the rest of the
    concurrency waited for it, so one hung request (a long timeout) stalled the epoch."""
    ds = FirstHangs(40, enough=8)
    got: list[Any] = []

    async def consume(loader: al.Loader) -> None:
        async for batch in loader:
            got.append(batch)

    async with al.Loader(ds, batch_size=batch_size, concurrency=8) as loader:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, loader)
                await ds.others_enough.wait()  # fetched while index 0 hangs
                ds.release.set()
    flat = [int(np.asarray(b).reshape(-1)[0]) for b in got]
    assert flat == list(range(40))


class Closing(Indexed):
    """``Indexed`` that counts ``aclose()`` calls (its connections released)."""

    closed = 0

    async def aclose(self) -> None:
        self.closed += 1


@pytest.mark.anyio
async def test_aclose_releases_the_dataset_when_the_last_report_raises() -> None:
    """aclose() ends the open epoch, which sends its last statistics: a callback that
    raises then (a metrics backend down) reaches the caller, and the dataset's
    connections are still released."""
    fail = False

    def report(snapshot: dict[str, Any]) -> None:
        if fail:
            raise ConnectionError("metrics backend down")

    ds = Closing(40)
    loader = al.Loader(ds, batch_size=4, on_statistics=report, statistics_every=1000)
    iterator = loader.__aiter__()
    await iterator.__anext__()
    fail = True
    with pytest.raises(ConnectionError, match="metrics backend down"):
        await loader.aclose()
    assert ds.closed == 1
