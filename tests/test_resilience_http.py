"""A training run survives a flaky network: no sample lost, duplicated or corrupted.

Everything goes through the public API (``al.Loader``, ``al.sources.HTTPSource``,
``al.Retry``, ``al.CircuitBreaker``) against a real aiohttp server that fails requests by a
deterministic plan (``tests/faults.py``): 503 with and without Retry-After, 500, 429 with
Retry-After, connection resets, stalls, truncated bodies (by Content-Length and chunked),
404s, and a "down" mode.

Expectations are exact: :meth:`faults.FaultPlan.expect` replays each sample's requests as
the client sees them, so the tests know how many requests the server must receive for each
sample and how many retries the loader must count. Nothing here sleeps to make something
happen: retry backoffs are recorded by a fake ``sleep`` or are a millisecond long, the
breaker runs on a fake clock, and the only real waits are per-attempt timeouts of
:data:`STALL_TIMEOUT` seconds on requests that the server holds on purpose.

After every epoch, completed or failed, the loader is closed and the test checks that no
task is left in the event loop and no client connection to the server is left open.
"""

from __future__ import annotations

import collections
import errno
import itertools
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import anyio
import psutil
import pytest
from conftest import ASYNCIO_BACKENDS
from faults import (
    ALL_TRANSIENT,
    CHUNKED_CUT,
    NOT_FOUND,
    RESET,
    S429_RA,
    S500,
    S503,
    S503_RA,
    STALL,
    TRUNCATED,
    Expectation,
    Fault,
    FaultPlan,
    FaultServer,
    body,
)

import asyncload as al
from asyncload.resilience import is_transient

pytestmark = pytest.mark.anyio

# Per-attempt timeout for the stalled requests: long enough that no healthy request on a
# busy 2-core machine comes near it, short enough to keep the file fast.
STALL_TIMEOUT = 1.5


# HTTPSource runs on asyncio and uvloop only (trio is covered in test_sources_http.py: a
# clear RuntimeError).
ANYIO_BACKENDS = ASYNCIO_BACKENDS


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as fault_server:
        yield fault_server


# -- helpers --------------------------------------------------------------------------------


class Indexed(al.AsyncDataset[tuple[int, bytes]]):
    """``(index, body)`` for each sample of ``source``: keeps the index with the bytes, so
    that unordered output can be checked as a multiset keyed by index."""

    def __init__(self, source: al.AsyncDataset[bytes]) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    async def __getitem__(self, index: int) -> tuple[int, bytes]:
        return index, await self.source[index]

    def key_of(self, index: int) -> Hashable | None:
        return self.source.key_of(index)

    async def aclose(self) -> None:
        await self.source.aclose()


class FakeSleep:
    """Records the delays it is asked for; waits for nothing but a checkpoint."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()


class FixedRandom:
    """``rng`` for Retry: full jitter then gives exactly ``value`` times the ceiling."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class FakeClock:
    """A monotonic clock for the breaker that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def client_connections(server: FaultServer) -> list[Any]:
    """This process's TCP sockets connected to the server (the client side: the server's own
    sockets have the server's port as their local, not their remote, port)."""
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server.port
    ]


async def run_epoch(
    loader: al.Loader, server: FaultServer, live_tasks: Callable[[], set[object]]
) -> tuple[list[Any], al.AsyncloadError | None]:
    """One epoch: the samples that came (batches flattened) and the error that ended it, if
    any. Closes the loader either way, then checks that nothing is left behind: no task in
    the event loop, no open client connection, no
    fetch counted in flight."""
    baseline = live_tasks()
    got: list[Any] = []
    error: al.AsyncloadError | None = None
    try:
        async for batch in loader:
            if loader.batch_size is None:
                got.append(batch)
            else:
                got.extend(batch)
    except al.AsyncloadError as exc:
        error = exc
    finally:
        await loader.aclose()
    assert live_tasks() == baseline
    assert client_connections(server) == []
    assert loader.statistics()["in_flight"] == 0
    return got, error


