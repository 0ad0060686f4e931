"""A fault-injecting HTTP server for resilience tests, and the model of what a client sees.

:class:`FaultServer` is a real aiohttp server on 127.0.0.1 (an ephemeral port) running in
its own thread with its own event loop, like ``conftest.HTTPServer``. It serves
:func:`body` ``(i)`` at ``/sample/{i}``, except where its :class:`FaultPlan` says that the
``n``-th request for ``i`` (``n`` counted from 1, per index, on the server) must fail, or
while it is :attr:`FaultServer.down`.

The fault kinds (:class:`Fault`): an HTTP status (503 with and without ``Retry-After``, 500,
429 with ``Retry-After``, 404), a connection reset in the middle of the response headers
(``SO_LINGER`` 0, then abort: the client reads an RST), a stalled response (held until the
client gives up, or the server stops), a truncated body (``Content-Length`` announced in
full, half of the body sent, then the connection closed), and a chunked body cut off the
same way (no length announced: only the chunked framing can tell).

Everything is deterministic: the same plan gives the same answers to the same sequence of
requests for each index, whatever the interleaving across indices. :meth:`FaultPlan.expect`
predicts, for one index, the requests the server receives and the failed attempts the
client sees; it models the one thing HTTPSource's client does behind the caller's back: a GET whose
connection is reset before the response headers arrive is sent once more, at once, inside
the same call (RFC 9112 section 9.3.1.1; ``ClientSession`` has no public switch for it).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web
from threaded_server import ThreadedServer

__all__ = [
    "ALL_TRANSIENT",
    "CHUNKED_CUT",
    "NOT_FOUND",
    "RESET",
    "S429_RA",
    "S500",
    "S503",
    "S503_RA",
    "STALL",
    "TRUNCATED",
    "Expectation",
    "Fault",
    "FaultPlan",
    "FaultServer",
    "body",
]

FaultKind = Literal["status", "reset", "stall", "truncated", "chunked-cut"]


def body(index: int) -> bytes:
    """The bytes of sample ``index``: a sha256-derived pattern of 64 B to 16 KiB, every
    fourth sample exactly 16 KiB, and no two samples alike."""
    seed = hashlib.sha256(f"asyncload fault sample {index}".encode()).digest()
    size = 16384 if index % 4 == 0 else 64 + int.from_bytes(seed[:2], "big") % 12000
    repeats = -(-size // len(seed))
    return (seed * repeats)[:size]


@dataclass(frozen=True)
class Fault:
    """One way a request fails. ``retry_after`` is the header value sent, if any."""

    name: str
    kind: FaultKind
    status: int = 0
    retry_after: str | None = None

    @property
    def transient(self) -> bool:
        """Whether asyncload's default classification retries it (and a breaker counts it)."""
        return self.kind != "status" or self.status in (408, 429) or self.status >= 500

    def __repr__(self) -> str:
        return self.name


S503_RA = Fault("503+retry-after", "status", 503, "0.01")
S503 = Fault("503", "status", 503)
S500 = Fault("500", "status", 500)
S429_RA = Fault("429+retry-after", "status", 429, "0")
RESET = Fault("reset", "reset")
STALL = Fault("stall", "stall")
TRUNCATED = Fault("truncated", "truncated")
CHUNKED_CUT = Fault("chunked-cut", "chunked-cut")
NOT_FOUND = Fault("404", "status", 404)

ALL_TRANSIENT = (S503_RA, S503, S500, S429_RA, RESET, STALL, TRUNCATED, CHUNKED_CUT)


@dataclass(frozen=True)
class Expectation:
    """What one sample's fetch does under a plan, with ``attempts`` client attempts."""

    requests: int  # requests the server receives for this index
    failures: tuple[Fault, ...]  # the fault each failed client attempt sees, in order
    ok: bool  # the sample arrives in the end
    resent: int = 0  # reset requests that the client sent again within the same attempt

    @property
    def retries(self) -> int:
        """Retries the client makes: every failed attempt but a final one."""
        return len(self.failures) - (0 if self.ok else 1)


