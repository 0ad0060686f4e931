"""The lean HTTP/1.1 client under HTTPSource (``asyncload.sources._http1``): content codings,
message framing (close-delimited, chunked with extensions and trailers, 1xx, 204/304),
keep-alive reuse and the stale-connection resend, malformed answers, request headers
(validation, Basic auth from the URL, Host), request-target quoting, ``iter_chunks``, and
the pure helpers.

Real servers in the test's own event loop: an aiohttp app for ordinary HTTP, and a raw
``asyncio.start_server`` server that writes exact bytes for framing edge cases. Nothing
sleeps to force an ordering; the only real wait is a 0.2 s read timeout on a server that
stalls on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import pytest
from aiohttp import web
from conftest import ASYNCIO_BACKENDS

import asyncload as al
from asyncload.resilience import is_transient
from asyncload.sources import HTTPSource, _http1
from asyncload.sources._http1 import _parse_head, _split_url, _Target

pytestmark = pytest.mark.anyio

BODY = bytes(range(256)) * 40  # 10 KiB, not a repeating short pattern
SAFETY = 10  # seconds: a guard against a hang (a deadlock fails fast), never a timing claim


ANYIO_BACKENDS = ASYNCIO_BACKENDS


# -- servers ----------------------------------------------------------------------------------


class Site:
    """An aiohttp app on 127.0.0.1 that records each request: the client's port (one port
    per connection), the raw request target, and the headers (repeats kept)."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.targets: list[str] = []
        self.headers: list[list[tuple[str, str]]] = []
        self.app = web.Application()
        self.runner = web.AppRunner(self.app)
        self.base = ""

    def route(
        self, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> None:
        async def recorded(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            self.ports.append(request.transport.get_extra_info("peername")[1])
            self.targets.append(request.raw_path)
            self.headers.append(list(request.headers.items()))
            return await handler(request)

        self.app.router.add_get(path, recorded)

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()


def header(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


@pytest.fixture
async def site(anyio_backend: Any) -> AsyncIterator[Site]:
    site = Site()

    async def body(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: chunked transfer
        await response.prepare(request)
        for start in range(0, len(BODY), 3000):
            await response.write(BODY[start : start + 3000])
        await response.write_eof()
        return response

    async def coded(request: web.Request) -> web.StreamResponse:
        coding = request.match_info["coding"]
        data = request.query.get("size")
        plain = b"\0" * int(data) if data else BODY
        if coding == "gzip":
            payload = gzip.compress(plain)
        elif coding == "deflate":
            payload = zlib.compress(plain)  # zlib-wrapped, as RFC 9110 says
        else:
            payload = b"not really " + coding.encode()
        if request.query.get("framing") == "chunked":
            response = web.StreamResponse(headers={"Content-Encoding": coding})
            await response.prepare(request)
            for start in range(0, len(payload), 100):
                await response.write(payload[start : start + 100])
            await response.write_eof()
            return response
        return web.Response(body=payload, headers={"Content-Encoding": coding})

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    site.route("/body", body)
    site.route("/chunked", chunked)
    site.route("/coded/{coding}", coded)
    site.route("/empty", empty)
    await site.start()
    try:
        yield site
    finally:
        await site.stop()


class RawConnection:
    """One accepted connection of a :class:`RawServer`: read request heads, write bytes."""

    def __init__(
        self, server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.index = server.connections  # 0 for the first connection accepted, ...
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes | None:
        """The next request's head (request line and headers), or None when the client
        closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.server.requests.append(head)
        return head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[RawConnection], Awaitable[None]]


class RawServer:
    """``asyncio.start_server`` on 127.0.0.1 that hands each connection to ``handler``, and
    counts connections and the request heads it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.stopping = asyncio.Event()  # a handler that stalls waits on this
        self.base = ""
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    def url(self, path: str) -> str:
        return self.base + path

    def targets(self) -> list[str]:
        return [head.split(b" ", 2)[1].decode("ascii") for head in self.requests]

    def headers(self, index: int) -> list[tuple[str, str]]:
        lines = self.requests[index].decode("latin-1").split("\r\n")[1:]
        pairs = [line.split(":", 1) for line in lines if line]
        return [(name, value.strip()) for name, value in pairs]

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        conn = RawConnection(self, reader, writer)
        self.connections += 1
        try:
            await self.handler(conn)
        except ConnectionError:
            pass  # the client went away: not what these tests check
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self.stopping.set()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def keep_alive(answers: Mapping[str, bytes]) -> Handler:
    """A handler that answers each request on a connection with ``answers[path]``, for as
    long as the client keeps the connection open."""

    async def handler(conn: RawConnection) -> None:
        while (head := await conn.request()) is not None:
            path = head.split(b" ", 2)[1].decode("ascii").split("?", 1)[0]
            await conn.send(answers[path])

    return handler


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def fetch_all(source: HTTPSource) -> list[bytes]:
    """Each sample of ``source`` in order, one request after another; the source closed."""
    try:
        return [await source[i] for i in range(len(source))]
    finally:
        await source.aclose()


# -- 1-3: content codings ------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_gzip_and_deflate_bodies_are_decoded(site: Site, coding: str, framing: str) -> None:
    source = HTTPSource([f"{site.base}/coded/{coding}?framing={framing}"] * 2)
    assert await fetch_all(source) == [BODY, BODY]
    assert [header(h, "Accept-Encoding") for h in site.headers] == [["identity"]] * 2
    assert len(set(site.ports)) == 1  # a decoded body read to its end keeps the connection


async def test_unsupported_content_encoding_is_a_value_error_naming_it(site: Site) -> None:
    # One connection at most: the failed answer must give its slot back.
    source = HTTPSource([f"{site.base}/coded/br", f"{site.base}/body"], max_connections=1)
    try:
        with pytest.raises(ValueError, match="'br'") as info:
            await source[0]
        assert not isinstance(info.value, al.ObjectTooLargeError)
        assert not is_transient(info.value)  # asking again gets the same coding
        with anyio.fail_after(SAFETY):
            assert await source[1] == BODY
    finally:
        await source.aclose()


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_max_bytes_applies_to_the_decoded_size(site: Site, framing: str) -> None:
    size = 200_000  # about 200 bytes gzipped
    url = f"{site.base}/coded/gzip?size={size}&framing={framing}"
    with pytest.raises(al.ObjectTooLargeError, match=f"max_bytes={size - 1}"):
        await fetch_all(HTTPSource([url], max_bytes=size - 1))
    assert await fetch_all(HTTPSource([url], max_bytes=size)) == [b"\0" * size]


async def test_a_head_over_64_kib_is_refused_even_when_it_arrives_at_once() -> None:
    """The limit was checked only while the head's end had not arrived yet."""
    long_header = b"X-Padding: " + b"p" * (100 << 10) + b"\r\n"
    async with raw_server(keep_alive({"/x": ok(BODY, long_header)})) as server:
        with pytest.raises(ConnectionError, match="headers too long"):
            await fetch_all(HTTPSource([server.url("/x")]))


async def test_a_corrupt_gzip_body_is_a_connection_error() -> None:
    corrupt = b"\x1f\x8b\x08\x00" + b"\xff" * 40
    answer = ok(corrupt, b"Content-Encoding: gzip\r\n")
    async with raw_server(keep_alive({"/x": answer})) as server:
        with pytest.raises(ConnectionError, match="compressed"):
            await fetch_all(HTTPSource([server.url("/x")]))


async def test_a_gzip_body_cut_short_is_an_error_not_a_short_sample() -> None:
    """The coded body is complete by its framing (Content-Length), but the gzip stream in
    it stops half way: the decoder knows it did not reach the stream's end."""
    plain = bytes(range(256)) * 400
    coded = gzip.compress(plain)
    half = coded[: len(coded) // 2]
    answer = ok(half, b"Content-Encoding: gzip\r\n")
    async with raw_server(keep_alive({"/x": answer})) as server:
        with pytest.raises((al.TruncatedBodyError, ConnectionError)):
            got = await fetch_all(HTTPSource([server.url("/x")]))
            raise AssertionError(f"a short sample: {len(got[0])} of {len(plain)} bytes")


# -- 4, 5: connections -------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    ],
    ids=["http10", "connection-close"],
)
async def test_a_close_delimited_body_is_read_whole(head: bytes) -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            await conn.send(head)
            for start in range(0, len(BODY), 1000):
                await conn.send(BODY[start : start + 1000])
        # then the handler returns and the connection closes: the end of the body

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/a"), server.url("/b")])) == [BODY] * 2
        assert server.connections == 2  # the connection ended with the body: not reused
        assert server.targets() == ["/a", "/b"]


@pytest.mark.parametrize(
    ("extra", "connections"),
    [
        (b"", 1),  # HTTP/1.1: kept alive unless told otherwise
        (b"Connection: close\r\n", 2),
    ],
    ids=["default", "close"],
)
async def test_http11_with_content_length_keeps_alive_unless_closed(
    extra: bytes, connections: int
) -> None:
    async with raw_server(keep_alive({"/x": ok(b"hello", extra)})) as server:
        assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello"] * 2
        assert server.connections == connections


@pytest.mark.parametrize(
    ("connection", "connections"),
    [(b"", 2), (b"Connection: keep-alive\r\n", 1)],
    ids=["default", "keep-alive"],
)
async def test_http10_keeps_alive_only_when_told(connection: bytes, connections: int) -> None:
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n" + connection + b"\r\nhello"

    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            await conn.send(answer)
            if not connection:
                return  # an HTTP/1.0 server closes after its answer

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello"] * 2
        assert server.connections == connections


async def test_sequential_requests_reuse_one_connection(site: Site) -> None:
    source = HTTPSource([f"{site.base}/body"] * 20)
    assert await fetch_all(source) == [BODY] * 20
    assert len(site.ports) == 20
    assert len(set(site.ports)) == 1


async def test_a_connection_the_server_closed_after_answering_is_replaced() -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            await conn.send(ok(b"hello"))  # keep-alive by its headers, then closed

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello"] * 2
        assert server.connections == 2
        assert len(server.requests) == 2


async def test_a_request_on_a_connection_closed_unanswered_is_resent_once() -> None:
    """The race of a keep-alive connection the server drops just as a request goes out:
    made deterministic by a server that reads the second request and closes without an
    answer. The client resends it on a new connection."""

    async def handler(conn: RawConnection) -> None:
        if await conn.request() is None:
            return
        await conn.send(ok(b"first" if conn.index == 0 else b"again"))
        if conn.index == 0:
            await conn.request()  # read, never answered: the connection closes

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/a"), server.url("/b")])) == [
            b"first",
            b"again",
        ]
        assert server.connections == 2
        assert server.targets() == ["/a", "/b", "/b"]


LONG = bytes(range(251)) * 8357  # about 2 MiB: it arrives over many socket reads


async def send_in_pieces(conn: RawConnection, data: bytes, piece: int = 1 << 16) -> None:
    for start in range(0, len(data), piece):
        await conn.send(data[start : start + piece])


async def test_a_long_body_sent_in_pieces_arrives_whole_and_keeps_the_connection() -> None:
    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            await send_in_pieces(conn, ok(LONG))

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/a")] * 3)) == [LONG] * 3
        assert server.connections == 1


async def test_a_long_body_cut_short_is_an_error_and_its_connection_is_not_reused() -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is None:
            return
        if conn.index == 0:
            await send_in_pieces(conn, ok(LONG)[: len(LONG) // 2])  # then closed
        else:
            await conn.send(ok(b"next"))

    async with raw_server(handler) as server:
        source = HTTPSource([server.url("/a"), server.url("/b")])
        try:
            with pytest.raises(al.TruncatedBodyError, match=f"of {len(LONG)} bytes"):
                await source[0]
            assert await source[1] == b"next"
        finally:
            await source.aclose()
        assert server.connections == 2


async def test_bytes_past_a_long_body_are_not_read_as_the_next_answer() -> None:
    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            if conn.index == 0:
                await send_in_pieces(conn, ok(LONG) + b"HTTP/1.1 200 OK\r\n")
            else:
                await conn.send(ok(b"fresh"))

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/a"), server.url("/b")])) == [
            LONG,
            b"fresh",
        ]
        assert server.connections == 2  # the first connection held unread bytes


# -- 6, 7: interim answers, answers without a body ------------------------------------------


async def test_interim_1xx_answers_are_skipped() -> None:
    async def handler(conn: RawConnection) -> None:
        while await conn.request() is not None:
            await conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            await conn.send(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
            await conn.send(ok(b"hello"))

    async with raw_server(handler) as server:
        assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello"] * 2
        assert server.connections == 1


async def test_101_switching_protocols_is_a_connection_error() -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    async with raw_server(keep_alive({"/x": answer})) as server:
        with pytest.raises(ConnectionError, match="switched protocols"):
            await fetch_all(HTTPSource([server.url("/x")]))


async def test_204_is_an_empty_sample_and_keeps_the_connection(site: Site) -> None:
    source = HTTPSource([f"{site.base}/empty", f"{site.base}/empty", f"{site.base}/body"])
    assert await fetch_all(source) == [b"", b"", BODY]
    assert len(set(site.ports)) == 1


async def test_204_and_304_read_no_body_whatever_their_headers_say() -> None:
    """A 304's Content-Length describes the representation it did not send; a 204 has no
    body. Neither is waited for, and the connection carries the next request."""
    answers = {
        "/204": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/304": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: x\r\n\r\n",
        "/200": ok(b"hello"),
    }
    async with raw_server(keep_alive(answers)) as server:
        source = HTTPSource([server.url(p) for p in ("/204", "/304", "/200")])
        try:
            with anyio.fail_after(SAFETY):
                assert await source[0] == b""
                with pytest.raises(al.HTTPStatusError) as info:
                    await source[1]
                assert info.value.status == 304
                assert await source[2] == b"hello"
        finally:
            await source.aclose()
        assert server.connections == 1
        assert server.targets() == ["/204", "/304", "/200"]


# -- 8, 9: chunked framing, malformed answers ----------------------------------------------

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_chunk_extensions_and_trailers() -> None:
    body = (
        b"5;name=value\r\nhello\r\n"
        b'A ; quoted="a;b"\r\n, world!!!\r\n'
        b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    )
    async with raw_server(keep_alive({"/x": CHUNKED + body})) as server:
        assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello, world!!!"] * 2
        # The trailers were read to their end: the connection carried the second request.
        assert server.connections == 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"zz\r\nhello\r\n0\r\n\r\n", "chunk size"),
        (b"\r\nhello\r\n0\r\n\r\n", "chunk size"),
        (b"5\r\nhelloXX\r\n0\r\n\r\n", "CRLF after a chunk"),
    ],
    ids=["not-hex", "empty", "no-crlf"],
)
async def test_bad_chunked_framing_is_a_transient_connection_error(body: bytes, match: str) -> None:
    async with raw_server(keep_alive({"/x": CHUNKED + body})) as server:
        with pytest.raises(ConnectionError, match=match) as info:
            await fetch_all(HTTPSource([server.url("/x")]))
        assert is_transient(info.value)


async def test_a_negative_chunk_size_is_refused() -> None:
    """``-5`` is no chunk size (1*HEXDIG): it must not be read as a size. Read through
    iter_chunks with a bound on the parts, so that a client that loops cannot hang."""
    async with raw_server(keep_alive({"/x": CHUNKED + b"-5\r\nhello\r\n0\r\n\r\n"})) as server:
        source = HTTPSource([server.url("/x")])
        parts: list[bytes] = []
        try:
            with anyio.fail_after(SAFETY), pytest.raises(ConnectionError, match="chunk size"):
                async for part in source.iter_chunks(server.url("/x")):
                    parts.append(part)
                    assert len(parts) < 10, f"a negative chunk size was read: {parts[:3]}"
        finally:
            await source.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    ],
    ids=[
        "garbage",
        "http2",
        "no-code",
        "no-colon",
        "space-before-colon",
        "two-lengths",
        "length-list",
        "length-word",
        "length-negative",
    ],
)
async def test_malformed_answers_are_connection_errors(answer: bytes) -> None:
    answers = {"/bad": answer, "/ok": ok(b"hello")}
    async with raw_server(keep_alive(answers)) as server:
        # One connection at most: the malformed answer must give its slot back.
        source = HTTPSource([server.url("/bad"), server.url("/ok")], max_connections=1)
        try:
            with pytest.raises(ConnectionError, match="malformed") as info:
                await source[0]
            assert is_transient(info.value)
            with anyio.fail_after(SAFETY):
                assert await source[1] == b"hello"
        finally:
            await source.aclose()
        assert server.targets() == ["/bad", "/ok"]  # a malformed answer is not resent
        assert server.connections == 2  # nor is its connection reused


async def test_equal_duplicate_content_lengths_are_accepted() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    async with raw_server(keep_alive({"/x": answer})) as server:
        assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello"] * 2
        assert server.connections == 1


# -- 10-13: what the request carries --------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Token": "a\r\nX-Injected: 1"},
        {"X-Token": "a\nb"},
        {"X-Token": "a\rb"},
        {"X-Bad:Name": "v"},
        {"X Bad": "v"},
        {"X-Bad\r\nName": "v"},
        {"": "v"},
    ],
)
def test_bad_header_names_and_values_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="bad header"):
        HTTPSource(["http://127.0.0.1/x"], headers=headers)


