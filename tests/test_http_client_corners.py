"""Corners of the HTTP source and its HTTP/1.1 client (found by helper-50): a redirect hop
waiting for a slot is off the clock, aclose() wakes requests queued behind an open
stream, chunk_size and timeout checked when given, a bare-LF head before a CRLF blank
line in its body, no empty idle lists per origin, bad hosts and port 0 named.

Servers are tiny ``asyncio.start_server`` servers in the test's own event loop that write
exact bytes. Orderings are made with events (or by looking at the pool's own state),
never with sleeps; ``SAFETY`` only guards against a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest
import test_http_corners

from asyncload.sources import HTTPSource

pytestmark = pytest.mark.anyio
ANYIO_BACKENDS = [pytest.param("asyncio", id="asyncio")]
SAFETY = 10  # seconds: a guard against a hang, never a timing claim


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


Answer = Callable[[bytes], Awaitable[bytes | None]]


class Server(test_http_corners.Server):
    """test_http_corners' server, each request head read handed to ``answer(target)``,
    whose bytes are written back (None: close the connection)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self._answer = answer

    async def answer(self, target: bytes) -> bytes | None:
        return await self._answer(target)


@contextlib.asynccontextmanager
async def serving(answer: Answer) -> AsyncIterator[Server]:
    server = Server(answer)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def always(data: bytes) -> Answer:
    async def answer(target: bytes) -> bytes:
        return data

    return answer


async def outcome(fetch: Awaitable[Any]) -> Any:
    try:
        return await fetch
    except Exception as exc:
        return exc


async def first_sample_error(url: str) -> Any:
    """What ``await HTTPSource([url])[0]`` raises (or returns)."""
    source = HTTPSource([url])
    try:
        with anyio.fail_after(SAFETY):
            return await outcome(source[0])
    finally:
        await source.aclose()


# -- iter_chunks: chunk_size below 1 ------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [0, -3])
async def test_iter_chunks_refuses_a_chunk_size_below_one(chunk_size: int) -> None:
    """``iter_chunks(url, chunk_size)`` takes any int: 0 yields ``b""`` for ever (a hang in a
    ``async for``), a negative size yields the body less its last bytes, then ``b""`` for
    ever. It should raise ``ValueError`` naming ``chunk_size`` (as TarShardSource does)."""
    async with serving(always(ok(b"0123456789"))) as server:
        source = HTTPSource([server.url("/x")])
        got: list[bytes] = []
        try:
            with anyio.fail_after(SAFETY), pytest.raises(ValueError, match="chunk_size"):
                async for chunk in source.iter_chunks(server.url("/x"), chunk_size):
                    got.append(chunk)
                    if len(got) > 20:  # the bug: chunks without end; stop looking
                        break
        finally:
            await source.aclose()


# -- _http1._exchange: a bare-LF head whose body holds CRLF CRLF --------------------------------


async def test_a_bare_lf_head_is_read_when_its_body_holds_a_crlf_blank_line() -> None:
    """Heads with bare-LF line ends are accepted (RFC 9112 2.2), but the head's end is
    looked for as CRLF CRLF first, anywhere in the buffer: when the body, arrived with the
    head, holds ``\\r\\n\\r\\n`` (any binary sample may), the head is cut there instead, and
    a valid answer is refused as a "malformed header line ''". The earliest blank line of
    either kind ends the head."""
    body = b"ab\r\n\r\ncd"
    answer = b"HTTP/1.1 200 OK\nContent-Length: %d\n\n%s" % (len(body), body)
    async with serving(always(answer)) as server:
        source = HTTPSource([server.url("/x")])
        try:
            with anyio.fail_after(SAFETY):
                got = await outcome(source[0])
        finally:
            await source.aclose()
    assert got == body


# -- HTTPSource.timeout: a redirect's next hop queued for a connection --------------------------


