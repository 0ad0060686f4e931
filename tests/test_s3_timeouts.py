"""S3 prefix streams under timeout: a timed-out listing page or GET names the prefix or key,
and a GET started ahead that stalls frees its connection in time for a retry of another.

Against the real SeaweedFS server and fault proxy of tests/test_sources_s3.py (its
fixtures are reused). No sleeps: stalled requests are bounded by a short per-attempt
timeout, as in test_sources_s3.py.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import test_sources_s3 as _s3
from conftest import ASYNCIO_BACKENDS
from s3_faults import LIST, FaultProxy
from seaweedfs import SeaweedFS
from test_sources_s3 import (
    BUCKET,
    N_OBJECTS,
    STALL_TIMEOUT,
    body_of,
    no_wait_retry,
    obj_key,
    stream,
)

import asyncload as al

# The server and fault proxy fixtures of test_sources_s3.py.
seaweed = _s3.seaweed
_session_proxy = _s3._session_proxy
marked = _s3.marked
proxy = _s3.proxy

ANYIO_BACKENDS = ASYNCIO_BACKENDS[:1]  # obstore runs on asyncio only; plain asyncio suffices


@pytest.mark.anyio
async def test_listing_timeout_names_the_prefix(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    """S3PrefixStream's docs: a failed listing "ends the stream with the error a GET would
    raise, naming s3://bucket/prefix". A listing request over ``timeout`` raises anyio's
    bare ``TimeoutError()`` instead: its message is empty (s3.py, _pages.read: the
    fail_after error is not an obstore error, so translate() returns it unchanged)."""
    objects = stream(proxy.endpoint_url, "obj/", timeout=STALL_TIMEOUT)
    try:
        for listing in (objects.list_keys, objects.__aiter__):
            proxy.fail(LIST, "stall")
            with pytest.raises(TimeoutError) as caught:
                async for _ in listing():
                    pass
            proxy.release_stalled()
            assert f"s3://{BUCKET}/obj/" in str(caught.value)
    finally:
        await objects.aclose()


@pytest.mark.anyio
async def test_stream_get_timeout_names_the_key(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    """A GET of the stream over ``timeout`` ends the stream with a bare ``TimeoutError()``
    (s3.py, _finish: anyio.fail_after), which names no key; under a Loader the epoch
    fails with "stream failed after sample 4: TimeoutError: " and no key at all. Every
    other failed GET names s3://bucket/key (obstore's own timeout does too)."""
    key = obj_key(5)
    objects = stream(proxy.endpoint_url, "obj/", in_flight=4, timeout=STALL_TIMEOUT)
    try:
        proxy.fail(key, "stall")
        with pytest.raises(TimeoutError) as caught:
            async for _ in objects:
                pass
        proxy.release_stalled()
        assert f"s3://{BUCKET}/{key}" in str(caught.value)
    finally:
        await objects.aclose()
    # Through the Loader, retries exhausted: the SampleError must name the key somewhere.
    proxy.fail(key, "stall", times=2)
    loader = al.Loader(
        stream(
            proxy.endpoint_url, "obj/", in_flight=4, timeout=STALL_TIMEOUT, retry=no_wait_retry(2)
        ),
        batch_size=None,
    )
    with pytest.raises(al.SampleError) as failed:
        async for _ in loader:
            pass
    await loader.aclose()
    proxy.release_stalled()
    assert key in str(failed.value) or getattr(failed.value, "key", None) == key


@pytest.mark.anyio
async def test_stalled_prefetched_gets_do_not_starve_a_retry(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    """``timeout`` "bounds each GET attempt, from the moment it starts", but a GET started
    ahead (in the window) is only timed out when the consumer reaches it (s3.py, _finish).
    With max_connections, a stalled GET ahead then holds its connection for good: here
    obj/0000 is stalled once and times out; its retry waits for the one connection, which
    the stalled obj/0001 (started ahead) holds until the consumer gets to it, which it
    never does. Every retry of obj/0000 times out without reaching the store, and the
    stream fails, although each object was stalled only once and the same stream without
    max_connections delivers everything."""
    proxy.fail(obj_key(0), "stall")
    proxy.fail(obj_key(1), "stall")
    objects = stream(
        proxy.endpoint_url,
        "obj/",
        in_flight=3,
        max_connections=1,
        timeout=STALL_TIMEOUT,
        retry=no_wait_retry(3),
    )
    got: list[Any] = []
    try:
        with anyio.fail_after(60):  # a hang fails here rather than hanging the run
            async for body in objects:
                got.append(body)
    finally:
        proxy.release_stalled()
        await objects.aclose()
    assert got == [body_of(i) for i in range(N_OBJECTS)]
    assert proxy.count(obj_key(0)) == 2  # the stalled attempt, then one that succeeds


@pytest.mark.anyio
async def test_list_keys_heads_run_under_timeout_and_retry(
    marked: SeaweedFS, proxy: FaultProxy
) -> None:
    """list_keys() tells a folder marker from an empty object with a HEAD. Those HEADs
    ran under neither the stream's ``timeout`` nor its ``retry``: a stalled one hung the
    listing for good, and a reset connection ended it, where a GET or a listing request
    is retried."""
    objects = stream(proxy.endpoint_url, "marked/", timeout=STALL_TIMEOUT, retry=no_wait_retry(3))
    try:
        for fault in ("stall", "reset"):
            proxy.fail("marked/empty", fault)  # (the empty object: its HEAD finds it)
            with anyio.fail_after(60):  # a hang fails here rather than hanging the run
                keys = [k async for k in objects.list_keys()]
            proxy.release_stalled()
            assert keys == list(_s3.MARKED_SAMPLES), fault
    finally:
        proxy.release_stalled()
        await objects.aclose()


@pytest.mark.anyio
async def test_a_stalled_head_without_retry_names_the_key(
    marked: SeaweedFS, proxy: FaultProxy
) -> None:
    objects = stream(proxy.endpoint_url, "marked/", timeout=STALL_TIMEOUT)
    try:
        proxy.fail("marked/empty", "stall")
        with anyio.fail_after(60), pytest.raises(TimeoutError) as caught:
            async for _ in objects.list_keys():
                pass
        assert f"s3://{BUCKET}/marked/empty" in str(caught.value)
    finally:
        proxy.release_stalled()
        await objects.aclose()