@pytest.mark.parametrize("headers", [{"X-Count": 1}, {b"X-Bytes": "v"}, {"X-Bytes": b"v"}])
def test_header_names_and_values_must_be_str(headers: dict[Any, Any]) -> None:
    with pytest.raises(TypeError, match="str"):
        HTTPSource(["http://127.0.0.1/x"], headers=headers)


def test_header_values_must_be_latin1() -> None:
    """HTTP/1.1 header bytes are Latin-1: anything else is refused when the source is
    built, not at its first request."""
    with pytest.raises(ValueError, match="Latin-1"):
        HTTPSource(["http://127.0.0.1/x"], headers={"X-Name": "caf\u00e9 \u2713"})
    HTTPSource(["http://127.0.0.1/x"], headers={"X-Name": "caf\u00e9"})  # Latin-1: fine


async def test_user_info_is_sent_as_basic_auth() -> None:
    async with raw_server(keep_alive({"/x": ok(b"hello")})) as server:
        host = server.base.removeprefix("http://")
        assert await fetch_all(HTTPSource([f"http://user:p%40ss@{host}/x"])) == [b"hello"]
        token = base64.b64encode(b"user:p@ss").decode("ascii")
        assert header(server.headers(0), "Authorization") == [f"Basic {token}"]
        assert server.targets() == ["/x"]  # the user info is not in the request target
        assert b"p%40ss" not in server.requests[0] and b"p@ss" not in server.requests[0]


