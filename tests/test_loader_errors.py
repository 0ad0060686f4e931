"""Failed samples through the Loader: SampleError, on_error policies, the error budget,
validate and transform errors, per-fetch timeouts, Retry, CircuitBreaker and the cache.

No real sleeps: Retry gets a recording fake ``sleep``; the breaker a long recovery timeout.
The only real wait is a 0.05 s per-fetch timeout on a fetch that never finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import asyncio_only

import asyncload as al

pytestmark = pytest.mark.anyio


class Failing(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``, except that the indices in ``bad`` raise ``make(i)``.
    ``calls`` counts fetches per index."""

    def __init__(
        self,
        n: int,
        bad: set[int] | Callable[[int], bool],
        make: Callable[[int], Exception] = lambda i: KeyError(f"boom-{i}"),
        fail_times: int | None = None,
    ) -> None:
        self.n = n
        self.is_bad = bad if callable(bad) else bad.__contains__
        self.make = make
        self.fail_times = fail_times  # None: always; k: only the first k calls per index
        self.calls: dict[int, int] = {}

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        self.calls[index] = self.calls.get(index, 0) + 1
        await anyio.lowlevel.checkpoint()
        if self.is_bad(index) and (self.fail_times is None or self.calls[index] <= self.fail_times):
            raise self.make(index)
        return index

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()


def flat(batches: list[Any]) -> list[int]:
    return [int(x) for batch in batches for x in batch]


async def run_epoch(loader: al.Loader, got: list[Any] | None = None) -> list[Any]:
    """Iterate one epoch, appending to ``got`` as batches come (so that a test can see what
    came before an error), and ``aclose()`` the loader in any case."""
    got = [] if got is None else got
    try:
        async for batch in loader:
            got.append(batch)
    finally:
        await loader.aclose()
    return got


# -- SampleError --------------------------------------------------------------------------


async def test_failed_sample_raises_sample_error() -> None:
    loader = al.Loader(Failing(10, {5}), batch_size=2)
    got: list[Any] = []
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader, got)
    error = info.value
    assert isinstance(error, al.AsyncloadError)
    assert error.index == 5
    assert error.key is None
    assert isinstance(error.__cause__, KeyError)
    assert "boom-5" in str(error.__cause__)
    # The batches before the failed one were delivered, in order.
    assert [list(map(int, b)) for b in got] == [[0, 1], [2, 3]]
    stats = loader.statistics()
    assert stats["errors"] >= 1


class FailsLate(al.AsyncDataset[int]):
    """Index ``bad`` fails, but only once the test sets ``go``: by then the later samples
    have completed (out of order) and wait for it."""

    def __init__(self, n: int, bad: int) -> None:
        self.n = n
        self.bad = bad
        self._go: anyio.Event | None = None

    @property
    def go(self) -> anyio.Event:
        if self._go is None:
            self._go = anyio.Event()
        return self._go

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == self.bad:
            await self.go.wait()
            raise KeyError(f"boom-{index}")
        return index


@pytest.mark.parametrize("batch_size", [1, 2, 3])
async def test_ordered_output_never_skips_a_failed_sample(batch_size: int) -> None:
    """With ordered=True and on_error="raise", what comes before the error is exactly the
    samples before the failed one: no later sample jumps over it."""
    ds = FailsLate(8, bad=3)
    loader = al.Loader(ds, batch_size=batch_size, concurrency=8, prefetch=8)
    got: list[Any] = []

    async def consume() -> None:
        with pytest.raises(al.SampleError) as info:
            await run_epoch(loader, got)
        assert info.value.index == 3

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.wait_all_tasks_blocked()
        ds.go.set()
    delivered = flat(got)
    assert delivered == list(range(len(delivered)))
    assert 3 not in delivered


async def test_missing_file_key_is_the_path(tmp_path: Path) -> None:
    for i in range(4):
        (tmp_path / f"{i}.bin").write_bytes(bytes([i]) * 3)
    keys = ["0.bin", "1.bin", "missing.bin", "3.bin"]
    loader = al.Loader(al.sources.FileSource(keys, root=tmp_path), batch_size=2)
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert info.value.index == 2
    assert info.value.key == "missing.bin"
    assert isinstance(info.value.__cause__, FileNotFoundError)
    absolute = str(tmp_path / "nope.bin")
    loader = al.Loader(al.sources.FileSource([absolute]), batch_size=2)
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert info.value.key == absolute
    assert isinstance(info.value.__cause__, FileNotFoundError)


