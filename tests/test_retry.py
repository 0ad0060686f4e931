"""Retry: backoff math, the retry loop, classification. No real sleeps: a fake clock and a
recording sleep stand in for time."""

from __future__ import annotations

import builtins
import errno
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncload.errors import CircuitOpenError, HTTPStatusError, TruncatedBodyError
from asyncload.resilience import Retry, backoff_delay, is_transient, retry_after

ANYIO_BACKENDS = ["asyncio", "trio"]


class FakeTime:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def make_retry(time: FakeTime, **kwargs: Any) -> Retry:
    kwargs.setdefault("rng", FixedRandom(0.5))
    return Retry(sleep=time.sleep, clock=time.clock, **kwargs)


def failing(
    *errors: BaseException, result: str = "ok"
) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """An async function that raises ``errors`` in turn, then returns ``result``."""
    calls: list[int] = []

    async def fn() -> str:
        calls.append(len(calls))
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return fn, calls


# backoff_delay: a pure function


def test_backoff_full_jitter_examples() -> None:
    common = {"initial_delay": 0.1, "max_delay": 1.0, "multiplier": 2.0}
    assert backoff_delay(0, jitter="none", rand=0.3, **common) == pytest.approx(0.1)
    assert backoff_delay(2, jitter="none", rand=0.3, **common) == pytest.approx(0.4)
    assert backoff_delay(10, jitter="none", rand=0.3, **common) == 1.0
    assert backoff_delay(2, jitter="full", rand=0.5, **common) == pytest.approx(0.2)
    assert backoff_delay(2, jitter="full", rand=0.0, **common) == 0.0
    assert backoff_delay(2, jitter="equal", rand=0.0, **common) == pytest.approx(0.2)
    assert backoff_delay(2, jitter="equal", rand=1.0, **common) == pytest.approx(0.4)


def test_backoff_survives_huge_attempt_numbers() -> None:
    for n in (1_100, 10**6, 10**30):
        delay = backoff_delay(
            n, initial_delay=0.05, max_delay=5.0, multiplier=2, jitter="none", rand=0.0
        )
        assert delay == 5.0


def test_backoff_rejects_bad_inputs() -> None:
    common: dict[str, Any] = {"initial_delay": 1.0, "max_delay": 2.0, "multiplier": 2.0}
    with pytest.raises(ValueError, match="n must"):
        backoff_delay(-1, jitter="full", rand=0.5, **common)
    with pytest.raises(ValueError, match="rand"):
        backoff_delay(0, jitter="full", rand=1.5, **common)
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(0, jitter="bogus", rand=0.5, **common)  # type: ignore[arg-type]


delays = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@given(
    n=st.integers(min_value=0, max_value=5_000),
    initial=delays,
    maximum=delays,
    multiplier=st.floats(min_value=1.0, max_value=10.0),
    jitter=st.sampled_from(["full", "equal", "none"]),
    rand=st.floats(min_value=0.0, max_value=1.0),
)
def test_backoff_within_bounds_and_caps_monotone(
    n: int, initial: float, maximum: float, multiplier: float, jitter: Any, rand: float
) -> None:
    def cap(k: int) -> float:
        return backoff_delay(
            k,
            initial_delay=initial,
            max_delay=maximum,
            multiplier=multiplier,
            jitter="none",
            rand=0.0,
        )

    delay = backoff_delay(
        n, initial_delay=initial, max_delay=maximum, multiplier=multiplier, jitter=jitter, rand=rand
    )
    assert math.isfinite(delay)
    assert 0.0 <= delay <= cap(n) <= maximum
    if n < 100:
        assert cap(n) == pytest.approx(min(maximum, initial * multiplier**n))
    assert cap(n) <= cap(n + 1)
    if jitter == "equal":
        assert delay >= cap(n) / 2


