"""Review of 6e514c8..HEAD (session 15, helper-71): each test is a bug it found in the
changes, since fixed: aclose() after close() no longer waited for the cancelled epoch; a
close() from another thread could fail a next() with an AssertionError; the S3 cache key
named endpoint_url while obstore talked to AWS_ENDPOINT_URL_S3; keys with control
characters reached obstore's bare parse error.

No sleeps, no timing assertions: thread interleavings are forced with a trace function
and events, servers are local.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import FrameType
from typing import Any

import anyio
import pytest

import asyncload as al
from asyncload.bridge import SyncIterator

# -- 1. Loader.close() then aclose(): the cancelled epoch is no longer waited for -----------


class Hanging(al.AsyncDataset[int]):
    """Index 0 comes at once; every other fetch waits forever, counting starts and ends."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.started = 0
        self.ended = 0
        self.all_started = asyncio.Event()

    def __len__(self) -> int:
        return 64

    async def __getitem__(self, index: int) -> int:
        if index == 0:
            return 0
        self.started += 1
        if self.started == self.waiting:
            self.all_started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.ended += 1
        return index  # pragma: no cover


def test_aclose_after_close_still_waits_for_the_cancelled_epoch() -> None:
    """``aclose()`` promises to wait for the running epoch's fetches (docs/async.md). After
    a ``break`` the epoch is reachable only through ``loader._current``; ``close()`` now
    clears it, so a later ``aclose()`` (e.g. ``loader.close()`` from sync code, then the
    ``async with`` exit) returns with the cancelled fetches still in flight."""
    dataset = Hanging(waiting=1)
    loader = al.Loader(dataset, batch_size=1, concurrency=4, prefetch=1)

    async def main() -> None:
        async for _batch in loader:
            await dataset.all_started.wait()
            break
        loader.close()
        await loader.aclose()
        assert dataset.started >= 1
        assert dataset.ended == dataset.started  # 0 ended
        assert loader.statistics()["in_flight"] == 0

    asyncio.run(main())


# -- 2. _Pump.forget() races with a next() in another thread -------------------------------


def _line_of(function: Any, text: str) -> int:
    lines, first = inspect.getsourcelines(function)
    for offset, line in enumerate(lines):
        if text in line:
            return first + offset
    raise AssertionError(f"{text!r} not in {function.__qualname__}")


def test_close_from_another_thread_during_next_does_not_break_that_next() -> None:
    """``SyncIterator.__next__`` checks ``_closed`` after ``queue.get()``, then reads
    ``self._pump.iterator`` and asserts it is not None. A ``close()`` from another thread
    that lands between the two now runs ``_pump.forget()``, which sets ``iterator = None``:
    the consumer's next() dies with an AssertionError (an AttributeError under -O)
    instead of ending (StopIteration) or returning the batch it took."""
    loader = al.Loader(Hanging(waiting=10**9), batch_size=1, concurrency=1, prefetch=1)
    it = iter(loader)
    assert isinstance(it, SyncIterator)
    target_code = SyncIterator.__next__.__code__
    target_line = _line_of(SyncIterator.__next__, "iterator = self._pump.iterator")
    reached, proceed = threading.Event(), threading.Event()
    outcome: list[BaseException | object] = []

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and frame.f_lineno == target_line and not reached.is_set():
            reached.set()
            proceed.wait(30)
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code is target_code else None

    def consume() -> None:
        sys.settrace(tracer)
        try:
            outcome.append(next(it))
        except BaseException as exc:  # (the outcome is what is checked)
            outcome.append(exc)
        finally:
            sys.settrace(None)

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert reached.wait(30)
        loader.close()  # from this thread, while the consumer is between the two reads
    finally:
        proceed.set()
        consumer.join(30)
    assert len(outcome) == 1
    result = outcome[0]
    assert not isinstance(result, AssertionError | AttributeError), repr(result)


# -- 3. S3: the cache key names endpoint_url while obstore talks to AWS_ENDPOINT_URL_S3 ------


def _serving(body: bytes) -> Iterator[HTTPServer]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", '"e"')
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def server_a() -> Iterator[HTTPServer]:
    yield from _serving(b"from A")


@pytest.fixture
def server_b() -> Iterator[HTTPServer]:
    yield from _serving(b"from B")


def test_s3_cache_key_names_the_endpoint_obstore_really_uses(
    server_a: HTTPServer, server_b: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """obstore ranks ``aws_endpoint_url_s3`` (config key or the ``AWS_ENDPOINT_URL_S3``
    environment variable) above ``endpoint``, where S3Source put ``endpoint_url``: with
    ``AWS_ENDPOINT_URL_S3`` set, the requests went to B while the cache key named A (a
    DiskCache shared with a run really reading A handed A's entries out as B's objects).
    Now ``endpoint_url`` wins, and without it the key names what obstore picks."""
    from asyncload.sources import S3Source

    url_a = f"http://127.0.0.1:{server_a.server_port}"
    url_b = f"http://127.0.0.1:{server_b.server_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url_b)

    def fetched(source: S3Source) -> bytes:
        async def fetch() -> bytes:
            try:
                return await source[0]
            finally:
                await source.aclose()

        return asyncio.run(fetch())

    given = S3Source("bkt", ["k"], endpoint_url=url_a, anonymous=True, allow_http=True)
    assert fetched(given) == b"from A"  # the argument wins
    assert given._cache_key(0) == ("s3", url_a, "bkt", "k")
    configured = S3Source(
        "bkt",
        ["k"],
        config={"endpoint": url_a},
        anonymous=True,
        client_options={"allow_http": True},
    )
    assert fetched(configured) == b"from B"  # obstore's own ranking
    assert configured._cache_key(0) == ("s3", url_b, "bkt", "k")


# -- 4. key_problem misses keys obstore refuses: ASCII control characters -------------------


@pytest.mark.parametrize("key", ["a\tb", "line\nbreak", "nul\x00", "del\x7f"])
def test_s3_key_with_a_control_character_is_refused_naming_it(key: str) -> None:
    """object_store's Path::parse refuses ASCII control characters in a segment, as it
    refuses '.' and '..' ones. ``key_problem`` says such a key "can be asked for as
    written", so S3Source takes it and every fetch raises obstore's bare
    ``ValueError: Could not parse path ...`` naming neither the bucket nor s3://bucket/key
    (the failure mode the dot-segment fix was for)."""
    from asyncload.sources import S3Source

    with pytest.raises(ValueError, match="S3Source: key"):
        S3Source("bkt", [key], endpoint_url="http://127.0.0.1:9", anonymous=True)
