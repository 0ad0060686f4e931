"""Review (helper-82): the Loader consumed with ``async for`` by async trainers. Each test
failed before its fix; its docstring says what happened and what is expected."""

from __future__ import annotations

import contextvars
from typing import Any

import anyio
import numpy as np
import pytest

import asyncload as al

pytestmark = pytest.mark.anyio


class BatchedSource(al.AsyncDataset[int]):
    """Not in memory, overrides ``getitems`` (as FileSource, NpySource, S3Source do)."""

    def __len__(self) -> int:
        return 32

    async def __getitem__(self, index: int) -> int:
        await anyio.lowlevel.checkpoint()
        return index

    async def getitems(self, indices: Any) -> list[int]:
        await anyio.lowlevel.checkpoint()
        return list(indices)


@pytest.mark.parametrize("source", ["from_sequence", "batched_source"])
async def test_async_transform_on_a_batched_dataset_runs_one_at_a_time(source: str) -> None:
    """An async ``transform=`` (an async decode, a download of the URL in the sample) over a
    dataset that overrides ``getitems`` (``from_sequence``, FileSource, NpySource, ...),
    ``batch_size=8, concurrency=8``: only ONE transform is ever in flight (peak 1), because
    ``Fetcher.chunk`` awaits ``finish()`` sample after sample within a chunk, and there is
    only ``concurrency // chunk`` = 1 worker. Expected: up to ``concurrency`` (8) at once,
    as the same function given as ``dataset.map(fn)`` gets (8: ``MappedDataset.batched``
    turns batching off for async fns "so the Loader overlaps the calls"). docs/sources.md
    presents ``.map(fn)`` and ``transform=`` as two places for the same decode step."""
    active = 0
    peak = 0
    gate: anyio.Event | None = None

    async def decode(x: int) -> int:
        nonlocal active, peak, gate
        if gate is None:
            gate = anyio.Event()
        active += 1
        peak = max(peak, active)
        await gate.wait()
        active -= 1
        return x

    ds: Any = al.from_sequence(list(range(32))) if source == "from_sequence" else BatchedSource()
    loader = al.Loader(ds, batch_size=8, concurrency=8, transform=decode)
    got: list[int] = []

    async def consume() -> None:
        async for batch in loader:
            got.extend(batch.tolist())

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.wait_all_tasks_blocked()  # every transform that can start has
            peak_before_release = peak
            assert gate is not None
            gate.set()
        await loader.aclose()
    assert got == list(range(32))
    assert peak_before_release == 8, f"{peak_before_release} async transform(s) in flight"


@pytest.mark.parametrize("batch_size", [3, None])
async def test_async_collate_fn_yields_coroutines_instead_of_batches(
    batch_size: int | None,
) -> None:
    """``collate_fn=`` an ``async def``: the loader yields un-awaited coroutine objects as
    the "batches" (and a "coroutine was never awaited" RuntimeWarning comes later).
    Expected: the batch (awaited, as ``transform``/``validate``/``on_error`` are), or a
    ``TypeError`` at construction naming ``collate_fn``, as ``batch_cost`` gets
    ("batch_cost must be a plain function: an async one cannot be used")."""

    async def collate(samples: Any) -> Any:
        await anyio.lowlevel.checkpoint()
        return samples

    try:
        loader = al.Loader(
            al.from_sequence(list(range(6))), batch_size=batch_size, collate_fn=collate
        )
    except TypeError as exc:
        assert "collate_fn" in str(exc)
        return
    with anyio.fail_after(30):
        async with loader:
            got = [batch async for batch in loader]
    for batch in got:
        if hasattr(batch, "close"):
            batch.close()  # (no "never awaited" warning from this test)
    expected = [[0, 1, 2], [3, 4, 5]] if batch_size else list(range(6))
    assert got == expected


REQUEST_ID = contextvars.ContextVar("REQUEST_ID", default="unset")


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
async def test_consumer_contextvars_do_not_reach_async_transforms_on_trio() -> None:
    """A ContextVar set by the consuming task (a request id, an OpenTelemetry span, a
    structlog binding) is seen by an async ``transform`` on asyncio and uvloop (the epoch's
    background task copies the consumer's context), and by a sync one everywhere (it runs
    in the consumer's task), but NOT by an async transform on trio: it sees the default,
    because the epoch runs as a trio *system* task, which does not inherit context
    variables. Expected: the same on every backend the docs support (the consumer's
    values, as on asyncio)."""
    seen: list[str] = []

    async def transform(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        seen.append(REQUEST_ID.get())
        return x

    loader = al.Loader(al.from_sequence(list(range(4))), batch_size=2, transform=transform)
    REQUEST_ID.set("run-42")
    with anyio.fail_after(30):
        async with loader:
            batches = [batch.tolist() async for batch in loader]
    assert batches == [[0, 1], [2, 3]]
    assert seen == ["run-42"] * 4


async def test_cancelled_scope_does_not_stop_an_in_memory_async_for() -> None:
    """``async for`` over an in-memory dataset (the inline epoch) inside a cancel scope
    that is cancelled after the 3rd batch (the body does no ``await`` afterwards, as a
    synchronous training step does not): the loop goes on yielding 28 more batches (31 in
    all) before a cancellation point is reached, because ``InlineEpoch.next_item`` only
    checkpoints every 64 units and not at all while it hands out batches fetched ahead.
    Expected, as for a dataset with I/O (the background epoch's ``receive()`` is a
    checkpoint) and as anyio/trio expect of library awaits: the cancellation takes effect
    soon. The inline epoch looks every 8 batches (anyio's check costs a few % of an
    in-memory batch; nothing but the consumer itself can cancel while no batch suspends),
    so at most 7 more batches come."""
    loader = al.Loader(al.from_sequence(np.arange(1000)), batch_size=2)
    got = 0
    with anyio.fail_after(30):
        with anyio.CancelScope() as scope:
            async for _batch in loader:
                got += 1
                if got == 3:
                    scope.cancel()
        await loader.aclose()
    assert scope.cancelled_caught
    assert got <= 3 + 7, f"{got - 3} batches delivered after the scope was cancelled"
