"""Resumption corners (found by helper-46): an unordered drop_last state resumed under
DataLoader workers loses nothing; a plan's slices honour their step."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncload as al


def keep(samples: list[Any]) -> list[Any]:
    return [int(s) for s in samples]


class GatedZero(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``; with a ``gate``, index 0 waits for it, so that an unordered
    epoch delivers later samples first (a state with positions past its watermark)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.gate: anyio.Event | None = None

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == 0 and self.gate is not None:
            await self.gate.wait()
        await anyio.lowlevel.checkpoint()
        return index


def test_unordered_drop_last_state_resumed_under_workers_loses_nothing() -> None:
    """A map-style state resumes under any number of DataLoader workers (distributed.md).
    Saved by an ``ordered=False`` epoch (done positions past the watermark) and resumed
    with ``drop_last=True`` under 2 workers, each worker is left an odd number of samples
    and drops its last, partial batch: 12 samples divide into batches of 2, nothing is
    trimmed, yet 2 of them never come."""
    pytest.importorskip("torch")

    def build(dataset: GatedZero) -> al.Loader:
        return al.Loader(
            dataset, batch_size=2, drop_last=True, ordered=False, concurrency=4, collate_fn=keep
        )

    async def first_batch() -> tuple[list[int], dict[str, Any]]:
        dataset = GatedZero(12)
        dataset.gate = anyio.Event()
        loader = build(dataset)
        async with loader:
            iterator = aiter(loader)
            taken = await anext(iterator)
            state = loader.state_dict()
        return taken, state

    taken, state = asyncio.run(first_batch())
    assert state["progress"]["done"], state  # positions past the watermark (the premise)
    resumed = build(GatedZero(12))
    resumed.load_state_dict(state)
    rest = [int(x) for batch in resumed.to_torch_loader(num_workers=2) for x in batch]
    assert sorted(taken + rest) == list(range(12))


def test_plan_slices_honour_their_step() -> None:
    """``loader.plan()`` is a ``Sequence[int]``: a slice with a step must give the same
    indices as slicing the list. ``Plan.__getitem__`` drops the step: ``plan[::2]`` is the
    whole plan and ``plan[::-1]`` is empty."""
    loader = al.Loader(al.from_sequence(list(range(10))), shuffle=True, seed=1)
    plan = loader.plan()
    as_list = list(plan)
    assert list(plan[::2]) == as_list[::2]
    assert list(plan[::-1]) == as_list[::-1]
