"""Exact resume under torch DataLoader workers, through ``Loader.to_torch_loader()``.

Each batch's positions travel back from its worker with it, so the loader's state counts
exactly the batches the training loop took, even though workers run ahead (DataLoader
prefetching). A map-style state resumes with any number of workers; a stream's with the
same number.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

import asyncload as al

torch = pytest.importorskip("torch")

# 3 workers on a 2-core machine is deliberate here (a different worker count on resume).
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

N = 53


def numbers(n: int = N) -> al.AsyncDataset[Any]:
    return al.from_sequence(np.arange(n))


def build(dataset: Any = None, **kwargs: Any) -> al.Loader:
    options: dict[str, Any] = {"batch_size": 4, "shuffle": True, "seed": 7}
    options.update(kwargs)
    return al.Loader(dataset if dataset is not None else numbers(), **options)


def flat(batches: list[Any]) -> list[int]:
    return [int(x) for batch in batches for x in batch]


def take(loader: al.Loader, batches: int, workers: int) -> tuple[list[Any], dict[str, Any]]:
    """The first ``batches`` batches through a TorchLoader, then the loader's state."""
    got = []
    for batch in loader.to_torch_loader(num_workers=workers):
        got.append(batch)
        if len(got) == batches:
            break
    return got, loader.state_dict()


def rest(loader: al.Loader, workers: int) -> list[Any]:
    return list(loader.to_torch_loader(num_workers=workers))


@pytest.mark.parametrize(("before", "after"), [(2, 2), (2, 3), (3, 0), (0, 2)])
@pytest.mark.parametrize("cut", [1, 6])
def test_map_style_resumes_exactly_with_any_workers(before: int, after: int, cut: int) -> None:
    """The same batches as one uninterrupted pass, in its order (dataloader.md: a
    map-style loader's batches come in the loader's own order, with workers too)."""
    full = [batch.tolist() for batch in build()]
    assert [b.tolist() for b in build().to_torch_loader(num_workers=before)] == full
    first, state = take(build(), cut, before)
    resumed = build()
    resumed.load_state_dict(state)
    second = rest(resumed, after)
    assert [b.tolist() for b in first + second] == full


def test_state_counts_taken_batches_not_prefetched_ones() -> None:
    loader = build()
    taken, state = take(loader, 3, 2)
    # Workers ran ahead (prefetch_factor 2 per worker), but only 3 batches were taken.
    assert state["progress"]["watermark"] + len(state["progress"]["done"]) == 12
    assert not state["finished"]
    assert len(taken) == 3


def test_a_finished_epoch_resumes_as_a_full_new_pass() -> None:
    loader = build()
    first = rest(loader, 2)
    state = loader.state_dict()
    assert state["finished"]
    again = build()
    again.load_state_dict(state)
    assert sorted(flat(rest(again, 2))) == sorted(flat(first)) == list(range(N))


def test_a_torch_state_resumes_in_a_plain_loader() -> None:
    first, state = take(build(), 4, 2)
    plain = build()
    plain.load_state_dict(state)
    assert sorted(flat(first) + flat(list(plain))) == list(range(N))


class Counting(al.AsyncIterableDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.n):
            yield i


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("cut", [1, 3])
def test_stream_resumes_exactly_with_the_same_workers(workers: int, cut: int) -> None:
    """The rest of the epoch in the saved run's order: the DataLoader asks worker 0 first,
    so the worker that was to be asked next is worker 0 on resume."""

    def stream_loader() -> al.Loader:
        return al.Loader(Counting(30), batch_size=4, shuffle=True, seed=1, shuffle_buffer=5)

    full = [b.tolist() for b in rest(stream_loader(), workers)]
    assert sorted(x for b in full for x in b) == list(range(30))  # each worker its stride
    first, state = take(stream_loader(), cut, workers)
    resumed = stream_loader()
    resumed.load_state_dict(state)
    second = rest(resumed, workers)
    assert [b.tolist() for b in first + second] == full


def test_stream_state_refuses_another_worker_count() -> None:
    loader = al.Loader(Counting(30), batch_size=4)
    _, state = take(loader, 2, 2)
    resumed = al.Loader(Counting(30), batch_size=4)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="2 DataLoader workers"):
        rest(resumed, 3)


class SizedCounting(Counting):
    def num_samples(self) -> int:
        return self.n


def fail(sample: int) -> int:  # (module level: spawned workers pickle it)
    raise ValueError(f"bad {sample}")


