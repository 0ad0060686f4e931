"""Review: observability numbers being exact (``statistics()``, ``on_statistics``, cache
and resilience counters). Each test failed before its fix (helper-85, review); each
docstring tells what was wrong."""

from __future__ import annotations

import re
from typing import Any

import anyio
import numpy as np
import pytest

import asyncload as al

ANYIO_BACKENDS = [pytest.param("asyncio", id="asyncio")]


def _check(x: int) -> int:
    if x % 10 == 3:
        raise ValueError(f"bad value {x}")
    return x


def test_statistics_snapshot_error_log_is_a_copy() -> None:
    """A ``statistics()`` snapshot is a plain dict the caller owns: changing an entry of its
    ``error_log`` (an exporter that pops or renames keys, say) must not change what the
    loader reports next. Expected: the loader's next snapshot still says
    ``action == "skipped"``; the entries' dicts are shared, so it says what the caller
    wrote."""
    loader = al.Loader(al.from_sequence(np.arange(30)).map(_check), batch_size=10,
                       on_error="skip")  # fmt: skip
    list(loader)
    snapshot = loader.statistics()
    snapshot["error_log"][0]["action"] = "exported"
    snapshot["error_log"][0].pop("error")
    again = loader.statistics()["error_log"][0]
    assert again["action"] == "skipped"
    assert again["error"] == "ValueError('bad value 3')"


def test_buffered_returns_to_zero_when_an_in_memory_for_loop_is_closed() -> None:
    """A plain ``for`` over in-memory data (the inline iterator) closed early, by
    ``iterator.close()`` or ``loader.close()``: the epoch is over, so
    ``statistics()["buffered"]`` (batches ready and not yet taken) must be 0. Expected 0;
    it keeps reporting the batches left in the closed iterator's ready deque."""
    loader = al.Loader(al.from_sequence(np.arange(100)), batch_size=2, prefetch=2)
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert loader.statistics()["buffered"] == 0

    other = al.Loader(al.from_sequence(np.arange(100)), batch_size=2, prefetch=2)
    kept = iter(other)
    next(kept)
    other.close()
    assert other.statistics()["buffered"] == 0
    assert list(kept) == []


def test_last_snapshot_after_a_break_in_an_in_memory_for_loop_has_nothing_buffered() -> None:
    """The snapshot ``on_statistics`` gets when a plain ``for`` over in-memory data is left
    by ``break`` describes an epoch that is over (observability.md's gauges keep it until
    the next epoch). Expected ``buffered == 0`` in it, as ``statistics()`` after an async
    dataset's break says; it reports the batch left in the closed inline iterator (1)."""
    got: list[dict[str, Any]] = []
    loader = al.Loader(al.from_sequence(np.arange(40)), batch_size=4, prefetch=2,
                       on_statistics=got.append, statistics_every=3)  # fmt: skip
    for step, _batch in enumerate(loader):
        if step == 4:
            break
    assert [s["batches"] for s in got] == [3, 5]
    assert got[-1]["buffered"] == 0


def test_throttle_decreases_count_only_decreases() -> None:
    """api.md: ``throttle_decreases`` is "the times it lowered the limit". A loader of
    ``concurrency=1`` (the throttle's floor, ``min_concurrency=1``) cannot lower its limit:
    a 503 answer leaves ``concurrency_limit`` at 1. Expected ``throttle_decreases == 0``
    (``throttled == 1``); Throttle.failed() counts a decrease for every throttling answer
    past its mark even when the limit stays where it is."""

    class Busy(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 4

        async def __getitem__(self, index: int) -> int:
            await anyio.lowlevel.checkpoint()
            if index == 1:
                raise al.HTTPStatusError(503, f"http://127.0.0.1/{index}")
            return index

    loader = al.Loader(Busy(), batch_size=2, concurrency=1, on_error="skip")
    list(loader)
    stats = loader.statistics()
    assert (stats["throttled"], stats["concurrency_limit"]) == (1, 1)
    assert stats["throttle_decreases"] == 0


def test_progress_bar_does_not_count_the_batch_whose_report_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A batch whose ``on_statistics`` call raises is not delivered (EpochIterator.commit
    takes it back out of ``statistics()``, and a resume delivers it again): the loop got 5
    batches and ``statistics()["batches"] == 5``. Expected: the progress bar ends at 5/10
    as well; Reporter.batch() updated the bar before the callback raised, so it ends at
    6/10."""
    pytest.importorskip("tqdm")
    calls = 0

    def export(snapshot: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # at batch 6
            raise ConnectionError("metrics backend down")

    loader = al.Loader(al.from_sequence(np.arange(100)), batch_size=10, progress=True,
                       on_statistics=export, statistics_every=3)  # fmt: skip
    taken = 0
    with pytest.raises(ConnectionError):
        for _batch in loader:
            taken += 1
    assert taken == loader.statistics()["batches"] == 5
    shown = re.findall(r"(\d+)/10\b", capsys.readouterr().err)
    assert shown[-1] == "5"


class _Bytes(al.AsyncDataset[bytes]):
    def __len__(self) -> int:
        return 10

    async def __getitem__(self, index: int) -> bytes:
        await anyio.lowlevel.checkpoint()
        return bytes([index])


def _even(sample: bytes) -> bool:
    return sample[0] % 2 == 0


def test_a_filter_drop_is_not_a_cache_load_error(tmp_path: Any) -> None:
    """api.md: a filter's drops are counted as ``filtered``, "never as errors"; the cache's
    ``load_errors`` are "loads that raised". A filtered view under ``cache=`` drops 5 of
    10 samples and nothing fails (the loader says ``errors == 0``). Expected
    ``load_errors == 0`` in ``LRUCache.statistics()`` and ``DiskCache.statistics()``; both
    count each drop (the load raised ``SampleFiltered``) as a load error: 5."""
    dataset = _Bytes().filter(_even)
    memory = al.LRUCache()
    loader = al.Loader(dataset, batch_size=2, cache=memory)
    list(loader)
    stats = loader.statistics()
    assert (stats["filtered"], stats["errors"], stats["samples"]) == (5, 0, 5)
    disk = al.DiskCache(tmp_path / "cache", max_bytes=1 << 20)
    list(al.Loader(dataset, batch_size=2, cache=disk))
    assert (memory.statistics()["load_errors"], disk.statistics()["load_errors"]) == (0, 0)