# construction


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"attempts": 0}, ValueError, "attempts"),
        ({"attempts": 1.5}, TypeError, "attempts"),
        ({"attempts": True}, TypeError, "attempts"),
        ({"initial_delay": -1}, ValueError, "initial_delay"),
        ({"initial_delay": math.nan}, ValueError, "initial_delay"),
        ({"max_delay": -0.1}, ValueError, "max_delay"),
        ({"max_delay": "1"}, TypeError, "max_delay"),
        ({"multiplier": 0.5}, ValueError, "multiplier"),
        ({"jitter": "random"}, ValueError, "jitter"),
        ({"retry_on": 3}, TypeError, "retry_on"),
        ({"retry_on": int}, TypeError, "retry_on"),
        ({"retry_on": (OSError, "x")}, TypeError, "retry_on"),
        ({"deadline": -1}, ValueError, "deadline"),
    ],
)
def test_bad_arguments_name_the_argument(
    kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        Retry(**kwargs)


def test_repr_shows_settings() -> None:
    text = repr(Retry(attempts=3, retry_on=(OSError, KeyError), deadline=2))
    assert text.startswith("Retry(attempts=3, initial_delay=0.05, max_delay=5.0")
    assert "jitter='full'" in text
    assert "retry_on=(OSError, KeyError)" in text
    assert "deadline=2.0" in text
    assert "retry_on=is_transient" in repr(Retry())


# the retry loop


@pytest.mark.anyio
async def test_succeeds_after_transient_failures_with_recorded_delays() -> None:
    time = FakeTime()
    retry = make_retry(time, initial_delay=0.1, multiplier=2.0, max_delay=10.0)
    fn, calls = failing(ConnectionResetError(), TimeoutError(), HTTPStatusError(503, "u"))
    assert await retry.run(fn) == "ok"
    assert len(calls) == 4
    # full jitter with rand = 0.5: half of 0.1, 0.2, 0.4
    assert time.sleeps == pytest.approx([0.05, 0.1, 0.2])


@pytest.mark.anyio
async def test_call_passes_arguments() -> None:
    time = FakeTime()
    retry = make_retry(time)
    seen: list[tuple[Any, ...]] = []

    async def fn(a: int, b: int, *, c: int) -> int:
        seen.append((a, b, c))
        if len(seen) == 1:
            raise ConnectionRefusedError
        return a + b + c

    assert await retry.call(fn, 1, 2, c=3) == 6
    assert seen == [(1, 2, 3), (1, 2, 3)]


@pytest.mark.anyio
async def test_on_retry_sees_attempt_error_and_delay() -> None:
    time = FakeTime()
    retry = make_retry(time, initial_delay=1.0, jitter="none", max_delay=100.0)
    first, second = ConnectionError("a"), ConnectionError("b")
    fn, _ = failing(first, second)
    events: list[tuple[int, BaseException, float]] = []
    await retry.run(fn, on_retry=lambda n, exc, delay: events.append((n, exc, delay)))
    assert events == [(1, first, 1.0), (2, second, 2.0)]
    assert time.sleeps == [1.0, 2.0]


@pytest.mark.anyio
async def test_exhausted_attempts_reraise_the_last_error_itself() -> None:
    time = FakeTime()
    errors = [ConnectionResetError(f"#{i}") for i in range(3)]
    fn, calls = failing(*errors)
    with pytest.raises(ConnectionResetError) as info:
        await make_retry(time, attempts=3).run(fn)
    assert info.value is errors[-1]
    assert info.value.__context__ is None  # not chained onto the earlier attempts
    assert len(calls) == 3
    assert len(time.sleeps) == 2


@pytest.mark.anyio
async def test_single_attempt_never_sleeps() -> None:
    time = FakeTime()
    fn, calls = failing(ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        await make_retry(time, attempts=1).run(fn)
    assert len(calls) == 1
    assert time.sleeps == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("gone"),
        IndexError(3),
        KeyError("k"),
        ValueError("bad"),
        TypeError("bad"),
        CircuitOpenError("open"),
        HTTPStatusError(404, "u"),
        RuntimeError("unknown"),
    ],
)
async def test_non_retryable_errors_raise_at_once(error: Exception) -> None:
    time = FakeTime()
    fn, calls = failing(error)
    with pytest.raises(type(error)) as info:
        await make_retry(time).run(fn)
    assert info.value is error
    assert len(calls) == 1
    assert time.sleeps == []


