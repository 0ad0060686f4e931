"""CircuitBreaker: transitions on a fake clock, probe limits, neutral errors, cancellation."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from asyncload.errors import CircuitOpenError, HTTPStatusError
from asyncload.resilience import CircuitBreaker
from asyncload.resilience.breaker import BreakerState, Outcome

ANYIO_BACKENDS = ["asyncio", "trio"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """A fake service: fails with ``error`` while ``error`` is set, and counts calls."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.calls = 0

    async def fetch(self, value: str = "ok") -> str:
        self.calls += 1
        await anyio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return value


def make(clock: FakeClock, **kwargs: Any) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        clock=clock, on_state_change=lambda old, new: changes.append((old, new)), **kwargs
    )
    return breaker, changes


async def fail_times(breaker: CircuitBreaker, backend: Backend, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionResetError):
            await breaker.call(backend.fetch)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"failure_threshold": 0}, ValueError, "failure_threshold"),
        ({"failure_threshold": 2.5}, TypeError, "failure_threshold"),
        ({"recovery_timeout": -1}, ValueError, "recovery_timeout"),
        ({"recovery_timeout": float("nan")}, ValueError, "recovery_timeout"),
        ({"recovery_timeout": "1"}, TypeError, "recovery_timeout"),
        ({"half_open_max_calls": 0}, ValueError, "half_open_max_calls"),
        ({"counts": 5}, TypeError, "counts"),
        ({"on_state_change": 5}, TypeError, "on_state_change"),
    ],
)
def test_bad_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        CircuitBreaker(**kwargs)


@pytest.mark.anyio
async def test_closed_open_half_open_closed() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, changes = make(clock, failure_threshold=3, recovery_timeout=10.0)
    assert breaker.state == "closed"
    assert await breaker.call(backend.fetch, "a") == "a"

    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 3)
    assert breaker.state == "open"
    assert changes == [("closed", "open")]

    # Open: refused at once, without calling the backend; the message says when it retries.
    calls = backend.calls
    clock.now += 4.0
    with pytest.raises(CircuitOpenError, match=r"in 6 s"):
        await breaker.call(backend.fetch)
    assert backend.calls == calls

    clock.now += 6.0
    assert breaker.state == "half_open"  # read before any call, as the next call finds it
    backend.error = None
    assert await breaker.call(backend.fetch, "probe") == "probe"
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    stats = breaker.statistics()
    assert stats["opened"] == 1
    assert stats["rejected"] == 1
    assert stats["failures"] == 0


@pytest.mark.anyio
async def test_probe_failure_reopens_for_a_new_recovery_period() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, changes = make(clock, failure_threshold=2, recovery_timeout=5.0)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 2)
    clock.now += 5.0
    await fail_times(breaker, backend, 1)  # the probe fails
    assert breaker.state == "open"
    clock.now += 4.9
    assert breaker.state == "open"  # a new period, counted from the probe's failure
    with pytest.raises(CircuitOpenError):
        await breaker.call(backend.fetch)
    clock.now += 0.1
    assert breaker.state == "half_open"
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
    ]
    assert breaker.statistics()["opened"] == 2


@pytest.mark.anyio
async def test_success_resets_the_consecutive_count() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, _ = make(clock, failure_threshold=3)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 2)
    assert breaker.statistics()["failures"] == 2
    backend.error = None
    await breaker.call(backend.fetch)
    assert breaker.statistics()["failures"] == 0
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 2)
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_non_counted_errors_neither_trip_nor_reset() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, changes = make(clock, failure_threshold=2)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    for error in (HTTPStatusError(404, "u"), ValueError("bad"), FileNotFoundError("x")):
        backend.error = error
        for _ in range(5):
            with pytest.raises(type(error)):
                await breaker.call(backend.fetch)
    assert breaker.state == "closed"
    assert breaker.statistics()["failures"] == 1  # not reset either
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    assert breaker.state == "open"
    assert changes == [("closed", "open")]


@pytest.mark.anyio
async def test_counts_accepts_exception_types() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, _ = make(clock, failure_threshold=1, counts=KeyError)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 3)
    assert breaker.state == "closed"
    backend.error = KeyError("k")
    with pytest.raises(KeyError):
        await breaker.call(backend.fetch)
    assert breaker.state == "open"


@pytest.mark.anyio
async def test_half_open_admits_at_most_max_probes() -> None:
    clock = FakeClock()
    breaker, changes = make(clock, failure_threshold=1, recovery_timeout=1.0, half_open_max_calls=2)
    backend = Backend()
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    clock.now += 1.0

    release = anyio.Event()
    entered: list[str] = []
    results: list[str] = []

    async def probe(name: str) -> str:
        entered.append(name)
        await release.wait()
        return name

    async def run_probe(name: str) -> None:
        results.append(await breaker.call(probe, name))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_probe, "p1")
        tg.start_soon(run_probe, "p2")
        await anyio.wait_all_tasks_blocked()
        assert sorted(entered) == ["p1", "p2"]
        assert breaker.statistics()["probes_in_flight"] == 2
        with pytest.raises(CircuitOpenError, match="half-open"):
            await breaker.call(probe, "p3")
        assert entered.count("p3") == 0
        release.set()
    assert sorted(results) == ["p1", "p2"]
    assert breaker.state == "closed"
    assert breaker.statistics()["rejected"] == 1
    assert changes[-1] == ("half_open", "closed")