def stream_state_at_the_start(when: str) -> dict[str, Any]:
    """A stream loader's state before any batch was taken."""
    loader = al.Loader(SizedCounting(20), batch_size=4)
    if when == "set_epoch":
        loader.set_epoch(1)
    elif when == "unstarted_iterator":
        iter(loader.to_torch_loader(num_workers=2))  # dropped without a next()
    elif when == "first_batch_failed":
        # The workers started, and the epoch ended before any batch: progress per worker,
        # none delivered.
        failing = al.Loader(SizedCounting(20), batch_size=4, transform=fail)
        with pytest.raises(Exception, match="bad"):
            next(iter(failing.to_torch_loader(num_workers=2)))
        # The failed DataLoader iterator is held in a cycle by its traceback: collected in
        # a later test's forked worker, its finalizer imported amid the worker's own import
        # (a KeyError in importlib on Python 3.11, and the worker died).
        gc.collect()
        state = failing.state_dict()
        assert state["progress"]["workers"] == 2
        return state
    return loader.state_dict()


@pytest.mark.parametrize("when", ["fresh", "set_epoch", "unstarted_iterator", "first_batch_failed"])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_a_stream_state_at_the_epochs_start_resumes_under_any_workers(
    when: str, workers: int
) -> None:
    """It holds no position, per worker or not: the whole epoch, under any number of
    workers (a plain for too)."""
    state = stream_state_at_the_start(when)
    resumed = al.Loader(SizedCounting(20), batch_size=4)
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"]
    whole = al.Loader(SizedCounting(20), batch_size=4)
    whole.set_epoch(state["epoch"])
    # (Under 3 workers each share is padded on its own: 21 samples, one twice.)
    assert sorted(flat(rest(resumed, workers))) == sorted(flat(rest(whole, workers)))
    plain = al.Loader(SizedCounting(20), batch_size=4)
    plain.load_state_dict(state)
    assert sorted(flat(list(plain))) == list(range(20))


@pytest.mark.parametrize("streaming", [False, True], ids=["map", "stream"])
def test_a_torch_loader_state_of_another_plan_is_refused(streaming: bool) -> None:
    """The state kept by to_torch_loader() records the plan as a plain loop's does."""

    def make(shuffle: bool) -> al.Loader:
        if streaming:
            return al.Loader(Counting(30), batch_size=4, shuffle=shuffle, seed=1)
        return build(shuffle=shuffle)

    _, state = take(make(True), 2, 2)
    assert state["plan"]["shuffle"] is True
    with pytest.raises(ValueError, match="shuffle=True, this one has shuffle=False"):
        make(False).load_state_dict(state)


def test_dataloader_keywords_that_belong_to_the_loader_are_refused() -> None:
    with pytest.raises(TypeError, match="batch_size"):
        build().to_torch_loader(batch_size=4)
    with pytest.raises(ValueError, match="persistent_workers"):
        build().to_torch_loader(num_workers=2, persistent_workers=True)


def test_an_elastic_epoch_ended_through_torch_loader_leaves_a_full_next_pass() -> None:
    first = build(rank=0, world_size=2)
    second = build(rank=1, world_size=2)
    states = [take(first, 2, 0)[1], take(second, 1, 0)[1]]
    resumed = build()
    resumed.load_state_dict(resumed.merge_states(states))
    assert len(resumed) < len(build())  # the rest of the epoch
    rest(resumed, 2)
    state = resumed.state_dict()
    assert state["finished"] and state["excluded"] == []
    assert len(resumed) == len(build())
    again = build()
    again.load_state_dict(state)
    assert len(flat(rest(again, 2))) == N


def test_a_refused_resume_keeps_the_resume_point() -> None:
    loader = al.Loader(Counting(32), batch_size=4)
    _, state = take(loader, 4, 2)
    resumed = al.Loader(Counting(32), batch_size=4)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="2 DataLoader workers"):
        list(resumed)  # a plain for: refused
    with pytest.raises(ValueError, match="2 DataLoader workers"):
        rest(resumed, 3)
    assert resumed.state_dict() == state
    assert len(rest(resumed, 2)) == 4  # the other half, once


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dataset": numbers(1000), "batch_size": 64, "bucket": 100},  # buckets per worker
        {"batch_cost": [1 + i % 3 for i in range(N)], "batch_budget": 8},  # planned
    ],
)
def test_len_counts_what_the_workers_yield(kwargs: dict[str, Any]) -> None:
    loader = build(**kwargs)
    for workers in (0, 2, 3):
        torch_loader = loader.to_torch_loader(num_workers=workers)
        assert len(torch_loader) == len(list(torch_loader)), workers


def test_a_collate_fn_converts_the_batch() -> None:
    def to_list(batch: Any) -> list[int]:
        return [int(x) for x in batch]

    loader = build(shuffle=False)
    got = list(loader.to_torch_loader(num_workers=2, collate_fn=to_list))
    assert got[0] == [0, 1, 2, 3] and sum(len(b) for b in got) == N
    assert loader.state_dict()["finished"]


def test_to_torch_under_persistent_workers_is_refused_on_the_second_epoch() -> None:
    loader = build()
    data_loader = torch.utils.data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=1, persistent_workers=True
    )
    assert len(flat(list(data_loader))) == N
    loader.set_epoch(1)
    with pytest.raises(RuntimeError, match="persistent_workers"):
        list(data_loader)
