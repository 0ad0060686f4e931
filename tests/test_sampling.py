"""Sampling invariants (hypothesis): every index across ranks, equal shares padded by
wrapping as torch's DistributedSampler, a permutation that is a pure function of
(seed, epoch), worker splits that add up to the rank's batches, and ordered output."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import anyio
import pytest
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al
from asyncload.sampling import Plan, epoch_order

SEEDS = st.integers(0, 2**32 - 1)


def padded_order(order: list[int], world_size: int, drop_last: bool) -> list[int]:
    """What torch's DistributedSampler hands out over all ranks (rank r takes ``[r::w]``)."""
    n = len(order)
    if drop_last:
        return order[: (n // world_size) * world_size]
    total = math.ceil(n / world_size) * world_size
    return (order * math.ceil(total / n))[:total] if n else []


def chunks(values: list[Any], size: int) -> list[list[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def to_list(batch: Any) -> list[int]:
    return [int(x) for x in batch]


async def collect(loader: al.Loader) -> list[list[int]]:
    # aclose(): an epoch's resources are released now, not whenever it is collected.
    async with loader:
        return [to_list(batch) async for batch in loader]


class Scrambled(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``; fetches finish out of index order (a fixed number of
    checkpoints per index), so ordering is really exercised."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        for _ in range((index * 7) % 5):
            await anyio.lowlevel.checkpoint()
        return index


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 120),
    world_size=st.integers(1, 9),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    seed=SEEDS,
    epoch=st.integers(0, 1000),
)
def test_rank_shares(
    n: int, world_size: int, drop_last: bool, shuffle: bool, seed: int, epoch: int
) -> None:
    order = [int(i) for i in epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)]
    assert sorted(order) == list(range(n))
    shares = [
        list(Plan(order, rank=r, world_size=world_size, drop_last=drop_last))
        for r in range(world_size)
    ]
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    assert [len(s) for s in shares] == [per_rank] * world_size
    expected = padded_order(order, world_size, drop_last)
    for r, share in enumerate(shares):
        assert share == expected[r::world_size]
    union = [i for share in shares for i in share]
    if not drop_last:
        assert set(union) == set(range(n))  # every index somewhere
        # Padding only wraps around: the extra samples repeat the order from its start.
        extra = sorted(union)
        for i in range(n):
            extra.remove(i)
        assert sorted(extra) == sorted((order * world_size)[: len(union) - n])
    else:
        assert len(set(union)) == len(union)  # trimmed, never duplicated
    if n % world_size == 0:
        assert sorted(union) == list(range(n))  # a partition


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), world_size=st.integers(1, 6), drop_last=st.booleans())
def test_rank_shares_match_torch_distributed_sampler(
    n: int, world_size: int, drop_last: bool
) -> None:
    """Unshuffled, each rank gets exactly what torch's DistributedSampler gives it."""
    for rank in range(world_size):
        sampler = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=False, drop_last=drop_last
        )
        loader = al.Loader(
            al.from_sequence(list(range(n))),
            batch_size=None,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        assert [int(x) for x in anyio.run(collect_samples, loader)] == list(sampler)
        assert len(loader) == len(sampler)


async def collect_samples(loader: al.Loader) -> list[Any]:
    async with loader:
        return [sample async for sample in loader]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(20, 300), seed=SEEDS, epoch=st.integers(0, 10_000))