@pytest.mark.anyio
async def test_retry_on_types_and_predicates() -> None:
    time = FakeTime()
    fn, calls = failing(KeyError("a"), KeyError("b"))
    assert await make_retry(time, retry_on=KeyError).run(fn) == "ok"
    assert len(calls) == 3

    fn, calls = failing(ValueError("a"))
    assert await make_retry(time, retry_on=(KeyError, ValueError)).run(fn) == "ok"

    fn, calls = failing(ValueError("retry me"), ValueError("not me"))
    retry = make_retry(time, retry_on=lambda exc: "retry" in str(exc))
    with pytest.raises(ValueError, match="not me"):
        await retry.run(fn)
    assert len(calls) == 2


@pytest.mark.anyio
async def test_deadline_stops_before_a_sleep_would_cross_it() -> None:
    time = FakeTime()
    # delays 1, 2, 4, 8 ...: after sleeping 1 + 2 the next sleep (4) would end at 7 > 5
    retry = make_retry(time, attempts=10, initial_delay=1.0, jitter="none", deadline=5.0)
    errors = [TimeoutError(f"#{i}") for i in range(10)]
    fn, calls = failing(*errors)
    with pytest.raises(TimeoutError) as info:
        await retry.run(fn)
    assert time.sleeps == [1.0, 2.0]
    assert len(calls) == 3
    assert info.value is errors[2]


@pytest.mark.anyio
async def test_deadline_counts_time_spent_in_attempts() -> None:
    time = FakeTime()
    retry = make_retry(time, attempts=10, initial_delay=1.0, jitter="none", deadline=5.0)
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        time.now += 4.5  # the attempt itself takes 4.5 s
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await retry.run(slow)
    assert calls == 1
    assert time.sleeps == []


@pytest.mark.anyio
async def test_retry_after_is_honoured_and_capped() -> None:
    time = FakeTime()
    retry = make_retry(time, initial_delay=0.01, max_delay=3.0)
    fn, calls = failing(
        HTTPStatusError(429, "u", retry_after=2.0),
        HTTPStatusError(503, "u", retry_after=60.0),
        HTTPStatusError(503, "u"),
    )
    assert await retry.run(fn) == "ok"
    # 2 s as asked; 60 s capped at max_delay; then plain backoff (n=2, rand 0.5)
    assert time.sleeps == pytest.approx([2.0, 3.0, 0.5 * 0.04])
    assert len(calls) == 4


@pytest.mark.anyio
async def test_retry_after_respects_the_deadline() -> None:
    time = FakeTime()
    retry = make_retry(time, max_delay=100.0, deadline=10.0)
    error = HTTPStatusError(429, "u", retry_after=30.0)
    fn, calls = failing(error)
    with pytest.raises(HTTPStatusError) as info:
        await retry.run(fn)
    assert info.value is error
    assert len(calls) == 1
    assert time.sleeps == []


@pytest.mark.anyio
async def test_cancellation_is_not_retried() -> None:
    time = FakeTime()
    retry = make_retry(time, retry_on=lambda exc: True)
    started = anyio.Event()
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(retry.run, hang)
        await started.wait()
        tg.cancel_scope.cancel()
    assert calls == 1
    assert time.sleeps == []


@pytest.mark.anyio
async def test_cancellation_during_backoff_sleep_stops_retrying() -> None:
    sleeping = anyio.Event()
    calls = 0

    async def blocking_sleep(seconds: float) -> None:
        sleeping.set()
        await anyio.sleep_forever()

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionResetError

    retry = Retry(sleep=blocking_sleep, clock=lambda: 0.0)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(retry.run, fn)
            await sleeping.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert calls == 1


class Interrupt(BaseException):
    pass


@pytest.mark.anyio
async def test_base_exceptions_are_never_retried() -> None:
    time = FakeTime()
    fn, calls = failing(Interrupt())
    with pytest.raises(Interrupt):
        await make_retry(time, retry_on=lambda exc: True).run(fn)
    assert len(calls) == 1


@pytest.mark.anyio
async def test_default_sleep_is_anyio_sleep_with_zero_delays() -> None:
    # initial_delay=0 keeps the real anyio.sleep at zero seconds: no waiting.
    fn, calls = failing(ConnectionResetError(), ConnectionResetError())
    assert await Retry(initial_delay=0).run(fn) == "ok"
    assert len(calls) == 3


def test_one_retry_serves_several_event_loops() -> None:
    time = FakeTime()
    retry = make_retry(time)
    for backend in ("asyncio", "trio"):
        fn, calls = failing(ConnectionResetError())
        assert anyio.run(retry.run, fn, backend=backend) == "ok"
        assert len(calls) == 2


