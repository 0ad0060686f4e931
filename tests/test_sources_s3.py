"""S3Source and S3Source.from_prefix against a real SeaweedFS server (tests/seaweedfs.py),
and against the same server behind a fault-injecting proxy (tests/s3_faults.py).

One server for the whole session (start-up costs about a second). No mocks, no real
sleeps to order things, no timing assertions; the few stalled requests use a short
per-attempt timeout. obstore runs on asyncio only: these tests run on asyncio and uvloop,
and on trio the source must raise a clear RuntimeError.
"""

from __future__ import annotations

import io
import pickle
import re
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import pytest
from conftest import ASYNCIO_BACKENDS, asyncio_only
from s3_faults import FAULTS, LIST, FaultKind, FaultProxy
from seaweedfs import SeaweedFS

import asyncload as al
from asyncload._cli.sources import NoSamplesError, S3Options, resolve
from asyncload.resilience.classify import is_transient
from asyncload.sources import S3PrefixStream, S3Source
from asyncload.sources.s3 import _MarkerTwins

BUCKET = "asyncload-test"
SECRET = "SUPERSECRET123"
KEY_ID = "AKIDTESTKEY"
N_OBJECTS = 96
N_LISTED = 1100  # more than one S3 listing page (1,000 keys)
BIG_KEY = "big/object"
BIG_SIZE = 64 * 1024
# Per-attempt timeout where a request is stalled on purpose: each stall costs this much
# wall time; every other request has the rest of a generous retry budget.
STALL_TIMEOUT = 0.4
PASSWORD = "PASSW0RDX"  # in an endpoint's userinfo: it must never appear in an error
# Objects as the S3 console's "Create folder" makes them: folder markers (zero-size, key
# ending with "/"), one with contents and one without, beside a real empty object.
MARKED_OBJECTS = {
    "marked/a/": b"",
    "marked/a/1": b"a1",
    "marked/b-empty/": b"",
    "marked/empty": b"",
    "marked/z": b"z",
}
MARKED_SAMPLES = {"marked/a/1": b"a1", "marked/empty": b"", "marked/z": b"z"}


def body_of(i: int) -> bytes:
    """Object ``obj/{i:04d}``: distinct, of varied sizes, one of them empty."""
    if i == 7:
        return b""
    return f"object {i};".encode() * (1 + i % 13) + bytes([i % 256]) * (i * 37 % 3000)


def obj_key(i: int) -> str:
    return f"obj/{i:04d}"