# -- on_error -------------------------------------------------------------------------------


async def test_skip() -> None:
    loader = al.Loader(Failing(20, {3, 7, 8}), batch_size=4, on_error="skip")
    batches = await run_epoch(loader)
    assert flat(batches) == [i for i in range(20) if i not in {3, 7, 8}]
    # Batches are made of the samples that survived: all full but the last.
    assert [len(b) for b in batches] == [4, 4, 4, 4, 1]
    stats = loader.statistics()
    assert stats["skipped"] == 3
    assert stats["errors"] == 3
    assert stats["samples"] == 17


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_callable_substitutes(is_async: bool) -> None:
    seen: list[tuple[int, type[BaseException]]] = []

    def substitute(index: int, exc: BaseException) -> int:
        seen.append((index, type(exc)))
        return -index

    async def async_substitute(index: int, exc: BaseException) -> int:
        await anyio.lowlevel.checkpoint()
        return substitute(index, exc)

    loader = al.Loader(
        Failing(8, {2, 5}),
        batch_size=3,
        on_error=async_substitute if is_async else substitute,
    )
    assert flat(await run_epoch(loader)) == [0, 1, -2, 3, 4, -5, 6, 7]
    assert sorted(seen) == [(2, KeyError), (5, KeyError)]
    stats = loader.statistics()
    assert stats["errors"] == 2
    assert stats["skipped"] == 0


async def test_failing_error_handler_raises() -> None:
    def handler(index: int, exc: BaseException) -> int:
        raise RuntimeError("handler broke")

    loader = al.Loader(Failing(4, {1}), batch_size=2, on_error=handler)
    with pytest.raises(al.AsyncloadError) as info:
        await run_epoch(loader)
    assert isinstance(info.value, al.SampleError)
    assert info.value.index == 1


# -- max_errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["skip", "callable"])
async def test_max_errors_count(on_error: str) -> None:
    policy: Any = on_error if on_error == "skip" else (lambda index, exc: -1)
    ds = Failing(40, lambda i: i % 2 == 0)
    loader = al.Loader(ds, batch_size=2, concurrency=1, on_error=policy, max_errors=3)
    got: list[Any] = []
    with pytest.raises(al.AsyncloadError) as info:
        await run_epoch(loader, got)
    assert not isinstance(info.value, al.SampleError)
    message = str(info.value)
    assert "4" in message  # the count: the 4th error is past max_errors=3
    assert "boom-0" in message  # the first causes
    assert ds.total_calls < 40  # it stopped early
    # Exactly at the budget is fine.
    loader = al.Loader(
        Failing(40, {1, 2, 3}), batch_size=2, concurrency=1, on_error=policy, max_errors=3
    )
    assert len(flat(await run_epoch(loader))) == (37 if on_error == "skip" else 40)


async def test_max_errors_zero() -> None:
    loader = al.Loader(Failing(10, {4}), batch_size=2, on_error="skip", max_errors=0)
    with pytest.raises(al.AsyncloadError) as info:
        await run_epoch(loader)
    assert "1" in str(info.value)


async def test_max_errors_count_with_concurrency() -> None:
    loader = al.Loader(
        Failing(200, lambda i: i % 3 == 0), batch_size=4, on_error="skip", max_errors=5
    )
    with pytest.raises(al.AsyncloadError) as info:
        await run_epoch(loader)
    assert not isinstance(info.value, al.SampleError)
    assert "boom-" in str(info.value)


