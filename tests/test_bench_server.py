"""The benchmark server's query parameters (benchmarks/server.py), on a real server
process: a latency it cannot honour is refused, not served with another mean."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from benchmarks.server import jitter, running_server, sample_bytes


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with running_server(latency_ms=0.0, size=64, count=100) as url:
        yield url


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_samples_are_served_with_latency_and_jitter(base_url: str) -> None:
    assert get(f"{base_url}/sample/7?latency_ms=2&jitter_ms=1") == (200, sample_bytes(7, 64))
    assert get(f"{base_url}/sample/8?latency_ms=1&jitter_ms=1") == (200, sample_bytes(8, 64))


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("latency_ms=1&jitter_ms=2", b"jitter_ms must be <= the latency, 1 ms"),
        ("jitter_ms=1", b"jitter_ms must be <= the latency, 0 ms"),
        ("latency_ms=fast", b"latency_ms must be a number, got 'fast'"),
        ("latency_ms=-1", b"latency_ms must be a finite number >= 0, got '-1'"),
        ("latency_ms=1&jitter_ms=nan", b"jitter_ms must be a finite number >= 0, got 'nan'"),
    ],
)
def test_a_latency_it_cannot_honour_is_a_400(base_url: str, query: str, message: bytes) -> None:
    assert get(f"{base_url}/sample/3?{query}") == (400, message)
    # The connection's failure is the request's own: the next is served.
    assert get(f"{base_url}/sample/3")[0] == 200


def test_jitter_spreads_evenly_with_mean_zero() -> None:
    values = [jitter(i) for i in range(10_000)]
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert abs(sum(values) / len(values)) < 0.01
    assert min(values) < -0.99 and max(values) > 0.99