# classification


class SlowDown(Exception):
    pass


class FakeClientError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(f"An error occurred ({code}) when calling the GetObject operation")
        self.response = {"Error": {"Code": code}}


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError(),
        ConnectionResetError(),
        BrokenPipeError(),
        TimeoutError(),
        OSError(errno.ECONNRESET, "reset"),
        OSError(errno.ENETUNREACH, "unreachable"),
        socket.gaierror(socket.EAI_AGAIN, "temporary failure"),
        HTTPStatusError(429, "u"),
        HTTPStatusError(408, "u"),
        HTTPStatusError(500, "u"),
        HTTPStatusError(503, "u"),
        TruncatedBodyError("short"),
        SlowDown(),
        FakeClientError("SlowDown"),
        FakeClientError("InternalError"),
        FakeClientError("ServiceUnavailable"),
        RuntimeError("RequestTimeout: your socket connection was not read from"),
        FakeClientError("ThrottlingException"),
    ],
)
def test_transient(error: BaseException) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(),
        PermissionError(),
        IsADirectoryError(),
        NotADirectoryError(),
        OSError(errno.ENOSPC, "disk full"),
        socket.gaierror(socket.EAI_NONAME, "unknown host"),
        IndexError(),
        KeyError("k"),
        LookupError(),
        ValueError("InternalError"),  # a ValueError is never retried, whatever it says
        TypeError(),
        CircuitOpenError("open"),
        HTTPStatusError(400, "u"),
        HTTPStatusError(404, "u"),
        HTTPStatusError(403, "u"),
        FakeClientError("NoSuchKey"),
        RuntimeError("boom"),
        RuntimeError("SlowDownsampler misconfigured"),  # a store's code is a whole word
        AssertionError("ThrottlingPolicy mismatch"),
        Exception(),
        KeyboardInterrupt(),
        Interrupt(),
    ],
)
def test_permanent(error: BaseException) -> None:
    assert not is_transient(error)


def test_aiohttp_errors() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    assert is_transient(aiohttp.ServerDisconnectedError())
    assert is_transient(aiohttp.ClientPayloadError("cut"))
    assert is_transient(aiohttp.ServerTimeoutError())
    assert is_transient(aiohttp.ClientConnectionError())
    assert not is_transient(aiohttp.InvalidURL("x"))


def test_exception_groups_are_transient_only_if_all_members_are() -> None:
    group_type = getattr(builtins, "ExceptionGroup", None)
    if group_type is None:  # Python 3.10
        group_type = pytest.importorskip("exceptiongroup").ExceptionGroup
    assert is_transient(group_type("g", [ConnectionResetError(), TimeoutError()]))
    assert not is_transient(group_type("g", [ConnectionResetError(), ValueError()]))


def test_cancellation_classes_are_not_transient() -> None:
    import asyncio

    import trio

    assert not is_transient(asyncio.CancelledError())
    cancelled = anyio.run(_make_trio_cancelled, backend="trio")
    assert isinstance(cancelled, trio.Cancelled)
    assert not is_transient(cancelled)


async def _make_trio_cancelled() -> BaseException:
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException as exc:  # the backend's Cancelled, caught to inspect it
            caught = exc
            raise
    return caught


def test_retry_after_reads_the_servers_delay() -> None:
    assert retry_after(HTTPStatusError(429, "u", retry_after=1.5)) == 1.5
    assert retry_after(HTTPStatusError(429, "u")) is None
    assert retry_after(ConnectionResetError()) is None
    bad = HTTPStatusError(503, "u", retry_after=-1.0)
    assert retry_after(bad) is None


def test_next_delay_is_pure_and_needs_no_event_loop() -> None:
    """For callers that drive attempts themselves, from synchronous code too."""
    import asyncio

    retry = Retry(attempts=3, initial_delay=0.5, jitter="none")
    assert retry.next_delay(1, ConnectionError(), 0.0) == 0.5
    assert retry.next_delay(3, ConnectionError(), 0.0) is None  # attempts spent
    assert retry.next_delay(1, ValueError(), 0.0) is None  # permanent
    assert retry.next_delay(1, asyncio.CancelledError(), 0.0) is None