async def test_max_errors_fraction() -> None:
    """20% of samples fail: past max_errors=0.1, but only checked after 100 attempts."""
    ds = Failing(300, lambda i: i % 5 == 0)
    loader = al.Loader(ds, batch_size=1, concurrency=1, on_error="skip", max_errors=0.1)
    got: list[Any] = []
    with pytest.raises(al.AsyncloadError) as info:
        await run_epoch(loader, got)
    assert not isinstance(info.value, al.SampleError)
    # At least 100 samples were attempted before it gave up (80 of them good)...
    assert len(got) >= 80
    assert ds.total_calls >= 100
    # ... and it did give up, well before the end.
    assert len(got) < 240
    message = str(info.value)
    assert any(str(count) in message for count in range(20, 30)), message
    assert "boom-0" in message


async def test_max_errors_fraction_within_budget() -> None:
    loader = al.Loader(
        Failing(300, lambda i: i % 5 == 0), batch_size=10, on_error="skip", max_errors=0.3
    )
    assert len(flat(await run_epoch(loader))) == 240
    assert loader.statistics()["skipped"] == 60


async def test_max_errors_fraction_of_a_short_epoch_is_checked_at_its_end() -> None:
    """Fewer than 100 samples in all: the fraction is checked once every sample was
    attempted, so an epoch where half (or all) failed does not pass as a short one."""
    for failing in (lambda i: i % 2 == 0, lambda i: True):
        loader = al.Loader(Failing(60, failing), batch_size=10, on_error="skip", max_errors=0.1)
        with pytest.raises(al.ErrorBudgetExceeded, match=r"of 60 samples failed"):
            await run_epoch(loader)
    loader = al.Loader(
        Failing(60, lambda i: i % 20 == 0), batch_size=10, on_error="skip", max_errors=0.1
    )
    assert len(flat(await run_epoch(loader))) == 57  # 3 of 60: within 10 %


# -- validate and transform ------------------------------------------------------------------


async def test_validate_returning_false_is_a_sample_error() -> None:
    loader = al.Loader(al.from_sequence(list(range(6))), batch_size=2, validate=lambda s: s != 3)
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert info.value.index == 3


async def test_validate_raising_is_a_sample_error() -> None:
    def validate(sample: int) -> None:
        if sample == 4:
            raise ValueError("bad sample 4")

    loader = al.Loader(al.from_sequence(list(range(6))), batch_size=2, validate=validate)
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert info.value.index == 4
    assert isinstance(info.value.__cause__, ValueError)


async def test_validate_errors_follow_on_error() -> None:
    async def validate(sample: int) -> bool:
        await anyio.lowlevel.checkpoint()
        if sample == 4:
            raise ValueError("bad")
        return sample != 1

    loader = al.Loader(
        al.from_sequence(list(range(6))), batch_size=2, validate=validate, on_error="skip"
    )
    assert flat(await run_epoch(loader)) == [0, 2, 3, 5]
    stats = loader.statistics()
    assert stats["errors"] == stats["skipped"] == 2


async def test_validate_sees_the_transformed_sample() -> None:
    seen: list[int] = []

    def validate(sample: int) -> bool:
        seen.append(sample)
        return True

    loader = al.Loader(
        al.from_sequence([1, 2]), batch_size=2, transform=lambda s: s * 100, validate=validate
    )
    assert flat(await run_epoch(loader)) == [100, 200]
    assert sorted(seen) == [100, 200]


async def test_transform_error_is_a_sample_error() -> None:
    def transform(sample: int) -> int:
        if sample == 2:
            raise ZeroDivisionError("transform failed")
        return sample

    loader = al.Loader(al.from_sequence(list(range(5))), batch_size=1, transform=transform)
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert info.value.index == 2
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    loader = al.Loader(
        al.from_sequence(list(range(5))), batch_size=1, transform=transform, on_error="skip"
    )
    assert flat(await run_epoch(loader)) == [0, 1, 3, 4]


# -- timeout --------------------------------------------------------------------------------


class Stuck(al.AsyncDataset[int]):
    """Index ``stuck`` waits forever, at least ``times`` times; the others answer at once."""

    def __init__(self, n: int, stuck: int, times: int | None = None) -> None:
        self.n = n
        self.stuck = stuck
        self.times = times
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        await anyio.lowlevel.checkpoint()
        if index == self.stuck:
            self.calls += 1
            if self.times is None or self.calls <= self.times:
                await anyio.Event().wait()
        return index


