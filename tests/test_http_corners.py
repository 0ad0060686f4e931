"""HTTP client and resilience corners: max_connections with connections opening at once,
aclose() while a request connects, typed Retry/CircuitBreaker filters that pickle, malformed
redirect Locations that name the URL, the system's connect timeout kept as it is.

The HTTP tests use tiny ``asyncio.start_server`` servers in the test's own event loop
(asyncio and uvloop only: HTTPSource runs on asyncio). Orderings are made with events,
never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
from conftest import ASYNCIO_BACKENDS

import asyncload as al
from asyncload.sources import HTTPSource, _http1

ANYIO_BACKENDS = ASYNCIO_BACKENDS
SAFETY = 10  # seconds: a guard against a hang, never a timing claim

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class Server:
    """``asyncio.start_server`` on 127.0.0.1: answers every request with ``ANSWER``; a
    request for a path starting with ``/gate`` is held until ``release`` is set. Records
    the request targets it read."""

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.release = release or asyncio.Event()
        self.targets: list[bytes] = []
        self.arrived = 0
        self.on_arrival: Callable[[int], None] = lambda n: None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                target = head.split(b" ", 2)[1]
                self.targets.append(target)
                data = await self.answer(target)
                if data is None:
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def answer(self, target: bytes) -> bytes | None:
        """The bytes to write back for a request of ``target`` (None: close the
        connection); subclasses answer otherwise."""
        if target.startswith(b"/gate"):
            self.arrived += 1
            self.on_arrival(self.arrived)
            await self.release.wait()
        return ANSWER

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self.release.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:  # (an answer that never comes)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def serving(count: int = 1) -> AsyncIterator[list[Server]]:
    servers = [Server() for _ in range(count)]
    for server in servers:
        await server.start()
    try:
        yield servers
    finally:
        for server in servers:
            await server.stop()


async def outcome(fetch: Awaitable[bytes]) -> bytes | BaseException:
    try:
        return await fetch
    except Exception as exc:
        return exc


# -- _http1.Pool: max_connections --------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_new_connections_do_not_exceed_max_connections() -> None:
    """``max_connections`` caps open connections per event loop, idle ones of other origins
    included. ``Pool._connect`` evicts an idle connection only when ``len(_open)`` has
    reached the limit, and a connection being opened is not in ``_open`` yet: two requests
    that connect at once both see room, and the pool ends up with 3 open at a limit of 2."""
    async with serving(2) as (idle_site, busy_site):
        both_arrived = anyio.Event()
        busy_site.on_arrival = lambda n: both_arrived.set() if n == 2 else None
        source = HTTPSource(
            [idle_site.url("/x"), busy_site.url("/gate/1"), busy_site.url("/gate/2")],
            max_connections=2,
        )
        try:
            with anyio.fail_after(SAFETY):
                assert await source[0] == b"hi"  # one idle connection to the first origin
                pool = source._pools.get()
                got: list[bytes] = []

                async def fetch(index: int) -> None:
                    got.append(await source[index])

                async with anyio.create_task_group() as tg:
                    tg.start_soon(fetch, 1)
                    tg.start_soon(fetch, 2)
                    await both_arrived.wait()  # two connections to the second origin
                    open_now = len(pool._open)
                    busy_site.release.set()
                assert got == [b"hi", b"hi"]
        finally:
            await source.aclose()
    assert open_now <= 2, f"{open_now} connections open with max_connections=2"


# -- _http1.Pool.aclose: a request still connecting --------------------------------------------


@pytest.mark.anyio
async def test_aclose_stops_a_request_that_is_still_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Pool.aclose``: "requests waiting for a connection or yet to come raise
    RuntimeError". A request that holds a slot and is resolving its host (or in the TCP
    connect) when the pool is closed carries on: it opens a new connection on the closed
    pool after ``aclose()`` returned, sends its GET and returns the sample."""
    looking_up = anyio.Event()
    resolve = anyio.Event()

    async def gated_look_up(self: _http1.Pool, host: str, port: int) -> list[str]:
        looking_up.set()
        await resolve.wait()
        return ["127.0.0.1"]

    monkeypatch.setattr(_http1.Pool, "_look_up", gated_look_up)
    monkeypatch.setattr(_http1, "_resolved", {})
    async with serving() as (site,):
        source = HTTPSource([site.url("/x", host="localhost")])
        results: list[bytes | BaseException] = []

        async def fetch() -> None:
            results.append(await outcome(source[0]))

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch)
                await looking_up.wait()
                await source.aclose()
                resolve.set()
        await source.aclose()
        sent = list(site.targets)
    assert sent == [], f"a GET was sent after aclose(): {sent}"
    assert isinstance(results[0], (RuntimeError, ConnectionError)), results


