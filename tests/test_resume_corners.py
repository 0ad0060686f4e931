"""Resumption corners (found by helper-46): an unordered drop_last state resumed under
DataLoader workers loses nothing; a plan's slices honour their step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncload as al


def keep(samples: list[Any]) -> list[Any]:
    return [int(s) for s in samples]


class Gated(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``; with a ``gate``, index ``held`` waits for it, so that an
    unordered epoch delivers later samples first (a state with positions past its
    watermark)."""

    def __init__(self, n: int, held: int = 0) -> None:
        self.n, self.held = n, held
        self.gate: anyio.Event | None = None

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == self.held and self.gate is not None:
            await self.gate.wait()
        await anyio.lowlevel.checkpoint()
        return index


def first_batch_held_back(
    build: Callable[[Gated], al.Loader], dataset: Gated
) -> tuple[list[Any], dict[str, Any]]:
    """The first batch of an (unordered) epoch of ``build(dataset)`` taken while
    ``dataset``'s held sample never comes, and the state saved then."""

    async def first_batch() -> tuple[list[Any], dict[str, Any]]:
        dataset.gate = anyio.Event()
        loader = build(dataset)
        async with loader:
            iterator = aiter(loader)
            taken = await anext(iterator)
            state = loader.state_dict()
        return taken, state

    return asyncio.run(first_batch())


def test_unordered_drop_last_state_resumed_under_workers_loses_nothing() -> None:
    """A map-style state resumes under any number of DataLoader workers (distributed.md).
    Saved by an ``ordered=False`` epoch (done positions past the watermark) and resumed
    with ``drop_last=True`` under 2 workers, each worker is left an odd number of samples
    and drops its last, partial batch: 12 samples divide into batches of 2, nothing is
    trimmed, yet 2 of them never come."""
    pytest.importorskip("torch")

    def build(dataset: Gated) -> al.Loader:
        return al.Loader(
            dataset, batch_size=2, drop_last=True, ordered=False, concurrency=4, collate_fn=keep
        )

    taken, state = first_batch_held_back(build, Gated(12))
    assert state["progress"]["done"], state  # positions past the watermark (the premise)
    resumed = build(Gated(12))
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


def test_stratified_sampler_keeps_class_proportions_on_every_rank() -> None:
    """StratifiedSampler promises batches that keep the class proportions. Under ranks,
    the Loader deals its order sample by sample (rank r takes positions r, r + w, ...), so
    with a 50/50 split one rank gets only class 0 and the other only class 1."""
    labels = [i % 2 for i in range(64)]
    sampler = al.StratifiedSampler(labels, 8, seed=0)
    for rank in range(2):
        loader = al.Loader(
            al.from_sequence(list(range(64))),
            batch_size=8,
            sampler=sampler,
            rank=rank,
            world_size=2,
            collate_fn=keep,
        )
        for batch in loader:
            ones = sum(labels[i] for i in batch)
            assert abs(ones - 4) < 2, (rank, [labels[i] for i in batch])


@pytest.mark.parametrize("n", [64, 70, 13])
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_stratified_runs_dealt_to_ranks_lose_and_repeat_nothing(
    n: int, world_size: int, drop_last: bool
) -> None:
    """Ranks dealt a StratifiedSampler's order by whole runs still share the epoch as
    ranks dealt sample by sample do: equal counts, every sample once (padding wraps
    around to the start, trimming drops the tail)."""
    labels = [i % 3 for i in range(n)]
    got: list[int] = []
    counts = set()
    for rank in range(world_size):
        loader = al.Loader(
            al.from_sequence(list(range(n))),
            batch_size=4,
            sampler=al.StratifiedSampler(labels, 4, seed=3),
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            collate_fn=keep,
        )
        mine = [i for batch in loader for i in batch]
        counts.add(len(mine))
        got += mine
    assert len(counts) == 1
    if drop_last:
        assert len(set(got)) == len(got) == (n // world_size // 4) * 4 * world_size
    else:
        assert set(got) == set(range(n))
        assert len(got) - n < world_size  # only the padding repeats


def test_stratified_elastic_resume_delivers_each_sample_once() -> None:
    """merge_states() maps each rank's delivered positions back to the epoch order by the
    same runs the plan dealt them by."""
    n, labels = 48, [i % 2 for i in range(48)]

    def build(rank: int, world_size: int) -> al.Loader:
        return al.Loader(
            al.from_sequence(list(range(n))),
            batch_size=4,
            sampler=al.StratifiedSampler(labels, 4, seed=1),
            rank=rank,
            world_size=world_size,
            collate_fn=keep,
        )

    seen: list[int] = []
    states = []
    for rank in range(2):
        loader = build(rank, 2)
        iterator = iter(loader)
        for _ in range(2 + rank):
            seen += next(iterator)
        states.append(loader.state_dict())
        iterator.close()
    merged = build(0, 3).merge_states(states)
    for rank in range(3):
        loader = build(rank, 3)
        loader.load_state_dict(merged)
        seen += [i for batch in loader for i in batch]
    assert sorted(set(seen)) == list(range(n))
    assert len(seen) - n < 3  # only the new ranks' padding repeats


def assert_resumes_exactly(build: Callable[[], al.Loader]) -> None:
    """Saved after every batch in turn and resumed, ``build()`` yields the batches of an
    uninterrupted epoch."""
    full = list(build())
    for saved_after in range(1, len(full)):
        first = build()
        iterator = iter(first)
        taken = [next(iterator) for _ in range(saved_after)]
        state = first.state_dict()
        first.close()
        resumed = build()
        resumed.load_state_dict(state)
        assert taken + list(resumed) == full, f"saved after {saved_after} batches"


def test_bucketed_resume_yields_the_batches_of_an_uninterrupted_run() -> None:
    """api.md: a loaded state yields exactly the batches the original would have yielded
    after the save point. With ``bucket`` the resumed epoch regroups the bucket it was
    saved in, and restarts the seeded bucket-order generator: even a state saved exactly
    at a bucket's end resumes with the next bucket's batches in another order."""
    data = [1, 3, 5, 4, 6, 2, 7, 8, 9, 2, 4, 1, 3, 6, 5, 8]  # each sample its own cost

    def build() -> al.Loader:
        return al.Loader(
            al.from_sequence(data), batch_size=2, bucket=8, batch_cost=int, seed=1, collate_fn=keep
        )

    assert_resumes_exactly(build)


class _Counting(al.AsyncIterableDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def num_samples(self) -> int:
        return self.n

    async def __aiter__(self) -> Any:
        for i in range(self.n):
            yield i


@pytest.mark.parametrize("kind", ["filtered", "budget", "stream"])
def test_bucketed_resume_is_exact_with_filters_budgets_and_streams(kind: str) -> None:
    """A bucket is a run of positions, dropped samples included: re-cut after a resume
    from the same positions and seed, it gives the same batches."""
    costs = [(i * 7) % 9 + 1 for i in range(30)]

    def build() -> al.Loader:
        dataset: Any = al.from_sequence(list(range(30)))
        if kind == "filtered":
            dataset = dataset.filter(lambda x: x % 4 != 1)
        elif kind == "stream":
            dataset = _Counting(30)
        return al.Loader(
            dataset,
            batch_size=3,
            bucket=8,
            batch_budget=12 if kind == "budget" else None,
            batch_cost=costs.__getitem__,
            seed=2,
            collate_fn=keep,
        )

    assert_resumes_exactly(build)
