"""Counters and latency percentiles for a Loader: plain numbers, cheap to update per sample
and cheap to snapshot."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._redact import redact_key

__all__ = ["LatencyWindow", "LoaderStats"]


class LatencyWindow:
    """The most recent ``size`` fetch latencies (seconds), for percentiles."""

    def __init__(self, size: int = 4096) -> None:
        self._values = [0.0] * size
        self._count = 0

    def add(self, seconds: float) -> None:
        self._values[self._count % len(self._values)] = seconds
        self._count += 1

    def percentiles(self) -> dict[str, float | None]:
        n = min(self._count, len(self._values))
        if not n:
            return {"fetch_latency_p50": None, "fetch_latency_p90": None, "fetch_latency_p99": None}
        p50, p90, p99 = np.percentile(np.asarray(self._values[:n]), [50, 90, 99])
        return {
            "fetch_latency_p50": float(p50),
            "fetch_latency_p90": float(p90),
            "fetch_latency_p99": float(p99),
        }


@dataclass
class LoaderStats:
    """What one Loader has done in the current epoch (and ``retries``/cache totals with it)."""

    samples: int = 0
    batches: int = 0
    in_flight: int = 0
    errors: int = 0
    skipped: int = 0
    substituted: int = 0
    filtered: int = 0
    retries: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    started: float | None = None
    stopped: float | None = None  # when the epoch ended: rates stop there
    first_batch_seconds: float | None = None
    error_log: list[dict[str, Any]] = field(default_factory=list)
    latency: LatencyWindow = field(default_factory=LatencyWindow)

    # Keep the error log bounded: a run with millions of skips must not grow without end.
    MAX_ERROR_LOG = 100

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.stopped is None:
            self.stopped = time.perf_counter()

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.stopped if self.stopped is not None else time.perf_counter()) - self.started

    def count_retry(self, attempt: int, exc: BaseException, delay: float) -> None:
        """An ``on_retry`` hook for `Retry.run`: counts the retry."""
        self.retries += 1

    def log_error(self, index: int, key: object, exc: BaseException, action: str) -> None:
        if len(self.error_log) < self.MAX_ERROR_LOG:
            self.error_log.append(
                {"index": index, "key": redact_key(key), "error": repr(exc), "action": action}
            )

    def snapshot(self, buffered: int) -> dict[str, Any]:
        elapsed = self.elapsed()
        return {
            "samples": self.samples,
            "batches": self.batches,
            "in_flight": self.in_flight,
            "buffered": buffered,
            "errors": self.errors,
            "skipped": self.skipped,
            "substituted": self.substituted,
            "filtered": self.filtered,
            "retries": self.retries,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "samples_per_second": self.samples / elapsed if elapsed > 0 else 0.0,
            "elapsed_seconds": elapsed,
            "first_batch_seconds": self.first_batch_seconds,
            "error_log": [dict(entry) for entry in self.error_log],  # (the caller's own)
            **self.latency.percentiles(),
        }
