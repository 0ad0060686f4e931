"""The public contract read literally (found by helper-54): credentials kept out of a
concat view's errors, a stream sample's key in a transform's error, retry= and breaker=
swapped, numpy integer limits, botocore 5xx answers without an S3 error code."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from test_statistics_and_verdicts import Numbers

import asyncload as al
from asyncload.datasets import normalize_index

pytestmark = pytest.mark.anyio


async def collect(loader: al.Loader) -> list[Any]:
    async with loader:
        return [x async for x in loader]


class SecretURLs(al.AsyncDataset[bytes]):
    """Keys are URLs with credentials and a signed query string (a presigned S3 URL, an
    HTTPSource URL with user:password@); every fetch fails with a 404."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def key_of(self, index: int) -> str:
        i = normalize_index(index, self.n)
        return f"https://user:hunter2@store.example/obj-{i}?X-Amz-Signature=SECRET"

    async def __getitem__(self, index: int) -> bytes:
        await anyio.lowlevel.checkpoint()
        raise al.HTTPStatusError(404, "https://store.example/obj?...")


# -- secrets in messages ---------------------------------------------------------------------


async def test_concat_of_url_sources_keeps_credentials_out_of_errors_and_statistics() -> None:
    """docs/resilience.md: "Error messages, logs and statistics() never contain credentials
    or query strings"; docs/api.md: SampleError's "message names the sample (keys
    redacted)", error_log's "key" is redacted. A single source is redacted, but
    ``ds1 + ds2`` keys its samples ``(part, url)`` and the tuple passes ``redact_key``
    untouched: the password and the signature land in the SampleError message and in
    statistics()["error_log"] (same with two real HTTPSources)."""
    both = SecretURLs(1) + SecretURLs(1)

    skipping = al.Loader(both, batch_size=None, on_error="skip")
    assert await collect(skipping) == []
    log = skipping.statistics()["error_log"]
    assert len(log) == 2
    assert "hunter2" not in repr(log) and "SECRET" not in repr(log)

    with pytest.raises(al.SampleError) as info:
        await collect(al.Loader(both, batch_size=None))
    assert "hunter2" not in str(info.value) and "SECRET" not in str(info.value)


# -- a stream sample's key -------------------------------------------------------------------


