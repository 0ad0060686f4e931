"""Exact resume under torch DataLoader workers, through ``Loader.to_torch_loader()``.

Each batch's positions travel back from its worker with it, so the loader's state counts
exactly the batches the training loop took, even though workers run ahead (DataLoader
prefetching). A map-style state resumes with any number of workers; a stream's with the
same number.
"""

from __future__ import annotations

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


def test_dataloader_keywords_that_belong_to_the_loader_are_refused() -> None:
    with pytest.raises(TypeError, match="batch_size"):
        build().to_torch_loader(batch_size=4)
    with pytest.raises(ValueError, match="persistent_workers"):
        build().to_torch_loader(num_workers=2, persistent_workers=True)
