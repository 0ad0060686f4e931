"""Exactly-once delivery across simulated ranks (explicit ``rank=``/``world_size=``) and
torch DataLoader workers together (``DataLoader(loader.to_torch(), batch_size=None,
num_workers=k)``), as docs/api.md and docs/distributed.md promise it.

Review (helper-67) checked the plain cases across ranks, workers, samplers, planned
batches, tar shards and resume, and found them exact; kept here is the one case that is
not: samples removed by a filter or ``on_error="skip"``, as docs/dataloader.md describes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import asyncload as al

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def keep(x: Any) -> bool:
    """The filter: with 2 ranks (rank ``x % 2`` holds ``x`` at its position ``x // 2``),
    drops each rank's positions 1, 5, 9: 9 of its 12 samples survive."""
    return (int(x) // 2) % 4 != 1


class FailsAQuarter(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``; the indices that `keep` drops fail (on_error="skip")."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if not keep(index):
            raise ValueError(f"corrupt sample {index}")
        return index


def build(kind: str, rank: int, world_size: int, *, drop_last: bool) -> al.Loader:
    """24 samples, 2 ranks of 12, batches of 3: no padding, no trimming of the shares, and
    every rank's share is exactly 4 whole batches."""
    if kind == "filter":
        dataset: Any = al.from_sequence(np.arange(24)).filter(keep)
        extra: dict[str, Any] = {}
    else:
        dataset = FailsAQuarter(24)
        extra = {"on_error": "skip"}
    return al.Loader(
        dataset,
        batch_size=3,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        **extra,
    )


def samples(batches: Any) -> list[int]:
    return sorted(int(x) for batch in batches for x in batch)


@pytest.mark.parametrize("kind", ["filter", "skip"])
@pytest.mark.parametrize("drop_last", [False, True])
def test_workers_batch_what_remains_of_their_part(kind: str, drop_last: bool) -> None:
    """With samples removed, each worker fills its batches from what remains of its own
    part (docs/dataloader.md). Nothing is delivered twice; without ``drop_last`` every
    survivor is delivered; with it every batch is full, and at most the workers' short
    tails (each under a batch) are not delivered, where the rank alone drops one."""
    world_size, workers, batch_size = 2, 2, 3
    for rank in range(world_size):
        survivors = [x for x in range(rank, 24, world_size) if keep(x)]
        # (the rank's own pass: its 9 survivors in 3 whole batches)
        assert samples(build(kind, rank, world_size, drop_last=drop_last)) == survivors
        loader = build(kind, rank, world_size, drop_last=drop_last)
        batches = [
            [int(x) for x in batch]
            for batch in torch.utils.data.DataLoader(
                loader.to_torch(), batch_size=None, num_workers=workers, timeout=60
            )
        ]
        got = sorted(x for batch in batches for x in batch)
        assert sorted(set(got)) == got, "a sample delivered twice"
        assert set(got) <= set(survivors)
        if drop_last:
            assert all(len(batch) == batch_size for batch in batches)
            assert len(survivors) - len(got) < workers * batch_size
        else:
            assert got == survivors