@pytest.mark.anyio
async def test_cancelled_probe_releases_its_slot() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, _ = make(clock, failure_threshold=1, recovery_timeout=1.0)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    clock.now += 1.0

    started = anyio.Event()

    async def hang() -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, hang)
        await started.wait()
        with pytest.raises(CircuitOpenError):  # the one slot is taken
            await breaker.call(backend.fetch)
        tg.cancel_scope.cancel()

    assert breaker.state == "half_open"  # a cancelled probe decides nothing
    assert breaker.statistics()["probes_in_flight"] == 0
    backend.error = None
    assert await breaker.call(backend.fetch, "next") == "next"
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_neutral_probe_error_frees_the_slot() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, _ = make(clock, failure_threshold=1, recovery_timeout=1.0)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    clock.now += 1.0
    backend.error = HTTPStatusError(404, "u")
    with pytest.raises(HTTPStatusError):
        await breaker.call(backend.fetch)
    assert breaker.state == "half_open"
    backend.error = None
    await breaker.call(backend.fetch)
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_late_outcome_of_a_call_from_before_the_trip_is_ignored() -> None:
    clock = FakeClock()
    breaker, changes = make(clock, failure_threshold=1, recovery_timeout=1.0)
    release = anyio.Event()

    async def slow_success() -> str:
        await release.wait()
        return "late"

    async def fail() -> None:
        raise ConnectionResetError

    async with anyio.create_task_group() as tg:
        tg.start_soon(breaker.call, slow_success)  # admitted while closed
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(ConnectionResetError):
            await breaker.call(fail)
        assert breaker.state == "open"
        release.set()
    # The slow call succeeded after the trip: it was no probe, so the breaker stays open.
    assert breaker.state == "open"
    assert changes == [("closed", "open")]


@pytest.mark.anyio
async def test_run_takes_a_zero_argument_function() -> None:
    breaker = CircuitBreaker()

    async def fn() -> int:
        return 7

    assert await breaker.run(fn) == 7


@pytest.mark.anyio
async def test_base_exceptions_pass_through_without_counting() -> None:
    class Interrupt(BaseException):
        pass

    async def fn() -> None:
        raise Interrupt

    breaker = CircuitBreaker(failure_threshold=1, counts=lambda exc: True)
    with pytest.raises(Interrupt):
        await breaker.run(fn)
    assert breaker.state == "closed"


@pytest.mark.anyio
async def test_hook_may_read_the_breaker() -> None:
    clock, backend = FakeClock(), Backend()
    seen: list[str] = []
    breaker: CircuitBreaker

    def hook(old: str, new: str) -> None:
        seen.append(breaker.state)  # would deadlock if called under the lock

    breaker = CircuitBreaker(failure_threshold=1, clock=clock, on_state_change=hook)
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    assert seen == ["open"]


@pytest.mark.anyio
async def test_a_hook_that_raises_leaves_the_breaker_working() -> None:
    """The hook's error reaches the call that made the transition; the probe slot that
    call took is freed, so the next call probes, and a success closes the breaker."""
    clock, backend = FakeClock(), Backend()
    changes: list[tuple[str, str]] = []

    def hook(old: str, new: str) -> None:
        changes.append((old, new))
        if new == "half_open" and changes.count(("open", "half_open")) == 1:
            raise RuntimeError("the logger failed")

    breaker = CircuitBreaker(
        failure_threshold=1, recovery_timeout=1.0, clock=clock, on_state_change=hook
    )
    backend.error = ConnectionResetError()
    await fail_times(breaker, backend, 1)
    backend.error = None
    clock.now += 2.0
    with pytest.raises(RuntimeError, match="the logger failed"):
        await breaker.call(backend.fetch)
    assert backend.calls == 1  # refused by the hook's error, not sent
    assert breaker.statistics()["probes_in_flight"] == 0
    assert await breaker.call(backend.fetch) == "ok"
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_one_breaker_serves_several_event_loops() -> None:
    clock, backend = FakeClock(), Backend()
    breaker, _ = make(clock, failure_threshold=2, recovery_timeout=1.0)
    backend.error = ConnectionResetError()

    async def fail_once() -> None:
        with pytest.raises(ConnectionResetError):
            await breaker.call(backend.fetch)

    anyio.run(fail_once, backend="asyncio")
    anyio.run(fail_once, backend="trio")
    assert breaker.state == "open"
    clock.now += 1.0
    backend.error = None
    assert anyio.run(breaker.call, backend.fetch, backend="asyncio") == "ok"
    assert breaker.state == "closed"


def test_breaker_pickles() -> None:
    import pickle

    breaker = CircuitBreaker(failure_threshold=3)
    copy = pickle.loads(pickle.dumps(breaker))
    assert copy.state == "closed"
    assert copy.statistics()["failures"] == 0


def test_repr() -> None:
    assert repr(CircuitBreaker()) == (
        "CircuitBreaker(failure_threshold=5, recovery_timeout=1.0, "
        "half_open_max_calls=1, state='closed')"
    )


def test_state_machine_without_io() -> None:
    clock = FakeClock()
    machine = BreakerState(
        failure_threshold=2, recovery_timeout=3.0, half_open_max_calls=1, clock=clock
    )
    machine.settle(machine.admit(), Outcome.FAILURE)
    machine.settle(machine.admit(), Outcome.FAILURE)
    assert machine.state == "open"
    with pytest.raises(CircuitOpenError):
        machine.admit()
    clock.now += 3.0
    probe = machine.admit()
    assert probe.probe
    with pytest.raises(CircuitOpenError):
        machine.admit()
    machine.settle(probe, Outcome.IGNORED)
    probe = machine.admit()
    machine.settle(probe, Outcome.SUCCESS)
    assert machine.state == "closed"
    assert machine.pop_transitions() == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert machine.pop_transitions() == []
    assert (machine.opened, machine.rejected) == (1, 2)
