"""Review of the HTTP client's connection pool (``asyncload/sources/_http1.py``), by
helper-88: each test failed before its fix, for these bugs:

- ``max_connections`` is exceeded at the socket level: a discarded connection's slot is
  handed to the next request before its socket is closed, and an evicted idle connection
  is still open when its replacement is made;
- DataLoader workers (fork) inherit the parent's pooled sockets and keep them open after
  the parent closed them.

Servers on 127.0.0.1 only; no sleeps order events; socket counts come from psutil, taken
at the moment the client asks its loop for a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import anyio
import psutil
import pytest
from conftest import ASYNCIO_BACKENDS, sample_body
from test_http1 import keep_alive, ok, raw_server

import asyncload as al
from asyncload.sources import HTTPSource

ANYIO_BACKENDS = ASYNCIO_BACKENDS
SAFETY = 10  # seconds: a guard against a hang, never a timing claim


def client_ports(server_ports: list[int]) -> list[int]:
    """Local ports of this process's sockets connected to any of ``server_ports``."""
    return [
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port in server_ports
    ]


class SocketWatch:
    """Wraps the running loop's ``create_connection`` (what the pool opens sockets with):
    records how many client sockets to ``ports`` are open at the moment each new one is
    about to be made."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.seen: list[int] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[SocketWatch]:
        loop = asyncio.get_running_loop()
        original = loop.create_connection

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.seen.append(len(client_ports(self.ports)))
            return await original(*args, **kwargs)

        loop.create_connection = counting  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del loop.create_connection


def port_of(server: Any) -> int:
    return int(server.base.rsplit(":", 1)[1])


@pytest.mark.anyio
async def test_a_discarded_connection_is_closed_before_its_slot_opens_another() -> None:
    """max_connections=2 and 40 concurrent requests, each answered 404 with a 100 KB body
    (too long to skip: the connection is discarded, while the server keeps it open).

    Expected: whenever the pool opens a socket, at most 1 other is open (2 in all).
    Actual: ``Pool._discard`` releases the slot before closing the connection, and the
    transport's close only takes effect a loop step later, after the woken request has
    already made its socket: 3 sockets open at max_connections=2."""
    page = b"HTTP/1.1 404 Not Found\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
    async with raw_server(keep_alive({f"/{i}": page for i in range(40)})) as server:
        source = HTTPSource([server.url(f"/{i}") for i in range(40)], max_connections=2)
        watch = SocketWatch([port_of(server)])
        statuses: list[int] = []

        async def fetch(i: int) -> None:
            try:
                await source[i]
            except al.HTTPStatusError as exc:
                statuses.append(exc.status)

        try:
            with watch.installed(), anyio.fail_after(SAFETY):
                async with anyio.create_task_group() as tg:
                    for i in range(40):
                        tg.start_soon(fetch, i)
        finally:
            await source.aclose()
        assert statuses == [404] * 40
        assert max(watch.seen) + 1 <= 2, f"sockets already open at each connect: {watch.seen}"


@pytest.mark.anyio
async def test_evicting_an_idle_connection_closes_it_before_connecting() -> None:
    """max_connections=1: a request to origin B while origin A's kept-alive connection is
    idle evicts A's connection.

    Expected: A's socket is closed before B's is opened (never 2 sockets at once).
    Actual: ``Pool._evict_idle`` only schedules the close (``transport.close()``) and
    ``_connect`` opens B's socket at once, in the same loop step: 2 open at a limit of 1."""
    async with (
        raw_server(keep_alive({"/x": ok(b"a")})) as a,
        raw_server(keep_alive({"/x": ok(b"b")})) as b,
    ):
        source = HTTPSource([a.url("/x"), b.url("/x")], max_connections=1)
        watch = SocketWatch([port_of(a), port_of(b)])
        try:
            with watch.installed(), anyio.fail_after(SAFETY):
                assert await source[0] == b"a"
                assert await source[1] == b"b"
        finally:
            await source.aclose()
        assert watch.seen == [0, 0], f"sockets already open at each connect: {watch.seen}"


def test_forked_workers_do_not_hold_the_parents_sockets(http_server: Any) -> None:
    """One HTTPSource used in the parent's event loop (leaving an idle keep-alive
    connection), then by DataLoader workers (fork, persistent), then the parent closes its
    pool with ``aclose()``.

    Expected: each process has its own sockets; once the parent closed its connection, no
    process holds it. Actual: every worker inherited the parent's socket fd, so the TCP
    connection stays ESTABLISHED with the server for as long as the workers live."""
    import torch.utils.data

    urls = [http_server.url(f"/sample/{i}") for i in range(10)]
    source = HTTPSource(urls)
    loop = asyncio.new_event_loop()
    dl: Any = None
    it: Any = None
    try:
        assert loop.run_until_complete(source[0]) == sample_body(0)
        parents = set(client_ports([http_server.port]))
        assert len(parents) == 1  # the parent's idle connection
        loader = al.Loader(source, batch_size=3)
        dl = torch.utils.data.DataLoader(
            loader.to_torch(),
            batch_size=None,
            num_workers=2,
            multiprocessing_context="fork",
            persistent_workers=True,
        )
        it = iter(dl)
        got = [body for batch in it for body in batch]
        assert sorted(got) == sorted(sample_body(i) for i in range(10))
        loop.run_until_complete(source.aclose())  # the parent closes its connection
        children = psutil.Process().children(recursive=True)
        assert children  # the persistent workers, alive
        still_open = sorted(
            (child.pid, c.laddr.port, c.status)
            for child in children
            for c in child.net_connections("tcp")
            if c.raddr and c.raddr.port == http_server.port and c.laddr.port in parents
        )
        assert still_open == [], f"the parent's connection, held by workers: {still_open}"
    finally:
        del it, dl
        gc.collect()
        loop.close()
