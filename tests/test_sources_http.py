"""HTTPSource against a real aiohttp server (see conftest): bodies, status errors, truncated
bodies, headers, redaction, ordering with gated requests, retries, the breaker, the cache,
and sessions closed by ``aclose()`` and by the sync bridge.

aiohttp runs on asyncio only: these tests run on asyncio and uvloop; on trio the source
must raise a clear RuntimeError.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from conftest import ASYNCIO_BACKENDS

import asyncload as al
from asyncload.sources import HTTPSource

# The server fixture (conftest.py) serves these bodies at /sample/{i} and /gate/{i}.
HTTPServer = Any


def sample_body(index: int) -> bytes:
    return f"sample {index};".encode() * (1 + index % 5)


pytestmark = pytest.mark.anyio

SECRET = "SUPERSECRET123"


ANYIO_BACKENDS = ASYNCIO_BACKENDS


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await anyio.lowlevel.checkpoint()


async def run_epoch(loader: al.Loader, got: list[Any] | None = None) -> list[Any]:
    got = [] if got is None else got
    try:
        async for batch in loader:
            got.append(batch)
    finally:
        await loader.aclose()
    return got


def unclosed(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and "nclosed" in str(w.message)
    ]


def error_texts(exc: BaseException) -> list[str]:
    """str and repr of an exception and of everything chained to it."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), *map(str, current.args)]
        current = current.__cause__ or current.__context__
    return texts


# -- bodies -------------------------------------------------------------------------------


