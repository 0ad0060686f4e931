"""Where network data meets the trainer: TLS verification, the per-object size limit,
redirects across origins, and secrets kept out of messages and statistics.

Real servers: aiohttp apps on 127.0.0.1 in the test's own event loop (two ports are two
origins), and an HTTPS server with a certificate from a throwaway CA (trustme).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trustme
from aiohttp import web
from conftest import ASYNCIO_BACKENDS

import asyncload as al
from asyncload.resilience import is_transient
from asyncload.sources import HTTPSource

pytestmark = pytest.mark.anyio

BODY = b"0123456789" * 100


ANYIO_BACKENDS = ASYNCIO_BACKENDS


class Site:
    """An aiohttp app on 127.0.0.1 that records the headers of each request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.app = web.Application()
        self.runner = web.AppRunner(self.app)
        self.base = ""

    def route(self, path: str, handler: Any) -> None:
        async def recorded(request: web.Request) -> web.StreamResponse:
            self.seen.append(dict(request.headers))
            response: web.StreamResponse = await handler(request)
            return response

        self.app.router.add_get(path, recorded)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        self.base = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def sites(anyio_backend: Any) -> AsyncIterator[tuple[Site, Site]]:
    """Two origins: ``a`` redirects to itself and to ``b``; both serve ``BODY``."""
    a, b = Site(), Site()

    async def body(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # no Content-Length: chunked transfer
        await response.prepare(request)
        for _ in range(int(request.query["parts"])):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    for site in (a, b):
        site.route("/body", body)
        site.route("/chunked", chunked)
        site.route("/redirect", redirect)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.stop()
        await b.stop()


async def fetch(source: HTTPSource, index: int = 0) -> bytes:
    try:
        return await source[index]
    finally:
        await source.aclose()


# -- size limit ---------------------------------------------------------------------------


async def test_size_limit_from_content_length(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    assert await fetch(HTTPSource([f"{a.base}/body"], max_bytes=len(BODY))) == BODY
    with pytest.raises(al.ObjectTooLargeError, match="max_bytes=999") as info:
        await fetch(HTTPSource([f"{a.base}/body"], max_bytes=len(BODY) - 1))
    assert not is_transient(info.value)  # retrying does not make it smaller


async def test_size_limit_without_content_length(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    url = f"{a.base}/chunked?parts=5"
    assert await fetch(HTTPSource([url], max_bytes=5000)) == b"x" * 5000
    with pytest.raises(al.ObjectTooLargeError):
        await fetch(HTTPSource([url], max_bytes=4999))


async def test_too_large_through_the_loader_is_a_sample_error(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    source = HTTPSource([f"{a.base}/body"], max_bytes=10)
    async with al.Loader(source, retry=al.Retry(attempts=3)) as loader:
        with pytest.raises(al.SampleError) as info:
            _ = [batch async for batch in loader]
    assert isinstance(info.value.__cause__, al.ObjectTooLargeError)
    assert loader.statistics()["retries"] == 0


# -- redirects ------------------------------------------------------------------------------


async def test_same_origin_redirect_is_followed(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    url = f"{a.base}/redirect?to=/body"
    assert await fetch(HTTPSource([url])) == BODY


async def test_redirect_to_another_origin_is_refused_by_default(
    sites: tuple[Site, Site],
) -> None:
    a, b = sites
    url = f"{a.base}/redirect?to={b.base}/body"
    with pytest.raises(al.HTTPStatusError, match="redirects='any'") as info:
        await fetch(HTTPSource([url]))
    assert info.value.status == 302
    assert b.seen == []  # the other origin was never contacted
    assert not is_transient(info.value)


async def test_redirect_to_another_origin_when_allowed_drops_credentials(
    sites: tuple[Site, Site],
) -> None:
    a, b = sites
    url = f"{a.base}/redirect?to={b.base}/body"
    source = HTTPSource([url], redirects="any", headers={"Authorization": "Bearer s3cret"})
    assert await fetch(source) == BODY
    assert a.seen[0]["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in b.seen[0]


async def test_no_redirects(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    with pytest.raises(al.HTTPStatusError, match="redirects='none'"):
        await fetch(HTTPSource([f"{a.base}/redirect?to=/body"], redirects="none"))


async def test_redirect_to_another_scheme_is_refused(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    with pytest.raises(al.HTTPStatusError, match="'file' URL refused"):
        await fetch(HTTPSource([f"{a.base}/redirect?to=file:///etc/passwd"], redirects="any"))


async def test_redirect_loop_stops(sites: tuple[Site, Site]) -> None:
    a, _ = sites
    loop = f"{a.base}/redirect?to=/redirect%3Fto%3D/body"
    with pytest.raises(al.HTTPStatusError, match="more than 1 redirects"):
        await fetch(HTTPSource([loop], max_redirects=1))
    assert await fetch(HTTPSource([loop], max_redirects=2)) == BODY


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"redirects": "sometimes"}, "redirects"),
        ({"max_redirects": -1}, "max_redirects"),
        ({"max_bytes": 0}, "max_bytes"),
    ],
)
def test_bad_keywords_name_themselves(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HTTPSource(["http://example.com/x"], **kwargs)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture
async def https_site(anyio_backend: Any) -> AsyncIterator[Site]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    site = Site()

    async def body(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    site.route("/body", body)
    await site.start(ssl_context=context)
    try:
        yield site
    finally:
        await site.stop()


async def test_tls_certificates_are_verified_by_default(https_site: Site) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        await fetch(HTTPSource([f"{https_site.base}/body"]))
    assert not is_transient(info.value)  # a bad certificate is not retried


async def test_verify_tls_off_is_explicit_and_logged_once(
    https_site: Site, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncload.sources.http as http_module

    monkeypatch.setattr(http_module, "_warned_unverified", False)
    with caplog.at_level(logging.WARNING, logger="asyncload"):
        first = HTTPSource([f"{https_site.base}/body"], verify_tls=False)
        HTTPSource([f"{https_site.base}/body"], verify_tls=False)
    assert await fetch(first) == BODY
    warnings = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    assert len(warnings) == 1


# -- secrets ----------------------------------------------------------------------------------


async def test_secrets_stay_out_of_errors_and_statistics(sites: tuple[Site, Site]) -> None:
    a, b = sites
    host = a.base.removeprefix("http://")
    urls = [
        f"http://user:hunter2@{host}/missing?X-Amz-Signature=hunter2",
        f"{a.base}/redirect?to={b.base}/body%3Fsig%3Dhunter2",
    ]
    source = HTTPSource(urls, headers={"Authorization": "Bearer hunter2"})
    async with al.Loader(source, batch_size=None, on_error="skip", max_errors=2) as loader:
        got = [x async for x in loader]
    assert got == []
    stats = loader.statistics()
    assert stats["skipped"] == 2
    text = repr(stats)
    assert "hunter2" not in text
    assert "/missing" in text  # the log still says which sample failed