def write_shard(path: Path, samples: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            data = str(i).encode()
            info = tarfile.TarInfo(f"s{i:03d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def fail_on_two(sample: dict[str, Any]) -> dict[str, Any]:
    if sample["txt"] == b"2":
        raise ValueError("bad sample")
    return sample


async def test_stream_sample_failing_in_transform_carries_its_key(tmp_path: Path) -> None:
    """api.md: a failed sample raises SampleError "with .index (and .key where the dataset
    has keys)". A tar sample has a key (``__key__``) and a failure in ``ds.map(fn)``
    reports it, but the same function as the Loader's ``transform`` (or a ``validate``
    that rejects the sample) gives ``key=None``: the stream worker hands
    ``Fetcher.finish`` only the position, and ``_key`` asks the stream for a ``key_of`` it
    does not have."""
    shard = write_shard(tmp_path / "a.tar", 4)

    with pytest.raises(al.SampleError) as by_view:
        await collect(al.Loader(al.sources.TarShardSource([shard]).map(fail_on_two)))
    assert by_view.value.key == "s002"  # passes: the view keeps the key

    with pytest.raises(al.SampleError) as by_transform:
        await collect(al.Loader(al.sources.TarShardSource([shard]), transform=fail_on_two))
    assert by_transform.value.index == 2
    assert by_transform.value.key == "s002"
    assert "s002" in str(by_transform.value)


# -- bad arguments at construction -----------------------------------------------------------


def test_a_breaker_given_as_retry_is_refused_at_construction() -> None:
    """api.md: bad arguments raise ValueError or TypeError at construction, naming the
    argument; the Loader means to ("retry must be an asyncload retry object"). It checks
    only for a ``run`` method, which a CircuitBreaker has too: ``retry=breaker`` (the two
    keywords swapped) is accepted, then every fetch fails with "run() got an unexpected
    keyword argument 'on_retry'"; under on_error="skip" the epoch silently yields
    nothing."""
    with pytest.raises(TypeError, match="retry"):
        al.Loader(Numbers(4), batch_size=None, retry=al.CircuitBreaker(), on_error="skip")
    with pytest.raises(TypeError, match="breaker"):
        al.Loader(Numbers(4), breaker=al.Retry())


def test_lru_cache_takes_numpy_integer_limits() -> None:
    """``LRUCache(max_bytes=...)`` refuses a numpy integer (``np.prod(shape) * n``, the
    usual way to size it) with TypeError "must be an int or None, not int64", where the
    Loader, Retry and CircuitBreaker take numpy integers as ints."""
    rows = np.int64(1000)
    cache = al.LRUCache(max_items=rows, max_bytes=np.prod((3, 32, 32)) * rows)
    assert cache.max_items == 1000 and cache.max_bytes == 3 * 32 * 32 * 1000
    assert type(cache.max_items) is int
    # The same for from_torch's threads.
    assert al.from_torch([1, 2], max_threads=np.int64(2)).max_threads == 2


# -- what the default Retry calls transient ---------------------------------------------------


def boto_error(status: int, body: bytes) -> Exception:
    """The ClientError botocore raises for an S3 GetObject answered ``status`` with ``body``
    (parsed by botocore's own S3 parser, as aiobotocore and boto3 do)."""
    botocore_session = pytest.importorskip("botocore.session")
    from botocore.exceptions import ClientError
    from botocore.parsers import RestXMLParser

    operation = botocore_session.get_session().get_service_model("s3").operation_model("GetObject")
    parsed = RestXMLParser().parse(
        {"status_code": status, "headers": {}, "body": body}, operation.output_shape
    )
    return ClientError(parsed, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "body"),
    [(503, b""), (502, b"<html><body>502 Bad Gateway</body></html>")],
)
def test_default_retry_retries_a_botocore_5xx_without_an_s3_error_code(
    status: int, body: bytes
) -> None:
    """api.md: Retry's default "retries transient I/O errors (connection errors, timeouts,
    HTTP 429/5xx, truncated bodies)", and a breaker counts them. For a 5xx whose body is
    empty (any HEAD, a load balancer's answer) or not S3's XML (a proxy's HTML page),
    botocore's ClientError has Code "503"/"502"/... and Message "Service Unavailable":
    no S3 code the classifier knows, and its HTTP status (in
    ``response["ResponseMetadata"]["HTTPStatusCode"]``) is never read. So a custom dataset
    on aiobotocore/boto3 gets no retry for a 503 and its breaker never trips."""
    error = boto_error(status, body)
    calls = 0
    slept: list[float] = []

    async def get_object() -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        return b"data"

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    assert anyio.run(al.Retry(sleep=sleep).call, get_object) == b"data"
    assert calls == 2 and len(slept) == 1


def test_options_a_stream_would_ignore_are_refused() -> None:
    """A breaker or a cache given for a stream did nothing, silently: a stream is read by
    shard or page, not fetched by index."""

    class Stream(al.AsyncIterableDataset[int]):
        async def __aiter__(self) -> Any:
            yield 1

    with pytest.raises(ValueError, match="breaker="):
        al.Loader(Stream(), breaker=al.CircuitBreaker())
    with pytest.raises(ValueError, match="cache="):
        al.Loader(Stream(), cache=al.LRUCache(max_items=4))


def test_world_size_without_rank_is_refused() -> None:
    """Without torch.distributed, Loader(world_size=4) made every process rank 0: each got
    the same quarter of the data, and three quarters were never read."""
    with pytest.raises(ValueError, match=r"world_size=4 needs rank="):
        al.Loader(Numbers(8), world_size=4)
    assert al.Loader(Numbers(8), world_size=4, rank=3).rank == 3
    assert al.Loader(Numbers(8), world_size=1).rank == 0


def test_to_torch_loader_takes_batch_size_none() -> None:
    """batch_size=None is what it passes DataLoader itself; it was refused as batch_size=."""
    pytest.importorskip("torch")
    loader = al.Loader(Numbers(4), batch_size=2)
    assert [b.tolist() for b in loader.to_torch_loader(batch_size=None)] == [[0, 1], [2, 3]]
    with pytest.raises(TypeError, match="batch_size="):
        loader.to_torch_loader(batch_size=2)
    # drop_last= too, when the loader is made (DataLoader refused it only when iterated).
    with pytest.raises(TypeError, match="drop_last="):
        loader.to_torch_loader(drop_last=True)