async def test_a_user_authorization_header_wins_over_user_info() -> None:
    async with raw_server(keep_alive({"/x": ok(b"hello")})) as server:
        host = server.base.removeprefix("http://")
        source = HTTPSource([f"http://user:pass@{host}/x"], headers={"authorization": "Bearer t"})
        assert await fetch_all(source) == [b"hello"]
        assert header(server.headers(0), "Authorization") == ["Bearer t"]


async def test_user_headers_replace_the_defaults_case_insensitively() -> None:
    async with raw_server(keep_alive({"/x": ok(b"hello")})) as server:
        source = HTTPSource([server.url("/x")], headers={"user-agent": "me", "X-Extra": "1"})
        assert await fetch_all(source) == [b"hello"]
        sent = server.headers(0)
        assert header(sent, "User-Agent") == ["me"]
        assert header(sent, "X-Extra") == ["1"]
        assert header(sent, "Accept-Encoding") == ["identity"]


async def test_request_target_is_percent_encoded_once_without_the_fragment() -> None:
    async with raw_server(keep_alive({"/a%20b/%C3%A9/x%20y": ok(b"hello")})) as server:
        url = server.url("/a b/é/x%20y?q=1 2&r=é#frag")
        assert await fetch_all(HTTPSource([url])) == [b"hello"]
        assert server.targets() == ["/a%20b/%C3%A9/x%20y?q=1%202&r=%C3%A9"]
        assert b"frag" not in server.requests[0]