OBJECT_KEYS = [obj_key(i) for i in range(N_OBJECTS)]
LISTED_KEYS = [f"listing/{i:05d}" for i in range(N_LISTED)]


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    with SeaweedFS(buckets=[BUCKET]) as server:
        objects = {obj_key(i): body_of(i) for i in range(N_OBJECTS)}
        objects.update({key: key.encode() for key in LISTED_KEYS})
        objects[BIG_KEY] = bytes(range(256)) * (BIG_SIZE // 256)
        server.put_objects(BUCKET, objects, concurrency=64)
        yield server


@pytest.fixture(scope="session")
def marked(seaweed: SeaweedFS) -> SeaweedFS:
    """The server, with MARKED_OBJECTS stored under their exact keys: obstore (and so
    put_objects) would drop a key's trailing "/", so these go up by plain unsigned PUTs."""
    for key, body in MARKED_OBJECTS.items():
        url = f"{seaweed.endpoint_url}/{BUCKET}/{urllib.parse.quote(key)}"
        with urllib.request.urlopen(urllib.request.Request(url, body, method="PUT")) as answer:
            answer.read()
    return seaweed


@pytest.fixture(scope="session")
def _session_proxy(seaweed: SeaweedFS) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def proxy(_session_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """The fault proxy, with no faults scheduled and its counts at zero."""
    _session_proxy.clear()
    yield _session_proxy
    _session_proxy.clear()


ANYIO_BACKENDS = ASYNCIO_BACKENDS


def source(endpoint_url: str, keys: list[str] | None = None, **kwargs: Any) -> S3Source:
    kwargs.setdefault("access_key_id", KEY_ID)
    kwargs.setdefault("secret_access_key", SECRET)
    return S3Source(
        BUCKET, OBJECT_KEYS if keys is None else keys, endpoint_url=endpoint_url, **kwargs
    )


def stream(endpoint_url: str, prefix: str, **kwargs: Any) -> S3PrefixStream:
    kwargs.setdefault("access_key_id", KEY_ID)
    kwargs.setdefault("secret_access_key", SECRET)
    return S3Source.from_prefix(BUCKET, prefix, endpoint_url=endpoint_url, **kwargs)


def no_wait_retry(attempts: int = 3) -> al.Retry:
    """A Retry whose backoff is zero: retries happen at once, nothing sleeps."""
    return al.Retry(attempts=attempts, initial_delay=0.0, max_delay=0.0)


async def collect(loader: al.Loader) -> list[Any]:
    try:
        return [batch async for batch in loader]
    finally:
        await loader.aclose()


def with_password(endpoint_url: str) -> str:
    """``endpoint_url`` with ``user:PASSWORD@`` (SeaweedFS ignores it)."""
    return endpoint_url.replace("://", f"://user:{PASSWORD}@", 1)


def tar_bytes(members: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def error_texts(exc: BaseException) -> list[str]:
    """str and repr of an exception and of everything chained to it."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    return texts


# -- bytes round trip ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_await_each_object(seaweed: SeaweedFS) -> None:
    src = source(seaweed.endpoint_url)
    try:
        assert len(src) == N_OBJECTS
        for i in range(N_OBJECTS):
            data = await src[i]
            assert type(data) is bytes
            assert data == body_of(i), i
        assert await src[-1] == body_of(N_OBJECTS - 1)
        assert src.key_of(5) == obj_key(5)
        with pytest.raises(IndexError):
            await src[N_OBJECTS]
    finally:
        await src.aclose()


@pytest.mark.anyio
async def test_getitems_in_the_order_asked(seaweed: SeaweedFS) -> None:
    src = source(seaweed.endpoint_url)
    order = [5, 3, 90, -1, 7, 0, 5]
    try:
        got = await src.getitems(order)
        assert got == [body_of(i % N_OBJECTS) for i in order]
    finally:
        await src.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("shuffle", [False, True])
async def test_loader_round_trip(seaweed: SeaweedFS, shuffle: bool) -> None:
    loader = al.Loader(
        source(seaweed.endpoint_url), batch_size=10, concurrency=24, shuffle=shuffle, seed=3
    )
    batches = await collect(loader)
    samples = [s for batch in batches for s in batch]
    assert [len(b) for b in batches] == [10] * 9 + [6]
    order = list(loader.plan().indices(0, N_OBJECTS))
    assert samples == [body_of(i) for i in order]
    assert sorted(order) == list(range(N_OBJECTS))


def test_loader_sync_bridge(seaweed: SeaweedFS) -> None:
    """``for batch in loader`` runs the source in the bridge's own event loop thread."""
    with al.Loader(source(seaweed.endpoint_url), batch_size=32, concurrency=16) as loader:
        samples = [s for batch in loader for s in batch]
        assert samples == [body_of(i) for i in range(N_OBJECTS)]
        # A second epoch, in a new bridge loop: a new store for it.
        assert [s for batch in loader for s in batch] == samples


def test_source_pickles(seaweed: SeaweedFS) -> None:
    """DataLoader workers get the source by pickle (spawn): it must travel, also after it
    has been used here, and work there."""
    original = source(seaweed.endpoint_url)

    async def get(src: S3Source) -> bytes:
        try:
            return await src[3]
        finally:
            await src.aclose()

    assert anyio.run(get, original) == body_of(3)
    assert anyio.run(get, pickle.loads(pickle.dumps(original))) == body_of(3)


def test_torch_dataloader_spawned_workers(seaweed: SeaweedFS) -> None:
    """A spawned DataLoader worker makes its own store (one worker: spawning costs ~2 s)."""
    torch_data = pytest.importorskip("torch.utils.data")
    loader = al.Loader(source(seaweed.endpoint_url), batch_size=8, concurrency=8)
    dataloader = torch_data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    samples = [s for batch in dataloader for s in batch]
    assert samples == [body_of(i) for i in range(N_OBJECTS)]


def test_forked_child_gets_a_clear_error(seaweed: SeaweedFS) -> None:
    """obstore's runtime does not survive a fork: after a process has made requests, a
    child forked from it (a DataLoader worker under "fork") gets an error that says what to
    do, instead of requests that hang. Run in a fresh interpreter: forking pytest itself,
    threads and all, is not what is tested here."""
    code = (
        "import os, sys, anyio, asyncload as al\n"
        f"src = al.sources.S3Source({BUCKET!r}, ['obj/0001'], endpoint_url={seaweed.endpoint_url!r},"
        " anonymous=True)\n"
        "async def get():\n"
        "    return await src[0]\n"
        "assert anyio.run(get)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        anyio.run(get)\n"
        "    except RuntimeError as exc:\n"
        "        ok = \"multiprocessing_context='spawn'\" in str(exc)\n"
        "        os._exit(0 if ok else 3)\n"
        "    os._exit(2)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- errors --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_missing_key_is_file_not_found(seaweed: SeaweedFS) -> None:
    src = source(seaweed.endpoint_url, ["obj/0001", "no/such/key"])
    try:
        with pytest.raises(FileNotFoundError) as caught:
            await src[1]
        assert caught.value.filename == f"s3://{BUCKET}/no/such/key"
        assert "no/such/key" in str(caught.value)
        assert not is_transient(caught.value)
        assert all(SECRET not in t and KEY_ID not in t for t in error_texts(caught.value))
        assert SECRET not in repr(src)
    finally:
        await src.aclose()


@pytest.mark.anyio
async def test_missing_bucket_is_file_not_found(seaweed: SeaweedFS) -> None:
    src = S3Source("no-such-bucket", ["k"], endpoint_url=seaweed.endpoint_url, anonymous=True)
    try:
        with pytest.raises(FileNotFoundError, match="bucket does not exist"):
            await src[0]
    finally:
        await src.aclose()


@pytest.mark.anyio
async def test_listing_a_missing_bucket_is_file_not_found(seaweed: SeaweedFS) -> None:
    """A failed listing raises what a failed GET would, naming the bucket and prefix; the
    endpoint's password is in no message, the chained obstore errors' included."""
    endpoint = with_password(seaweed.endpoint_url)
    objects = S3Source.from_prefix("no-such-bucket", "x/", endpoint_url=endpoint, anonymous=True)
    try:
        with pytest.raises(FileNotFoundError, match="bucket does not exist") as caught:
            [key async for key in objects.list_keys()]
        assert caught.value.filename == "s3://no-such-bucket/x/"
        assert all(PASSWORD not in t for t in error_texts(caught.value))
        with pytest.raises(FileNotFoundError, match="bucket does not exist") as caught:
            [sample async for sample in objects]
        assert caught.value.filename == "s3://no-such-bucket/x/"
        assert not is_transient(caught.value)
        assert all(PASSWORD not in t for t in error_texts(caught.value))
    finally:
        await objects.aclose()
    loader = al.Loader(
        S3Source.from_prefix("no-such-bucket", "x/", endpoint_url=endpoint, anonymous=True),
        batch_size=2,
    )
    with pytest.raises(al.SampleError) as failed:
        await collect(loader)
    assert isinstance(failed.value.__cause__, FileNotFoundError)
    assert all(PASSWORD not in t for t in error_texts(failed.value))
    # A GET's error, chained obstore error included, has no password either.
    src = S3Source("no-such-bucket", ["k"], endpoint_url=endpoint, anonymous=True)
    try:
        with pytest.raises(FileNotFoundError) as caught:
            await src[0]
        assert all(PASSWORD not in t for t in error_texts(caught.value))
    finally:
        await src.aclose()


def test_cli_listing_error_names_no_password(seaweed: SeaweedFS) -> None:
    options = S3Options(endpoint_url=with_password(seaweed.endpoint_url), anonymous=True)
    with pytest.raises(NoSamplesError, match="bucket does not exist") as caught:
        resolve("s3://no-such-bucket/x/", urls_file=None, limit=10, s3=options)
    assert "s3://no-such-bucket/x/" in str(caught.value)
    assert all(PASSWORD not in t for t in error_texts(caught.value))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kind", "error"),
    [("slowdown", al.HTTPStatusError), ("reset", ConnectionError), ("forbidden", PermissionError)],
)
async def test_listing_fault_raises_the_right_error(
    seaweed: SeaweedFS, proxy: FaultProxy, kind: FaultKind, error: type[Exception]
) -> None:
    objects = stream(proxy.endpoint_url, "obj/")
    try:
        for listing in (objects.list_keys, objects.__aiter__):
            proxy.fail(LIST, kind)
            with pytest.raises(error) as caught:
                async for _ in listing():
                    pass
            assert f"s3://{BUCKET}/obj/" in str(caught.value)
            assert is_transient(caught.value) == (kind != "forbidden")
            assert all(SECRET not in t for t in error_texts(caught.value))
    finally:
        await objects.aclose()


@pytest.mark.anyio
async def test_missing_key_through_the_loader(seaweed: SeaweedFS) -> None:
    keys = [*OBJECT_KEYS[:20], "no/such/key", *OBJECT_KEYS[20:30]]
    loader = al.Loader(source(seaweed.endpoint_url, keys), batch_size=8, concurrency=8)
    got: list[Any] = []
    with pytest.raises(al.SampleError) as caught:
        async for batch in loader:
            got.append(batch)
    await loader.aclose()
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert caught.value.key == "no/such/key"
    assert caught.value.index == 20
    assert [s for b in got for s in b] == [body_of(i) for i in range(16)]
    assert all(SECRET not in t for t in error_texts(caught.value))


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["slowdown", "reset", "internal", "stall"])
async def test_listing_fault_with_retry_lists_every_key_once(
    seaweed: SeaweedFS, proxy: FaultProxy, kind: FaultKind
) -> None:
    """A listing request that fails after the first page: with ``retry``, the listing goes
    on from the key after the last one received, and every key comes exactly once."""
    objects = stream(
        proxy.endpoint_url,
        "listing/",
        in_flight=4,
        page_size=100,
        retry=no_wait_retry(3),
        timeout=STALL_TIMEOUT,
    )
    try:
        keys, bodies = LISTED_KEYS, [k.encode() for k in LISTED_KEYS]
        listings: list[tuple[Callable[[], AsyncIterator[Any]], list[Any]]] = [
            (objects.list_keys, keys),
            (objects.__aiter__, bodies),
        ]
        for listing, expected in listings:
            proxy.clear()
            iterator = listing()
            first = await iterator.__anext__()  # one listing request: the first page
            proxy.fail(LIST, kind)  # the next one (the second page) fails
            assert [first, *[item async for item in iterator]] == expected
            # 1,100 keys: two listing requests of at most 1,000 keys (page_size sets how
            # many each chunk of the listing hands over), the second one asked twice.
            assert proxy.count(LIST) == 3
            proxy.release_stalled()
    finally:
        await objects.aclose()


@pytest.mark.anyio
async def test_listing_requests_hold_one_of_max_connections(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    """With max_connections=1, no GET reaches the store while a listing request is out."""
    objects = stream(proxy.endpoint_url, "listing/", in_flight=4, max_connections=1)
    iterator = objects.__aiter__()
    got: list[bytes] = []

    async def drain() -> None:
        got.extend([body async for body in iterator])

    try:
        got.append(await iterator.__anext__())  # the first listing page is in
        proxy.fail(LIST, "stall")  # the second one stalls, once it is asked for
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await anyio.to_thread.run_sync(proxy.wait_stalled, 1)
            requests = proxy.total
            # A bounded wait for what must not happen: a GET sent meanwhile.
            await anyio.sleep(STALL_TIMEOUT)
            assert proxy.total == requests
            proxy.release_stalled()
        assert got == [k.encode() for k in LISTED_KEYS]
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]
        await objects.aclose()


@pytest.mark.anyio
async def test_listing_retry_gives_up_on_a_permanent_error(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    objects = stream(proxy.endpoint_url, "listing/", retry=no_wait_retry(3))
    try:
        proxy.fail(LIST, "forbidden")
        with pytest.raises(PermissionError):
            async for _ in objects.list_keys():
                pass
        assert proxy.count(LIST) == 1
        proxy.fail(LIST, "slowdown", times=3)  # as many as the attempts: the last one raises
        with pytest.raises(al.HTTPStatusError):
            async for _ in objects.list_keys():
                pass
        assert proxy.count(LIST) == 4
    finally:
        await objects.aclose()


@pytest.mark.anyio
async def test_missing_key_is_not_retried(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    loader = al.Loader(
        source(proxy.endpoint_url, ["no/such/key"]), batch_size=None, retry=no_wait_retry(5)
    )
    with pytest.raises(al.SampleError) as caught:
        await collect(loader)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert proxy.count("no/such/key") == 1


@pytest.mark.anyio
async def test_object_over_the_size_limit_is_refused(seaweed: SeaweedFS) -> None:
    src = source(seaweed.endpoint_url, [BIG_KEY, obj_key(1)], max_object_bytes=BIG_SIZE - 1)
    try:
        with pytest.raises(ValueError, match="max_object_bytes") as caught:
            await src[0]
        assert BIG_KEY in str(caught.value)
        assert not is_transient(caught.value)
        assert await src[1] == body_of(1)  # smaller objects still pass
    finally:
        await src.aclose()
    exact = source(seaweed.endpoint_url, [BIG_KEY], max_object_bytes=BIG_SIZE)
    try:
        assert len(await exact[0]) == BIG_SIZE
    finally:
        await exact.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_gets_a_clear_error(anyio_backend: str, seaweed: SeaweedFS) -> None:
    src = source(seaweed.endpoint_url)
    with pytest.raises(RuntimeError, match="asyncio"):
        await src[0]
    with pytest.raises(RuntimeError, match="asyncio"):
        await src.getitems([0, 1])
    with pytest.raises(RuntimeError, match="asyncio"):
        async for _ in stream(seaweed.endpoint_url, "obj/"):
            pass
    await src.aclose()  # a no-op on trio, not an error


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="keys"):
        S3Source(BUCKET, "obj/0001")
    with pytest.raises(ValueError, match="bucket"):
        S3Source("a/b", ["k"])
    with pytest.raises(ValueError, match="endpoint_url"):
        S3Source(BUCKET, ["k"], endpoint_url="ftp://host")
    with pytest.raises(ValueError, match="secret_access_key"):
        S3Source(BUCKET, ["k"], access_key_id="x")
    with pytest.raises(ValueError, match="anonymous"):
        S3Source(BUCKET, ["k"], anonymous=True, access_key_id="x", secret_access_key="y")
    with pytest.raises(ValueError, match="max_object_bytes"):
        S3Source(BUCKET, ["k"], max_object_bytes=0)
    with pytest.raises(ValueError, match="max_connections"):
        S3Source(BUCKET, ["k"], max_connections=0)
    with pytest.raises(ValueError, match="key '' must be a non-empty string"):
        S3Source(BUCKET, ["k", ""])
    with pytest.raises(ValueError, match="not both"):
        S3Source(BUCKET, ["k"], access_key_id="x", secret_access_key="y", credential_provider=dict)
    with pytest.raises(ValueError, match="in_flight"):
        S3Source.from_prefix(BUCKET, "p/", in_flight=0)
    with pytest.raises(ValueError, match="timeout"):
        S3Source.from_prefix(BUCKET, "p/", timeout=0)


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("https://", "has no host"),
        ("http://:8333", "has no host"),
        ("http://host:99999", "Port out of range"),
        ("http://host:abc", "not a valid URL"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://my host:8333", "spaces"),
        ("http://host:", "empty or zero port"),
        ("http://host:8333/?x=1", "query string"),
    ],
)
def test_a_malformed_endpoint_is_refused_when_made(endpoint: str, problem: str) -> None:
    """Every one of these reached obstore, whose first request then panicked (RustPanic,
    "unknown error") instead of naming the argument."""
    with pytest.raises(ValueError, match=f"endpoint_url .*{re.escape(problem)}"):
        S3Source(BUCKET, ["k"], endpoint_url=endpoint)
    with pytest.raises(ValueError, match="endpoint_url"):
        S3Source.from_prefix(BUCKET, "p/", endpoint_url=endpoint)


def test_an_endpoint_with_a_password_is_refused_without_showing_it() -> None:
    with pytest.raises(ValueError, match="endpoint_url") as caught:
        S3Source(BUCKET, ["k"], endpoint_url=f"http://user:{SECRET}@:8333")
    assert SECRET not in str(caught.value)


def test_import_asyncload_does_not_import_obstore() -> None:
    code = (
        "import sys\n"
        "sys.modules['obstore'] = None  # as if it were not installed\n"
        "import anyio, asyncload as al\n"
        "src = al.sources.S3Source('bucket', ['k'], endpoint_url='http://127.0.0.1:9')\n"
        "async def main():\n"
        "    try:\n"
        "        await src[0]\n"
        "    except ImportError as exc:\n"
        "        assert 'asyncload[s3]' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
        "anyio.run(main)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    code = "import sys, asyncload; assert 'obstore' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- from_prefix: a lazy stream --------------------------------------------------------------


@pytest.mark.anyio
async def test_from_prefix_streams_in_listing_order(seaweed: SeaweedFS) -> None:
    objects = stream(seaweed.endpoint_url, "obj/", in_flight=8, page_size=20)
    try:
        assert [s async for s in objects] == [body_of(i) for i in range(N_OBJECTS)]
        # A prefix that ends inside a path segment: obj/001* is obj/0010 .. obj/0019.
        partial = stream(seaweed.endpoint_url, "obj/001")
        assert [k async for k in partial.list_keys()] == [obj_key(i) for i in range(10, 20)]
        assert [s async for s in partial] == [body_of(i) for i in range(10, 20)]
        assert [s async for s in stream(seaweed.endpoint_url, "nothing/here/")] == []
    finally:
        await objects.aclose()


@pytest.mark.anyio
async def test_from_prefix_through_the_loader(seaweed: SeaweedFS) -> None:
    loader = al.Loader(stream(seaweed.endpoint_url, "obj/"), batch_size=16)
    batches = await collect(loader)
    assert [s for b in batches for s in b] == [body_of(i) for i in range(N_OBJECTS)]


@pytest.mark.anyio
async def test_from_prefix_is_lazy(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    """The first sample comes after one listing request, although the prefix holds more
    keys than one listing page; the rest of the listing is read as the stream goes."""
    objects = stream(proxy.endpoint_url, "listing/", in_flight=4, page_size=100)
    iterator = objects.__aiter__()
    try:
        assert await iterator.__anext__() == LISTED_KEYS[0].encode()
        assert await iterator.__anext__() == LISTED_KEYS[1].encode()
        assert proxy.count(LIST) == 1
    finally:
        await iterator.aclose()  # type: ignore[attr-defined]
        await objects.aclose()
    proxy.clear()
    keys = objects.list_keys()
    assert await keys.__anext__() == LISTED_KEYS[0]
    assert proxy.count(LIST) == 1
    assert [LISTED_KEYS[0]] + [k async for k in keys] == LISTED_KEYS
    assert proxy.count(LIST) == 2  # 1,100 keys: two pages of at most 1,000


@pytest.mark.anyio
async def test_loader_first_batch_after_one_listing_page(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    loader = al.Loader(stream(proxy.endpoint_url, "listing/", in_flight=8), batch_size=4)
    iterator = loader.__aiter__()
    try:
        assert await iterator.__anext__() == [k.encode() for k in LISTED_KEYS[:4]]
        assert proxy.count(LIST) == 1
    finally:
        await iterator.aclose()
        await loader.aclose()


@pytest.mark.anyio
async def test_from_prefix_skips_folder_markers(marked: SeaweedFS) -> None:
    """obstore lists "marked/a/" as "marked/a", a key that a GET does not find: such
    markers are no samples, and the listing goes on; a real empty object is one."""
    objects = stream(marked.endpoint_url, "marked/")
    try:
        assert [k async for k in objects.list_keys()] == list(MARKED_SAMPLES)
        assert [s async for s in objects] == list(MARKED_SAMPLES.values())
        only_markers = stream(marked.endpoint_url, "marked/b")
        assert [k async for k in only_markers.list_keys()] == []
        assert [s async for s in only_markers] == []
    finally:
        await objects.aclose()
    got = []
    for rank in range(2):
        loader = al.Loader(
            stream(marked.endpoint_url, "marked/"), batch_size=None, rank=rank, world_size=2
        )
        got += await collect(loader)
    assert sorted(got) == sorted(MARKED_SAMPLES.values())


def test_a_markers_twin_is_spotted_in_listing_order() -> None:
    """What obstore lists for the keys k, k-a, k/ (a marker), k/x, k0, l/ (a marker with no
    object beside it): k twice, the second time with size 0. (Not through SeaweedFS: a
    filer, it refuses a marker k/ beside an object k with 409 Conflict; S3 keeps both.)"""
    listed = [("k", 5), ("k-a", 1), ("k", 0), ("k/x", 2), ("k0", 0), ("l", 0), ("m", 3)]
    twins = _MarkerTwins()
    assert [twins.repeated(key, size) for key, size in listed] == [
        False,
        False,
        True,
        False,
        False,
        False,
        False,
    ]
    empty = _MarkerTwins()  # an empty object k beside the marker k/
    assert [empty.repeated(key, 0) for key in ("k", "k.a", "k", "k/a")] == [
        False,
        False,
        True,
        False,
    ]


class FakeListing:
    """obstore's listing of ``TRUE_KEYS`` after ``after`` (S3 compares true keys), two
    metas a chunk, a folder marker's path without its "/"; the listing made first fails
    after its second chunk, as a connection reset would."""

    TRUE_KEYS = ("p/a", "p/k", "p/k-a", "p/k/", "p/k/x", "p/z")
    made = 0

    def __init__(self, after: str | None) -> None:
        keys = [k for k in self.TRUE_KEYS if after is None or k > after]
        metas = [{"path": k.rstrip("/"), "size": 0 if k.endswith("/") else 1} for k in keys]
        self.chunks = [metas[i : i + 2] for i in range(0, len(metas), 2)]
        self.fails = FakeListing.made == 0
        FakeListing.made += 1

    async def __anext__(self) -> list[dict[str, Any]]:
        if self.fails and len(self.chunks) < 2:
            raise ConnectionResetError("reset")
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


@pytest.mark.anyio
@asyncio_only
async def test_a_retried_listing_goes_on_after_the_greatest_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing failed after a chunk ending with the marker p/k/ (listed as p/k): it
    goes on after p/k-a, the greatest key received, not after p/k, which would list p/k-a
    again; the marker listed again is a twin."""
    objects = stream("http://127.0.0.1:9", "p/", retry=no_wait_retry(2))
    FakeListing.made = 0
    monkeypatch.setattr(objects, "_listing", lambda store, after=None: FakeListing(after))
    next_page = objects._pages(None)
    twins = _MarkerTwins()
    listed = []
    while True:
        try:
            page = await next_page()
        except StopAsyncIteration:
            break
        listed += [m["path"] for m in page if not twins.repeated(m["path"], m["size"])]
    assert FakeListing.made == 2
    assert listed == ["p/a", "p/k", "p/k-a", "p/k/x", "p/z"]


def test_cli_lists_no_folder_markers(marked: SeaweedFS) -> None:
    options = S3Options(endpoint_url=marked.endpoint_url, anonymous=True)
    spec = resolve(f"s3://{BUCKET}/marked/", urls_file=None, limit=10, s3=options)
    assert spec.keys == list(MARKED_SAMPLES)


# -- faults, through the proxy --------------------------------------------------------------

FAULTED = [3, 17, 40]  # indices of the objects whose first request fails


def expected_error(kind: FaultKind) -> type[BaseException]:
    return {
        "slowdown": al.HTTPStatusError,
        "internal": al.HTTPStatusError,
        "reset": ConnectionError,
        "stall": TimeoutError,
        "truncate": al.TruncatedBodyError,
        "forbidden": PermissionError,
    }[kind]


TRANSIENT = [k for k in FAULTS if k != "forbidden"]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", FAULTS)
async def test_fault_without_retry_raises_the_right_error(
    seaweed: SeaweedFS, proxy: FaultProxy, kind: FaultKind
) -> None:
    src = source(proxy.endpoint_url)
    proxy.fail(obj_key(3), kind)
    try:
        with pytest.raises(expected_error(kind)) as caught:
            if kind == "stall":
                with anyio.fail_after(STALL_TIMEOUT):
                    await src[3]
            else:
                await src[3]
        assert is_transient(caught.value) == (kind != "forbidden")
        assert all(SECRET not in t for t in error_texts(caught.value))
        if kind in ("slowdown", "internal"):
            assert isinstance(caught.value, al.HTTPStatusError)
            assert caught.value.status == (503 if kind == "slowdown" else 500)
            assert ("SlowDown" if kind == "slowdown" else "InternalError") in str(caught.value)
        assert await src[3] == body_of(3)  # the fault was for one request only
        assert proxy.count(obj_key(3)) == 2
    finally:
        await src.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", TRANSIENT)
async def test_fault_with_retry_every_sample_arrives(
    seaweed: SeaweedFS, proxy: FaultProxy, kind: FaultKind
) -> None:
    faulted = FAULTED[:2] if kind == "stall" else FAULTED  # each stall costs a timeout
    for i in faulted:
        proxy.fail(obj_key(i), kind)
    loader = al.Loader(
        source(proxy.endpoint_url),
        batch_size=16,
        concurrency=16,
        retry=no_wait_retry(5),
        timeout=STALL_TIMEOUT if kind == "stall" else None,
    )
    batches = await collect(loader)
    assert [s for b in batches for s in b] == [body_of(i) for i in range(N_OBJECTS)]
    assert proxy.faults_served(kind) == len(faulted)
    for i in faulted:
        assert proxy.count(obj_key(i)) >= 2


@pytest.mark.anyio
async def test_every_fifth_request_fails(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    proxy.fail_every(5, "internal")
    # With 16 in flight, which request a retry is counts as chance: each attempt fails with
    # a chance of about 1 in 5, so 5 attempts left a sample failing in a few runs in 100
    # (seen in CI). 20 attempts: about 1 in 10^12.
    loader = al.Loader(
        source(proxy.endpoint_url), batch_size=16, concurrency=16, retry=no_wait_retry(20)
    )
    batches = await collect(loader)
    assert [s for b in batches for s in b] == [body_of(i) for i in range(N_OBJECTS)]
    served = proxy.faults_served("internal")
    assert served >= N_OBJECTS // 5
    assert proxy.total == N_OBJECTS + served
    assert loader.statistics()["retries"] == served


@pytest.mark.anyio
async def test_slowdown_lowers_the_loader_throttle(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    """S3's 503 SlowDown reaches the Loader as a throttling answer (HTTPStatusError 503)."""
    proxy.fail(obj_key(0), "slowdown")
    loader = al.Loader(source(proxy.endpoint_url), batch_size=16, retry=no_wait_retry())
    await collect(loader)
    stats = loader.statistics()
    assert stats["throttled"] == 1
    assert stats["throttle_decreases"] == 1


@pytest.mark.anyio
async def test_slowdown_with_retry_after(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    """obstore does not expose Retry-After: Retry backs off by its own schedule."""
    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        await anyio.lowlevel.checkpoint()

    proxy.fail(obj_key(2), "slowdown", times=2, retry_after=3600)
    retry = al.Retry(attempts=4, initial_delay=0.01, max_delay=0.05, sleep=fake_sleep)
    loader = al.Loader(
        source(proxy.endpoint_url, OBJECT_KEYS[:8]), batch_size=None, concurrency=1, retry=retry
    )
    assert await collect(loader) == [body_of(i) for i in range(8)]
    assert proxy.count(obj_key(2)) == 3
    assert len(delays) == 2 and all(d <= 0.05 for d in delays)
    assert loader.statistics()["retries"] == 2


@pytest.mark.anyio
async def test_forbidden_is_permanent(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    proxy.fail(obj_key(1), "forbidden", times=10)
    loader = al.Loader(
        source(proxy.endpoint_url, OBJECT_KEYS[:4]), batch_size=None, retry=no_wait_retry(5)
    )
    with pytest.raises(al.SampleError) as caught:
        await collect(loader)
    assert isinstance(caught.value.__cause__, PermissionError)
    assert caught.value.key == obj_key(1)
    assert proxy.count(obj_key(1)) == 1  # a 403 is not retried


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["slowdown", "reset", "truncate", "forbidden"])
async def test_is_transient_on_raw_obstore_errors(
    seaweed: SeaweedFS, proxy: FaultProxy, kind: FaultKind
) -> None:
    """Users of obstore itself get the same classification from is_transient."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        endpoint=proxy.endpoint_url,
        region="us-east-1",
        skip_signature=True,
        client_options={"allow_http": True},
        retry_config={"max_retries": 0},
    )
    proxy.fail(obj_key(4), kind)
    with pytest.raises(Exception) as caught:
        result = await obstore.get_async(store, obj_key(4))
        await result.bytes_async()
    assert type(caught.value).__module__.startswith("obstore")
    assert is_transient(caught.value) == (kind != "forbidden")
    with pytest.raises(FileNotFoundError) as missing:
        await obstore.get_async(store, "no/such/key")
    assert not is_transient(missing.value)


@pytest.mark.anyio
async def test_breaker_bounds_requests_to_a_down_store(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    proxy.set_down()
    breaker = al.CircuitBreaker(failure_threshold=3, recovery_timeout=3600)
    concurrency = 8
    loader = al.Loader(
        source(proxy.endpoint_url),
        batch_size=8,
        concurrency=concurrency,
        breaker=breaker,
        on_error="skip",
    )
    assert await collect(loader) == []
    # The failures that open it, plus at most the requests already in flight then.
    assert 3 <= proxy.total <= 3 + concurrency - 1
    assert breaker.state == "open"
    stats = loader.statistics()
    assert stats["skipped"] == N_OBJECTS


@pytest.mark.anyio
async def test_max_connections_bounds_requests_in_flight(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    for i in range(6):
        proxy.fail(obj_key(i), "stall")
    src = source(proxy.endpoint_url, max_connections=2)
    got: list[bytes] = []

    async def fetch() -> None:
        got.extend(await src.getitems(range(6)))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch)
            await anyio.to_thread.run_sync(proxy.wait_stalled, 2)
            # The other four wait for a connection: none of them has been sent.
            assert proxy.total == 2
            proxy.release_stalled()
            await anyio.to_thread.run_sync(proxy.wait_stalled, 2)
            assert proxy.total == 4
            proxy.release_stalled()
            await anyio.to_thread.run_sync(proxy.wait_stalled, 2)
            proxy.release_stalled()
        assert got == [body_of(i) for i in range(6)]
        assert proxy.total == 6
    finally:
        await src.aclose()


@pytest.mark.anyio
async def test_max_connections_counts_open_chunk_streams(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    """An iter_chunks stream holds its connection until it is closed, read or not: with
    max_connections=1, a second stream's GET waits for the first stream to close."""
    src = source(proxy.endpoint_url, max_connections=1)
    first = src.iter_chunks(BIG_KEY, 4096)
    second: list[bytes] = []

    async def read_second() -> None:
        chunks = src.iter_chunks(obj_key(1))
        try:
            async for chunk in chunks:
                second.append(chunk)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    try:
        assert await first.__anext__()  # open, part read
        proxy.fail(obj_key(1), "stall")
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_second)
            # A bounded wait for what must not happen: the second GET reaching the store.
            with pytest.raises(AssertionError, match="stalled"):
                await anyio.to_thread.run_sync(proxy.wait_stalled, 1, STALL_TIMEOUT)
            assert proxy.count(obj_key(1)) == 0
            await first.aclose()  # type: ignore[attr-defined]
            await anyio.to_thread.run_sync(proxy.wait_stalled, 1)  # now it is sent
            proxy.release_stalled()
        assert b"".join(second) == body_of(1)
    finally:
        await first.aclose()  # type: ignore[attr-defined]
        await src.aclose()


@pytest.mark.anyio
async def test_stream_with_retry_recovers(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    kinds: tuple[FaultKind, ...] = ("slowdown", "reset", "truncate")
    for i, kind in zip(FAULTED, kinds, strict=True):
        proxy.fail(obj_key(i), kind)
    proxy.fail(obj_key(60), "stall")
    objects = stream(
        proxy.endpoint_url, "obj/", in_flight=8, retry=no_wait_retry(5), timeout=STALL_TIMEOUT
    )
    loader = al.Loader(objects, batch_size=16)
    batches = await collect(loader)
    assert [s for b in batches for s in b] == [body_of(i) for i in range(N_OBJECTS)]
    for i in [*FAULTED, 60]:
        assert proxy.count(obj_key(i)) >= 2


@pytest.mark.anyio
async def test_stream_without_retry_fails_the_epoch(seaweed: SeaweedFS, proxy: FaultProxy) -> None:
    proxy.fail(obj_key(5), "slowdown")
    loader = al.Loader(stream(proxy.endpoint_url, "obj/", in_flight=4), batch_size=4)
    got: list[Any] = []
    with pytest.raises(al.SampleError) as caught:
        async for batch in loader:
            got.append(batch)
    await loader.aclose()
    assert isinstance(caught.value.__cause__, al.HTTPStatusError)
    assert is_transient(caught.value.__cause__)
    assert [s for b in got for s in b] == [body_of(i) for i in range(4)]


@pytest.mark.parametrize(
    ("message", "facts", "transient"),
    [
        ("Server returned non-2xx status code: 503 Service Unavailable: busy", (503, None), True),
        ("Server returned non-2xx status code: 500 Internal Server Error", (500, None), True),
        ("inner: Status {\n    status: 429,\n    body: None }", (429, None), True),
        (
            "Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>",
            (400, None),
            True,
        ),
        (
            "Server returned non-2xx status code: 403 Forbidden: <Code>AccessDenied</Code>",
            (403, None),
            False,
        ),
        (
            "HTTP error: error sending request\nHttpError {\n    kind: Connect, source: x }",
            (None, "Connect"),
            True,
        ),
        ("HttpError {\n    kind: Timeout,\n source: TimedOut }", (None, "Timeout"), True),
        (
            "HttpError {\n    kind: Interrupted,\n source: IncompleteBody }",
            (None, "Interrupted"),
            True,
        ),
        ("HttpError {\n    kind: Decode,\n source: bad xml }", (None, "Decode"), False),
        ("something else entirely", (None, None), False),
    ],
)
def test_obstore_error_classification(
    message: str, facts: tuple[int | None, str | None], transient: bool
) -> None:
    """is_transient reads obstore's errors, which carry their status and failure kind only
    in their message (the Rust error's Debug form)."""
    from obstore.exceptions import GenericError

    from asyncload.resilience.classify import obstore_error_facts

    error = GenericError(message)
    assert obstore_error_facts(error) == facts
    assert is_transient(error) == transient


# -- tar shards from S3 ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_tar_shards_from_s3(seaweed: SeaweedFS) -> None:
    """TarShardSource streams ``s3://`` shards through S3Source.iter_chunks: every sample
    once, in order, with small chunks so that members straddle chunk boundaries."""
    import io
    import tarfile

    shards = {}
    for shard in range(3):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i in range(4):
                data = body_of(shard * 10 + i) * 50
                info = tarfile.TarInfo(f"s{shard}/{i:03d}.bin")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards[f"tars/shard-{shard}.tar"] = buffer.getvalue()
    seaweed.put_objects(BUCKET, shards, concurrency=3)
    tar_source = al.sources.TarShardSource(
        [f"s3://{BUCKET}/{key}" for key in shards],
        chunk_size=4096,
        s3_options={
            "endpoint_url": seaweed.endpoint_url,
            "access_key_id": KEY_ID,
            "secret_access_key": SECRET,
        },
    )
    got = await collect(al.Loader(tar_source, batch_size=None))
    assert [s["__key__"] for s in got] == [f"s{j}/{i:03d}" for j in range(3) for i in range(4)]
    assert [s["bin"] for s in got] == [body_of(j * 10 + i) * 50 for j in range(3) for i in range(4)]


@pytest.mark.anyio
async def test_tar_shards_from_s3_within_max_connections(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    """max_connections=1 with prefetch_shards=4 finishes: a shard read ahead, its buffer
    full, holds its connection, so it must not take the one connection that the shard
    being consumed needs, here to be opened again after it was cut off."""
    n_samples = 100  # more than a prefetch reader's buffer
    shards = {
        f"tars-limited/shard-{shard}.tar": tar_bytes(
            {f"s{shard}/{i:03d}.bin": body_of(i)[:100] + bytes([shard]) for i in range(n_samples)}
        )
        for shard in range(4)
    }
    seaweed.put_objects(BUCKET, shards, concurrency=4)
    proxy.fail("tars-limited/shard-0.tar", "truncate")
    tar_source = al.sources.TarShardSource(
        [f"s3://{BUCKET}/{key}" for key in shards],
        prefetch_shards=4,
        chunk_size=4096,
        s3_options={
            "endpoint_url": proxy.endpoint_url,
            "access_key_id": KEY_ID,
            "secret_access_key": SECRET,
            "max_connections": 1,
        },
    )
    loader = al.Loader(tar_source, batch_size=None, retry=no_wait_retry())
    with anyio.fail_after(60):  # a deadlock fails here rather than hanging the run
        got = await collect(loader)
    assert [s["__key__"] for s in got] == [
        f"s{shard}/{i:03d}" for shard in range(4) for i in range(n_samples)
    ]
    assert proxy.count("tars-limited/shard-0.tar") == 2


@pytest.mark.anyio
async def test_prefix_stream_ranks_fetch_only_their_share(
    seaweed: SeaweedFS, proxy: FaultProxy
) -> None:
    """Two ranks over a prefix: each GETs only its own objects; together, all of them."""
    got = []
    for rank in range(2):
        loader = al.Loader(
            stream(proxy.endpoint_url, "obj/"), batch_size=None, rank=rank, world_size=2
        )
        got.append(await collect(loader))
    assert sorted(got[0] + got[1]) == sorted(body_of(i) for i in range(N_OBJECTS))
    assert not set(got[0]) & set(got[1])
    # One GET per object, not one per object per rank.
    assert sum(proxy.count(key) for key in OBJECT_KEYS) == N_OBJECTS


def test_cache_keys_name_the_store_and_bucket_without_credentials() -> None:
    # Two buckets (or two stores) with the same object keys must never share an entry
    # of a cache; a key that DiskCache writes to disk must carry no password.
    from asyncload.cache import cache_key

    def key(bucket: str, endpoint_url: str | None) -> Any:
        return cache_key(S3Source(bucket, ["a/1"], endpoint_url=endpoint_url), 0)

    local = "http://bob:s3cret@127.0.0.1:8333"
    keys = {key("one", local), key("two", local), key("one", None), key("one", "http://[::1]:8333")}
    assert len(keys) == 4
    assert key("one", local) == key("one", "http://127.0.0.1:8333/")
    assert "s3cret" not in repr(keys)
