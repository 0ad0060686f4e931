"""A fault-injecting reverse proxy in front of a real S3 server (SeaweedFS), for tests.

A real aiohttp server on 127.0.0.1 (port 0), running in its own thread with its own event
loop, as ``conftest.HTTPServer`` does. It forwards every request to the upstream endpoint
unchanged (method, path, query, body, and headers, the ``Host`` header included, so a SigV4
signature made for the proxy's address stays what the client signed), except where a fault
is scheduled. Fault kinds (:data:`FAULTS`):

- ``"slowdown"``: 503 with an S3 ``<Code>SlowDown</Code>`` XML body (``retry_after=S`` adds
  a ``Retry-After`` header);
- ``"internal"``: 500 with an S3 ``<Code>InternalError</Code>`` XML body;
- ``"reset"``: the connection is reset (RST) before any byte of an answer;
- ``"stall"``: no answer at all until :meth:`FaultProxy.release_stalled` or ``stop()``;
  pair it with a per-attempt timeout on the client;
- ``"truncate"``: the upstream answer with its full ``Content-Length``, but only half of
  the body is sent before the connection closes;
- ``"forbidden"``: 403 with an S3 ``<Code>AccessDenied</Code>`` XML body (a permanent error).

Schedules are deterministic: :meth:`FaultProxy.fail` fails the next ``times`` requests for
one key, :meth:`FaultProxy.fail_every` every ``n``-th object request, and
:meth:`FaultProxy.set_down` resets every connection (a store that is down). Requests are
counted per object key (``count(key)``), listing requests as ``count(LIST)``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import threading
from typing import Final, Literal

import aiohttp
from aiohttp import web
from threaded_server import ThreadedServer

__all__ = ["FAULTS", "LIST", "FaultKind", "FaultProxy"]

FaultKind = Literal["slowdown", "internal", "reset", "stall", "truncate", "forbidden"]
FAULTS: Final[tuple[FaultKind, ...]] = (
    "slowdown",
    "internal",
    "reset",
    "stall",
    "truncate",
    "forbidden",
)
LIST: Final = "<list>"
"""The key under which listing requests (``GET /bucket?list-type=2``) are counted."""

# Headers that describe one hop's connection, not the message: never forwarded.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Content-Length",
    )
)


# Faults answered with an S3 error document: kind -> (S3 error code, HTTP status).
_STATUS_FAULTS: Final[dict[str, tuple[str, int]]] = {
    "slowdown": ("SlowDown", 503),
    "internal": ("InternalError", 500),
    "forbidden": ("AccessDenied", 403),
}


def s3_error_xml(code: str, message: str, resource: str) -> bytes:
    """An S3 error body, as AWS sends it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>FAULTPROXY</RequestId></Error>"
    ).encode()


class _Rule:
    __slots__ = ("kind", "left", "retry_after")

    def __init__(self, kind: FaultKind, left: int, retry_after: float | None) -> None:
        self.kind = kind
        self.left = left
        self.retry_after = retry_after


