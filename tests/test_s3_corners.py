"""Corner cases of the S3 source (asyncload/sources/s3.py), each a bug found by review
(helper-66) and fixed: prefixes ending in a dot segment, keys obstore would rewrite,
explicit keys signed with the environment's session token, and cache keys that ignored an
endpoint given through ``config`` or the environment.

Against the real SeaweedFS server and fault proxy of tests/test_sources_s3.py (its session
fixtures are reused); one test records request headers with a small local server. No
sleeps, no timing assertions.
"""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any

import pytest
import test_sources_s3 as _s3
from aiohttp import web
from conftest import ASYNCIO_BACKENDS
from seaweedfs import SeaweedFS
from test_sources_s3 import BUCKET, KEY_ID, SECRET, collect, source, stream
from threaded_server import ThreadedServer

import asyncload as al
from asyncload.sources import S3Source

# The server fixture of test_sources_s3.py.
seaweed = _s3.seaweed

ANYIO_BACKENDS = ASYNCIO_BACKENDS[:1]  # obstore runs on asyncio only; plain asyncio suffices

# Keys whose last segment starts with a dot (".hidden" files, "._" macOS forks).
DOT = {
    "corners/dot/.hidden": b"h",
    "corners/dot/.x": b"x",
    "corners/dot/a": b"a",
}
FULL = "corners/full"  # an object; "corners/full/" is none (SeaweedFS answers 404)
MARKER = "corners/marker/"  # a folder marker that exists: an empty object, key ending in "/"


def put(endpoint: str, key: str, body: bytes) -> None:
    """An unsigned PUT of ``key`` exactly as written (obstore would rewrite some keys)."""
    url = f"{endpoint}/{BUCKET}/{urllib.parse.quote(key, safe='/')}"
    with urllib.request.urlopen(urllib.request.Request(url, body, method="PUT")) as answer:
        answer.read()


@pytest.fixture(scope="session")
def corners(seaweed: SeaweedFS) -> SeaweedFS:
    for key, body in {**DOT, FULL: b"full", MARKER: b""}.items():
        put(seaweed.endpoint_url, key, body)
    return seaweed


# -- 1. a prefix whose last segment is "." + one character ---------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("corners/dot/.h", ["corners/dot/.hidden"]),
        ("corners/dot/.x", ["corners/dot/.x"]),
    ],
)
async def test_prefix_whose_last_segment_is_a_dot_and_one_char(
    corners: SeaweedFS, prefix: str, expected: list[str]
) -> None:
    """from_prefix lists the parent folder from ``offset=prefix[:-1]``: for "dir/.h" that is
    "dir/.", which obstore refuses as a path ("illegal character sequence"), so the listing
    fails with a raw obstore ValueError that names neither bucket nor prefix."""
    objects = stream(corners.endpoint_url, prefix)
    try:
        assert [k async for k in objects.list_keys()] == expected
        assert [s async for s in objects] == [DOT[k] for k in expected]
    finally:
        await objects.aclose()


# -- 2. keys that obstore rewrites: a different object, or the bucket's listing ------------


@pytest.mark.parametrize(
    "key", ["/", "//", f"{FULL}/", MARKER, f"/{FULL}", "corners//full", "corners/./full", "a/../b"]
)
def test_keys_obstore_would_rewrite_are_refused_naming_them(key: str) -> None:
    """obstore drops a key's leading and trailing "/": "/" became the bucket itself (its
    ListBucketResult XML came back as the sample), "corners/full/" (no object: a plain GET
    is a 404) served the bytes of "corners/full", and the folder marker "corners/marker/",
    which exists, was reported missing. Empty, "." and ".." segments it refuses with an
    error that named no key."""
    with pytest.raises(ValueError, match=f"S3Source: key '{key}' "):
        S3Source(BUCKET, ["k", key])


@pytest.mark.anyio
async def test_a_key_obstore_can_address_is_fetched_as_written(corners: SeaweedFS) -> None:
    src = source(corners.endpoint_url, [FULL, "corners/dot/.hidden"])
    try:
        assert [await src[0], await src[1]] == [b"full", b"h"]
    finally:
        await src.aclose()


@pytest.mark.anyio
async def test_iter_chunks_of_an_empty_key_is_not_the_buckets_listing(
    corners: SeaweedFS,
) -> None:
    src = source(corners.endpoint_url, [FULL])
    try:
        with pytest.raises((FileNotFoundError, ValueError)):
            data = b"".join([chunk async for chunk in src.iter_chunks("")])
            raise AssertionError(f"got {data[:80]!r}")
    finally:
        await src.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("url", [f"s3://{BUCKET}", f"s3://{BUCKET}/"])
async def test_an_s3_shard_url_without_a_key(corners: SeaweedFS, url: str) -> None:
    """A shard URL that names a bucket but no object: refused, or a missing-object error;
    not the bucket's listing XML read as a tar ("invalid header ... at offset 0")."""
    options = {"endpoint_url": corners.endpoint_url, "anonymous": True}
    try:
        tar_source = al.sources.TarShardSource([url], s3_options=options)
    except ValueError as exc:
        assert "s3://" in str(exc)
        return
    with pytest.raises(al.SampleError) as caught:
        await collect(al.Loader(tar_source, batch_size=None))
    assert isinstance(caught.value.__cause__, (FileNotFoundError, ValueError)), repr(
        caught.value.__cause__
    )


# -- 3. explicit keys signed with the environment's session token --------------------------


class HeaderRecorder(ThreadedServer):
    """Answers every request with a 2-byte object and records the request headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        super().__init__("s3-header-recorder")

    async def _app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            return web.Response(
                body=b"ok",
                headers={"ETag": '"abc"', "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"},
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.mark.anyio
async def test_explicit_keys_are_not_signed_with_the_environments_session_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shell with temporary credentials (AWS_SESSION_TOKEN set, as SSO and assumed roles
    leave it) and a source given other, long-term keys: the requests carry the keys given
    and the environment's token, a mix that AWS refuses (403 InvalidToken/SignatureDoesNotMatch).
    The docs: the environment is read "without them" (the keywords)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "ENV-SESSION-TOKEN")
    with HeaderRecorder() as server:
        src = S3Source(
            BUCKET,
            ["k"],
            endpoint_url=server.base_url,
            access_key_id=KEY_ID,
            secret_access_key=SECRET,
        )
        try:
            assert await src[0] == b"ok"
        finally:
            await src.aclose()
    (headers,) = server.headers
    assert f"Credential={KEY_ID}/" in headers["authorization"]
    assert "x-amz-security-token" not in headers, headers["x-amz-security-token"]


# -- 4. cache keys of stores whose endpoint is given through config ------------------------


def test_cache_keys_name_an_endpoint_given_through_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """``config`` is passed to obstore's S3Store, and {"endpoint": ...} there points the
    source at another store; _cache_key still says "aws" for all of them, so two stores with
    the same bucket and keys share cache entries (one's bytes served for the other)."""
    from asyncload.cache import cache_key

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)

    def key(**kwargs: Any) -> Any:
        return cache_key(S3Source("one", ["a/1"], allow_http=True, **kwargs), 0)

    one = key(config={"endpoint": "http://127.0.0.1:8333"})
    assert one != key(config={"endpoint": "http://127.0.0.1:9000"})
    assert one != key()  # AWS
    assert one == key(endpoint_url="http://127.0.0.1:8333")
    # In the environment, as obstore reads it when nothing else names an endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert key() == key(endpoint_url="http://127.0.0.1:9000")
    assert one == key(config={"endpoint": "http://127.0.0.1:8333"})
