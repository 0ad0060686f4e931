"""A lean HTTP/1.1 client for GETs: what :class:`~asyncload.sources.HTTPSource` fetches with.

Why not aiohttp's ``ClientSession``: a sample's GET is the loader's hot path, and a session
spends about 95 µs of CPU on one 16 KiB GET (URL parsing and requoting, request and
response objects, header multidicts, cookies, tracing hooks); at hundreds of requests in
flight that is the whole core, and the loader's throughput with it. This client does only
what a GET of a whole object needs, in about 30 µs: one pre-encoded request, a status line
and headers parsed once, a body framed by Content-Length, chunked encoding or the end of
the connection, and keep-alive connections pooled per origin (scheme, host, port).

What it does not do, on purpose: cookies, proxies, HTTP/2, request bodies, and content
codings other than gzip and deflate (it asks for ``identity``; a server that compresses
anyway with another coding gets an error rather than a wrong sample). It runs on asyncio
(and uvloop) only.

Contract with the caller (HTTPSource): :meth:`Pool.get` returns a :class:`Response` whose
head is read; the caller reads the body (:meth:`Response.read` or :meth:`Response.chunks`)
and must call :meth:`Response.release` on every path, which returns the connection to the
pool when its response was read to the end, and closes it otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import os
import re
import socket
import ssl
import time
import warnings
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast
from urllib.parse import SplitResult, quote, unquote, urlsplit

from .._redact import redact_url
from ..errors import ObjectTooLargeError, TruncatedBodyError

__all__ = ["Pool", "RequestError", "Response"]

_MAX_HEAD = 64 << 10  # a status line and headers longer than this are refused
_MAX_LINE = 8 << 10  # a chunk-size line or trailer
_HIGH_WATER = 1 << 20  # bytes buffered per connection before reading pauses (streams)
_DRAIN = 64 << 10  # an unread body up to this size, already here, is skipped to keep alive
_MAX_ORIGINS = 4096  # request heads kept per origin before the cache starts over
# Characters a request target may carry as they are; anything else is percent-encoded.
_NEEDS_QUOTE = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")
_TARGET_SAFE = "-._~!$&'()*+,;=:@/?%"
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Closed(ConnectionError):
    """The server closed a connection before the whole head of its answer (a keep-alive
    connection it dropped while idle, or a reset)."""


class RequestError(ValueError):
    """A request this client cannot make (a malformed URL), or an answer it cannot decode
    (a content coding other than gzip and deflate)."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes received are kept in ``buffer`` until the reader
    takes them; the reader waits on :meth:`more` when it needs more."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        origin: tuple[str, str, int],
        lost: weakref.WeakMethod[Any],
    ) -> None:
        self.loop = loop
        self.origin = origin
        # Tells the pool, which then forgets this connection. Weak: the loop holds the
        # transport, which holds this, and a dropped pool must still be collected (and
        # warn that it was left open).
        self._lost = lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.high_water = _HIGH_WATER
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.gone = loop.create_future()  # set once the transport has closed its socket

    # -- protocol callbacks (the event loop calls these) ----------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > self.high_water and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        self.eof = True
        if self.error is None:
            self.error = exc
        self._wake()
        forget = self._lost()
        if forget is not None:
            forget(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the reader's side --------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Idle and still open: may carry another request."""
        return not self.eof and self.transport is not None and not self.transport.is_closing()

    async def more(self, timeout: float | None = None) -> None:
        """Wait until more bytes arrive or the connection ends (``eof``)."""
        if self._paused:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        waiter = self._waiter = self.loop.create_future()
        if timeout is None:
            await waiter
            return
        timer = self.loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    async def line(self, timeout: float | None) -> bytes:
        """The next CRLF-terminated line, without its CRLF."""
        buffer = self.buffer
        while True:
            end = buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                return line
            if len(buffer) > _MAX_LINE:
                raise ConnectionError("malformed HTTP response: a line too long")
            if self.eof:
                raise TruncatedBodyError("body cut short")
            await self.more(timeout)

    def close(self, error: BaseException | None = None) -> None:
        """Close the connection; ``error`` wakes a reader waiting on it with that error
        (otherwise the reader sees the end of the connection when the transport says so)."""
        if self.transport is not None:
            if error is None:
                self.transport.close()
            else:
                self.transport.abort()  # no TLS goodbye to wait for: the pool is closing
        self.eof = True
        if error is not None:
            self.error = error
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                self._waiter = None
                waiter.set_exception(error)


def _waited_out(exc: BaseException) -> bool:
    """Whether ``exc`` is ``asyncio.wait_for``'s own timeout: no errno, no message. Since
    3.11 it is the builtin ``TimeoutError``, as is the system's ETIMEDOUT, which keeps its
    errno and its message; before 3.11 it is no ``OSError`` at all."""
    return isinstance(exc, asyncio.TimeoutError) and getattr(exc, "errno", None) is None


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no data from the server in time"))


class Response:
    """A response whose status line and headers are read; its body is read on demand."""

    __slots__ = (
        "_coding",
        "_conn",
        "_keep_alive",
        "_left",
        "_pool",
        "_released",
        "_timeout",
        "_until_close",
        "chunked",
        "headers",
        "status",
        "url",
    )

    def __init__(
        self,
        pool: Pool,
        conn: _Connection,
        url: str,
        status: int,
        headers: dict[str, str],
        keep_alive: bool,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._released = False
        self._timeout = timeout
        self.url = url
        self.status = status
        self.headers = headers  # names in lower case; repeated headers joined with ", "
        self.chunked = False
        self._until_close = False
        transfer = headers.get("transfer-encoding")
        if status < 200 or status in (204, 304):
            self._left = 0
        elif transfer is not None:
            if transfer.strip().lower() != "chunked":  # (a coding under chunked, or none)
                raise ConnectionError(f"unsupported Transfer-Encoding {transfer!r}")
            self.chunked = True
            self._left = -1  # not known: chunk by chunk
            if "content-length" in headers:
                keep_alive = False  # both framings: RFC 9112 says close after this one
        elif "content-length" in headers:
            self._left = _content_length(headers["content-length"])
        else:
            self._until_close = True
            self._left = -1
            keep_alive = False
        self._keep_alive = keep_alive
        # Checked when a body is read, not here: an error status or a redirect with an
        # unknown coding must still say what it is.
        self._coding = headers.get("content-encoding", "").strip().lower() or "identity"

    async def read(self, max_bytes: int) -> bytes:
        """The whole body (decoded), at most ``max_bytes`` of it.

        Raises :class:`TruncatedBodyError` when the connection ends before the body does
        and :class:`ObjectTooLargeError` past ``max_bytes``.
        """
        conn, left = self._conn, self._left
        if left >= 0 and self._coding == "identity":
            # The common case: a body of known length, taken from the buffer in one piece.
            if left > max_bytes:
                raise ObjectTooLargeError(f"{left} bytes, more than max_bytes={max_bytes}")
            buffer = conn.buffer
            if len(buffer) < left:
                conn.high_water = max(_HIGH_WATER, left)  # it is all wanted: no pausing
                try:
                    while len(buffer) < left:
                        if conn.eof:
                            raise TruncatedBodyError(f"body has {len(buffer)} of {left} bytes")
                        await conn.more(self._timeout)
                finally:
                    conn.high_water = _HIGH_WATER
            body = _take(buffer, left)
            self._left = 0
            return body
        parts: list[bytes] = []
        size = 0
        async for part in self.chunks(1 << 20):
            size += len(part)
            if size > max_bytes:
                raise ObjectTooLargeError(f"body larger than max_bytes={max_bytes}")
            parts.append(part)
        return b"".join(parts)

    async def chunks(self, chunk_size: int) -> AsyncIterator[bytes]:
        """The body (decoded), as it arrives, in parts of at most ``chunk_size`` bytes."""
        coding = self._coding
        if coding == "identity":
            async for raw in self._raw(chunk_size):
                yield raw
            return
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise RequestError(f"unsupported Content-Encoding {coding!r} (asked for identity)")
        gzip = coding != "deflate"
        decoder: Any = None  # made at the first byte: an empty body is just empty
        async for raw in self._raw(chunk_size):
            data = raw
            while data:
                if decoder is None:
                    # gzip: one decoder per member (RFC 1952 allows several in a row);
                    # deflate: zlib-wrapped, as RFC 9110 says.
                    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
                try:
                    out = decoder.decompress(data, chunk_size)
                except zlib.error as exc:
                    raise ConnectionError(f"malformed compressed body: {exc}") from None
                # At a member's end, what follows it is all in unused_data; unconsumed_tail
                # may still hold a copy of it (after output-limited calls), not more input.
                data = decoder.unused_data if decoder.eof else decoder.unconsumed_tail
                if out:
                    yield out
                if decoder.eof:
                    if data and not gzip:
                        raise ConnectionError("malformed compressed body: data after its end")
                    decoder = None if gzip else decoder
        if decoder is not None:
            tail = decoder.flush()
            if tail:
                yield tail
            if not decoder.eof:  # the framing ended, the compressed stream did not
                raise TruncatedBodyError("compressed body cut short")

    async def _raw(self, chunk_size: int) -> AsyncIterator[bytes]:
        """The body as framed on the wire (Content-Length, chunked, or until close)."""
        conn, timeout = self._conn, self._timeout
        buffer = conn.buffer
        if self.chunked:
            while True:
                size_line = await conn.line(timeout)
                size_text = size_line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size_text):
                    raise ConnectionError("malformed HTTP response: bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    while await conn.line(timeout):  # trailers, up to an empty line
                        pass
                    self._left = 0
                    return
                while size:
                    if not buffer:
                        if conn.eof:
                            raise TruncatedBodyError("body cut short")
                        await conn.more(timeout)
                        continue
                    part = _take(buffer, min(size, chunk_size))
                    size -= len(part)
                    yield part
                if await conn.line(timeout):
                    raise ConnectionError("malformed HTTP response: no CRLF after a chunk")
        if self._until_close:
            while True:
                if buffer:
                    yield _take(buffer, chunk_size)
                elif conn.eof:
                    if conn.error is not None:
                        raise TruncatedBodyError("body cut short") from conn.error
                    self._left = 0
                    return
                else:
                    await conn.more(timeout)
        expected = self._left
        while self._left > 0:
            if not buffer:
                if conn.eof:
                    got = expected - self._left
                    raise TruncatedBodyError(f"body has {got} of {expected} bytes")
                await conn.more(timeout)
                continue
            part = _take(buffer, min(self._left, chunk_size))
            self._left -= len(part)
            yield part

    def release(self) -> None:
        """Return the connection to the pool when the response was read to the end (or its
        short unread body is already here), else close it. Idempotent."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        left = self._left
        if 0 < left <= _DRAIN and len(conn.buffer) >= left:
            del conn.buffer[:left]  # an error page or a redirect's body: skipped
            left = 0
        if left == 0 and self._keep_alive and not conn.buffer:
            self._pool._put_back(conn)
        else:
            self._pool._discard(conn)


def _content_length(value: str) -> int:
    if value.isdigit() and value.isascii():  # the common case: one plain number
        return int(value)
    values = {v.strip() for v in value.split(",")}  # repeated: all must be the same
    if len(values) != 1 or not all(v.isdigit() and v.isascii() for v in values):
        raise ConnectionError(f"malformed HTTP response: Content-Length {value!r}")
    return int(values.pop())


def _take(buffer: bytearray, n: int) -> bytes:
    """The first ``n`` bytes of ``buffer`` (all of it if shorter), removed from it: one
    copy (a slice of a bytearray would be a second one)."""
    if len(buffer) <= n:
        part = bytes(buffer)
        buffer.clear()
        return part
    with memoryview(buffer) as view:
        part = bytes(view[:n])
    del buffer[:n]
    return part


class _Target:
    """What a URL's requests need, parsed once per URL (cached by netloc for the origin)."""

    __slots__ = ("auth", "host_header", "literal", "origin")

    def __init__(self, netloc_url: str) -> None:
        try:
            parts = urlsplit(netloc_url)
        except ValueError as exc:  # "Invalid IPv6 URL"
            raise RequestError(f"bad URL {redact_url(netloc_url)}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise RequestError(f"not an http(s) URL: {redact_url(netloc_url)}")
        host = parts.hostname
        if not host:
            raise RequestError(f"no host in URL {redact_url(netloc_url)}")
        try:
            port = parts.port
        except ValueError:
            raise RequestError(f"bad port in URL {redact_url(netloc_url)}") from None
        if port == 0:  # (not "the default": nothing listens on port 0)
            raise RequestError(f"bad port 0 in URL {redact_url(netloc_url)}")
        if port is None:
            port = _DEFAULT_PORTS[scheme]
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise RequestError(f"bad host in URL {redact_url(netloc_url)}: {exc}") from None
        self.literal = _is_ip(host)  # nothing to resolve
        self.origin = (scheme, host, port)
        shown = f"[{host}]" if ":" in host else host
        self.host_header = shown if parts.port is None else f"{shown}:{parts.port}"
        self.auth = basic_auth(parts)


def basic_auth(parts: SplitResult) -> str | None:
    """The ``Authorization`` value for a URL's ``user:password@`` (percent-decoded, UTF-8),
    or None for a URL without one."""
    if parts.username is None:
        return None
    credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# Resolved addresses by (host, port), for every pool of the process: an epoch of the sync
# bridge opens its connections in a new event loop, and without this each of them (256
# at 256 in flight) asked the resolver again, in the loop's thread pool.
_DNS_TTL = 10.0  # seconds, as aiohttp's resolver cache
_resolved: dict[tuple[str, int], tuple[float, list[str]]] = {}


def _split_url(url: str) -> tuple[str, str]:
    """``(scheme://netloc, request target)`` of an http(s) URL; the fragment dropped."""
    scheme_end = url.find("://")
    start = scheme_end + 3
    cut = len(url)
    for mark in "/?#":
        at = url.find(mark, start)
        if 0 <= at < cut:
            cut = at
    target = url[cut:].split("#", 1)[0]
    if not target.startswith("/"):
        target = "/" + target
    if _NEEDS_QUOTE.search(target):
        target = quote(target, safe=_TARGET_SAFE)
    return url[:cut], target


_TLS: dict[bool, ssl.SSLContext] = {}


def _tls_context(verify: bool) -> ssl.SSLContext:
    """One TLS context per process for each setting, made at the first https connection:
    loading the CA store costs about 20 ms, which an http-only first batch must not wait."""
    context = _TLS.get(verify)
    if context is None:
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        _TLS[verify] = context
    return context


# Every live pool, for a forked child to let go of the parent's connections.
_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


def _leave_inherited_connections() -> None:
    """In a forked child (a DataLoader worker): the pools' connections are the parent's.
    Each inherited socket is pointed at /dev/null, so that the connection ends when the
    parent closes it; not closed, since the copied socket objects still own their numbers
    and would later close whatever reused them."""
    pools = list(_POOLS)
    if not pools:
        return
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for pool in pools:
            pool._leave(null)
    finally:
        os.close(null)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_leave_inherited_connections)


class Pool:
    """Keep-alive connections of one event loop, at most ``limit`` in use at once.

    Idle connections are reused most recent first; a connection the server closed while
    idle is found stale on its next request and replaced (a GET is safe to send again).
    """

    def __init__(self, limit: int, verify_tls: bool, headers: Mapping[str, str]) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._connecting = 0  # connections being opened: not in _open yet
        self._slots = asyncio.Semaphore(limit)
        self._verify_tls = verify_tls
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._resolving: dict[tuple[str, int], asyncio.Task[list[str]]] = {}
        self._closed = False
        # The request's header lines after the request line, by (netloc, with the user's
        # headers): built once, not per request.
        self._heads: dict[tuple[str, bool], bytes] = {}
        self._headers = dict(headers)
        _POOLS.add(self)

    def _leave(self, null: int) -> None:
        """Forked: let go of the parent's connections (see _leave_inherited_connections);
        this pool belongs to the parent's loop, which the child does not run."""
        for conn in self._open:
            transport = conn.transport
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(null, sock.fileno())
        self._open.clear()
        self._idle.clear()
        self._closed = True

    def _head(self, netloc_url: str, target: _Target, with_headers: bool) -> bytes:
        key = (netloc_url, with_headers)
        head = self._heads.get(key)
        if head is None:
            fields = {
                "Host": target.host_header,
                "User-Agent": "asyncload",
                "Accept": "*/*",
                "Accept-Encoding": "identity",
            }
            if target.auth is not None:
                fields["Authorization"] = target.auth
            if with_headers:
                chosen = {name.lower(): name for name in fields}
                for name, value in self._headers.items():
                    fields.pop(chosen.get(name.lower(), name), None)
                    fields[name] = value
            lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
            head = self._heads[key] = f" HTTP/1.1\r\n{lines}\r\n".encode("latin-1")
        return head

    async def get(
        self,
        url: str,
        *,
        with_headers: bool = True,
        timeout: float | None = None,
        on_slot: Callable[[], None] | None = None,
    ) -> Response:
        """Send a GET of ``url`` and read the response's head. ``timeout`` (seconds), when
        given, bounds the connection and each wait for data (not the whole request).
        ``on_slot`` is called once the request has one of the ``limit`` slots."""
        self._check_open()
        netloc_url, path = _split_url(url)
        target = self._targets.get(netloc_url)
        if target is None:
            if len(self._targets) >= _MAX_ORIGINS:  # URLs over very many hosts
                self._targets.clear()
                self._heads.clear()
            target = self._targets[netloc_url] = _Target(netloc_url)
        request = b"GET " + path.encode("ascii") + self._head(netloc_url, target, with_headers)
        await self._slots.acquire()
        try:
            if on_slot is not None:
                on_slot()
            self._check_open()
            conn = self._idle_connection(target.origin)
            if conn is None:
                conn = await self._connect(target, timeout)
            try:
                return await self._exchange(conn, url, request, timeout)
            except _Closed:
                # Closed before the answer's head: a keep-alive connection the server
                # dropped while idle, or a reset; a GET is safe to send again, once.
                self._check_open()
                conn = await self._connect(target, timeout)
                try:
                    return await self._exchange(conn, url, request, timeout)
                except _Closed as exc:  # again: the caller sees the public type
                    raise ConnectionError(*exc.args) from exc.__cause__
        except BaseException:
            self._slots.release()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HTTPSource: the connection pool was closed")

    def _idle_connection(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if idle is None:
            return None
        found = None
        while idle:
            conn = idle.pop()
            if conn.usable and not conn.buffer:  # (bytes on an idle connection: not ours)
                found = conn
                break
            self._discard(conn, release_slot=False)
        if not idle:  # (over very many hosts, empty lists would pile up)
            del self._idle[origin]
        return found

    async def _connect(self, target: _Target, timeout: float | None) -> _Connection:
        self._connecting += 1
        try:
            # At most `limit` open, those being opened too: idle ones of other origins go,
            # their sockets closed before another is opened (a transport closes its socket
            # at the loop's next step, not at close()).
            evicted = []
            while len(self._open) + self._connecting > self._limit:
                old = self._evict_idle()
                if old is None:
                    break
                evicted.append(old)
            for old in evicted:
                await asyncio.shield(old.gone)
            conn = await self._open_connection(target, timeout)
        finally:
            self._connecting -= 1
        if self._closed:  # closed while this one was being opened
            conn.close()
            self._check_open()
        self._open.add(conn)
        return conn

    async def _open_connection(self, target: _Target, timeout: float | None) -> _Connection:
        loop = self._loop
        scheme, host, port = target.origin
        tls = scheme == "https"
        forget = weakref.WeakMethod(self._forget)
        if target.literal:
            addresses = [host]
        elif timeout is None:
            addresses = await self._resolve(host, port)
        else:
            try:  # the lookup too: a resolver that does not answer is a connection that does not
                addresses = await asyncio.wait_for(self._resolve(host, port), timeout)
            except asyncio.TimeoutError as exc:
                if not _waited_out(exc):
                    raise
                raise TimeoutError(f"no address for {host} within {timeout} s") from None
        failure: Exception | None = None
        for address in addresses:  # in the resolver's order, as create_connection would
            connecting = loop.create_connection(
                lambda: _Connection(loop, target.origin, forget),
                address,
                port,
                ssl=_tls_context(self._verify_tls) if tls else None,
                server_hostname=host if tls else None,
            )
            try:
                if timeout is None:
                    _, conn = await connecting
                else:
                    _, conn = await asyncio.wait_for(connecting, timeout)
                break
            except ssl.SSLError:
                raise  # a certificate problem: another address will not fix it
            except (OSError, asyncio.TimeoutError) as exc:
                timed_out = _waited_out(exc)
                failure = TimeoutError(f"no connection within {timeout} s") if timed_out else exc
        else:
            assert failure is not None
            raise failure
        return conn

    async def _exchange(
        self, conn: _Connection, url: str, request: bytes, timeout: float | None
    ) -> Response:
        """Write the request on ``conn`` and read the response head (1xx answers skipped).
        On any failure the connection is closed; :class:`_Closed` when the server closed it
        before answering anything."""
        try:
            assert conn.transport is not None
            conn.transport.write(request)
            buffer = conn.buffer
            while True:
                end, blank = _head_end(buffer)
                while end < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise ConnectionError("malformed HTTP response: headers too long")
                    if conn.eof:
                        message = "the server closed the connection before answering"
                        code = getattr(conn.error, "errno", None)  # a reset: ECONNRESET
                        closed = _Closed(message) if code is None else _Closed(code, message)
                        raise closed from conn.error
                    await conn.more(timeout)
                    end, blank = _head_end(buffer)
                if end > _MAX_HEAD:  # (the whole head arrived in one read)
                    raise ConnectionError("malformed HTTP response: headers too long")
                head = bytes(buffer[:end]).decode("latin-1")
                del buffer[: end + blank]
                status, headers, keep_alive = _parse_head(head)
                if status >= 200 or status == 101:
                    break
            if status == 101:
                raise ConnectionError("the server switched protocols")
            return Response(self, conn, url, status, headers, keep_alive, timeout)
        except BaseException:
            self._discard(conn, release_slot=False)
            raise

    async def _resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host``, from the process's cache while fresh; concurrent
        first connections to a host share one lookup."""
        key = (host, port)
        cached = _resolved.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        pending = self._resolving.get(key)
        if pending is None:
            pending = self._resolving[key] = self._loop.create_task(self._look_up(host, port))
            pending.add_done_callback(lambda done: self._looked_up(key, done))
        try:
            return await asyncio.shield(pending)  # one waiter cancelled: the others still wait
        except asyncio.CancelledError:
            # The lookup cancelled by aclose(), and not this task itself (3.11+ can tell):
            # the pool is closed, as every later request is told.
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)
            if pending.cancelled() and (cancelling is None or cancelling() == 0):
                self._check_open()
            raise

    def _looked_up(self, key: tuple[str, int], done: asyncio.Task[list[str]]) -> None:
        self._resolving.pop(key, None)
        if not done.cancelled():
            # Retrieved here: its waiters may all have been cancelled meanwhile, and asyncio
            # would log a failed lookup nobody awaited as an error.
            done.exception()

    async def _look_up(self, host: str, port: int) -> list[str]:
        infos = await self._loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"no address for {host}")
        if len(_resolved) >= _MAX_ORIGINS:
            _resolved.clear()
        _resolved[(host, port)] = (time.monotonic() + _DNS_TTL, addresses)
        return addresses

    def _evict_idle(self) -> _Connection | None:
        """Close an idle connection, the longest idle of its origin (None if none is)."""
        for origin, idle in self._idle.items():
            if idle:
                conn = idle.pop(0)
                self._discard(conn, release_slot=False)
                if not idle:
                    del self._idle[origin]
                return conn
        return None

    def _forget(self, conn: _Connection) -> None:
        """A connection ended (the server closed it, or we did)."""
        self._open.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:  # (over very many hosts, empty lists would pile up)
                del self._idle[conn.origin]

    def _put_back(self, conn: _Connection) -> None:
        if self._closed or not conn.usable:
            self._discard(conn)
            return
        self._idle.setdefault(conn.origin, []).append(conn)
        self._slots.release()

    def _discard(self, conn: _Connection, *, release_slot: bool = True) -> None:
        # Closed before the slot goes to a waiting request: its socket then closes (at the
        # loop's next step) before that request's opens, within max_connections.
        conn.close()
        self._open.discard(conn)
        if release_slot:
            self._slots.release()

    async def aclose(self) -> None:
        """Close every connection: requests in flight on them fail, and requests waiting
        for a connection or yet to come raise ``RuntimeError``."""
        self._closed = True
        self._idle.clear()
        # Wake the requests waiting for a slot (held by streams whose readers do not pull,
        # say): the first sees the pool closed and releases its slot to the next, and so on.
        self._slots.release()
        for lookup in list(self._resolving.values()):
            lookup.cancel()  # (nobody can use its answer now)
        for conn in list(self._open):
            # Aborted: a TLS goodbye could take seconds.
            conn.close(ConnectionError("HTTPSource: the connection pool was closed"))
        self._open.clear()
        await asyncio.sleep(0)  # the transports' connection_lost run in this loop

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "_closed", True) or not self._open:  # (True: __init__ failed)
            return
        _warn(
            f"unclosed HTTPSource connection pool with {len(self._open)} open "
            "connection(s): await source.aclose() (or the Loader's aclose/close)",
            ResourceWarning,
            stacklevel=1,
        )
        # Closed here all the same, or a server shutting down gracefully would wait for them.
        for conn in self._open:
            with contextlib.suppress(Exception):  # the loop may be closed already
                conn.close()


def _head_end(buffer: bytearray) -> tuple[int, int]:
    """Where the response head in ``buffer`` ends, and the length of the blank line that
    ends it (CRLF CRLF; or, for lines ended by a bare LF, LF then LF or CRLF): the first
    blank line, whatever kind a body that came in the same read holds. The end is -1
    while no blank line has arrived."""
    # RFC 9112 2.2: a recipient may take a bare LF as a line's end (old servers, scripts).
    crlf = buffer.find(b"\r\n\r\n")
    stop = crlf if crlf >= 0 else len(buffer)  # (a bare-LF blank line must come before it)
    best, blank = crlf, 4
    for pattern, size in ((b"\n\n", 2), (b"\n\r\n", 3)):
        at = buffer.find(pattern, 0, stop)
        if at >= 0:
            best, blank, stop = at, size, at
    return best, blank


def _parse_head(head: str) -> tuple[int, dict[str, str], bool]:
    """(status, headers, keep-alive) of a response head (status line and header lines),
    its lines ended by CRLF or a bare LF."""
    # Split on LF; a line's CR goes with the strip() of its value (or of the status line).
    # A blank line inside the head (a head ended by a bare LF, read up to a CRLF blank line
    # in its body) is a header line without a colon: refused.
    lines = head.split("\n")
    status_line = lines[0].removesuffix("\r")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if (
        not version.startswith("HTTP/1.")
        or len(code) != 3
        or not code.isdigit()
        or not 100 <= int(code) <= 599  # (below 100 is no interim answer to skip)
        or rest[3:4] not in ("", " ")
    ):
        raise ConnectionError(f"malformed HTTP response: status line {status_line[:80]!r}")
    headers: dict[str, str] = {}
    name = ""
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and name and line.strip():
            # An obsolete folded line continues the previous header's value (RFC 9112
            # 5.2: replaced by a space).
            headers[name] = f"{headers[name]} {line.strip()}"
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name[-1] in " \t":
            raise ConnectionError(f"malformed HTTP response: header line {line[:80]!r}")
        name = name.lower()
        value = value.strip()
        previous = headers.get(name)
        headers[name] = value if previous is None else f"{previous}, {value}"
    connection = headers.get("connection", "").lower()
    # HTTP/1.1 keeps a connection open unless told otherwise; HTTP/1.0 closes it unless told.
    if version == "HTTP/1.1":
        return int(code), headers, "close" not in connection
    return int(code), headers, "keep-alive" in connection