@dataclass
class FaultPlan:
    """``faults[(index, n)]``: how the ``n``-th request (from 1) for ``index`` fails;
    ``always[index]``: how every request for ``index`` fails. Anything else succeeds."""

    faults: dict[tuple[int, int], Fault] = field(default_factory=dict)
    always: dict[int, Fault] = field(default_factory=dict)

    def fault_for(self, index: int, n: int) -> Fault | None:
        return self.always.get(index) or self.faults.get((index, n))

    @classmethod
    def runs(cls, runs: Mapping[int, Iterable[Fault]]) -> FaultPlan:
        """Sample ``i`` fails its first requests with ``runs[i]``, in order."""
        return cls({(i, n): f for i, run in runs.items() for n, f in enumerate(run, 1)})

    @classmethod
    def seeded(
        cls,
        n: int,
        *,
        seed: int,
        rate: float,
        kinds: tuple[Fault, ...] = tuple(f for f in ALL_TRANSIENT if f is not STALL),
        stalls: Iterable[int] = (),
    ) -> FaultPlan:
        """About ``rate`` of all the requests for ``n`` samples faulted, drawn from ``kinds``
        by ``random.Random(seed)``: runs of 1 to 3 consecutive failures on one sample
        (weights 6:3:1), each kind in turn so that all are well represented. Every other
        reset comes twice in a row, so that the client's resend meets a reset too and the
        client sees it; the others are absorbed by that resend. The samples in ``stalls``
        stall on their first request and fail no other way."""
        rng = random.Random(seed)
        stalled = set(stalls)
        plan = cls({(i, 1): STALL for i in stalled})
        # Faulted / all requests = rate  <=>  faulted = rate / (1 - rate) * clean (= n).
        target = round(rate / (1 - rate) * n) - len(stalled)
        candidates = [i for i in range(n) if i not in stalled]
        rng.shuffle(candidates)
        turn = resets = 0
        for index in candidates:
            if target <= 0:
                break
            run: list[Fault] = []
            for _ in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
                fault = kinds[turn % len(kinds)]
                turn += 1
                run.append(fault)
                if fault is RESET:
                    resets += 1
                    if resets % 2 == 0:
                        run.append(fault)
            run = run[:target]
            for attempt, fault in enumerate(run, 1):
                plan.faults[(index, attempt)] = fault
            target -= len(run)
        return plan

    def expect(self, index: int, *, attempts: int, resend_after_reset: bool = True) -> Expectation:
        """Replay ``index``'s requests as a client with ``attempts`` attempts, asyncload's
        default classification, and (``resend_after_reset``) the client's single resend of a
        GET that was reset before its response headers."""
        n = resent = 0
        failures: list[Fault] = []
        for _ in range(attempts):
            n += 1
            fault = self.fault_for(index, n)
            if fault is RESET and resend_after_reset:
                n += 1
                resent += 1
                fault = self.fault_for(index, n)
            if fault is None:
                return Expectation(n, tuple(failures), ok=True, resent=resent)
            failures.append(fault)
            if not fault.transient:
                break
        return Expectation(n, tuple(failures), ok=False, resent=resent)

    def faulted_requests(self, index: int, requests: int) -> list[Fault]:
        """The faults the server sends for the first ``requests`` requests for ``index``."""
        return [f for n in range(1, requests + 1) if (f := self.fault_for(index, n))]


class FaultServer(ThreadedServer):
    """A real aiohttp server in a background thread that fails requests by a plan.

    ``requests[i]`` counts the requests for ``/sample/{i}`` (each counted on arrival, so the
    ``n``-th request is the one the plan's ``(i, n)`` describes), ``faults[name]`` the faults
    sent by name, ``total`` all requests. Set :attr:`down` to a fault to fail every request
    with it, and back to ``None`` to recover; :attr:`plan` may be replaced between epochs.
    """

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.plan = plan if plan is not None else FaultPlan()
        self.down: Fault | None = None
        self._lock = threading.Lock()
        self._requests: collections.Counter[int] = collections.Counter()
        self._faults: collections.Counter[str] = collections.Counter()
        self._stop_stalls: asyncio.Event | None = None
        # handler_cancellation: a stalled handler ends when its client hangs up.
        super().__init__("fault-http-server", handler_cancellation=True)

    # -- test side ---------------------------------------------------------------------------

    def url(self, index: int) -> str:
        return f"{self.base_url}/sample/{index}"

    def urls(self, n: int) -> list[str]:
        return [self.url(i) for i in range(n)]

    @property
    def requests(self) -> dict[int, int]:
        with self._lock:
            return dict(self._requests)

    @property
    def faults(self) -> dict[str, int]:
        with self._lock:
            return dict(self._faults)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._requests.values())

    def reset_counts(self) -> None:
        """Forget all requests: the next request for each index is its first again."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()

    # -- server side -------------------------------------------------------------------------

    async def _sample(self, request: web.Request) -> web.StreamResponse:
        index = int(request.match_info["index"])
        with self._lock:
            self._requests[index] += 1
            fault = self.down or self.plan.fault_for(index, self._requests[index])
            if fault is not None:
                self._faults[fault.name] += 1
        if fault is None:
            return web.Response(body=body(index), content_type="application/octet-stream")
        if fault.kind == "status":
            headers = {} if fault.retry_after is None else {"Retry-After": fault.retry_after}
            return web.Response(status=fault.status, text=fault.name, headers=headers)
        transport = request.transport
        assert transport is not None
        if fault.kind == "reset":
            # Half a status line, then an RST (linger 0) rather than a clean FIN.
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Len")
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
            return web.Response()  # never sent: the connection is gone
        if fault.kind == "stall":
            # Cancelled when the client hangs up (handler_cancellation), released at stop().
            assert self._stop_stalls is not None
            await self._stop_stalls.wait()
            return web.Response(body=body(index))
        data = body(index)
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        if fault.kind == "truncated":
            response.content_length = len(data)
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        transport.close()
        return response

    async def _app(self) -> web.Application:
        self._stop_stalls = asyncio.Event()
        app = web.Application()
        app.router.add_get("/sample/{index}", self._sample)
        return app

    async def _cleanup(self) -> None:
        assert self._stop_stalls is not None
        self._stop_stalls.set()
        await super()._cleanup()