def test_permutation_is_a_pure_function_of_seed_and_epoch(n: int, seed: int, epoch: int) -> None:
    first = list(epoch_order(n, shuffle=True, seed=seed, epoch=epoch))
    again = list(epoch_order(n, shuffle=True, seed=seed, epoch=epoch))
    assert first == again
    assert sorted(first) == list(range(n))
    assert first != list(epoch_order(n, shuffle=True, seed=seed, epoch=epoch + 1))
    assert first != list(epoch_order(n, shuffle=True, seed=seed + 1, epoch=epoch))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(20, 80),
    seed=SEEDS,
    epoch=st.integers(0, 100),
    world_size=st.integers(1, 3),
    batch_size=st.integers(1, 7),
)
def test_loaders_agree_on_the_shuffle(
    n: int, seed: int, epoch: int, world_size: int, batch_size: int
) -> None:
    """Two loaders built alike give the same batches for an epoch, on every rank; ranks
    together cover the dataset; another epoch gives another order."""

    def build(rank: int) -> al.Loader:
        loader = al.Loader(
            al.from_sequence(list(range(n))),
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        loader.set_epoch(epoch)
        return loader

    per_rank = [anyio.run(collect, build(r)) for r in range(world_size)]
    assert per_rank == [anyio.run(collect, build(r)) for r in range(world_size)]
    union = {i for batches in per_rank for batch in batches for i in batch}
    assert union == set(range(n))
    other = build(0)
    other.set_epoch(epoch + 1)
    assert anyio.run(collect, other) != per_rank[0]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 100),
    world_size=st.integers(1, 4),
    drop_last=st.booleans(),
    batch_size=st.integers(1, 9),
    num_workers=st.integers(1, 5),
    data=st.data(),
)
def test_worker_plans_add_up_to_the_rank(
    n: int, world_size: int, drop_last: bool, batch_size: int, num_workers: int, data: Any
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    order = list(range(n))[::-1]
    common = {
        "rank": rank,
        "world_size": world_size,
        "drop_last": drop_last,
        "batch_size": batch_size,
    }
    rank_batches = chunks(list(Plan(order, **common)), batch_size)
    per_worker = [
        chunks(list(Plan(order, worker=k, num_workers=num_workers, **common)), batch_size)
        for k in range(num_workers)
    ]
    assert round_robin(per_worker) == rank_batches
    # Every worker's batches but (maybe) its last are full.
    for batches in per_worker:
        assert all(len(b) == batch_size for b in batches[:-1])


def round_robin(per_worker: list[list[Any]]) -> list[Any]:
    """The order torch's DataLoader takes batches from iterable-dataset workers."""
    out = []
    for i in range(max((len(b) for b in per_worker), default=0)):
        for batches in per_worker:
            if i < len(batches):
                out.append(batches[i])
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 60),
    world_size=st.integers(1, 3),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
    batch_size=st.integers(1, 6),
    num_workers=st.integers(1, 4),
    data=st.data(),
)
def test_for_worker_loaders_add_up_to_the_rank(
    n: int,
    world_size: int,
    drop_last: bool,
    shuffle: bool,
    batch_size: int,
    num_workers: int,
    data: Any,
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    loader = al.Loader(
        Scrambled(n),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=5,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        concurrency=4,
    )
    whole = anyio.run(collect, loader)
    assert len(whole) == len(loader)
    per_worker = [anyio.run(collect, loader.for_worker(k, num_workers)) for k in range(num_workers)]
    assert round_robin(per_worker) == whole


@settings(max_examples=80, deadline=None)
@given(
    sampler=st.lists(st.integers(0, 29), max_size=60),
    world_size=st.integers(1, 3),
    batch_size=st.integers(1, 8),
    concurrency=st.integers(1, 12),
    prefetch=st.integers(0, 3),
    data=st.data(),
)
def test_ordered_output_equals_sampler_order(
    sampler: list[int],
    world_size: int,
    batch_size: int,
    concurrency: int,
    prefetch: int,
    data: Any,
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    loader = al.Loader(
        Scrambled(30),
        sampler=sampler,
        batch_size=batch_size,
        concurrency=concurrency,
        prefetch=prefetch,
        rank=rank,
        world_size=world_size,
    )
    share = padded_order(sampler, world_size, drop_last=False)[rank::world_size]
    batches = anyio.run(collect, loader)
    assert batches == chunks(share, batch_size)
    assert len(batches) == len(loader)
    # Unordered: the same samples, each once.
    unordered = al.Loader(
        Scrambled(30),
        sampler=sampler,
        batch_size=batch_size,
        concurrency=concurrency,
        prefetch=prefetch,
        rank=rank,
        world_size=world_size,
        ordered=False,
    )
    flat = [i for batch in anyio.run(collect, unordered) for i in batch]
    assert sorted(flat) == sorted(share)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_plans(n: int) -> None:
    for w in (1, 2, 3):
        shares = [list(Plan(list(range(n)), rank=r, world_size=w)) for r in range(w)]
        assert [len(s) for s in shares] == [n and 1] * w


@pytest.mark.parametrize("replicas", [2, 4])
def test_a_distributed_sampler_over_several_replicas_is_refused(replicas: int) -> None:
    """It gives one rank's share, which the Loader would deal to ranks again: each rank
    would see 1/world_size of it, and half the data (of 2 ranks) never, silently."""
    data = al.from_sequence(list(range(20)))
    sampler = torch.utils.data.DistributedSampler(range(20), num_replicas=replicas, rank=1)
    with pytest.raises(TypeError, match=f"sampler .*DistributedSampler over {replicas}"):
        al.Loader(data, sampler=sampler, rank=1, world_size=replicas)
    # Over one replica it is the whole order (a seeded shuffle with set_epoch): accepted.
    whole = torch.utils.data.DistributedSampler(range(20), num_replicas=1, rank=0, seed=3)
    assert sorted(int(x) for x in al.Loader(data, sampler=whole, batch_size=None)) == list(
        range(20)
    )


def test_the_distributed_sampler_check_imports_no_torch() -> None:
    code = (
        "import sys, asyncload as al\n"
        "loader = al.Loader(al.from_sequence([0, 1, 2]), sampler=[2, 0, 1], batch_size=None)\n"
        "assert [int(x) for x in loader] == [2, 0, 1]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("labels", [10, 21])
def test_a_stratified_sampler_needs_one_label_per_index(labels: int) -> None:
    """Its order holds one position per label: another count yielded another number of
    samples (10 labels over 20 samples: half the dataset, silently)."""
    data = al.from_sequence(list(range(20)))
    sampler = al.StratifiedSampler([i % 2 for i in range(labels)], 4)
    with pytest.raises(ValueError, match=f"sampler: .*{labels} labels for a dataset of 20"):
        al.Loader(data, batch_size=4, sampler=sampler)
    fitting = al.StratifiedSampler([i % 2 for i in range(20)], 4)
    assert sum(len(b) for b in al.Loader(data, batch_size=4, sampler=fitting)) == 20