# -- resilience: exception-type filters must pickle ---------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: al.Retry(retry_on=ConnectionError),
        lambda: al.Retry(retry_on=(ConnectionError, TimeoutError)),
        lambda: al.CircuitBreaker(counts=ConnectionError),
        lambda: al.CircuitBreaker(counts=(ConnectionError, TimeoutError)),
    ],
    ids=["retry-type", "retry-tuple", "breaker-type", "breaker-tuple"],
)
def test_retry_and_breaker_with_exception_type_filters_pickle(make: Callable[[], Any]) -> None:
    """``retry_on``/``counts`` accept "an exception type, a tuple of them, or a predicate";
    ``as_predicate`` turns a type or tuple into a local lambda, which does not pickle. So a
    Loader with ``retry=al.Retry(retry_on=ConnectionError)`` cannot go to spawned DataLoader
    workers (docs/dataloader.md: spawn pickles the loader), though the user passed no
    lambda ("Can't pickle local object 'as_predicate.<locals>.<lambda>'")."""
    policy = make()
    copy = pickle.loads(pickle.dumps(policy))
    if isinstance(copy, al.Retry):
        assert copy.next_delay(1, ConnectionError("reset"), 0.0) is not None
        assert copy.next_delay(1, KeyError("k"), 0.0) is None
    else:
        assert copy._counts(ConnectionError("reset")) and not copy._counts(KeyError("k"))


def test_a_loader_with_a_typed_retry_pickles() -> None:
    """The same bug as seen by a user: the loader itself does not pickle."""
    loader = al.Loader(al.from_sequence([1, 2]), retry=al.Retry(retry_on=ConnectionError))
    copy = pickle.loads(pickle.dumps(loader))
    assert copy.retry.next_delay(1, ConnectionError(), 0.0) is not None


# -- http.py: a malformed redirect Location ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("redirects", ["same-origin", "any"])
@pytest.mark.parametrize(
    "location", ["http://127.0.0.1:99999/y", "http://[::1/y", "http://h:abc/y"]
)
async def test_a_malformed_redirect_location_names_the_url(redirects: str, location: str) -> None:
    """ "Every error names its URL": a 302 whose Location has a bad port or a broken IPv6
    host raised urllib's bare ``ValueError`` ("Port out of range 0-65535", "Invalid IPv6
    URL") from ``urljoin``/``_same_origin`` in ``HTTPSource._open``, which names neither
    the URL nor the redirect."""
    answer = b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % location.encode()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = HTTPSource([f"http://127.0.0.1:{port}/x?token=SECRET"], redirects=redirects)
    try:
        with anyio.fail_after(SAFETY):
            error = await outcome(source[0])
    finally:
        await source.aclose()
        server.close()
    assert isinstance(error, (ValueError, al.HTTPStatusError)), error  # permanent either way
    assert f"http://127.0.0.1:{port}/x?..." in str(error), str(error)
    assert "SECRET" not in str(error)


# -- _http1.Pool._connect: the OS's own connect timeout ------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_an_os_connect_timeout_is_not_reported_as_ours(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On Python >= 3.11 ``asyncio.TimeoutError`` is the builtin ``TimeoutError``, the
    class of the OS's own ETIMEDOUT from connect(). ``except asyncio.TimeoutError`` (meant
    for ``wait_for``) catches it first and replaces it with "no connection within None s":
    a timeout the user never set, and the errno and the OS's message are lost."""
    import errno
    import os

    loop = asyncio.get_running_loop()

    async def timed_out(*args: Any, **kwargs: Any) -> Any:
        raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))

    monkeypatch.setattr(loop, "create_connection", timed_out)
    source = HTTPSource(["http://127.0.0.1:9/x"])  # no timeout given
    try:
        error = await outcome(source[0])
    finally:
        await source.aclose()
    assert isinstance(error, TimeoutError), error
    assert "None s" not in str(error), str(error)
    assert error.errno == errno.ETIMEDOUT, (error.errno, str(error))


@pytest.mark.anyio
async def test_a_lookup_that_never_answers_is_bounded_by_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``timeout`` bounds the connection, the name lookup too (a streamed shard has no other
    bound before its first byte; the lookup was awaited without one)."""

    async def hung_look_up(self: _http1.Pool, host: str, port: int) -> list[str]:
        await anyio.sleep_forever()
        raise AssertionError

    monkeypatch.setattr(_http1.Pool, "_look_up", hung_look_up)
    monkeypatch.setattr(_http1, "_resolved", {})
    source = HTTPSource(["http://no-answer.invalid:8080/x"], timeout=0.05)
    try:
        with anyio.fail_after(SAFETY), pytest.raises(TimeoutError) as info:
            async for _ in source.iter_chunks(source.urls[0]):
                pass
    finally:
        await source.aclose()
    assert "no address for no-answer.invalid within 0.05 s" in str(info.value)
    assert "http://no-answer.invalid:8080/x" in str(info.value)  # the URL, as every error


@pytest.mark.anyio
async def test_aclose_cancels_a_lookup_whose_requests_were_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name lookup is shared by the requests waiting on it and outlives them (shielded);
    once the pool closes, nobody can use its answer: it is cancelled, not left running."""
    looking_up = anyio.Event()
    lookup_cancelled = anyio.Event()

    async def hung_look_up(self: _http1.Pool, host: str, port: int) -> list[str]:
        looking_up.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            lookup_cancelled.set()
            raise
        raise AssertionError

    monkeypatch.setattr(_http1.Pool, "_look_up", hung_look_up)
    monkeypatch.setattr(_http1, "_resolved", {})
    source = HTTPSource(["http://no-answer.invalid:8080/x"])
    with anyio.fail_after(SAFETY):
        async with anyio.create_task_group() as tg:
            tg.start_soon(outcome, source[0])
            await looking_up.wait()
            tg.cancel_scope.cancel()  # the request goes; the shared lookup stays
        assert not lookup_cancelled.is_set()
        await source.aclose()
        await lookup_cancelled.wait()
