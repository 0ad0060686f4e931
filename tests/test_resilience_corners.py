"""Corners of the resilience layer and the error policy (found by helper-47): S3 codes
kept through translation and pickling, throttling vs transient agreement, a dataset's own
timeout kept as the cause, timeouts over thread-backed reads, error budgets of streams,
throttle floors, numpy max_errors, third-party HTTP errors.

No real sleeps order anything here; the only real waits are a 0.05 s per-fetch timeout and
a safety release of a blocked thread.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from typing import Any

import numpy as np
import pytest
from conftest import asyncio_only

import asyncload as al
from asyncload.resilience import Throttle, is_throttling, is_transient

pytestmark = pytest.mark.anyio


def _s3_translated(message: str) -> BaseException:
    """What S3Source raises for an obstore error with this message."""
    exceptions = pytest.importorskip("obstore.exceptions")
    source = al.sources.S3Source("bucket", ["key"], endpoint_url="http://127.0.0.1:1")
    return source._client.translate(exceptions.GenericError(message), "key", reading_body=False)


def test_s3_400_request_timeout_stays_transient_after_translation() -> None:
    """S3 answers 400 <Code>RequestTimeout</Code> when the connection idled: a transient
    failure (classify says so for the raw obstore error), but S3Source turns it into
    HTTPStatusError(400) and is_transient then looks at the status only, so Retry gives up
    at once and the breaker ignores it."""
    raw = "Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>"
    translated = _s3_translated(raw)
    assert isinstance(translated, al.HTTPStatusError)
    assert is_transient(translated)


def test_http_status_error_keeps_its_message_through_pickle() -> None:
    """S3Source puts the S3 error code in an HTTPStatusError's message ("HTTP 503 (SlowDown)
    for s3://..."), but HTTPStatusError.__reduce__ rebuilds from status and url alone: in
    another process (DataLoader workers, multiprocessing) the code is gone."""
    error = _s3_translated(
        "Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>"
    )
    assert "SlowDown" in str(error)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_a_missing_file_is_never_a_throttling_signal() -> None:
    """is_throttling matches its words anywhere in the message, with no word end and no
    permanent-error check (unlike is_transient, whose regex refuses "SlowDownsampler"): a
    FileNotFoundError for a file under "SlowDownsampled/" halves the loader's concurrency."""
    missing = FileNotFoundError(2, "No such file or directory", "/data/SlowDownsampled/0.npy")
    assert not is_transient(missing)
    assert not is_throttling(missing)


class _OwnTimeout(al.AsyncDataset[int]):
    """Sample 1 fails with the TimeoutError of the dataset's own asyncio.wait_for (Python
    raises it without args), at once: the loader's timeout has not expired."""

    def __init__(self) -> None:
        self.raised: BaseException | None = None

    def __len__(self) -> int:
        return 3

    async def __getitem__(self, index: int) -> int:
        if index == 1:
            try:
                await asyncio.wait_for(asyncio.Event().wait(), 0)
            except TimeoutError as exc:
                self.raised = exc
                raise
        return index


@asyncio_only
async def test_a_datasets_own_timeout_is_not_reported_as_the_loaders() -> None:
    """_with_timeout rewrites every arg-less TimeoutError as "no answer within timeout=100
    s" (from None): the cause is lost and blamed on the loader's timeout, which never
    fired. api.md: SampleError has the original exception as __cause__."""
    ds = _OwnTimeout()
    loader = al.Loader(ds, batch_size=None, timeout=100)
    with pytest.raises(al.SampleError) as caught:
        async for _ in loader:
            pass
    await loader.aclose()
    assert ds.raised is not None
    assert caught.value.__cause__ is ds.raised
    assert "timeout=100" not in str(caught.value)