async def test_request_target_of_a_url_without_a_path() -> None:
    async with raw_server(keep_alive({"/": ok(b"hello")})) as server:
        urls = [server.base, server.base + "?q=1", server.base + "#frag"]
        assert await fetch_all(HTTPSource(urls)) == [b"hello"] * 3
        assert server.targets() == ["/", "/?q=1", "/"]


async def test_host_header_carries_the_port() -> None:
    async with raw_server(keep_alive({"/x": ok(b"hello")})) as server:
        assert await fetch_all(HTTPSource([server.url("/x")])) == [b"hello"]
        host = server.base.removeprefix("http://")
        assert host.startswith("127.0.0.1:")
        assert header(server.headers(0), "Host") == [host]


@pytest.mark.parametrize(
    ("url", "host_header", "origin"),
    [
        ("http://example.com", "example.com", ("http", "example.com", 80)),
        ("https://example.com", "example.com", ("https", "example.com", 443)),
        ("http://Example.COM:8080", "example.com:8080", ("http", "example.com", 8080)),
        ("https://example.com:443", "example.com:443", ("https", "example.com", 443)),
        ("http://[::1]:8080", "[::1]:8080", ("http", "::1", 8080)),
        ("HTTPS://example.com", "example.com", ("https", "example.com", 443)),
        ("http://bücher.example", "xn--bcher-kva.example", ("http", "xn--bcher-kva.example", 80)),
    ],
)
def test_target_host_header_and_origin(
    url: str, host_header: str, origin: tuple[str, str, int]
) -> None:
    target = _Target(url)
    assert target.host_header == host_header
    assert target.origin == origin
    assert target.auth is None