async def test_a_redirect_hop_waiting_for_a_connection_is_not_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``timeout`` "bounds each whole request, redirects included, from when it has a
    connection (waiting for one of max_connections does not count)". But ``_open`` gives
    the connection slot back after a 3xx and queues for a new one for the next hop, behind
    every request waiting, while the clock started at the first hop keeps running: with
    ``max_connections`` below the loader's concurrency, followed redirects time out
    though no request was slow. The event loop's clock is moved forward while the next hop
    waits (as a long queue would), instead of sleeping."""
    a_sent = anyio.Event()
    b_queued = anyio.Event()
    b_arrived = anyio.Event()
    release_b = anyio.Event()

    async def answer(target: bytes) -> bytes:
        if target == b"/redirect":
            a_sent.set()
            await b_queued.wait()
            return b"HTTP/1.1 302 Found\r\nLocation: /final\r\nContent-Length: 0\r\n\r\n"
        if target == b"/final":
            return ok(b"final")
        b_arrived.set()
        await release_b.wait()
        return ok(b"other")

    loop = asyncio.get_running_loop()
    real_time = loop.time
    offset = [0.0]
    monkeypatch.setattr(loop, "time", lambda: real_time() + offset[0])
    async with serving(answer) as server:
        source = HTTPSource([server.url("/redirect")], max_connections=1, timeout=2.0)
        pool = source._pools.get()
        results: dict[str, Any] = {}
        a_done = anyio.Event()

        async def fetch_a() -> None:
            results["a"] = await outcome(source[0])
            a_done.set()

        async def fetch_b() -> None:  # another request of the pool, without a timeout
            response = await pool.get(server.url("/gate"))
            try:
                results["b"] = await response.read(1 << 20)
            finally:
                response.release()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch_a)
                await a_sent.wait()  # A holds the only connection
                tg.start_soon(fetch_b)
                for _ in range(1000):  # B queues for the connection
                    if pool._slots._waiters:
                        break
                    await asyncio.sleep(0)
                b_queued.set()  # A gets its 302
                async with anyio.create_task_group() as first:

                    async def wait_then_stop(event: anyio.Event) -> None:
                        await event.wait()
                        first.cancel_scope.cancel()

                    first.start_soon(wait_then_stop, b_arrived)
                    first.start_soon(wait_then_stop, a_done)
                offset[0] = 10.0  # the next hop waits long in the queue (2 s timeout)
                for _ in range(50):
                    await asyncio.sleep(0)
                release_b.set()
        finally:
            offset[0] = 0.0
            await source.aclose()
    assert results["b"] == b"other"
    assert results["a"] == b"final", repr(results["a"])


# -- Pool.aclose: requests queued for a connection that an open stream holds ---------------------


async def test_aclose_fails_a_request_queued_behind_an_open_stream() -> None:
    """``Pool.aclose``: "requests waiting for a connection or yet to come raise
    RuntimeError". A request queued for the only connection, which an ``iter_chunks``
    stream holds (a tar shard being read, its consumer not pulling right now), is not
    woken by ``aclose()``: it waits until that stream is closed, for ever if it never is."""

    async def answer(target: bytes) -> bytes | None:
        if target == b"/stream":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"  # then stalls
        return ok(b"hi")

    async with serving(answer) as server:
        source = HTTPSource([server.url("/x")], max_connections=1)
        pool = source._pools.get()
        stream = source.iter_chunks(server.url("/stream"))
        result: list[Any] = []
        try:
            assert await stream.__anext__() == b"0123456789"

            done = anyio.Event()

            async def fetch() -> None:
                result.append(await outcome(source[0]))
                done.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch)
                for _ in range(1000):  # queued for the connection
                    if pool._slots._waiters:
                        break
                    await asyncio.sleep(0)
                await source.aclose()
                with anyio.move_on_after(3):  # a guard: a fixed pool fails it at once
                    await done.wait()
                tg.cancel_scope.cancel()
        finally:
            await stream.aclose()
            await source.aclose()
    assert result, "the queued request still waits after aclose()"
    assert isinstance(result[0], RuntimeError), result


# -- HTTPSource(timeout=...): checked at construction ------------------------------------------


@pytest.mark.parametrize("timeout", ["5", float("nan")], ids=["str", "nan"])
def test_a_bad_timeout_is_refused_at_construction_naming_it(timeout: Any) -> None:
    """Bad arguments "raise ValueError or TypeError at construction, with a message that
    names the argument" (api.md). ``timeout="5"`` raised ``TypeError: '<=' not supported
    between instances of 'str' and 'int'``; ``timeout=nan`` was accepted, and then every
    request failed (``ValueError: deadline must not be NaN``; from ``iter_chunks``: "no
    connection within nan s")."""
    with pytest.raises((ValueError, TypeError), match="timeout"):
        HTTPSource(["http://127.0.0.1/x"], timeout=timeout)


# -- _http1._Target: errors of a malformed URL name it ------------------------------------------


async def test_a_host_that_is_not_valid_idna_names_the_url() -> None:
    """ "Every error names its URL": a non-ASCII host that IDNA cannot encode raised the
    bare ``UnicodeError`` of ``host.encode("idna")`` ("label empty or too long"), which
    names neither the URL nor HTTPSource (``_Target`` turns only its own RequestError into
    a named ValueError)."""
    error = await first_sample_error("http://b\u00fccher..example/x?token=SECRET")
    assert isinstance(error, ValueError), error
    assert "b\u00fccher..example/x" in str(error), str(error)
    assert "SECRET" not in str(error)


async def test_port_zero_is_not_taken_for_the_default_port() -> None:
    """``parts.port or _DEFAULT_PORTS[scheme]``: a URL with port 0 connects to port 80
    (the error even says ``Connect call failed ('127.0.0.1', 80)``), and ``_origin`` takes
    ``http://h:0/`` for the same origin as ``http://h/``. Port 0 is no port to connect to:
    a ValueError naming the URL, as for any other bad port."""
    error = await first_sample_error("http://127.0.0.1:0/x")
    assert isinstance(error, ValueError), error
    assert "port" in str(error) and "', 80)" not in str(error), str(error)


# -- Pool._idle: one entry per origin ever used ---------------------------------------------------


async def test_origins_whose_idle_connections_closed_leave_nothing_in_the_pool() -> None:
    """The pool bounds what it keeps per origin (``_targets``, ``_heads`` and the DNS cache
    start over past 4096 origins: "URLs over very many hosts"), but ``_idle`` keeps an
    empty list for every origin whose idle connections the server closed (``_forget``,
    ``_idle_connection`` empty the list and leave it): over a web-scale URL list (millions
    of hosts) that grows without bound for the life of the pool."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(serving(always(ok(b"hi")))) for _ in range(20)]
        source = HTTPSource([s.url("/x") for s in servers])
        try:
            assert [await source[i] for i in range(len(servers))] == [b"hi"] * len(servers)
            pool = source._pools.get()
            assert sum(len(idle) for idle in pool._idle.values()) == len(servers)
            for server in servers:  # each server closes its idle keep-alive connection
                await server.stop()
            for _ in range(1000):  # their connection_lost callbacks run
                if not pool._open:
                    break
                await asyncio.sleep(0)
            assert not pool._open
            assert pool._idle == {}, f"{len(pool._idle)} origins kept with no connection"
        finally:
            await source.aclose()