async def test_timeout_per_fetch() -> None:
    loader = al.Loader(Stuck(6, stuck=3), batch_size=2, timeout=0.05)
    got: list[Any] = []
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader, got)
    assert info.value.index == 3
    assert isinstance(info.value.__cause__, TimeoutError)
    assert flat(got) == [0, 1]


async def test_timeout_is_per_attempt() -> None:
    """The first attempt of sample 2 times out, the retry gets it."""
    sleep = FakeSleep()
    ds = Stuck(4, stuck=2, times=1)
    loader = al.Loader(ds, batch_size=2, timeout=0.05, retry=al.Retry(attempts=2, sleep=sleep))
    assert flat(await run_epoch(loader)) == [0, 1, 2, 3]
    assert ds.calls == 2
    assert loader.statistics()["retries"] == 1
    assert len(sleep.delays) == 1


# -- Retry ----------------------------------------------------------------------------------


async def test_retry_counts_retries() -> None:
    sleep = FakeSleep()
    ds = Failing(6, lambda i: True, make=lambda i: ConnectionError(f"reset {i}"), fail_times=2)
    loader = al.Loader(ds, batch_size=3, retry=al.Retry(attempts=3, sleep=sleep))
    assert flat(await run_epoch(loader)) == list(range(6))
    assert ds.calls == {i: 3 for i in range(6)}
    assert loader.statistics()["retries"] == 12
    assert len(sleep.delays) == 12
    assert loader.statistics()["errors"] == 0


async def test_retry_runs_out() -> None:
    sleep = FakeSleep()
    ds = Failing(4, {1}, make=lambda i: ConnectionError("down"))
    loader = al.Loader(ds, batch_size=2, retry=al.Retry(attempts=3, sleep=sleep))
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert info.value.index == 1
    assert isinstance(info.value.__cause__, ConnectionError)
    assert ds.calls[1] == 3


async def test_retry_does_not_retry_permanent_errors() -> None:
    sleep = FakeSleep()
    ds = Failing(4, {1}, make=lambda i: ValueError("corrupt"))
    loader = al.Loader(ds, batch_size=2, retry=al.Retry(attempts=5, sleep=sleep), on_error="skip")
    assert flat(await run_epoch(loader)) == [0, 2, 3]
    assert ds.calls[1] == 1
    assert loader.statistics()["retries"] == 0
    assert sleep.delays == []


# -- CircuitBreaker -------------------------------------------------------------------------


async def test_breaker_opens_after_transient_failures() -> None:
    breaker = al.CircuitBreaker(failure_threshold=3, recovery_timeout=1000.0)
    ds = Failing(10, lambda i: True, make=lambda i: ConnectionError("down"))
    loader = al.Loader(ds, batch_size=2, concurrency=1, breaker=breaker, on_error="skip")
    assert await run_epoch(loader) == []
    assert ds.total_calls == 3  # then the breaker refused without calling
    assert breaker.state == "open"
    stats = loader.statistics()
    assert stats["errors"] == stats["skipped"] == 10


async def test_breaker_refusal_is_a_sample_error() -> None:
    breaker = al.CircuitBreaker(failure_threshold=1, recovery_timeout=1000.0)
    ds = Failing(4, lambda i: True, make=lambda i: ConnectionError("down"))
    loader = al.Loader(ds, batch_size=1, concurrency=1, breaker=breaker, on_error="skip")
    await run_epoch(loader)
    loader = al.Loader(ds, batch_size=1, concurrency=1, breaker=breaker)
    with pytest.raises(al.SampleError) as info:
        await run_epoch(loader)
    assert isinstance(info.value.__cause__, al.CircuitOpenError)
    assert ds.total_calls == 1


async def test_breaker_ignores_permanent_errors() -> None:
    breaker = al.CircuitBreaker(failure_threshold=2, recovery_timeout=1000.0)
    ds = Failing(10, lambda i: True, make=lambda i: ValueError("bad request"))
    loader = al.Loader(ds, batch_size=2, concurrency=1, breaker=breaker, on_error="skip")
    await run_epoch(loader)
    assert ds.total_calls == 10
    assert breaker.state == "closed"