def expectations(plan: FaultPlan, n: int, attempts: int) -> dict[int, Expectation]:
    return {i: plan.expect(i, attempts=attempts) for i in range(n)}


def throttling(fault: Fault) -> bool:
    """Whether the loader's default throttle counts this failure (429 and 503)."""
    return fault.kind == "status" and fault.status in (429, 503)


def assert_cause(error: BaseException | None, index: int, server: FaultServer) -> BaseException:
    """``error`` is the SampleError of sample ``index``, keyed by its URL; its cause."""
    assert isinstance(error, al.SampleError), repr(error)
    assert error.index == index
    assert error.key == server.url(index)
    assert error.__cause__ is not None
    return error.__cause__


# -- the headline: 20 % of all requests faulted, every kind, nothing lost -----------------

N_SAMPLES = 1000
ATTEMPTS = 5
# Three stalls close together, so that their timeouts overlap instead of adding up.
HEADLINE_PLAN = FaultPlan.seeded(N_SAMPLES, seed=20240611, rate=0.2, stalls=(500, 501, 503))


def test_the_headline_plan_is_what_it_claims() -> None:
    """The schedule itself: ~20 % of all requests faulted, every transient kind well
    represented, some samples faulted on 2 to 4 consecutive requests, and survivable with
    ``ATTEMPTS`` attempts (even counting the client's resend after a reset)."""
    plan, n = HEADLINE_PLAN, N_SAMPLES
    expect = expectations(plan, n, ATTEMPTS)
    assert all(e.ok for e in expect.values())
    faulted = collections.Counter(
        f.name for i, e in expect.items() for f in plan.faulted_requests(i, e.requests)
    )
    total = sum(e.requests for e in expect.values())
    assert 0.19 <= sum(faulted.values()) / total <= 0.21
    assert set(faulted) == {f.name for f in ALL_TRANSIENT}
    assert faulted["stall"] == 3
    assert min(c for name, c in faulted.items() if name != "stall") >= 25
    runs = collections.Counter(sum(1 for (i, _) in plan.faults if i == j) for j in range(n))
    assert runs[2] >= 10 and runs[3] >= 5
    assert max(len(e.failures) for e in expect.values()) <= ATTEMPTS - 1
    # Every kind reaches the loader as a failed attempt (a reset only when resent into
    # another reset), and some resets are absorbed by the client's resend.
    assert {f for e in expect.values() for f in e.failures} == set(ALL_TRANSIENT)
    assert sum(e.resent for e in expect.values()) > 0


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_flaky_network_loses_duplicates_and_corrupts_nothing(
    server: FaultServer, live_tasks: Callable[[], set[object]], ordered: bool
) -> None:
    """1,000 samples (up to 16 KiB) with 20 % of all requests faulted, across every fault
    kind: each sample arrives exactly once with its exact bytes, in order when ordered;
    the server sees exactly the requests the plan predicts; ``retries`` is exactly the
    number of failed attempts; nothing is counted as an error or skipped."""
    plan, n = HEADLINE_PLAN, N_SAMPLES
    server.plan = plan
    expect = expectations(plan, n, ATTEMPTS)
    loader = al.Loader(
        Indexed(al.sources.HTTPSource(server.urls(n))),
        batch_size=32,
        collate_fn=list,
        concurrency=16,
        ordered=ordered,
        retry=al.Retry(attempts=ATTEMPTS, initial_delay=0.001, max_delay=0.002),
        timeout=STALL_TIMEOUT,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None

    indices = [index for index, _ in got]
    if ordered:
        assert indices == list(range(n))
    else:
        assert collections.Counter(indices) == collections.Counter(range(n))
    assert [index for index, data in got if data != body(index)] == []

    # The server saw exactly the requests and faults the plan predicts, sample by sample.
    assert server.requests == {i: e.requests for i, e in expect.items()}
    faults = server.faults
    assert faults == collections.Counter(
        f.name for i, e in expect.items() for f in plan.faulted_requests(i, e.requests)
    )
    assert set(faults) == {f.name for f in ALL_TRANSIENT}
    # Every faulted request was either a failed attempt that the loader retried, or a reset
    # that the client resent by itself within the same attempt (see faults.py).
    retries = sum(e.retries for e in expect.values())
    assert sum(faults.values()) == retries + sum(e.resent for e in expect.values())

    stats = loader.statistics()
    assert stats["samples"] == n
    assert stats["retries"] == retries
    assert (stats["errors"], stats["skipped"], stats["substituted"]) == (0, 0, 0)
    assert stats["error_log"] == []
    assert stats["throttled"] == sum(
        1 for e in expect.values() for f in e.failures if throttling(f)
    )


# -- one fault kind at a time ---------------------------------------------------------------


def one_failed_attempt(fault: Fault) -> list[Fault]:
    """The requests that make exactly one client attempt fail with ``fault``: a single reset
    is resent by HTTPSource's client within the attempt, so a reset takes two."""
    return [fault, fault] if fault is RESET else [fault]


@pytest.mark.parametrize("fault", ALL_TRANSIENT, ids=repr)
async def test_each_fault_kind_is_retried_into_an_intact_sample(
    server: FaultServer, live_tasks: Callable[[], set[object]], fault: Fault
) -> None:
    n = 6
    server.plan = plan = FaultPlan.runs({2: one_failed_attempt(fault)})
    sleep = FakeSleep()
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=2,
        retry=al.Retry(attempts=2, sleep=sleep),
        timeout=STALL_TIMEOUT,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    assert got == [body(i) for i in range(n)]
    assert plan.expect(2, attempts=2) == Expectation(
        len(plan.faults) + 1, (fault,), ok=True, resent=1 if fault is RESET else 0
    )
    assert server.requests == {i: plan.expect(i, attempts=2).requests for i in range(n)}
    stats = loader.statistics()
    assert (stats["retries"], stats["errors"], stats["skipped"]) == (1, 0, 0)
    assert len(sleep.delays) == 1


@pytest.mark.parametrize("fault", ALL_TRANSIENT, ids=repr)
async def test_each_fault_kind_surfaces_as_the_right_error_without_retry(
    server: FaultServer, live_tasks: Callable[[], set[object]], fault: Fault
) -> None:
    """retry=None: the failed sample raises SampleError (index, key = URL) at its place in
    the stream, with the source's own error as cause, classified transient."""
    n = 6
    server.plan = FaultPlan.runs({2: one_failed_attempt(fault)})
    loader = al.Loader(al.sources.HTTPSource(server.urls(n)), batch_size=1, timeout=STALL_TIMEOUT)
    got, error = await run_epoch(loader, server, live_tasks)
    assert got == [body(0), body(1)]
    cause = assert_cause(error, 2, server)
    if fault.kind == "status":
        assert isinstance(cause, al.HTTPStatusError)
        assert cause.status == fault.status
        expected_delay = None if fault.retry_after is None else float(fault.retry_after)
        assert cause.retry_after == expected_delay
    elif fault is RESET:
        # The connection's own error: a ConnectionError saying ECONNRESET.
        assert isinstance(cause, ConnectionError)
        assert cause.errno == errno.ECONNRESET
    elif fault is STALL:
        assert isinstance(cause, TimeoutError)
    else:
        assert fault in (TRUNCATED, CHUNKED_CUT)
        assert isinstance(cause, al.TruncatedBodyError)
        assert "body" in str(cause)
    assert is_transient(cause)
    assert server.requests[2] == len(one_failed_attempt(fault))
    stats = loader.statistics()
    assert (stats["errors"], stats["retries"]) == (1, 0)
    assert [(e["index"], e["action"]) for e in stats["error_log"]] == [(2, "raised")]


async def test_a_reset_request_is_resent_once_even_without_retry(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """What the plan model assumes, checked: a GET reset before its response headers is
    sent again by HTTPSource's client inside the same call, invisibly to the loader (no retry counted)
    and to retry=None. One reset is therefore never seen; two in a row are."""
    server.plan = FaultPlan.runs({0: [RESET]})
    loader = al.Loader(al.sources.HTTPSource(server.urls(2)), batch_size=None)
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    assert got == [body(0), body(1)]
    assert server.requests == {0: 2, 1: 1}
    assert loader.statistics()["retries"] == 0


async def test_404_is_never_retried_and_never_trips_the_breaker(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    n, bad = 16, {1, 2, 3, 7, 11}
    server.plan = FaultPlan(always={i: NOT_FOUND for i in bad})
    breaker = al.CircuitBreaker(failure_threshold=1, recovery_timeout=60.0, clock=FakeClock())
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=4,
        concurrency=4,
        retry=al.Retry(attempts=5, sleep=FakeSleep()),
        breaker=breaker,
        on_error="skip",
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    assert got == [body(i) for i in range(n) if i not in bad]
    assert server.requests == dict.fromkeys(range(n), 1)
    assert breaker.state == "closed"
    assert breaker.statistics()["opened"] == 0
    stats = loader.statistics()
    assert (stats["retries"], stats["errors"], stats["skipped"]) == (0, len(bad), len(bad))
    log = sorted(stats["error_log"], key=lambda e: e["index"])
    assert [e["index"] for e in log] == sorted(bad)
    for entry in log:
        assert entry["key"] == server.url(entry["index"])
        assert entry["action"] == "skipped"
        assert entry["error"].startswith("HTTPStatusError(") and "404" in entry["error"]


# -- Retry-After --------------------------------------------------------------------------


async def test_retry_after_is_honoured_capped_and_otherwise_backoff(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """With concurrency 1 the retries happen in plan order, so the recorded delays are an
    exact list: the server's Retry-After where it sent one (capped at max_delay; an HTTP
    date in the past is 0), else full jitter (rng fixed at 0.5: half the ceiling
    ``min(max_delay, initial_delay * 2**n)``, ``n`` counting this sample's retries)."""
    ra_big = Fault("503+retry-after 120", "status", 503, "120")
    ra_date = Fault("503+retry-after date", "status", 503, "Wed, 21 Oct 2015 07:28:00 GMT")
    server.plan = FaultPlan.runs(
        {
            0: [S503_RA],  # Retry-After: 0.01
            1: [S429_RA],  # Retry-After: 0
            2: [ra_big],  # capped at max_delay
            3: [ra_date],  # in the past: 0
            4: [S500, S500, S503],  # backoff n = 0, 1, 2
            5: [RESET, RESET, TRUNCATED],  # two failed attempts: backoff n = 0, 1
            6: [S503_RA, S500],  # Retry-After, then backoff n = 1
        }
    )
    sleep = FakeSleep()
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(8)),
        batch_size=None,
        concurrency=1,
        retry=al.Retry(
            attempts=4,
            initial_delay=0.01,
            max_delay=0.05,
            multiplier=2.0,
            sleep=sleep,
            rng=FixedRandom(0.5),
        ),
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    assert got == [body(i) for i in range(8)]
    expected = [0.01, 0.0, 0.05, 0.0, 0.005, 0.01, 0.02, 0.005, 0.01, 0.01, 0.01]
    assert sleep.delays == pytest.approx(expected)
    assert loader.statistics()["retries"] == len(expected)


# -- the circuit breaker against a server that is down ------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4], ids=["c1", "c4"])
@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
@pytest.mark.parametrize("down", [S503, RESET], ids=repr)
async def test_breaker_bounds_the_requests_to_a_down_server(
    server: FaultServer,
    live_tasks: Callable[[], set[object]],
    down: Fault,
    ordered: bool,
    concurrency: int,
) -> None:
    """At most ``k + c - 1`` fetches reach a down server, exactly ``k`` at concurrency 1;
    they are the first samples of the plan; the rest fail fast with CircuitOpenError, are
    skipped, and are listed with index, key and cause.

    The bound: a fetch reaches the server only if the breaker admitted it while closed; it
    opens when the ``k``-th failure settles, and at that moment at most ``c - 1`` other
    fetches are in flight (one per worker). Units are taken in plan order, so the admitted
    fetches are a prefix of the plan. (Today's loader reaches the bound exactly: a worker
    whose fetch failed admits its next sample without suspending, so ``c`` stay in flight;
    the test does not rely on that.) A reset costs two requests per fetch: the client resends
    it once.
    """
    n, k, c = 40, 3, concurrency
    server.down = down
    breaker = al.CircuitBreaker(failure_threshold=k, recovery_timeout=60.0, clock=FakeClock())
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=4,
        concurrency=c,
        ordered=ordered,
        breaker=breaker,
        on_error="skip",
        max_errors=n,
        throttle=False,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert (got, error) == ([], None)
    per_fetch = 2 if down is RESET else 1
    admitted, rest = divmod(server.total, per_fetch)
    assert rest == 0
    assert k <= admitted <= k + c - 1
    if c == 1:
        assert admitted == k
    assert server.requests == dict.fromkeys(range(admitted), per_fetch)
    assert breaker.state == "open"
    assert breaker.statistics()["rejected"] == n - admitted
    stats = loader.statistics()
    assert (stats["errors"], stats["skipped"], stats["samples"]) == (n, n, 0)
    assert (stats["breaker_state"], stats["breaker_opened"]) == ("open", 1)
    log = sorted(stats["error_log"], key=lambda e: e["index"])
    assert [e["index"] for e in log] == list(range(n))
    for entry in log:
        assert entry["key"] == server.url(entry["index"])
        assert entry["action"] == "skipped"
        refused = entry["index"] >= admitted
        assert entry["error"].startswith("CircuitOpenError(") == refused


async def test_breaker_bound_holds_with_retry_and_throttle(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """With the default throttle (503s lower the concurrency) and retries (whose sleeps do
    suspend), the count is no longer exact, but the bound is: only fetches admitted while
    closed reach the server, at most ``c`` at a time, and it opens at the ``k``-th
    failure, so at most ``k + c - 1``. An open breaker's refusals are not retried."""
    n, k, c = 40, 5, 8
    server.down = S503
    breaker = al.CircuitBreaker(failure_threshold=k, recovery_timeout=60.0, clock=FakeClock())
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=4,
        concurrency=c,
        retry=al.Retry(attempts=3, sleep=FakeSleep()),
        breaker=breaker,
        on_error="skip",
        max_errors=n,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert (got, error) == ([], None)
    assert k <= server.total <= k + c - 1
    stats = loader.statistics()
    assert (stats["errors"], stats["skipped"]) == (n, n)
    assert stats["retries"] <= server.total
    refused = [e for e in stats["error_log"] if e["error"].startswith("CircuitOpenError(")]
    assert len(refused) >= n - server.total
    assert all(
        e["error"].startswith("HTTPStatusError(") for e in stats["error_log"] if e not in refused
    )


async def test_breaker_recovers_through_a_half_open_probe(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """Down: the breaker opens. Still open before ``recovery_timeout``: an epoch sends not a
    single request. The server comes back and the (fake) clock passes the recovery
    timeout: the first fetch is the probe, it succeeds and closes the breaker, and that
    epoch and the next are intact."""
    n, k = 24, 3
    clock = FakeClock()
    breaker = al.CircuitBreaker(failure_threshold=k, recovery_timeout=30.0, clock=clock)
    source = al.sources.HTTPSource(server.urls(n))

    def loader(concurrency: int) -> al.Loader:
        return al.Loader(
            source,
            batch_size=4,
            concurrency=concurrency,
            breaker=breaker,
            on_error="skip",
            max_errors=n,
            throttle=False,
        )

    server.down = S500
    got, error = await run_epoch(loader(1), server, live_tasks)
    assert (got, error) == ([], None)
    assert server.total == k
    assert breaker.state == "open"

    server.down = None
    server.reset_counts()
    clock.advance(29.9)
    refused = loader(4)
    got, error = await run_epoch(refused, server, live_tasks)
    assert (got, error) == ([], None)
    assert server.total == 0
    assert refused.statistics()["skipped"] == n

    clock.advance(0.1)
    assert breaker.state == "half_open"
    probing = loader(1)
    got, error = await run_epoch(probing, server, live_tasks)
    assert error is None
    assert got == [body(i) for i in range(n)]
    assert breaker.state == "closed"
    assert probing.statistics()["skipped"] == 0

    server.reset_counts()
    got, error = await run_epoch(loader(4), server, live_tasks)
    assert error is None
    assert got == [body(i) for i in range(n)]
    assert server.requests == dict.fromkeys(range(n), 1)
    assert breaker.statistics()["opened"] == 1


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_a_recovery_epoch_at_full_concurrency_loses_no_sample(
    server: FaultServer, live_tasks: Callable[[], set[object]], ordered: bool
) -> None:
    """The breaker opened last epoch; the server is back and the recovery timeout has
    passed. The next epoch of the same loader (concurrency 4, on_error="skip") should
    deliver every sample: the store is healthy, only the breaker's probe is pending."""
    n, k = 40, 3
    clock = FakeClock()
    breaker = al.CircuitBreaker(failure_threshold=k, recovery_timeout=30.0, clock=clock)
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=4,
        concurrency=4,
        ordered=ordered,
        breaker=breaker,
        on_error="skip",
        max_errors=n,
        throttle=False,
    )
    server.down = S500
    await run_epoch(loader, server, live_tasks)
    assert breaker.state == "open"
    server.down = None
    clock.advance(30.0)
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    assert loader.statistics()["skipped"] == 0
    assert sorted(got) == sorted(body(i) for i in range(n))


async def test_refused_fetches_let_other_tasks_run(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """Down server, breaker open after the first failure: the remaining samples are refused
    at once, but a task that only checkpoints must still get turns in between (it sees
    the breaker's ``rejected`` count grow by at most a few per turn), as it would if each
    refused fetch passed through a checkpoint. No timing: counts of turns only."""
    n, c = 400, 4
    server.down = S503
    breaker = al.CircuitBreaker(failure_threshold=1, recovery_timeout=60.0, clock=FakeClock())
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=8,
        concurrency=c,
        breaker=breaker,
        on_error="skip",
        throttle=False,
    )
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(breaker.statistics()["rejected"])
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        got, error = await run_epoch(loader, server, live_tasks)
        tg.cancel_scope.cancel()
    assert (got, error) == ([], None)
    assert seen[-1] == n - c
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 2 * c


# -- the error budget -------------------------------------------------------------------------


@pytest.mark.parametrize("over", [False, True], ids=["at-budget", "over-budget"])
async def test_error_budget_count_is_exact(
    server: FaultServer, live_tasks: Callable[[], set[object]], over: bool
) -> None:
    """``max_errors=N``: N permanently failing samples (404, never retried) are skipped and
    the epoch completes; one more raises ErrorBudgetExceeded at that sample's place.

    Deterministic at concurrency 2: the failing samples are further apart than the ordered
    window (``max(4c, c + batch_size)`` = 8 samples), so a later one cannot be taken before
    an earlier one has completed, and the (N+1)-th failure is always sample 39."""
    n, budget = 48, 4
    bad = [3, 12, 21, 30] + ([39] if over else [])
    server.plan = FaultPlan(always=dict.fromkeys(bad, NOT_FOUND))
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=1,
        concurrency=2,
        retry=al.Retry(attempts=3, sleep=FakeSleep()),
        on_error="skip",
        max_errors=budget,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert all(server.requests[i] == 1 for i in bad)
    stats = loader.statistics()
    if not over:
        assert error is None
        assert got == [body(i) for i in range(n) if i not in bad]
        assert (stats["errors"], stats["skipped"], stats["retries"]) == (budget, budget, 0)
        return
    assert isinstance(error, al.ErrorBudgetExceeded)
    assert isinstance(error, al.AsyncloadError)
    assert str(error).startswith(
        f"{budget + 1} samples failed this epoch, more than max_errors={budget}"
    )
    assert error.errors == budget + 1
    assert all(isinstance(c, al.HTTPStatusError) and c.status == 404 for c in error.causes)
    assert got == [body(i) for i in range(39) if i not in bad]
    assert stats["skipped"] == budget


@pytest.mark.parametrize(
    ("late_failure", "raises"), [(100, True), (110, False)], ids=["over", "within"]
)
async def test_error_budget_fraction_is_checked_against_samples_attempted(
    server: FaultServer,
    live_tasks: Callable[[], set[object]],
    late_failure: int,
    raises: bool,
) -> None:
    """``max_errors=0.1`` at concurrency 1: samples 0-9 fail, 10 of the first 100 (not past
    10 %); one more failure at sample 100 makes 11 of 101 attempted (> 10 %): raise; at
    sample 110 it is 11 of 111 (<= 10 %): skip, and the epoch completes."""
    n = 200
    bad = [*range(10), late_failure]
    server.plan = FaultPlan(always=dict.fromkeys(bad, NOT_FOUND))
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=10,
        concurrency=1,
        on_error="skip",
        max_errors=0.1,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    if raises:
        assert isinstance(error, al.ErrorBudgetExceeded)
        assert str(error).startswith(
            f"11 of {late_failure + 1} samples failed, more than max_errors=0.1"
        )
        assert got == [body(i) for i in range(10, 100)]  # whole batches of 10 before it
    else:
        assert error is None
        assert got == [body(i) for i in range(n) if i not in bad]
        assert loader.statistics()["skipped"] == 11


async def test_error_budget_fraction_counts_failures_from_before_100_attempted(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """30 of 200 samples fail (15 %, and 30 % of the first 100) with ``max_errors=0.1``:
    once 100 samples have been attempted the loader is past its budget and must raise."""
    n = 200
    server.plan = FaultPlan(always=dict.fromkeys(range(30), NOT_FOUND))
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=10,
        concurrency=1,
        on_error="skip",
        max_errors=0.1,
    )
    _, error = await run_epoch(loader, server, live_tasks)
    assert isinstance(error, al.ErrorBudgetExceeded)


# -- on_error=callable --------------------------------------------------------------------------


async def test_on_error_callable_substitutes_and_lists_them(
    server: FaultServer, live_tasks: Callable[[], set[object]]
) -> None:
    """A 404 (permanent) and a 503 that outlasts the retries are replaced by the handler's
    value at their place; the handler sees the source's own error; they are counted as
    errors and substitutes, listed, and never skipped."""
    n = 12
    server.plan = FaultPlan(
        faults={(5, a): S503 for a in (1, 2, 3)}, always={2: NOT_FOUND, 9: NOT_FOUND}
    )
    seen: dict[int, BaseException] = {}

    async def substitute(index: int, exc: BaseException) -> bytes:
        seen[index] = exc
        await anyio.lowlevel.checkpoint()
        return b"substitute %d" % index

    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=3,
        concurrency=4,
        retry=al.Retry(attempts=3, sleep=FakeSleep()),
        on_error=substitute,
        throttle=False,
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    assert got == [b"substitute %d" % i if i in (2, 5, 9) else body(i) for i in range(n)]
    assert {i: (type(e), getattr(e, "status", None)) for i, e in seen.items()} == {
        2: (al.HTTPStatusError, 404),
        5: (al.HTTPStatusError, 503),
        9: (al.HTTPStatusError, 404),
    }
    assert server.requests[5] == 3 and server.requests[2] == server.requests[9] == 1
    stats = loader.statistics()
    assert (stats["errors"], stats["substituted"], stats["skipped"], stats["retries"]) == (
        3,
        3,
        0,
        2,
    )
    log = sorted(stats["error_log"], key=lambda e: e["index"])
    assert [(e["index"], e["action"]) for e in log] == [
        (2, "substituted"),
        (5, "substituted"),
        (9, "substituted"),
    ]
    assert all(e["key"] == server.url(e["index"]) for e in log)


# -- every fault kind at once, with nothing retried: errors, not corruption -------------------


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_without_retry_every_sample_is_delivered_intact_or_accounted_for(
    server: FaultServer, live_tasks: Callable[[], set[object]], ordered: bool
) -> None:
    """retry=None, on_error="skip", a fault plan across all kinds but stalls (their
    timeouts cost real time; the per-kind tests have them): each sample is either
    delivered with its exact bytes or skipped and listed with a transient cause; never a
    short or foreign body, never twice."""
    n = 90
    plan = FaultPlan.seeded(n, seed=7, rate=0.2)  # stalls: see the per-kind tests
    server.plan = plan
    expect = expectations(plan, n, attempts=1)
    loader = al.Loader(
        Indexed(al.sources.HTTPSource(server.urls(n))),
        batch_size=8,
        collate_fn=list,
        concurrency=8,
        ordered=ordered,
        timeout=STALL_TIMEOUT,
        on_error="skip",
    )
    got, error = await run_epoch(loader, server, live_tasks)
    assert error is None
    failed = {i for i, e in expect.items() if not e.ok}
    assert {f for e in expect.values() for f in e.failures} == set(ALL_TRANSIENT) - {STALL}
    delivered = [index for index, _ in got]
    assert sorted(delivered) == sorted(set(range(n)) - failed)
    if ordered:
        assert delivered == sorted(delivered)
    assert [i for i, data in got if data != body(i)] == []
    stats = loader.statistics()
    assert (stats["skipped"], stats["errors"], stats["retries"]) == (len(failed), len(failed), 0)
    assert sorted(e["index"] for e in stats["error_log"]) == sorted(failed)
    assert server.requests == {i: e.requests for i, e in expect.items()}


# -- the synchronous bridge: how most training loops iterate -----------------------------------


def test_sync_iteration_survives_the_same_faults(server: FaultServer) -> None:
    """``for batch in loader`` (a background event loop thread, uvloop where installed) over
    a plan with every fault kind: every sample intact, in order, exactly the predicted
    requests and retries; no thread and no client connection left after ``close()``."""
    import threading

    n = 300
    plan = FaultPlan.seeded(n, seed=99, rate=0.2, stalls=(150,))
    server.plan = plan
    expect = expectations(plan, n, ATTEMPTS)
    assert all(e.ok for e in expect.values())
    threads = set(threading.enumerate())
    loader = al.Loader(
        al.sources.HTTPSource(server.urls(n)),
        batch_size=16,
        concurrency=8,
        retry=al.Retry(attempts=ATTEMPTS, initial_delay=0.001, max_delay=0.002),
        timeout=STALL_TIMEOUT,
    )
    with loader:
        got = [sample for batch in loader for sample in batch]
    assert got == [body(i) for i in range(n)]
    assert server.requests == {i: e.requests for i, e in expect.items()}
    stats = loader.statistics()
    assert stats["retries"] == sum(e.retries for e in expect.values())
    assert (stats["errors"], stats["skipped"]) == (0, 0)
    # No new thread is left; idle worker threads of earlier tests may end meanwhile.
    assert set(threading.enumerate()) - threads == set()
    assert client_connections(server) == []
