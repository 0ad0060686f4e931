"""Statistics that mean what they say, and validate verdicts as numpy gives them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

import asyncload as al


class Numbers(al.AsyncDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        return index


def test_rates_stop_when_the_epoch_ends() -> None:
    loader = al.Loader(Numbers(10), batch_size=4)
    list(loader)
    first = loader.statistics()
    again = loader.statistics()
    assert first["elapsed_seconds"] == again["elapsed_seconds"]
    assert first["samples_per_second"] == again["samples_per_second"] > 0


def test_buffered_counts_the_sync_bridge_queue() -> None:
    loader = al.Loader(Numbers(64), batch_size=1, prefetch=4)
    iterator = iter(loader)
    next(iterator)
    # The pump refills the queue up to `prefetch` batches; wait for it by taking none.
    import time

    deadline = time.monotonic() + 10
    while loader.statistics()["buffered"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a background thread, bounded: no ordering depends on it
    assert loader.statistics()["buffered"] == 4
    iterator.close()  # type: ignore[attr-defined]
    assert loader.statistics()["buffered"] == 0


@pytest.mark.parametrize("verdict", [False, np.False_, 0])
def test_falsy_verdicts_reject_the_sample(verdict: object) -> None:
    loader = al.Loader(
        al.from_sequence([1, 2, 3]),
        batch_size=None,
        on_error="skip",
        validate=lambda s: verdict if s == 2 else None,
    )
    assert [int(x) for x in loader] == [1, 3]
    assert loader.statistics()["skipped"] == 1


def test_numpy_true_and_none_pass() -> None:
    data = [np.array([1, 2]), np.array([3, 4])]
    loader = al.Loader(al.from_sequence(data), batch_size=None, validate=lambda s: np.all(s > 0))
    assert len(list(loader)) == 2


class Stream(al.AsyncIterableDataset[int]):
    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(10):
            yield i

    def num_samples(self) -> int:
        return 10


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_torch_loader_len_counts_the_ranks_batches_under_workers() -> None:
    # 10 samples over 3 workers: runs of whole batches of the rank's share (4, 4 and 2
    # samples), not each worker padded to 4 (12 samples, 6 batches, two seen twice).
    pytest.importorskip("torch")
    batches = al.Loader(Stream(), batch_size=2).to_torch_loader(num_workers=3)
    taken = list(batches)
    assert len(batches) == len(taken) == 5
    assert sorted(int(x) for batch in taken for x in batch) == list(range(10))
