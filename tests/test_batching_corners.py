"""Corners of batching and collation (found by helper-53): default_collate refusing odd
samples whichever comes first, dicts with defaults, PadCollate keys, bucketed resumes
under workers or from unordered states, no more fetch tasks than samples, batch_cost
checks (async, without a budget, fractions)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import numpy as np
import pytest
from test_loader import Indexed

import asyncload as al

collate = al.default_collate


def keep(values: list[Any]) -> list[Any]:
    return values


# -- default_collate ------------------------------------------------------------------------


def test_default_collate_refuses_a_string_among_tuples() -> None:
    """The docstring: ``TypeError`` naming the positions and types when a sample is of
    another kind than the first. A 2-character string among pairs was split into its
    characters and zipped into the columns, a silent wrong batch; a dict among pairs got a
    TypeError that blamed an int and a str at column positions instead."""
    with pytest.raises(TypeError, match=r"str at batch position 1"):
        collate([("a", "b"), "cd"])
    with pytest.raises(TypeError, match=r"dict at batch position 1"):
        collate([(1, 2), {"a": 1, "b": 2}])


def test_default_collate_refuses_a_string_among_scalar_arrays() -> None:
    """A string among 1-d arrays raises ``TypeError``; among 0-d arrays (a label stored as
    ``np.array(3)``, an ``on_error`` substitute ``"missing"``) np.array turned every number
    into a string: ``array(['1', 'a'])``, silently."""
    with pytest.raises(TypeError, match=r"str at batch position 1"):
        collate([np.array(1), "a"])


@pytest.mark.parametrize(
    "other",
    [
        collections.Counter({"a": 1, "c": 3}),
        collections.defaultdict(int, {"a": 1, "c": 3}),
    ],
    ids=["Counter", "defaultdict"],
)
def test_default_collate_names_a_missing_key_of_a_dict_with_defaults(other: Any) -> None:
    """Dicts that differ in keys raise ``ValueError`` naming the key. A Counter or a
    defaultdict of the same size as the first sample answered ``0`` for the missing key
    (the defaultdict even grew it), and its own key ``"c"`` was dropped: a batch with an
    invented ``b`` and no ``c``, without an error."""
    with pytest.raises(ValueError, match=r"'b'|'c'"):
        collate([{"a": 1, "b": 2}, other])


def test_default_collate_refuses_a_number_among_strings_as_it_does_a_string_among_numbers() -> None:
    """``[1, "a"]`` raises ``TypeError`` (a string among numbers), but ``["a", 1]`` was
    returned as a list: whether a batch fails depends on which sample came first, which
    the None branch's own comment says must not happen."""
    with pytest.raises(TypeError):
        collate([1, "a"])
    with pytest.raises(TypeError, match=r"int at batch position 1"):
        collate(["a", 1])


# -- PadCollate -----------------------------------------------------------------------------


def test_pad_collate_refuses_dicts_that_differ_in_keys() -> None:
    """A sample with a key the first lacks lost that field silently (only the first
    sample's keys were read); default_collate raises ``ValueError`` naming it."""
    samples = [
        {"tokens": np.arange(2)},
        {"tokens": np.arange(3), "labels": np.arange(3)},
    ]
    with pytest.raises(ValueError, match="labels"):
        al.PadCollate()(samples)


# -- batchers and the Loader ------------------------------------------------------------------


def bucketed(data: list[int]) -> al.Loader:
    """Batches of up to 4 cut from buckets of 8 by a cost that scatters the samples."""
    return al.Loader(
        al.from_sequence(data),
        batch_size=4,
        bucket=8,
        batch_cost=lambda x: (x * 7) % 13,
        collate_fn=keep,
        seed=1,
    )


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_bucketed_resume_under_dataloader_workers_yields_the_uninterrupted_batches() -> None:
    """api.md: a loaded state yields exactly the batches the original would have yielded
    after the save. Under ``to_torch_loader(num_workers=2)`` with ``bucket``, the resumed
    run asked the wrong worker first: ``for_worker`` renumbers the workers by
    ``watermark // batch_size``, which counts the batches taken only for fixed counts
    (a bucket's batches are in cost order, so the watermark lags), and the batches came
    in another order than the uninterrupted run's."""
    pytest.importorskip("torch")
    data = list(range(32))

    def build() -> al.Loader:
        return bucketed(data)

    def ints(batch: Any) -> list[int]:
        return [int(v) for v in batch]

    full = [ints(b) for b in build().to_torch_loader(num_workers=2)]
    first = build()
    taken = []
    for batch in first.to_torch_loader(num_workers=2):
        taken.append(ints(batch))
        break
    state = first.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    rest = [ints(b) for b in resumed.to_torch_loader(num_workers=2)]
    assert sorted(v for b in taken + rest for v in b) == data  # (nothing lost: that holds)
    assert taken + rest == full


def test_an_epoch_starts_no_more_fetch_tasks_than_it_has_samples() -> None:
    """``concurrency`` is a bound on fetches in flight, but an epoch started
    ``concurrency // chunk`` worker tasks whatever its length: 3 samples at
    ``concurrency=100_000`` took 10 s and 380 MB (a million: 70 s, 3.4 GB)."""
    created = 0

    async def main() -> list[Any]:
        nonlocal created
        loop = asyncio.get_running_loop()

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            nonlocal created
            created += 1
            return asyncio.Task(coro, loop=loop, **kwargs)

        loop.set_task_factory(factory)  # type: ignore[arg-type]
        async with al.Loader(Indexed(3), batch_size=1, concurrency=2_000) as loader:
            return [int(batch[0]) async for batch in loader]

    assert asyncio.run(main()) == [0, 1, 2]
    assert created < 50, f"{created} tasks for an epoch of 3 samples"


