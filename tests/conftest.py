"""Shared fixtures: the anyio backends, a real HTTP server, and a live-task snapshot.

The HTTP server is a real aiohttp server on 127.0.0.1 (port 0), running in its own thread
with its own event loop. Its fault routes let tests order requests with events instead of
sleeps:

- ``/sample/{i}``: a deterministic body, :func:`sample_body` ``(i)``;
- ``/status/{code}``: answers ``code``; ``?retry_after=S`` adds a ``Retry-After`` header;
- ``/flaky/{name}?fail=K&status=S``: answers ``S`` (default 503) to the first ``K`` requests
  for ``name``, then ``/sample/0``'s body; ``?retry_after=S`` as above;
- ``/truncated``: declares a ``Content-Length`` larger than what it sends, then closes;
- ``/headers``: echoes the request headers as JSON;
- ``/gate/{i}``: blocks until the test calls ``server.release(i)``, then answers
  ``sample_body(i)``; ``server.wait_arrived(n)`` waits (a threading condition) until ``n``
  gated requests have arrived.

``server.requests`` counts requests per path, ``server.total`` all of them.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from threaded_server import ThreadedServer

BACKENDS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param("trio", id="trio"),
]


# For clients that run on asyncio only (aiohttp, obstore): not trio.
ASYNCIO_BACKENDS = BACKENDS[:2]


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param  # parametrized by pytest_generate_tests


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each anyio test on the backends its module lists in ``ANYIO_BACKENDS`` (all of
    ``BACKENDS`` when it lists none), unless the test picks its own (``@asyncio_only``)."""
    if "anyio_backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        if "anyio_backend" in mark.args[0]:
            return
    backends = getattr(metafunc.module, "ANYIO_BACKENDS", BACKENDS)
    metafunc.parametrize("anyio_backend", backends, indirect=True)


# One test of a module that runs on every backend, run on asyncio only.
asyncio_only = pytest.mark.parametrize("anyio_backend", ASYNCIO_BACKENDS, indirect=True)


def sample_body(index: int) -> bytes:
    """The body the test server sends for ``/sample/{index}`` and ``/gate/{index}``."""
    return f"sample {index};".encode() * (1 + index % 5)


class HTTPServer(ThreadedServer):
    """A real aiohttp server in a background thread; see the module docstring for routes."""

    def __init__(self) -> None:
        self.base_url = ""
        self.requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.Condition()
        self._arrived: list[int] = []
        self._in_gate = 0
        self.max_in_gate = 0
        self._gates: dict[int, asyncio.Event] = {}
        self._open_all = False
        self._flaky_seen: collections.Counter[str] = collections.Counter()
        super().__init__("test-http-server")

    # -- test side ---------------------------------------------------------------------------

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests[path]

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def arrived(self) -> list[int]:
        with self._lock:
            return list(self._arrived)

    def wait_arrived(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` gated requests have arrived (a generous safety timeout, not a
        timing assumption: a correct run gets there at once)."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._arrived) >= n, timeout=timeout):
                raise AssertionError(f"only {len(self._arrived)} of {n} gated requests arrived")

    def release(self, index: int) -> None:
        """Let ``/gate/{index}`` answer (now if it is waiting, else when it arrives)."""
        self._loop.call_soon_threadsafe(self._gate(index).set)

    def release_all(self) -> None:
        self._loop.call_soon_threadsafe(self._open_gates)

    def _open_gates(self) -> None:
        self._open_all = True
        for event in self._gates.values():
            event.set()

    # -- server side -------------------------------------------------------------------------

    def _gate(self, index: int) -> asyncio.Event:
        # Only called in the server's loop (directly, or through call_soon_threadsafe).
        event = self._gates.get(index)
        if event is None:
            event = self._gates[index] = asyncio.Event()
            if self._open_all:
                event.set()
        return event

    def _count(self, request: web.Request) -> None:
        with self._lock:
            self.requests[request.path] += 1

    async def _sample(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=sample_body(int(request.match_info["index"])))

    async def _status(self, request: web.Request) -> web.Response:
        self._count(request)
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=int(request.match_info["code"]), text="no", headers=headers)

    async def _flaky(self, request: web.Request) -> web.Response:
        self._count(request)
        name = request.match_info["name"]
        with self._lock:
            self._flaky_seen[name] += 1
            seen = self._flaky_seen[name]
        if seen <= int(request.query.get("fail", "1")):
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            return web.Response(
                status=int(request.query.get("status", "503")), text="busy", headers=headers
            )
        return web.Response(body=sample_body(0))

    async def _truncated(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()
        return response

    async def _headers(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(text=json.dumps(dict(request.headers)), content_type="application/json")

    async def _gated(self, request: web.Request) -> web.Response:
        self._count(request)
        index = int(request.match_info["index"])
        with self._lock:
            self._arrived.append(index)
            self._in_gate += 1
            self.max_in_gate = max(self.max_in_gate, self._in_gate)
            self._lock.notify_all()
        try:
            await self._gate(index).wait()
        finally:
            with self._lock:
                self._in_gate -= 1
        return web.Response(body=sample_body(index))

    async def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/sample/{index}", self._sample)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/flaky/{name}", self._flaky)
        app.router.add_get("/truncated", self._truncated)
        app.router.add_get("/headers", self._headers)
        app.router.add_get("/gate/{index}", self._gated)
        return app

    async def _cleanup(self) -> None:
        self._open_gates()  # held requests answer, so that the runner can close
        await super()._cleanup()


@pytest.fixture
def http_server() -> Iterator[HTTPServer]:
    server = HTTPServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_tasks() -> Callable[[], set[object]]:
    """A function that returns the tasks alive in the running event loop (asyncio or trio),
    for "no task left behind" checks: compare a snapshot before and after."""

    def snapshot() -> set[object]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            return {t for t in asyncio.all_tasks(loop) if not t.done()}
        import trio

        tasks: set[object] = set()
        stack = [trio.lowlevel.current_root_task()]
        while stack:
            task = stack.pop()
            tasks.add(task)
            for nursery in task.child_nurseries:
                stack.extend(nursery.child_tasks)
        return tasks

    return snapshot
