"""Review (helper-76): HTTPSource and its own HTTP/1.1 client against a raw asyncio server
that misbehaves on purpose. Each test failed before its fix; its docstring says what
happened then and what is expected.

The server is ``asyncio.start_server`` on 127.0.0.1 writing exact bytes; nothing sleeps to
force an ordering, and ``anyio.fail_after`` only guards against a hang.
"""

from __future__ import annotations

import os
import time

import anyio
import pytest
from conftest import ASYNCIO_BACKENDS
from test_http1 import Handler, RawConnection, raw_server

import asyncload as al
from asyncload.sources import HTTPSource

pytestmark = pytest.mark.anyio

ANYIO_BACKENDS = ASYNCIO_BACKENDS  # HTTPSource runs on asyncio (and uvloop) only

GUARD = 30  # seconds: a guard against a hang, never a timing claim


def path_of(head: bytes) -> str:
    return head.split(b" ", 2)[1].decode("ascii")


def answers(table: dict[str, bytes]) -> Handler:
    """Answer each request of a keep-alive connection with ``table[path]`` (404 if none)."""

    async def handler(conn: RawConnection) -> None:
        while (head := await conn.request()) is not None:
            not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
            await conn.send(table.get(path_of(head), not_found))

    return handler


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def fetch(source: HTTPSource, index: int = 0, guard: float = GUARD) -> bytes:
    try:
        with anyio.fail_after(guard):
            return await source[index]
    finally:
        await source.aclose()


async def test_a_raw_utf8_location_is_followed_to_its_utf8_percent_encoded_target() -> None:
    """A redirect whose Location carries raw UTF-8 bytes (``/café`` as sent by servers that
    do not escape it; requests, aiohttp and browsers all read it as UTF-8).

    Happens: the head is decoded as Latin-1, so ``é`` (C3 A9) becomes ``Ã©`` and is
    percent-encoded again as UTF-8: the client asks for ``/caf%C3%83%C2%A9`` and the user
    gets ``HTTP 404 for .../cafÃ©``. Expected: the client asks for ``/caf%C3%A9`` and
    the sample is the redirected object's body."""
    table = {
        "/old": b"HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
        "/caf%C3%A9": ok(b"coffee"),
    }
    async with raw_server(answers(table)) as server:
        try:
            got = await fetch(HTTPSource([server.base + "/old"]))
        finally:
            targets = server.targets()
        assert targets == ["/old", "/caf%C3%A9"]
        assert got == b"coffee"


async def test_a_folded_header_line_is_unfolded_not_refused() -> None:
    """A response with an obs-fold (a header line continued on the next line, which starts
    with a space), as older servers still send. RFC 9112 5.2: a user agent that receives
    one in a response MUST replace it with SP before interpreting the field.

    Happens: ``ConnectionError: malformed HTTP response: header line '  part two'`` for
    every request (and, the error being transient, Retry asks again ``attempts`` times).
    Expected: the body ``hello``."""
    answer = b"HTTP/1.1 200 OK\r\nX-Note: part one\r\n  part two\r\nContent-Length: 5\r\n\r\nhello"
    async with raw_server(answers({"/x": answer})) as server:
        assert await fetch(HTTPSource([server.base + "/x"])) == b"hello"


async def test_a_status_code_below_100_is_a_malformed_answer_not_an_interim_one() -> None:
    """A server answers ``HTTP/1.1 099 ...`` (status codes are 100..599, RFC 9110 15) and
    keeps the connection open.

    Happens: the client takes any status below 200 for an interim 1xx answer, skips it,
    and then waits for another head that never comes: with the default ``timeout=None``
    the request hangs for ever (here until the test's guard fires). Expected: a prompt
    ``ConnectionError`` saying the answer is malformed, as for other bad status lines."""
    answer = b"HTTP/1.1 099 Weird\r\nContent-Length: 5\r\n\r\nhello"
    async with raw_server(answers({"/x": answer})) as server:
        with pytest.raises(ConnectionError, match="malformed"):
            await fetch(HTTPSource([server.base + "/x"]), guard=5)


async def test_an_asctime_retry_after_date_is_read_as_gmt() -> None:
    """``Retry-After`` as an HTTP-date in asctime form (``Sun Nov  6 08:49:37 1994``), one
    of the three forms RFC 9110 5.6.7 says a recipient MUST accept, always GMT.

    Happens: ``email.utils.parsedate_to_datetime`` gives a naive datetime for it and
    ``.timestamp()`` reads it in the machine's local time zone; on a machine 8 h east of
    UTC a date 3 s ahead is read as 8 h in the past: ``retry_after == 0.0`` and Retry asks
    again at once (west of UTC it would be hours ahead). Expected: about 3 s, whatever
    the local time zone."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC-8"  # POSIX: 8 hours east of UTC
    time.tzset()
    try:
        when = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(time.time() + 3)).encode()
        answer = b"HTTP/1.1 503 Busy\r\nRetry-After: " + when + b"\r\nContent-Length: 0\r\n\r\n"
        async with raw_server(answers({"/x": answer})) as server:
            with pytest.raises(al.HTTPStatusError) as info:
                await fetch(HTTPSource([server.base + "/x"]))
        assert info.value.retry_after is not None
        assert 1.0 <= info.value.retry_after <= 3.0
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()
