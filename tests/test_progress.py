"""Watching a run: ``progress=True`` (a tqdm bar) and ``on_statistics`` every N batches."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import pytest

import asyncload as al

pytestmark = pytest.mark.anyio


def loader(**kwargs: Any) -> al.Loader:
    return al.Loader(al.from_sequence(list(range(1000))), **{"batch_size": 10, **kwargs})


async def test_statistics_every_n_batches_and_at_the_end() -> None:
    got: list[dict[str, Any]] = []
    run = loader(on_statistics=got.append, statistics_every=30)
    _ = [b async for b in run]
    assert [s["batches"] for s in got] == [30, 60, 90, 100]
    assert got[-1]["samples"] == 1000


def test_statistics_through_the_sync_bridge_and_a_break() -> None:
    got: list[dict[str, Any]] = []
    run = loader(on_statistics=got.append, statistics_every=40)
    list(run)
    assert [s["batches"] for s in got] == [40, 80, 100]
    got.clear()
    for i, _ in enumerate(run):
        if i == 44:
            break
    assert [s["batches"] for s in got] == [40, 45]  # the last when the loop is left


async def test_an_epoch_that_fails_is_reported() -> None:
    # Before the first batch: the error reaches the hook in the end snapshot.
    def broken(i: int) -> int:
        raise OSError(f"sample {i} is broken")

    got: list[dict[str, Any]] = []
    run = al.Loader(al.from_sequence(list(range(8))).map(broken), batch_size=4,
                    on_statistics=got.append)  # fmt: skip
    with pytest.raises(al.SampleError):
        _ = [b async for b in run]
    assert len(got) == 1 and got[0]["batches"] == 0 and got[0]["errors"] >= 1


async def test_a_failure_after_a_snapshot_is_reported() -> None:
    # Batch 5 sends a snapshot (every 5); sample 20 fails only once the consumer holds
    # batch 5, so the snapshot at the end is the only one that can carry the error.
    consumer_has_batch_5 = anyio.Event()

    class Gated(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 40

        async def __getitem__(self, i: int) -> int:
            if i == 20:
                await consumer_has_batch_5.wait()
                raise OSError("sample 20 is broken")
            return i

    got: list[dict[str, Any]] = []
    run = al.Loader(Gated(), batch_size=4, concurrency=1, on_statistics=got.append,
                    statistics_every=5)  # fmt: skip
    with pytest.raises(al.SampleError):
        async for batch in run:
            if 19 in batch:
                consumer_has_batch_5.set()
    assert [(s["batches"], s["errors"]) for s in got] == [(5, 0), (5, 1)]


class Failing:
    """An on_statistics callback whose backend fails at its ``fail_at``-th call."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, snapshot: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("metrics backend down")


async def slow_double(x: int) -> int:
    return 2 * x  # async: the epoch runs in the bridge's thread under a plain for


def check_nothing_lost(run: al.Loader, got: list[int], transform: Any = None) -> None:
    assert len(got) == 50  # 5 batches; the 6th's report raised
    resumed = loader(transform=transform)
    resumed.load_state_dict(run.state_dict())
    rest = [int(x) for batch in resumed for x in batch]
    scale = 2 if transform else 1
    assert sorted(got + rest) == [scale * i for i in range(1000)]


@pytest.mark.parametrize("transform", [None, slow_double], ids=["inline", "bridge"])
def test_a_failing_statistics_callback_loses_no_batch(transform: Any) -> None:
    """The batch whose report raised is not counted: a resumed epoch delivers it. (It
    was counted as delivered, and under the bridge each failure also lost a credit until
    next() waited forever.)"""
    run = loader(on_statistics=Failing(fail_at=2), statistics_every=3, transform=transform)
    got: list[int] = []
    with pytest.raises(ConnectionError, match="backend down"):
        for batch in run:
            got.extend(int(x) for x in batch)
    check_nothing_lost(run, got, transform)


async def test_a_failing_statistics_callback_loses_no_batch_under_async_for() -> None:
    run = loader(on_statistics=Failing(fail_at=2), statistics_every=3)
    got: list[int] = []
    with pytest.raises(ConnectionError, match="backend down"):
        async for batch in run:
            got.extend(int(x) for x in batch)
    check_nothing_lost(run, got)


async def test_async_for_left_early_sends_the_last_snapshot() -> None:
    """observability.md: once more when the loop leaves the epoch, on a break too (the
    loop's iterator is dropped there: CPython collects it at once)."""
    got: list[dict[str, Any]] = []
    run = loader(on_statistics=got.append, statistics_every=4)
    taken = 0
    async for _batch in run:
        taken += 1
        if taken == 6:
            break
    assert [s["batches"] for s in got] == [4, 6]
    rate = run.statistics()["samples_per_second"]
    assert run.statistics()["samples_per_second"] == rate  # frozen: the epoch ended


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    list(loader(progress=True))
    err = capsys.readouterr().err
    assert "100/100" in err
    assert "samples/s" in err


@pytest.mark.parametrize("batch_size", [10, None])
def test_a_resumed_epochs_bar_ends_at_its_total(
    capsys: pytest.CaptureFixture[str], batch_size: int | None
) -> None:
    pytest.importorskip("tqdm")
    total = 100 if batch_size else 1000
    first = loader(batch_size=batch_size)
    for i, _ in enumerate(first):
        if i == 39:
            break
    resumed = loader(batch_size=batch_size, progress=True)
    resumed.load_state_dict(first.state_dict())
    assert len(list(resumed)) == total - 40
    err = capsys.readouterr().err
    assert f"{total}/{total}" in err and f"{total - 40}/{total}" not in err


def test_progress_needs_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        list(loader(progress=True))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"statistics_every": 0}, ValueError), ({"on_statistics": 3}, TypeError)],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        loader(**kwargs)
