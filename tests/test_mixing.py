"""Weighted mixing of datasets and stratified batches."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import asyncload as al

pytestmark = pytest.mark.anyio


class Letters(al.AsyncIterableDataset[str]):
    def __init__(self, letter: str, n: int) -> None:
        self.letter, self.n = letter, n

    async def __aiter__(self) -> AsyncIterator[str]:
        for i in range(self.n):
            yield f"{self.letter}{i}"

    def num_samples(self) -> int:
        return self.n


def tagged(letter: str, n: int) -> al.AsyncDataset[str]:
    return al.from_sequence([f"{letter}{i}" for i in range(n)])


async def collect(loader: al.Loader) -> list[Any]:
    return [x async for x in loader]


async def test_mix_follows_the_weights_and_each_source_keeps_its_order() -> None:
    mixed = al.mix([Letters("a", 4000), tagged("b", 4000)], weights=[3, 1])
    got = await collect(al.Loader(mixed, batch_size=None, seed=2))
    counts = Counter(x[0] for x in got)
    # Stops when a runs out (about 4000 / 0.75 draws): b's share is about a quarter.
    assert counts["a"] == 4000
    assert 0.2 < counts["b"] / len(got) < 0.3
    assert [x for x in got if x[0] == "a"] == [f"a{i}" for i in range(4000)]
    assert [x for x in got if x[0] == "b"] == [f"b{i}" for i in range(counts["b"])]


async def test_mix_all_reads_every_sample_once() -> None:
    mixed = al.mix([Letters("a", 50), tagged("b", 20), Letters("c", 5)], stop="all")
    loader = al.Loader(mixed, batch_size=None)
    got = await collect(loader)
    assert sorted(got) == sorted(
        [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(20)] + [f"c{i}" for i in range(5)]
    )
    assert len(loader) == 75  # the size is known when every part's is


async def test_mix_all_with_a_zero_weight_reads_the_others_once() -> None:
    """A dataset of weight 0 is never drawn from: it is not counted either (it was, and
    the loader padded the difference with repeats)."""
    mixed = al.mix([Letters("a", 10), tagged("b", 5), Letters("c", 3)], [1, 1, 0], stop="all")
    loader = al.Loader(mixed, batch_size=None)
    got = await collect(loader)
    assert len(loader) == 15
    assert sorted(got) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(5)])


async def test_a_filtered_map_style_part_counts_as_filtered() -> None:
    """Its dropped samples are counted as filtered and keep their places, and a real
    lookup error is an error, not a silent drop."""
    b = tagged("b", 10).filter(lambda s: s not in ("b3", "b7"))
    mixed = al.mix([Letters("a", 5), b], stop="all")
    loader = al.Loader(mixed, batch_size=None)
    got = await collect(loader)
    assert sorted(got) == sorted(
        [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(10) if i not in (3, 7)]
    )
    assert loader.statistics()["filtered"] == 2
    assert [x async for x in mixed].count("b3") == 0

    class Missing(al.AsyncDataset[str]):
        def __len__(self) -> int:
            return 3

        async def __getitem__(self, index: int) -> str:
            if index == 1:
                raise KeyError("gone")
            return f"m{index}"

    skipping = al.Loader(al.mix([Missing()], stop="all"), batch_size=None, on_error="skip")
    assert await collect(skipping) == ["m0", "m2"]
    assert skipping.statistics()["skipped"] == 1


async def test_mix_is_seeded_by_seed_and_epoch() -> None:
    def run(seed: int, epoch: int) -> list[str]:
        loader = al.Loader(al.mix([Letters("a", 30), Letters("b", 30)]), batch_size=None, seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(1, 1)
    assert run(1, 0) != run(2, 0)


async def test_mix_resumes_exactly() -> None:
    def build() -> al.Loader:
        parts = [Letters("a", 40), tagged("b", 40)]
        return al.Loader(al.mix(parts, stop="all"), batch_size=4, shuffle=True, seed=5)

    full = [x for b in await collect(build()) for x in b]
    first = build()
    seen: list[str] = []
    async for batch in first:
        seen += batch
        if len(seen) >= 20:
            break
    state = first.state_dict()
    await first.aclose()
    second = build()
    second.load_state_dict(state)
    rest = [x for b in await collect(second) for x in b]
    assert seen + rest == full


async def test_mix_across_ranks_reads_each_sample_once() -> None:
    got = []
    for rank in range(2):
        mixed = al.mix([Letters("a", 30), tagged("b", 30)], stop="all")
        loader = al.Loader(mixed, batch_size=None, rank=rank, world_size=2)
        got.append(await collect(loader))
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) == len(got[1]) == 30  # equal counts: sizes are known


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 7), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
    world_size=st.integers(2, 4),
    shuffle=st.booleans(),
)
@example(sizes=[3, 3], world_size=2, shuffle=False)  # rank 0 had a0 a2 b0 b2: one lost
def test_map_style_parts_split_over_ranks_like_distributed_sampler(
    sizes: list[int], world_size: int, shuffle: bool
) -> None:
    """``stop="all"`` over map-style parts: every sample once, on ranks of equal length;
    where the total does not divide, a rank repeats at most one of its own samples. (With
    fewer samples than ranks a share is empty and cannot be padded: a ValueError.)"""
    assume(sum(sizes) >= world_size)
    parts = [al.from_sequence([f"{chr(97 + k)}{i}" for i in range(n)]) for k, n in enumerate(sizes)]
    got = []
    for rank in range(world_size):
        loader = al.Loader(
            al.mix(parts, stop="all"),
            batch_size=None,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
        )
        got.append(list(loader))
    total = sum(sizes)
    assert all(len(share) == -(-total // world_size) for share in got)
    everything = [name for share in got for name in share]
    assert set(everything) == {name for part in parts for name in part.sequence}
    assert len(everything) - total == (-total) % world_size  # the padding, and no more
    assert all(len(share) - len(set(share)) <= 1 for share in got)


def test_mix_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        al.mix([])
    with pytest.raises(ValueError, match="weights"):
        al.mix([Letters("a", 1)], weights=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        al.mix([Letters("a", 1), Letters("b", 1)], weights=[0, 0])
    with pytest.raises(ValueError, match="stop"):
        al.mix([Letters("a", 1)], stop="never")
    with pytest.raises(TypeError, match="weights must be numbers"):
        al.mix([Letters("a", 1), Letters("b", 1)], weights=["a", "b"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="dataset"):
        al.mix([[1, 2]])  # type: ignore[list-item]


# -- stratified batches ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    batch_size=st.integers(2, 16),
    seed=st.integers(0, 3),
)
@example(counts=[1, 1, 1, 14, 14], batch_size=2, seed=0)  # "furthest behind first" fails here
def test_stratified_batches_keep_proportions(counts: list[int], batch_size: int, seed: int) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    order = list(al.StratifiedSampler(labels, batch_size, seed=seed))
    assert sorted(order) == list(range(len(labels)))
    shares = np.array(counts) / len(labels)
    seen = np.zeros(len(counts))
    for k, index in enumerate(order, start=1):  # every prefix: within one of its quota
        seen[labels[index]] += 1
        assert np.all(np.abs(seen - k * shares) < 1 + 1e-9), (k, seen, k * shares)
    for start in range(0, len(order) - batch_size + 1, batch_size):  # every batch: two
        batch = labels[order[start : start + batch_size]]
        got = np.bincount(batch, minlength=len(counts))
        assert np.all(np.abs(got - batch_size * shares) < 2), (got, batch_size * shares)


async def test_stratified_sampler_in_the_loader() -> None:
    labels = [i % 4 == 0 for i in range(200)]  # a 25 / 75 split
    data = al.from_sequence(list(range(200)))
    sampler = al.StratifiedSampler([int(x) for x in labels], 8, seed=3)
    loader = al.Loader(data, batch_size=8, sampler=sampler)
    batches = [[int(x) for x in b] async for b in loader]
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(sum(i % 4 == 0 for i in b) == 2 for b in batches)
    first = [list(b) for b in batches]
    loader.set_epoch(1)
    assert [[int(x) for x in b] async for b in loader] != first


def test_stratified_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        al.StratifiedSampler([0, 1], 0)
    with pytest.raises(ValueError, match="flat"):
        al.StratifiedSampler([[0, 1]], 2)