# -- 14: iter_chunks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/body", BODY),
        ("/chunked", BODY),
        ("/coded/gzip", BODY),
        ("/coded/gzip?size=100000", b"\0" * 100_000),
    ],
    ids=["length", "chunked", "gzip", "gzip-inflating"],
)
async def test_iter_chunks_yields_the_whole_body_in_bounded_parts(
    site: Site, path: str, expected: bytes
) -> None:
    source = HTTPSource([])
    try:
        parts = [part async for part in source.iter_chunks(site.base + path, 1000)]
        again = [part async for part in source.iter_chunks(site.base + path, 1000)]
    finally:
        await source.aclose()
    assert b"".join(parts) == expected
    assert max(len(part) for part in parts) <= 1000
    assert len(parts) >= len(expected) // 1000
    assert again == parts
    assert len(set(site.ports)) == 1  # a stream read to its end keeps the connection


async def test_iter_chunks_times_out_on_a_stalled_body() -> None:
    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
            await conn.server.stopping.wait()  # the other 97 bytes never come

    async with raw_server(handler) as server:
        source = HTTPSource([], timeout=0.2)
        parts: list[bytes] = []
        try:
            with pytest.raises(TimeoutError) as info:
                async for part in source.iter_chunks(server.url("/x?token=SECRET")):
                    parts.append(part)
        finally:
            await source.aclose()
        assert parts == [b"abc"]
        assert f"{server.url('/x')}?...: no data" in str(info.value)  # named, redacted


async def test_iter_chunks_raises_on_an_error_status(site: Site) -> None:
    source = HTTPSource([])
    try:
        with pytest.raises(al.HTTPStatusError) as info:
            _ = [part async for part in source.iter_chunks(f"{site.base}/missing")]
    finally:
        await source.aclose()
    assert info.value.status == 404