async def test_retry_and_breaker_together() -> None:
    """Each attempt goes through the breaker; Retry never retries CircuitOpenError."""
    sleep = FakeSleep()
    breaker = al.CircuitBreaker(failure_threshold=3, recovery_timeout=1000.0)
    ds = Failing(5, lambda i: True, make=lambda i: ConnectionError("down"))
    loader = al.Loader(
        ds,
        batch_size=1,
        concurrency=1,
        breaker=breaker,
        retry=al.Retry(attempts=3, sleep=sleep),
        on_error="skip",
    )
    assert await run_epoch(loader) == []
    assert ds.calls == {0: 3}
    assert loader.statistics()["retries"] == 2
    assert breaker.state == "open"


# -- cache --------------------------------------------------------------------------------------


async def test_cache_serves_the_second_epoch() -> None:
    cache = al.LRUCache()
    ds = Failing(12, set())
    transformed: list[int] = []

    def transform(sample: int) -> int:
        transformed.append(sample)
        return sample + 1000

    loader = al.Loader(ds, batch_size=4, cache=cache, transform=transform, shuffle=True)
    first = flat(await run_epoch(loader))
    assert sorted(first) == [i + 1000 for i in range(12)]
    assert ds.total_calls == 12
    stats = loader.statistics()
    assert stats["cache_misses"] == 12
    assert stats["cache_hits"] == 0
    loader.set_epoch(1)
    second = flat(await run_epoch(loader))
    assert sorted(second) == sorted(first)
    assert ds.total_calls == 12  # nothing fetched
    stats = loader.statistics()
    assert stats["cache_hits"] == 12
    assert stats["cache_misses"] == 0
    assert cache.statistics()["hits"] == 12
    # The cache holds what was fetched; the transform runs again each epoch.
    assert len(transformed) == 24


async def test_cache_does_not_store_failures() -> None:
    cache = al.LRUCache()
    ds = Failing(4, {2}, make=lambda i: ValueError("once"), fail_times=1)
    loader = al.Loader(ds, batch_size=2, cache=cache, on_error="skip")
    assert flat(await run_epoch(loader)) == [0, 1, 3]
    assert flat(await run_epoch(loader)) == [0, 1, 2, 3]
    assert ds.calls == {0: 1, 1: 1, 2: 2, 3: 1}


async def test_a_load_that_failed_counts_as_a_miss() -> None:
    """cache_misses counts the calls the source saw, failed or filtered ones included."""
    ds = Failing(6, {1, 4})
    loader = al.Loader(ds, batch_size=2, cache=al.LRUCache(), on_error="skip")
    for _ in range(2):  # failures are not cached: fetched again in the second epoch
        assert flat(await run_epoch(loader)) == [0, 2, 3, 5]
    stats = loader.statistics()
    assert (stats["cache_misses"], stats["cache_hits"]) == (2, 4)
    assert ds.calls == {0: 1, 1: 2, 2: 1, 3: 1, 4: 2, 5: 1}


# -- errors that must not end an epoch quietly ---------------------------------------------------