class FaultProxy(ThreadedServer):
    """The proxy: ``proxy.endpoint_url`` is what the client talks to instead of ``upstream``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Condition()
        self._requests: collections.Counter[str] = collections.Counter()
        self._faults_served: collections.Counter[str] = collections.Counter()
        self._rules: dict[str, list[_Rule]] = {}
        self._every: tuple[int, FaultKind] | None = None
        self._object_requests = 0
        self._down = False
        self._stalled = 0
        self._stopping = False
        self._release = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        super().__init__("s3-fault-proxy")

    # -- test side ---------------------------------------------------------------------------

    def fail(
        self, key: str, kind: FaultKind, *, times: int = 1, retry_after: float | None = None
    ) -> None:
        """Answer the next ``times`` requests for ``key`` with fault ``kind`` (queued after
        any faults already scheduled for that key)."""
        if kind not in FAULTS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._rules.setdefault(key, []).append(_Rule(kind, times, retry_after))

    def fail_every(self, n: int, kind: FaultKind) -> None:
        """Answer every ``n``-th object request (the n-th, 2n-th, ...) with fault ``kind``."""
        with self._lock:
            self._every = (n, kind)
            self._object_requests = 0

    def set_down(self, down: bool = True) -> None:
        """While down, every request's connection is reset (and still counted)."""
        with self._lock:
            self._down = down

    def clear(self) -> None:
        """Forget every schedule and count, and let stalled requests answer."""
        with self._lock:
            self._rules.clear()
            self._every = None
            self._object_requests = 0
            self._down = False
            self._requests.clear()
            self._faults_served.clear()
        self.release_stalled()

    def count(self, key: str) -> int:
        """Requests received for ``key`` (faulted ones included); ``LIST`` for listings."""
        with self._lock:
            return self._requests[key]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._requests.values())

    def faults_served(self, kind: FaultKind) -> int:
        with self._lock:
            return self._faults_served[kind]

    def wait_stalled(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` requests are stalled (a safety timeout, not a timing assumption)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._stalled >= n, timeout=timeout):
                raise AssertionError(f"only {self._stalled} of {n} requests stalled")

    def release_stalled(self) -> None:
        """Let every request stalled so far go on to the upstream."""

        with self._lock:
            # Counted from zero again now, in the caller's thread, so that a wait_stalled()
            # right after this call waits for new stalls.
            self._stalled = 0
            event = self._release

        def release() -> None:
            event.set()
            if self._release is event:
                self._release = asyncio.Event()  # later stalls wait for the next release

        self._loop.call_soon_threadsafe(release)

    # -- server side -------------------------------------------------------------------------

    def _pick(self, key: str) -> _Rule | None:
        with self._lock:
            self._requests[key] += 1
            if self._down:
                self._faults_served["reset"] += 1
                return _Rule("reset", 1, None)
            rules = self._rules.get(key)
            if rules:
                rule = rules[0]
                rule.left -= 1
                if rule.left <= 0:
                    rules.pop(0)
                self._faults_served[rule.kind] += 1
                return rule
            if key != LIST and self._every is not None:
                self._object_requests += 1
                n, kind = self._every
                if self._object_requests % n == 0:
                    self._faults_served[kind] += 1
                    return _Rule(kind, 1, None)
            return None

    @staticmethod
    def _key(request: web.Request) -> str:
        # Path style: /bucket/key...; a request on the bucket itself is a listing.
        _, _, key = request.path.lstrip("/").partition("/")
        return key if key else LIST

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rule = self._pick(self._key(request))
        kind = rule.kind if rule is not None else None
        if kind == "reset":
            return self._reset(request)
        if kind in _STATUS_FAULTS:
            assert rule is not None
            code, status = _STATUS_FAULTS[kind]
            headers = {"Content-Type": "application/xml"}
            if rule.retry_after is not None:
                headers["Retry-After"] = f"{rule.retry_after:g}"
            return web.Response(
                status=status,
                body=s3_error_xml(code, f"injected {code}", request.path),
                headers=headers,
            )
        if kind == "stall":
            with self._lock:
                self._stalled += 1
                self._lock.notify_all()
            await self._release.wait()
        if self._stopping:
            return self._reset(request)
        return await self._forward(request, truncate=kind == "truncate")

    def _reset(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:  # None: the client has gone already
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        return web.Response(status=500)  # never sent: the connection is gone

    async def _forward(self, request: web.Request, *, truncate: bool) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            payload = await upstream.read()
            out_headers = {
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
            }
            length = upstream.headers.get("Content-Length")
        if request.method == "HEAD" and length is not None:
            # The object's length, not the empty payload's: a HEAD answers with no body.
            head = web.StreamResponse(status=upstream.status, headers=out_headers)
            head.content_length = int(length)
            await head.prepare(request)
            await head.write_eof()
            return head
        if not truncate or len(payload) < 2:
            return web.Response(status=upstream.status, body=payload, headers=out_headers)
        response = web.StreamResponse(status=upstream.status, headers=out_headers)
        response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        assert request.transport is not None
        request.transport.close()
        return response

    async def _app(self) -> web.Application:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            skip_auto_headers=("User-Agent", "Content-Type", "Accept", "Accept-Encoding"),
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    @property
    def endpoint_url(self) -> str:
        return self.base_url

    async def _cleanup(self) -> None:
        self._stopping = True
        self._release.set()
        await super()._cleanup()
        if self._session is not None:
            await self._session.close()