@pytest.mark.filterwarnings("ignore:coroutine:RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_async_batch_cost_is_awaited_or_refused_by_name() -> None:
    """transform, validate, filter and map all take sync or async functions. An async
    batch_cost was called without being awaited, and the epoch failed with "int()
    argument must be ... not 'coroutine'" (and a never-awaited RuntimeWarning), which
    names neither batch_cost nor the sample."""

    async def cost(sample: np.ndarray) -> int:
        return len(sample)

    data = [np.zeros(n) for n in (1, 2, 3, 4, 5, 6)]
    try:
        loader = al.Loader(
            al.from_sequence(data), batch_size=8, batch_budget=6, batch_cost=cost, collate_fn=keep
        )
    except TypeError as exc:  # refused when built: fine, if it says which argument
        assert "batch_cost" in str(exc)
        return
    batches = list(loader)
    assert sorted(len(a) for b in batches for a in b) == [1, 2, 3, 4, 5, 6]
    assert all(sum(len(a) for a in b) <= 6 or len(b) == 1 for b in batches)


def test_a_callable_batch_cost_without_a_budget_or_bucket_is_refused() -> None:
    """A sequence of costs without ``batch_budget`` or ``bucket`` raises ``ValueError``
    ("batch_cost needs a batch_budget or a bucket"); a callable one was silently ignored,
    so a user who forgot the budget got fixed-count batches without a word."""
    with pytest.raises(ValueError, match="batch_cost"):
        al.Loader(al.from_sequence([np.zeros(3)] * 4), batch_size=2, batch_cost=len)


def test_a_fractional_cost_is_not_truncated_to_zero() -> None:
    """``batch_cost`` returning floats (kilobytes, say) was ``int()``-truncated: costs of
    0.9 each counted as 0, and a budget of 2 let 10 samples (a total of 9) into one
    batch. The budget must hold on the costs the function gave (or a non-int refused)."""
    data = list(range(10))
    try:
        batches = list(
            al.Loader(
                al.from_sequence(data),
                batch_size=10,
                batch_budget=2,
                batch_cost=lambda _: 0.9,
                collate_fn=keep,
            )
        )
    except (TypeError, ValueError) as exc:  # refused: fine, if it says which argument
        assert "batch_cost" in str(exc) or "batch_cost" in "".join(getattr(exc, "__notes__", []))
        return
    assert all(0.9 * len(b) <= 2 or len(b) == 1 for b in batches), [len(b) for b in batches]


def test_an_unordered_bucketed_state_resumes_in_an_ordered_loader_without_repeats() -> None:
    """``ordered`` is not part of the plan (a position means the same sample either way),
    so a state saved by an ``ordered=False`` loader loads into an ``ordered=True`` one.
    The exact-bucket resume then re-fetched from the watermark's bucket start, forgetting
    the delivered positions beyond that bucket and re-cutting the bucket into batches that
    mix delivered and new samples: 8 of 64 samples came twice."""

    def build(ordered: bool) -> al.Loader:
        return al.Loader(
            Indexed(64),  # fetches complete out of index order
            batch_size=4,
            bucket=8,
            batch_cost=lambda x: (x * 7) % 13,
            collate_fn=keep,
            seed=1,
            ordered=ordered,
            concurrency=16,
        )

    async def main() -> list[int]:
        first = build(False)
        taken: list[int] = []
        batches = 0
        async for batch in first:
            taken += [int(v) for v in batch]
            batches += 1
            if batches == 6:
                break
        await first.aclose()
        second = build(True)
        second.load_state_dict(first.state_dict())
        async with second:
            rest = [int(v) async for batch in second for v in batch]
        return taken + rest

    seen = asyncio.run(main())
    assert sorted(seen) == list(range(64)), [v for v in set(seen) if seen.count(v) > 1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_a_bucketed_state_from_dataloader_workers_resumes_without_workers_without_repeats() -> None:
    """A map-style state resumes under any number of workers (api.md, dataloader.md).
    Taken through 2 workers, a bucketed epoch's delivered positions are spread over the
    rank's buckets (each worker buckets its own share); resumed in a plain loader, the
    exact-bucket resume re-fetched from the watermark's bucket and delivered samples
    again (here 0, 2, 8-12, 14, after 3 batches)."""
    pytest.importorskip("torch")
    data = list(range(48))

    def build() -> al.Loader:
        return bucketed(data)

    first = build()
    taken: list[int] = []
    for i, batch in enumerate(first.to_torch_loader(num_workers=2)):
        taken += [int(v) for v in batch]
        if i == 2:
            break
    state = first.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    seen = taken + [int(v) for batch in resumed for v in batch]
    assert sorted(seen) == data, [v for v in set(seen) if seen.count(v) > 1]


# -- batch_size=None ------------------------------------------------------------------------


def test_collate_fn_converts_each_sample_without_batching() -> None:
    """torch's DataLoader with ``batch_size=None`` applies a given ``collate_fn`` to each
    sample; the Loader ignored it silently, so a conversion the user asked for never ran."""
    loader = al.Loader(al.from_sequence([1, 2, 3]), batch_size=None, collate_fn=lambda x: x * 10)
    assert list(loader) == [10, 20, 30]

    async def consume() -> list[Any]:
        return [sample async for sample in loader]

    assert asyncio.run(consume()) == [10, 20, 30]
    # Without one, samples come as they are (no list-wrapping, no conversion).
    assert list(al.Loader(al.from_sequence([[1], [2]]), batch_size=None)) == [[1], [2]]