class Counted(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``, after a checkpoint (a fetch that awaits, like I/O)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        await anyio.lowlevel.checkpoint()
        return index


async def awaits_a_cancelled_future_at_13(x: int) -> int:
    """Raises CancelledError at 13 without its task being cancelled (as awaiting a
    request future that a client library cancelled does)."""
    if x == 13:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future
    return x


@asyncio_only
async def test_a_stray_cancelled_error_fails_the_epoch_loudly() -> None:
    """The epoch must fail, not end as if complete."""
    loader = al.Loader(Counted(40), batch_size=4, transform=awaits_a_cancelled_future_at_13)
    got: list[Any] = []
    with pytest.raises(al.AsyncloadError, match="CancelledError without being cancelled"):
        await run_epoch(loader, got)
    assert flat(got) == list(range(12))  # the batches before the failing one, in order
    assert loader.state_dict()["finished"] is False


def test_a_stray_cancelled_error_fails_a_plain_for_loop() -> None:
    loader = al.Loader(Counted(40), batch_size=4, transform=awaits_a_cancelled_future_at_13)
    got: list[int] = []
    with pytest.raises(al.AsyncloadError, match="CancelledError"):
        for batch in loader:
            got.extend(int(x) for x in batch)
    assert got == list(range(12))


@pytest.mark.parametrize("raised", [StopIteration, StopAsyncIteration])
async def test_collate_fn_raising_stop_iteration_is_an_error_not_the_end(
    raised: type[Exception],
) -> None:
    calls = 0

    def collate(batch: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise raised("oops")
        return batch

    loader = al.Loader(Counted(20), batch_size=4, collate_fn=collate)
    got: list[Any] = []
    with pytest.raises(RuntimeError, match=raised.__name__) as info:
        await run_epoch(loader, got)
    assert isinstance(info.value.__cause__, raised)
    assert len(got) == 2


class WrongCount(Counted):
    """``getitems`` gives ``extra`` samples more (or fewer) than asked for."""

    def __init__(self, n: int, extra: int) -> None:
        super().__init__(n)
        self.extra = extra

    async def getitems(self, indices: list[int]) -> list[int]:
        got = [await self[i] for i in indices]
        return got + got[: self.extra] if self.extra > 0 else got[: len(got) + self.extra]


@pytest.mark.parametrize("extra", [-1, 1])
@pytest.mark.parametrize("concurrency", [1, 8])
async def test_getitems_with_the_wrong_count_fails_the_epoch(extra: int, concurrency: int) -> None:
    """Samples would shift between positions (or, at concurrency 1, the epoch would hang)."""
    loader = al.Loader(WrongCount(12, extra), batch_size=4, concurrency=concurrency)
    with pytest.raises(TypeError, match=r"WrongCount\.getitems returned \d+ samples for \d+"):
        await run_epoch(loader)


async def test_batch_cost_error_arrives_as_itself() -> None:
    """Not wrapped in a task group's ExceptionGroup."""

    def cost(sample: int) -> int:
        if sample == 7:
            raise ValueError("no cost for 7")
        return 1

    loader = al.Loader(Counted(12), batch_size=4, batch_cost=cost, batch_budget=3)
    with pytest.raises(ValueError, match="no cost for 7"):
        await run_epoch(loader)


def test_errors_pickle_whole() -> None:
    """Errors cross process boundaries (multiprocessing, DataLoader workers) with their
    fields intact."""
    import pickle

    sample = al.SampleError("sample 3 failed", index=3, key="a/b")
    budget = al.ErrorBudgetExceeded("too many", errors=4, causes=[OSError("x")])
    status = al.HTTPStatusError(503, "http://h/x", retry_after=1.5)
    filtered = al.SampleFiltered(7)
    s2, b2, h2, f2 = (pickle.loads(pickle.dumps(e)) for e in (sample, budget, status, filtered))
    assert (type(s2), str(s2), s2.index, s2.key) == (al.SampleError, "sample 3 failed", 3, "a/b")
    assert (b2.errors, [str(c) for c in b2.causes]) == (4, ["x"])
    assert (h2.status, h2.url, h2.retry_after) == (503, "http://h/x", 1.5)
    assert f2.index == 7


def test_the_error_budget_is_counted_per_dataloader_worker() -> None:
    """As docs/dataloader.md says: each worker holds its own copy of the budget."""
    pytest.importorskip("torch")
    # Batches of 2 over 8 samples, 2 workers: worker 0 makes batches 0 and 2 (samples
    # 0-1, 4-5), worker 1 batches 1 and 3 (2-3, 6-7). One failure in each worker's share.
    loader = al.Loader(Failing(8, {0, 2}), batch_size=2, on_error="skip", max_errors=1)
    got = sorted(int(x) for b in loader.to_torch_loader(num_workers=2) for x in b)
    assert got == [1, 3, 4, 5, 6, 7]
    # Two in one worker's share: over its budget.
    loader = al.Loader(Failing(8, {0, 4}), batch_size=2, on_error="skip", max_errors=1)
    with pytest.raises(al.ErrorBudgetExceeded, match="2 samples failed"):
        list(loader.to_torch_loader(num_workers=2))