async def test_reads_bytes(http_server: HTTPServer) -> None:
    urls = [http_server.url(f"/sample/{i}") for i in range(10)]
    src = HTTPSource(urls)
    try:
        assert len(src) == 10
        assert await src[0] == sample_body(0)
        assert await src[-1] == sample_body(9)
        assert await src.getitems([4, 2]) == [sample_body(4), sample_body(2)]
        with pytest.raises(IndexError):
            await src[10]
    finally:
        await src.aclose()
    assert http_server.count("/sample/4") == 1
    loader = al.Loader(HTTPSource(urls), batch_size=4, shuffle=True, seed=1)
    batches = await run_epoch(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(body for batch in batches for body in batch) == sorted(
        map(sample_body, range(10))
    )


async def test_404_is_an_http_status_error(http_server: HTTPServer) -> None:
    url = http_server.url("/status/404")
    src = HTTPSource([url])
    try:
        with pytest.raises(al.HTTPStatusError) as info:
            await src[0]
    finally:
        await src.aclose()
    assert info.value.status == 404
    assert isinstance(info.value, al.AsyncloadError)
    loader = al.Loader(HTTPSource([http_server.url("/sample/0"), url]), batch_size=2)
    with pytest.raises(al.SampleError) as sample_info:
        await run_epoch(loader)
    assert sample_info.value.index == 1
    assert sample_info.value.key == url
    assert isinstance(sample_info.value.__cause__, al.HTTPStatusError)
    assert sample_info.value.__cause__.status == 404


@pytest.mark.parametrize("code", [500, 503, 429])
async def test_error_statuses(http_server: HTTPServer, code: int) -> None:
    src = HTTPSource([http_server.url(f"/status/{code}?retry_after=7")])
    try:
        with pytest.raises(al.HTTPStatusError) as info:
            await src[0]
    finally:
        await src.aclose()
    assert info.value.status == code
    assert info.value.retry_after == 7.0


async def test_truncated_body_is_an_error(http_server: HTTPServer) -> None:
    src = HTTPSource([http_server.url("/truncated")])
    try:
        with pytest.raises(al.AsyncloadError) as info:
            await src[0]
    finally:
        await src.aclose()
    assert isinstance(info.value, al.TruncatedBodyError)
    # The default Retry treats a cut-off body as transient.
    sleep = FakeSleep()
    loader = al.Loader(
        HTTPSource([http_server.url("/truncated")]),
        batch_size=1,
        retry=al.Retry(attempts=2, sleep=sleep),
    )
    with pytest.raises(al.SampleError) as sample_info:
        await run_epoch(loader)
    assert isinstance(sample_info.value.__cause__, al.TruncatedBodyError)
    assert loader.statistics()["retries"] == 1
    assert http_server.count("/truncated") == 3


async def test_headers_are_sent(http_server: HTTPServer) -> None:
    src = HTTPSource(
        [http_server.url("/headers")], headers={"X-Test-Token": "abc", "Accept": "x/y"}
    )
    try:
        echoed = json.loads(await src[0])
    finally:
        await src.aclose()
    assert echoed["X-Test-Token"] == "abc"
    assert echoed["Accept"] == "x/y"


async def test_timeout(http_server: HTTPServer) -> None:
    src = HTTPSource([http_server.url("/gate/0")], timeout=0.05)  # never released
    try:
        with pytest.raises(TimeoutError):
            await src[0]
    finally:
        await src.aclose()


async def test_timeout_starts_once_a_connection_is_free(http_server: HTTPServer) -> None:
    """With one connection, a request queued behind a slow one waits longer than its
    ``timeout`` and still succeeds: the timeout bounds the request, not the queue. (The
    sleep makes the wait outlast the timeout; it orders nothing.)"""
    src = HTTPSource([http_server.url("/sample/1")], timeout=0.5, max_connections=1)
    try:
        holder = src.iter_chunks(http_server.url("/sample/0"), chunk_size=4)
        assert await holder.__anext__() == sample_body(0)[:4]  # the only connection, held
        async with anyio.create_task_group() as tg:
            results: list[bytes] = []

            async def queued() -> None:
                results.append(await src[0])

            tg.start_soon(queued)
            await anyio.sleep(0.75)
            assert results == []  # still waiting for the connection
            rest = [part async for part in holder]
        assert b"".join([sample_body(0)[:4], *rest]) == sample_body(0)
        assert results == [sample_body(1)]
    finally:
        await src.aclose()


async def test_timeout_error_names_the_url_without_secrets(http_server: HTTPServer) -> None:
    src = HTTPSource([http_server.url("/gate/0?token=" + SECRET)], timeout=0.05)
    try:
        with pytest.raises(TimeoutError, match=r"0\.05 s") as info:
            await src[0]
    finally:
        await src.aclose()
    assert "/gate/0" in str(info.value)
    assert SECRET not in str(info.value)


def secret_urls(server: HTTPServer) -> list[str]:
    port = server.base_url.rsplit(":", 1)[1]
    return [
        server.url(f"/status/404?token={SECRET}&x=1"),
        f"http://user:{SECRET}@127.0.0.1:{port}/status/500",
    ]


async def test_secrets_never_appear_in_http_errors(http_server: HTTPServer) -> None:
    for url in secret_urls(http_server):
        src = HTTPSource([url])
        try:
            with pytest.raises(al.HTTPStatusError) as info:
                await src[0]
        finally:
            await src.aclose()
        assert all(SECRET not in text for text in error_texts(info.value))
    with pytest.raises(ValueError) as bad:
        HTTPSource([f"ftp://example.com/x?token={SECRET}"])
    assert SECRET not in str(bad.value)


async def test_secrets_never_appear_in_sample_errors(http_server: HTTPServer) -> None:
    """Through the Loader too: the SampleError's message must not spell out the URL's query
    string or credentials (its ``.key`` may hold the URL itself)."""
    for url in secret_urls(http_server):
        loader = al.Loader(HTTPSource([url]), batch_size=1)
        with pytest.raises(al.SampleError) as info:
            await run_epoch(loader)
        assert info.value.key == url
        assert all(SECRET not in text for text in error_texts(info.value))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"http://user:{SECRET}@[2001:db8::1]:8080/a?sig={SECRET}",
            "http://[2001:db8::1]:8080/a?...",
        ),
        ("http://[::1]/x", "http://[::1]/x"),
        (
            f"https://{SECRET}@Example.com/shard-0.tar#00001.jpg",
            "https://Example.com/shard-0.tar#00001.jpg",
        ),
        ("http://host:99999/x", "<unparsable URL>"),
    ],
)
def test_redacted_urls_keep_what_identifies_them(url: str, shown: str) -> None:
    from asyncload._redact import redact_url

    assert redact_url(url) == shown


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        HTTPSource(["not a url"])
    with pytest.raises(TypeError):
        HTTPSource("http://127.0.0.1/")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        HTTPSource(["http://127.0.0.1/"], max_connections=0)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_raises_a_clear_error(anyio_backend: str) -> None:
    src = HTTPSource(["http://127.0.0.1:9/sample/0"])
    with pytest.raises(RuntimeError, match="asyncio"):
        await src[0]
    await src.aclose()
    loader = al.Loader(HTTPSource(["http://127.0.0.1:9/sample/0"]), batch_size=1)
    with pytest.raises((RuntimeError, al.SampleError)) as info:
        await run_epoch(loader)
    root: BaseException = info.value
    if isinstance(root, al.SampleError):
        assert root.__cause__ is not None
        root = root.__cause__
    assert isinstance(root, RuntimeError)
    assert "asyncio" in str(root)