class _Blocking:
    """A synchronous torch-style dataset whose sample 1 blocks until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> int:
        if index == 1:
            self.release.wait(30)
        return index


@asyncio_only
async def test_timeout_bounds_a_from_torch_fetch() -> None:
    """Loader(timeout=...) is "seconds for each fetch attempt", but a thread-backed fetch
    (from_torch, FileSource, NpySource) runs in anyio.to_thread.run_sync without
    abandon_on_cancel: the timeout's cancellation waits for the thread, and when the
    thread finally answers, the sample is delivered as if no timeout was set. A hung
    read (a stuck NFS mount) hangs the epoch whatever the timeout."""
    blocking = _Blocking()
    # Safety net: release the thread after a while, so that the current code ends too
    # (it then delivers sample 1, which the assertion below rejects).
    safety = threading.Timer(3.0, blocking.release.set)
    safety.start()
    try:
        loader = al.Loader(al.from_torch(blocking), batch_size=None, timeout=0.05, on_error="skip")
        got = [sample async for sample in loader]
        await loader.aclose()
    finally:
        blocking.release.set()
        safety.cancel()
    assert got == [0, 2]
    assert loader.statistics()["errors"] == 1


class _Stream(al.AsyncIterableDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    async def __aiter__(self) -> Any:
        for i in range(self.n):
            yield i


def _bad_every_20th(x: int) -> int:
    if x % 20 == 0:
        raise RuntimeError(f"bad {x}")
    return x


async def _epoch(ds: Any) -> list[int]:
    loader = al.Loader(
        ds, batch_size=None, transform=_bad_every_20th, on_error="skip", max_errors=0.1
    )
    try:
        return [sample async for sample in loader]
    finally:
        await loader.aclose()


async def test_fraction_budget_counts_filtered_samples_in_streams_as_in_map_datasets() -> None:
    """max_errors as a fraction "of the samples attempted": a map-style epoch counts the
    samples a filter dropped as attempted (Fetcher.one counts before fetching), a stream
    epoch does not (_stream_worker skips policy.count for DROPPED). The same 200 samples,
    150 filtered out, 10 failing: 5 % for the map epoch, which passes max_errors=0.1, but
    10/50 = 20 % for the stream, which raises ErrorBudgetExceeded."""

    def keep(x: int) -> bool:
        return x % 4 == 0

    mapped = await _epoch(al.from_sequence(list(range(200))).filter(keep))
    assert len(mapped) == 40
    streamed = await _epoch(_Stream(200).filter(keep))
    assert streamed == mapped


def test_throttle_limit_never_exceeds_the_loaders_concurrency() -> None:
    """A Throttle whose min_concurrency is above the loader's concurrency is accepted
    silently: statistics() reports a concurrency_limit of 32 for concurrency=4 (and a
    throttling answer counts as a "decrease" that raises the reported limit). Either refuse
    it, naming min_concurrency, or clamp the floor to the concurrency."""
    try:
        loader = al.Loader(
            al.from_sequence([1, 2, 3]), concurrency=4, throttle=Throttle(min_concurrency=32)
        )
    except ValueError as exc:
        assert "min_concurrency" in str(exc)
        return
    assert loader.statistics()["concurrency_limit"] <= 4


async def test_max_errors_accepts_a_numpy_integer() -> None:
    """The Loader takes numpy integers for batch_size and concurrency (and any real number
    for timeout), but max_errors=np.int64(2), e.g. computed from a dataset length with
    numpy, is refused with TypeError."""
    ds = al.from_sequence(list(range(10)))
    loader = al.Loader(
        ds, batch_size=None, transform=_bad_every_2nd, on_error="skip", max_errors=np.int64(2)
    )
    with pytest.raises(al.AsyncloadError, match="max_errors=2"):
        async for _ in loader:
            pass
    await loader.aclose()


def _bad_every_2nd(x: int) -> int:
    if x % 2:
        raise RuntimeError(f"bad {x}")
    return x


def _botocore_error(code: str) -> BaseException:
    exceptions = pytest.importorskip("botocore.exceptions")
    return exceptions.ClientError({"Error": {"Code": code, "Message": "slow down"}}, "GetObject")


def _urllib_error(status: int) -> BaseException:
    import io
    import urllib.error

    return urllib.error.HTTPError("http://host/a.bin", status, "busy", {}, io.BytesIO(b""))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _botocore_error("TooManyRequestsException"), id="boto-429-code"),
        pytest.param(lambda: _botocore_error("RequestLimitExceeded"), id="boto-limit-code"),
        pytest.param(lambda: _urllib_error(503), id="urllib-503"),
        pytest.param(lambda: _urllib_error(429), id="urllib-429"),
    ],
)
def test_a_throttling_answer_is_transient(make: Any) -> None:
    """is_throttling and is_transient disagree: an answer the throttle reads as "slow down"
    (its concurrency is halved) is not retried by Retry's default, nor counted by the
    breaker. api.md: the default retries HTTP 429/5xx; a from_torch dataset reading with
    urllib gets HTTPError(503) (a ``status`` attribute, read by is_throttling only), a
    boto-based one ClientError codes TooManyRequestsException / RequestLimitExceeded."""
    error = make()
    assert is_throttling(error)
    assert is_transient(error)


def test_urllib_connection_refused_is_transient_and_a_404_is_not() -> None:
    import urllib.error

    assert is_transient(urllib.error.URLError(ConnectionRefusedError(111, "refused")))
    assert not is_transient(urllib.error.URLError(FileNotFoundError(2, "no such file")))
    assert not is_transient(_urllib_error(404))


def test_throttle_floor_at_the_concurrency_is_accepted() -> None:
    loader = al.Loader(
        al.from_sequence([1, 2, 3]), concurrency=4, throttle=Throttle(min_concurrency=4)
    )
    assert loader.statistics()["concurrency_limit"] == 4


def test_retry_and_breaker_counts_take_numpy_integers() -> None:
    """Counts computed with numpy (as batch_size and concurrency already may be) were
    refused with "must be an int, not int64"."""
    retry = al.Retry(attempts=np.int64(3))
    assert retry.attempts == 3 and type(retry.attempts) is int
    breaker = al.CircuitBreaker(failure_threshold=np.int32(2))
    threshold = breaker._machine.failure_threshold
    assert threshold == 2 and type(threshold) is int
    with pytest.raises(TypeError, match="attempts"):
        al.Retry(attempts=np.float64(3))


def test_a_numpy_integer_key_names_the_same_disk_cache_entry_as_the_int() -> None:
    from asyncload.disk_cache import encode_key

    assert encode_key(np.int64(5)) == encode_key(5)
    assert encode_key(("a", np.uint16(7))) == encode_key(("a", 7))
