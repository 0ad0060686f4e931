"""Review of batching, collation and streams (helper-84): the bug it found, fixed."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

import asyncload as al


def _arrays_of_uneven_lengths() -> list[np.ndarray]:
    """13 samples: sample ``i`` is ``1 + (i * 7) % 5`` copies of ``i``."""
    return [np.full(1 + (i * 7) % 5, i, np.int64) for i in range(13)]


class _SizedArrays(al.AsyncIterableDataset):
    """A stream of the given arrays that knows its size (so it has a len())."""

    def __init__(self, data: list[np.ndarray]) -> None:
        self.data = data

    def num_samples(self) -> int:
        return len(self.data)

    async def __aiter__(self) -> AsyncIterator[np.ndarray]:
        for x in self.data:
            yield x


@pytest.mark.parametrize("kind", ["map", "stream"])
def test_bucketed_batches_under_to_torch_workers_are_the_ranks_batches(kind: str) -> None:
    """api.md: DataLoader(loader.to_torch(), batch_size=None, num_workers=k) "yields each
    of this rank's batches exactly once per epoch, spread over the k workers"; and
    docs/batching.md: with fixed counts and bucket=, every rank yields len(loader) batches.

    13 samples, batch_size=3, bucket=5: the loader's epoch is 5 batches (windows of 5, 5
    and 3 samples, cut into 2 + 2 + 1), and len(DataLoader) reports 5. Expected: the
    2-worker DataLoader yields those same 5 batches. Review (helper-84), failed before its
    fix: each worker bucketed its own part of the rank's share (map: Plan dealt runs of
    batch_size positions to workers; stream: worker runs of 1-sample units), so the
    DataLoader yielded 6 batches, grouped differently from the loader's, and torch warned
    "Length of IterableDataset ... was reported to be 5 ... but 6 samples have been
    fetched". Now whole buckets go to the workers."""
    torch = pytest.importorskip("torch")
    data = _arrays_of_uneven_lengths()
    dataset: Any = al.from_sequence(data) if kind == "map" else _SizedArrays(data)
    loader = al.Loader(dataset, batch_size=3, bucket=5, collate_fn=al.PadCollate())

    def groups(batches: Any) -> list[tuple[int, ...]]:
        return sorted(tuple(sorted(int(row[0]) for row in padded)) for padded, _ in batches)

    single = groups(loader)
    assert len(single) == len(loader) == 5
    data_loader = torch.utils.data.DataLoader(loader.to_torch(), batch_size=None, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's length warning: asserted below instead)
        got = groups(data_loader)
    assert len(got) == len(data_loader) == len(loader)
    assert got == single