# -- ordering with gated requests ---------------------------------------------------------


class Recorder:
    """``HTTPSource(...).map(recorder)``: notes each body as its request completes."""

    def __init__(self) -> None:
        self.completed: list[int] = []
        self._done: dict[int, anyio.Event] = {}

    def done(self, index: int) -> anyio.Event:
        if index not in self._done:
            self._done[index] = anyio.Event()
        return self._done[index]

    def __call__(self, body: bytes) -> int:
        index = int(body.split(b" ", 1)[1].split(b";", 1)[0])
        self.completed.append(index)
        self.done(index).set()
        return index


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "unordered"])
async def test_order_with_requests_completing_in_reverse(
    http_server: HTTPServer, ordered: bool
) -> None:
    n = 5
    recorder = Recorder()
    src = HTTPSource([http_server.url(f"/gate/{i}") for i in range(n)]).map(recorder)
    loader = al.Loader(src, batch_size=1, concurrency=n, ordered=ordered, prefetch=n)
    got: list[int] = []

    async def consume() -> None:
        async for batch in loader:
            got.extend(int(x) for x in batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        # The first two requests go out alone (slow start), the rest once two are done.
        await anyio.to_thread.run_sync(http_server.wait_arrived, 2)
        for i in (1, 0):
            http_server.release(i)
            await recorder.done(i).wait()
        await anyio.to_thread.run_sync(http_server.wait_arrived, n)
        for i in reversed(range(2, n)):
            http_server.release(i)
            await recorder.done(i).wait()
    await loader.aclose()
    reverse = [1, 0, *reversed(range(2, n))]
    assert recorder.completed == reverse
    assert got == (list(range(n)) if ordered else reverse)


async def test_max_connections(http_server: HTTPServer) -> None:
    n = 6
    src = HTTPSource([http_server.url(f"/gate/{i}") for i in range(n)], max_connections=2)
    loader = al.Loader(src, batch_size=1, concurrency=n, prefetch=n)
    got: list[bytes] = []

    async def consume() -> None:
        async for batch in loader:
            got.extend(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        # The first two requests go out alone (slow start); once both are done, 4 fetches
        # want requests, and 2 connections carry them.
        await anyio.to_thread.run_sync(http_server.wait_arrived, 2)
        http_server.release(0)
        http_server.release(1)
        await anyio.to_thread.run_sync(http_server.wait_arrived, 4)
        await anyio.wait_all_tasks_blocked()
        assert len(http_server.arrived) == 4
        http_server.release_all()
    await loader.aclose()
    assert got == [sample_body(i) for i in range(n)]
    assert http_server.max_in_gate <= 2


async def test_break_with_requests_in_flight(
    http_server: HTTPServer, live_tasks: Callable[[], set[object]]
) -> None:
    http_server.release(0)
    http_server.release(1)
    baseline = live_tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = HTTPSource([http_server.url(f"/gate/{i}") for i in range(8)])
        loader = al.Loader(src, batch_size=2, concurrency=4)
        async for batch in loader:
            assert batch == [sample_body(0), sample_body(1)]
            await anyio.to_thread.run_sync(http_server.wait_arrived, 4)
            break
        await loader.aclose()
        assert live_tasks() == baseline
        del loader, src, batch
        gc.collect()
    assert unclosed(caught) == []


# -- resilience and cache over HTTP ---------------------------------------------------------


async def test_retry_honours_retry_after(http_server: HTTPServer) -> None:
    sleep = FakeSleep()
    url = http_server.url("/flaky/a?fail=2&retry_after=2")
    loader = al.Loader(
        HTTPSource([url]), batch_size=1, retry=al.Retry(attempts=3, sleep=sleep, max_delay=60)
    )
    assert await run_epoch(loader) == [[sample_body(0)]]
    assert http_server.count("/flaky/a") == 3
    assert loader.statistics()["retries"] == 2
    assert sleep.delays == [2.0, 2.0]


async def test_retry_on_5xx_not_on_404(http_server: HTTPServer) -> None:
    sleep = FakeSleep()
    urls = [http_server.url("/status/500"), http_server.url("/status/404")]
    loader = al.Loader(
        HTTPSource(urls),
        batch_size=1,
        concurrency=1,
        retry=al.Retry(attempts=3, sleep=sleep),
        on_error="skip",
    )
    assert await run_epoch(loader) == []
    assert http_server.count("/status/500") == 3
    assert http_server.count("/status/404") == 1
    stats = loader.statistics()
    assert stats["retries"] == 2
    assert stats["skipped"] == 2


async def test_breaker_trips_on_5xx_not_on_404(http_server: HTTPServer) -> None:
    breaker = al.CircuitBreaker(failure_threshold=2, recovery_timeout=1000.0)
    loader = al.Loader(
        HTTPSource([http_server.url("/status/404")] * 5),
        batch_size=1,
        concurrency=1,
        breaker=breaker,
        on_error="skip",
    )
    await run_epoch(loader)
    assert http_server.count("/status/404") == 5
    assert breaker.state == "closed"
    loader = al.Loader(
        HTTPSource([http_server.url("/status/502")] * 5),
        batch_size=1,
        concurrency=1,
        breaker=breaker,
        on_error="skip",
    )
    await run_epoch(loader)
    assert http_server.count("/status/502") == 2
    assert breaker.state == "open"


async def test_cache_avoids_requests(http_server: HTTPServer) -> None:
    cache = al.LRUCache(max_items=100)
    urls = [http_server.url(f"/sample/{i}") for i in range(6)]
    loader = al.Loader(HTTPSource(urls), batch_size=3, cache=cache)
    first = await run_epoch(loader)
    assert http_server.total == 6
    second = await run_epoch(loader)
    assert second == first
    assert http_server.total == 6
    assert loader.statistics()["cache_hits"] == 6


# -- sessions ---------------------------------------------------------------------------------


async def one_epoch_and_drop(server: HTTPServer, *, close: bool) -> None:
    src = HTTPSource([server.url(f"/sample/{i}") for i in range(4)])
    loader = al.Loader(src, batch_size=2)
    async for _batch in loader:
        pass
    if close:
        await loader.aclose()


async def test_aclose_closes_the_session(http_server: HTTPServer) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await one_epoch_and_drop(http_server, close=True)
        gc.collect()
    assert unclosed(caught) == []


async def test_unclosed_session_is_detected(http_server: HTTPServer) -> None:
    """The check above can fail: without aclose() the dropped session is reported."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await one_epoch_and_drop(http_server, close=False)
        gc.collect()
    assert any("unclosed HTTPSource connection pool" in m for m in unclosed(caught))


def test_asyncio_run_per_sample_leaves_no_loops_behind(http_server: HTTPServer) -> None:
    """api.md: ``asyncio.run(ds[0])`` works. Each run's pool holds its loop (through its
    connections), and the source keeps pools per loop: a closed loop's pool is dropped when
    the source is next used, so repeated runs keep at most one loop (and its sockets)."""
    held = [HTTPSource([http_server.url(f"/sample/{i}") for i in range(6)])]
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def fetch(index: int) -> bytes:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return await held[0][index]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (each dropped pool reports it was left open)
        assert [asyncio.run(fetch(i)) for i in range(6)] == [sample_body(i) for i in range(6)]
        gc.collect()
        alive = sum(1 for loop in loops if loop() is not None)
        held.clear()  # and the last loop's pool with the source, while warnings are caught
        gc.collect()
    assert alive <= 1
    assert sum("connection pool" in m for m in unclosed(caught)) == 6  # collected, and said so


def test_sync_bridge_closes_sessions(http_server: HTTPServer) -> None:
    baseline = set(threading.enumerate())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        urls = [http_server.url(f"/sample/{i}") for i in range(6)]
        loader = al.Loader(HTTPSource(urls), batch_size=4)
        assert list(loader) == [
            [sample_body(i) for i in range(4)],
            [sample_body(4), sample_body(5)],
        ]
        for _batch in loader:
            break
        assert set(threading.enumerate()) - baseline == set()
        del loader
        gc.collect()
    assert unclosed(caught) == []


def test_sync_bridge_break_with_requests_in_flight(http_server: HTTPServer) -> None:
    baseline = set(threading.enumerate())
    http_server.release(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = al.Loader(
            HTTPSource([http_server.url(f"/gate/{i}") for i in range(6)]), batch_size=1
        )
        for batch in loader:
            assert batch == [sample_body(0)]
            http_server.wait_arrived(3)
            break
        assert set(threading.enumerate()) - baseline == set()
        del loader
        gc.collect()
    assert unclosed(caught) == []


def test_dataloader_workers_fetch_over_http(http_server: HTTPServer) -> None:
    """Each DataLoader worker (fork) runs its own loop and session against the server."""
    import torch.utils.data

    urls = [http_server.url(f"/sample/{i}") for i in range(10)]
    loader = al.Loader(HTTPSource(urls), batch_size=3)
    dl = torch.utils.data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    got = [body for batch in dl for body in batch]
    assert sorted(got) == sorted(sample_body(i) for i in range(10))
    assert http_server.total == 10