# -- 15: pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:1", ("http://h:1", "/")),
        ("http://h:1/", ("http://h:1", "/")),
        ("http://h:1/a/b?x=1&y=2", ("http://h:1", "/a/b?x=1&y=2")),
        ("http://h:1?x=1", ("http://h:1", "/?x=1")),
        ("http://h:1/a#frag", ("http://h:1", "/a")),
        ("http://h:1/a?x=1#frag?y", ("http://h:1", "/a?x=1")),
        ("http://h:1#frag", ("http://h:1", "/")),
        ("https://u:p@h/a", ("https://u:p@h", "/a")),
        ("http://[::1]:8080/a", ("http://[::1]:8080", "/a")),
        ("http://h/a b/é", ("http://h", "/a%20b/%C3%A9")),
        ("http://h/a%20b", ("http://h", "/a%20b")),
        ("http://h/a\r\nX: y", ("http://h", "/a%0D%0AX:%20y")),
        ("HTTPS://h/a?x=1", ("HTTPS://h", "/a?x=1")),
    ],
)
def test_split_url(url: str, expected: tuple[str, str]) -> None:
    assert _split_url(url) == expected


def test_parse_head_names_and_repeats() -> None:
    status, headers, keep = _parse_head(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Many: a\r\nx-many:  b \r\nEmpty:"
    )
    assert status == 200
    assert headers == {"content-type": "text/plain", "x-many": "a, b", "empty": ""}
    assert keep is True


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        ("HTTP/1.1 200 OK", True),
        ("HTTP/1.1 200 OK\r\nConnection: close", False),
        ("HTTP/1.1 200 OK\r\nConnection: Close", False),
        ("HTTP/1.1 200 OK\r\nConnection: keep-alive", True),
        ("HTTP/1.0 200 OK", False),
        ("HTTP/1.0 200 OK\r\nConnection: keep-alive", True),
        ("HTTP/1.0 200 OK\r\nConnection: Keep-Alive", True),
        ("HTTP/1.0 200 OK\r\nConnection: close", False),
    ],
)
def test_parse_head_keep_alive(head: str, keep_alive: bool) -> None:
    assert _parse_head(head)[2] is keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [("HTTP/1.1 404 Not Found", 404), ("HTTP/1.1 204", 204), ("HTTP/1.0 503 Busy Now", 503)],
)
def test_parse_head_status(head: str, status: int) -> None:
    assert _parse_head(head)[0] == status


@pytest.mark.parametrize(
    "head",
    [
        "garbage",
        "",
        "HTTP/2 200 OK",
        "HTTP/1.1 2x0 OK",
        "HTTP/1.1 200 OK\r\nno colon",
        "HTTP/1.1 200 OK\r\n: no name",
        "HTTP/1.1 200 OK\r\nName : space before the colon",
        "HTTP/1.1 200 OK\r\n folded continuation",
    ],
)
def test_parse_head_refuses_malformed_heads(head: str) -> None:
    with pytest.raises(ConnectionError, match="malformed"):
        _parse_head(head)


# -- found in review ------------------------------------------------------------------------


async def test_a_multi_member_gzip_body_is_decoded_whole_and_trailing_garbage_refused() -> None:
    members = gzip.compress(b"A" * 100) + gzip.compress(b"B" * 100)  # RFC 1952 allows this
    garbage = gzip.compress(b"A" * 100) + b"GARBAGE"
    answers = {
        "/two": ok(members, b"Content-Encoding: gzip\r\n"),
        "/garbage": ok(garbage, b"Content-Encoding: gzip\r\n"),
    }
    async with raw_server(keep_alive(answers)) as server:
        assert await fetch_all(HTTPSource([server.url("/two")])) == [b"A" * 100 + b"B" * 100]
        with pytest.raises(ConnectionError, match="compressed"):
            await fetch_all(HTTPSource([server.url("/garbage")]))


async def test_members_after_one_decoded_in_several_steps_come_once() -> None:
    """The first member inflates past one decoding step (read() decodes 1 MiB at a time,
    iter_chunks chunk_size): zlib then leaves the next member's bytes both in unused_data
    and in unconsumed_tail, and they were decoded twice (a wrong sample)."""
    first, second = b"A" * (3 << 20), bytes(range(100))
    body = gzip.compress(first) + gzip.compress(second)
    answers = {"/x": ok(body, b"Content-Encoding: gzip\r\n")}
    async with raw_server(keep_alive(answers)) as server:
        source = HTTPSource([server.url("/x")], max_bytes=8 << 20)
        try:
            assert await source[0] == first + second
            parts = [part async for part in source.iter_chunks(server.url("/x"), 4096)]
            assert b"".join(parts) == first + second
        finally:
            await source.aclose()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"gzip"])
