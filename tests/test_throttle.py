"""The throttle: additive increase, multiplicative decrease of the concurrency a loader keeps
in flight when the store answers 429 / 503 SlowDown.

The state machine is tested on plain numbers; the gate with datasets that record how many
fetches run at once; the loader end to end against the real HTTP server (conftest).
No real sleeps: retries get a recording fake ``sleep``.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from conftest import ASYNCIO_BACKENDS, sample_body

import asyncload as al
from asyncload.resilience.throttle import ConcurrencyGate, is_throttling

pytestmark = pytest.mark.anyio


class SlowDown(Exception):
    """What an S3 client raises when the store says 503 SlowDown."""

    def __init__(self) -> None:
        super().__init__("SlowDown: Please reduce your request rate.")


async def no_sleep(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


# -- classification -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (al.HTTPStatusError(429, "u"), True),
        (al.HTTPStatusError(503, "u"), True),
        (al.HTTPStatusError(500, "u"), False),
        (al.HTTPStatusError(404, "u"), False),
        (SlowDown(), True),
        (RuntimeError("TooManyRequests"), True),
        (ConnectionResetError(), False),
        (TimeoutError(), False),
    ],
    ids=repr,
)
def test_what_counts_as_throttling(exc: BaseException, expected: bool) -> None:
    assert is_throttling(exc) is expected


# -- the state machine ----------------------------------------------------------------------


def bound(throttle: al.Throttle, ceiling: int = 32) -> al.Throttle:
    throttle.bind(ceiling)
    return throttle


def test_a_burst_of_throttling_answers_halves_once() -> None:
    """32 requests in flight all answered 503: one decrease, not five down to the floor."""
    throttle = bound(al.Throttle())
    tickets = [throttle.admit() for _ in range(32)]
    for ticket in tickets:
        throttle.failed(ticket, al.HTTPStatusError(503, "u"))
    assert (throttle.slots, throttle.throttled, throttle.decreases) == (16, 32, 1)
    # A request sent after the decrease that is throttled again halves it again.
    throttle.failed(throttle.admit(), SlowDown())
    assert (throttle.slots, throttle.decreases) == (8, 2)


def test_decrease_stops_at_the_floor() -> None:
    throttle = bound(al.Throttle(min_concurrency=3), ceiling=16)
    for _ in range(10):
        throttle.failed(throttle.admit(), al.HTTPStatusError(429, "u"))
    assert throttle.slots == 3
    # The times it lowered the limit (16 -> 8 -> 4 -> 3), not the answers at the floor.
    assert (throttle.decreases, throttle.throttled) == (3, 10)


def test_other_failures_leave_the_limit_alone() -> None:
    throttle = bound(al.Throttle())
    for exc in (ConnectionResetError(), al.HTTPStatusError(500, "u"), FileNotFoundError()):
        throttle.failed(throttle.admit(), exc)
    assert (throttle.slots, throttle.throttled, throttle.decreases) == (32, 0, 0)


def test_successes_recover_about_one_slot_per_round() -> None:
    throttle = bound(al.Throttle())
    throttle.failed(throttle.admit(), SlowDown())
    assert throttle.slots == 16
    for _ in range(16):  # one round at the current limit
        throttle.succeeded()
    assert 16.9 < throttle.limit < 17.0  # about one slot per round
    for _ in range(1000):
        throttle.succeeded()
    assert throttle.slots == 32  # never above the ceiling
    assert throttle.limit == 32.0


def test_custom_signals_and_rates() -> None:
    throttle = bound(al.Throttle(decrease=0.25, increase=4.0, signals=lambda e: True), 64)
    throttle.failed(throttle.admit(), ValueError())
    assert throttle.slots == 16
    for _ in range(16):
        throttle.succeeded()
    assert 19 < throttle.limit < 20  # about +4 over one round


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_concurrency": 0}, ValueError, "min_concurrency"),
        ({"min_concurrency": 1.5}, TypeError, "min_concurrency"),
        ({"decrease": 1.0}, ValueError, "decrease"),
        ({"decrease": 0}, ValueError, "decrease"),
        ({"increase": -1}, ValueError, "increase"),
        ({"signals": 3}, TypeError, "signals"),
    ],
)
def test_bad_arguments_name_themselves(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        al.Throttle(**kwargs)


def test_loader_refuses_a_bad_throttle() -> None:
    with pytest.raises(TypeError, match="throttle"):
        al.Loader(al.from_sequence([1]), throttle="yes")  # type: ignore[arg-type]


# -- the gate ----------------------------------------------------------------------------------


class Recording(al.AsyncDataset[int]):
    """Records the most fetches running at once; the first ``throttled`` calls raise
    SlowDown, and fetches wait for ``release`` so that tests decide when they finish."""

    def __init__(self, n: int, throttled: int = 0) -> None:
        self.n = n
        self.throttled = throttled
        self.calls = 0
        self.running = 0
        self.peak = 0
        self.release = anyio.Event()

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        self.calls += 1
        if self.calls <= self.throttled:
            await anyio.lowlevel.checkpoint()
            raise SlowDown()
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.release.wait()
        finally:
            self.running -= 1
        return index


async def test_gate_holds_attempts_to_the_limit() -> None:
    # Recovery so slow that the 20 successes below cannot lift the limit past 4.
    throttle = bound(al.Throttle(increase=0.01), ceiling=8)
    throttle.failed(throttle.admit(), SlowDown())  # limit 4
    gate = ConcurrencyGate(throttle)
    ds = Recording(20)
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(gate.run, lambda i=i: ds[i])
        await anyio.wait_all_tasks_blocked()
        assert ds.running == 4
        ds.release.set()
    assert ds.peak == 4
    assert gate.in_use == 0


async def test_a_cancelled_waiter_passes_its_slot_on() -> None:
    throttle = bound(al.Throttle(), ceiling=2)
    throttle.failed(throttle.admit(), SlowDown())  # limit 1
    gate = ConcurrencyGate(throttle)
    ds = Recording(3)
    done: list[int] = []

    async def fetch(i: int, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            done.append(await gate.run(lambda: ds[i]))

    victim = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(fetch, 0)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(fetch, 1, victim)
        tg.start_soon(fetch, 2)
        await anyio.wait_all_tasks_blocked()
        assert ds.running == 1
        ds.release.set()  # 0 finishes and wakes 1 ...
        victim.cancel()  # ... which is cancelled before it runs: 2 must get the slot
    assert sorted(done) == [0, 2]
    assert gate.in_use == 0


async def test_loader_lowers_concurrency_when_throttled_and_loses_nothing() -> None:
    """The first 40 fetch attempts answer SlowDown; every sample still arrives once, and
    the fetches that follow run at most at the lowered limit."""
    ds = Recording(64, throttled=40)
    ds.release.set()
    loader = al.Loader(
        ds,
        batch_size=8,
        concurrency=32,
        retry=al.Retry(attempts=10, initial_delay=0.001, sleep=no_sleep),
    )
    got = [int(x) for batch in [b async for b in loader] for x in batch]
    assert got == list(range(64))
    stats = loader.statistics()
    assert stats["throttled"] == 40
    assert stats["throttle_decreases"] >= 1
    assert stats["concurrency_limit"] < 32
    assert stats["retries"] == 40
    assert ds.peak <= 32


async def test_throttle_off() -> None:
    ds = Recording(16, throttled=5)
    ds.release.set()
    loader = al.Loader(
        ds,
        concurrency=8,
        throttle=False,
        retry=al.Retry(attempts=10, initial_delay=0.001, sleep=no_sleep),
    )
    assert len([b async for b in loader]) == 16
    stats = loader.statistics()
    assert (stats["concurrency_limit"], stats["throttled"], stats["throttle_decreases"]) == (
        8,
        0,
        0,
    )


async def test_the_limit_carries_over_to_the_next_epoch() -> None:
    ds = Recording(32, throttled=1)
    ds.release.set()
    throttle = al.Throttle()
    loader = al.Loader(
        ds,
        concurrency=16,
        throttle=throttle,
        retry=al.Retry(attempts=3, initial_delay=0.001, sleep=no_sleep),
    )
    _ = [b async for b in loader]
    assert throttle.decreases == 1
    limit = throttle.limit
    assert 8 < limit < 16  # halved, then recovering
    _ = [b async for b in loader]
    assert throttle.limit > limit  # recovery went on from where it was


@pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS)
@pytest.mark.parametrize("status", [429, 503])
async def test_http_store_that_throttles(http_server: Any, status: int) -> None:
    """A real HTTP server answers the first request for each of 100 URLs with ``status``:
    the loader lowers its concurrency, retries, and delivers all 200 samples."""
    urls = [http_server.url(f"/flaky/t{status}-{i}?fail=1&status={status}") for i in range(100)]
    urls += [http_server.url(f"/sample/{i}") for i in range(100)]
    loader = al.Loader(
        al.sources.HTTPSource(urls),
        batch_size=None,
        concurrency=32,
        retry=al.Retry(attempts=5, initial_delay=0.001, sleep=no_sleep),
    )
    async with loader:
        bodies = [body async for body in loader]
    expected = [sample_body(0)] * 100 + [sample_body(i) for i in range(100)]
    assert bodies == expected
    stats = loader.statistics()
    assert (stats["throttled"], stats["retries"], stats["errors"]) == (100, 100, 0)
    assert stats["throttle_decreases"] >= 1
    assert http_server.total == 300