async def test_a_transfer_coding_other_than_chunked_is_refused(coding: bytes) -> None:
    """Never the coded bytes as the sample: a transfer coding this client cannot undo is
    an error (a bare ``gzip`` one is close-delimited)."""
    body = gzip.compress(BODY)
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\nConnection: close\r\n\r\n%s" % (
        coding,
        body,
    )

    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            await conn.send(answer)

    async with raw_server(handler) as server:
        with pytest.raises(ConnectionError, match="Transfer-Encoding"):
            await fetch_all(HTTPSource([server.url("/x")]))


async def test_an_error_status_with_an_unknown_coding_is_still_a_status_error() -> None:
    answer = (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Encoding: br\r\n"
        b"Content-Length: 4\r\n\r\nbusy"
    )
    async with raw_server(keep_alive({"/x": answer})) as server:
        with pytest.raises(al.HTTPStatusError) as info:
            await fetch_all(HTTPSource([server.url("/x")]))
    assert (info.value.status, info.value.retry_after) == (503, 5.0)
    assert is_transient(info.value)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding:\r\nContent-Length: 2\r\n\r\nhi",
    ],
    ids=["204-gzip", "empty-gzip", "empty-coding-header"],
)
async def test_empty_bodies_and_empty_codings_read_as_they_are(answer: bytes) -> None:
    async with raw_server(keep_alive({"/x": answer})) as server:
        got = await fetch_all(HTTPSource([server.url("/x")]))
    assert got == [b"hi" if answer.endswith(b"hi") else b""]


async def test_max_connections_caps_open_connections_across_origins(site: Site) -> None:
    """Idle connections count: opening one more closes the longest idle one, so many
    origins (one per URL's host and port) never hold more than ``max_connections``."""
    async with contextlib.AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(raw_server(keep_alive({"/x": ok(b"hi")})))
            for _ in range(6)
        ]
        source = HTTPSource([s.url("/x") for s in servers], max_connections=2)
        try:
            for i in range(len(servers)):
                assert await source[i] == b"hi"
                pool = source._pools.get()
                assert len(pool._open) <= 2
        finally:
            await source.aclose()


async def test_aclose_fails_requests_in_flight_instead_of_resending_them() -> None:
    """A request waiting for its answer when the pool is closed fails with a
    ConnectionError; nothing is sent again on a closed pool."""
    got_request = anyio.Event()

    async def handler(conn: RawConnection) -> None:
        if await conn.request() is not None:
            got_request.set()
            await conn.server.stopping.wait()  # never answers

    async with raw_server(handler) as server:
        source = HTTPSource([server.url("/x")])
        outcome: list[BaseException] = []

        async def fetch() -> None:
            try:
                await source[0]
            except BaseException as exc:
                outcome.append(exc)

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch)
                await got_request.wait()
                await source.aclose()
        assert len(outcome) == 1 and isinstance(outcome[0], ConnectionError), outcome
        assert server.targets() == ["/x"]  # sent once


@pytest.mark.parametrize("value", ["a\x00b", "a\x0bb", "a\x7fb"])
def test_control_characters_in_header_values_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="bad header"):
        HTTPSource(["http://127.0.0.1/x"], headers={"X-Token": value})
    HTTPSource(["http://127.0.0.1/x"], headers={"X-Token": "a\tb"})  # a tab is fine


async def test_a_host_name_is_resolved_once_for_concurrent_connections(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 first connections to ``localhost`` at once share one lookup (its addresses are
    tried in order: ``::1`` may come first and refuse), and later pools reuse it."""
    lookups: list[str] = []
    look_up = _http1.Pool._look_up

    async def counted(self: _http1.Pool, host: str, port: int) -> list[str]:
        lookups.append(host)
        return await look_up(self, host, port)

    monkeypatch.setattr(_http1.Pool, "_look_up", counted)
    monkeypatch.setattr(_http1, "_resolved", {})
    url = site.base.replace("127.0.0.1", "localhost") + "/body"
    source = HTTPSource([url] * 8, max_connections=8)
    try:
        got: list[bytes] = []

        async def fetch(index: int) -> None:
            got.append(await source[index])

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                for index in range(8):
                    tg.start_soon(fetch, index)
        assert got == [BODY] * 8
    finally:
        await source.aclose()
    assert lookups == ["localhost"]
    assert len(set(site.ports)) > 1  # several connections did open
    again = HTTPSource([url])
    assert await fetch_all(again) == [BODY]
    assert lookups == ["localhost"]  # from the process's cache


async def test_a_host_that_does_not_resolve_is_an_os_error() -> None:
    source = HTTPSource(["http://no-such-host.invalid/x"])
    try:
        with pytest.raises(OSError):
            await source[0]
    finally:
        await source.aclose()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 5\nX-A: a\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX-A: a\r\n\n",
        b"HTTP/1.1 200 OK\nContent-Length: 5\nX-A: a\n\r\n",
    ],
    ids=["lf", "crlf-then-lf", "lf-then-crlf"],
)
async def test_a_head_with_bare_lf_line_ends_is_read(head: bytes) -> None:
    """RFC 9112 2.2 lets a recipient take a bare LF as a line's end: such a head was never
    found to end (only CRLF CRLF did), and the request hung. The head's end is exact: the
    body is read by its length and the connection carries the next request."""
    async with raw_server(keep_alive({"/x": head + b"hello"})) as server:
        with anyio.fail_after(SAFETY):
            assert await fetch_all(HTTPSource([server.url("/x")] * 2)) == [b"hello"] * 2
        assert server.connections == 1


@pytest.mark.parametrize(
    ("head", "headers"),
    [
        ("HTTP/1.1 200 OK\nA: 1\nB: 2", {"a": "1", "b": "2"}),
        ("HTTP/1.1 200 OK\r\nA: 1\nB: 2\r", {"a": "1", "b": "2"}),
        ("HTTP/1.1 204\r", {}),
    ],
)
def test_parse_head_takes_bare_lf_as_a_line_end(head: str, headers: dict[str, str]) -> None:
    assert _parse_head(head)[:2] == (int(head[9:12]), headers)


def test_parse_head_refuses_a_blank_line_inside_the_head() -> None:
    """A head ended by bare LFs, found only at a CRLF CRLF in its body: the body's start
    must not be read as headers."""
    with pytest.raises(ConnectionError, match="malformed"):
        _parse_head("HTTP/1.1 200 OK\nContent-Length: 9\n\nX-Not: a header")


def closes_unanswered() -> Handler:
    async def handler(conn: RawConnection) -> None:
        await conn.request()  # read, never answered: the connection closes

    return handler


@pytest.mark.parametrize(
    ("handler", "kind", "match"),
    [
        (keep_alive({"/x": CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n"}), ConnectionError, "chunk"),
        (
            keep_alive({"/x": ok(b"\xff" * 9, b"Content-Encoding: gzip\r\n")}),
            ConnectionError,
            "compressed",
        ),
        (keep_alive({"/x": ok(b"hi", b"Content-Encoding: br\r\n")}), ValueError, "'br'"),
        (keep_alive({"/x": b"garbage\r\n\r\n"}), ConnectionError, "status line"),
        (closes_unanswered(), ConnectionError, "closed the connection before answering"),
    ],
    ids=["chunked", "gzip", "coding", "head", "no-answer"],
)
@pytest.mark.parametrize("read", ["sample", "iter_chunks"])
async def test_errors_name_the_url_redacted_and_are_public_types(
    handler: Handler, kind: type[Exception], match: str, read: str
) -> None:
    """They did not: with many URLs the failed one was unknown, and a server that closed
    without answering raised the client's private ``_Closed``."""
    async with raw_server(handler) as server:
        url = server.url("/x?token=SECRET")
        source = HTTPSource([url])
        try:
            with anyio.fail_after(SAFETY), pytest.raises(kind, match=match) as info:
                if read == "sample":
                    await source[0]
                else:
                    _ = [part async for part in source.iter_chunks(url)]
        finally:
            await source.aclose()
    assert type(info.value) is kind  # not a private subclass
    assert str(info.value).startswith(f"{server.url('/x')}?...: ")
    assert "SECRET" not in str(info.value)
    assert is_transient(info.value) is (kind is ConnectionError)


async def test_a_refused_connection_names_the_url() -> None:
    with socket.socket() as bound:  # bound, not listening: a connection is refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        source = HTTPSource([f"http://127.0.0.1:{port}/x?token=SECRET"])
        try:
            with pytest.raises(ConnectionRefusedError) as info:
                await source[0]
        finally:
            await source.aclose()
    assert f"http://127.0.0.1:{port}/x?...: " in str(info.value)
    assert is_transient(info.value)


async def test_an_upper_case_scheme_is_an_http_url() -> None:
    """Schemes are case-insensitive (RFC 3986 3.1): "HTTP://" was refused."""
    async with raw_server(keep_alive({"/x": ok(b"hello")})) as server:
        url = server.url("/x").replace("http://", "HTTP://")
        assert await fetch_all(HTTPSource([url, url.replace("HTTP", "Http")])) == [b"hello"] * 2
        assert server.connections == 1  # one origin, whatever the case
    HTTPSource(["HTTPS://example.com/a", "hTtPs://example.com/b"])
    with pytest.raises(ValueError, match="not an http"):
        HTTPSource(["HTTPX://example.com/a"])


def test_an_upper_case_https_url_is_not_redirected_to_http() -> None:
    source = HTTPSource([], redirects="any")
    with pytest.raises(al.HTTPStatusError, match="https to http"):
        source._redirect_target("HTTPS://example.com/a", 302, "http://example.com/b")
