"""Shared pieces of the benchmarks: the RSS sampler, the result record, the sample checker.

Nothing here imports torch or asyncload, so the orchestrating process stays light.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.server import check_sample

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def sample_urls(base_url: str, count: int, latency_ms: float | None = None) -> list[str]:
    """URLs of samples ``0 .. count-1``; ``latency_ms`` overrides the server's latency."""
    query = "" if latency_ms is None else f"?latency_ms={latency_ms:g}"
    return [f"{base_url}/sample/{i}{query}" for i in range(count)]


class PeakRSS:
    """Peak of the summed resident set size of this process and all its descendants
    (DataLoader workers included), sampled by a background thread every ``interval`` s.

    Summed RSS counts pages shared between forked workers once per worker, as ``ps`` and
    ``top`` users add them up; it is what a memory-limited container sees pressure from.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.cpu_s = 0.0  # CPU time the sampler thread itself has used
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def sample(self) -> int:
        """One reading of the summed RSS, in bytes; updates ``peak``."""
        total = self._proc.memory_info().rss
        for child in self._proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += child.memory_info().rss
        self.peak = max(self.peak, total)
        self.samples += 1
        return total

    def _run(self) -> None:
        start = time.thread_time()
        while not self._stop.wait(self.interval):
            self.sample()
            self.cpu_s = time.thread_time() - start

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its reaped children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def tree_cpu_seconds() -> float:
    """CPU time of this process, its reaped children and its live descendants."""
    total = cpu_seconds()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = child.cpu_times()
            total += t.user + t.system
    return total


class Tally:
    """Counts and checks the samples a loader yields, and times the batches.

    Every sample is checked (length, embedded index, fill bytes; position too when
    ``ordered``); ``finish()`` then checks that each of the ``expected`` samples came
    exactly once. Samples/s is measured from the first batch to the last one, so start-up
    cost shows only in the time to the first batch.
    """

    def __init__(
        self,
        expected: int,
        size: int,
        *,
        ordered: bool,
        cpu_probe: Callable[[], float] | None = None,
    ) -> None:
        self.expected = expected
        self.cpu_probe = cpu_probe
        self.cpu_first: float | None = None
        self.cpu_last: float | None = None
        self.size = size
        self.ordered = ordered
        self.seen = bytearray(expected)
        self.count = 0
        self.batches = 0
        self.first_batch_samples = 0
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = self.t0

    def start(self) -> None:
        """Mark the moment the loader is about to be built."""
        self.t0 = time.perf_counter()

    def batch(self, batch: Any) -> None:
        """Check one batch (a list of bytes samples) and record its arrival time."""
        now = time.perf_counter()
        if not isinstance(batch, list | tuple):
            raise TypeError(f"batch is {type(batch).__name__}, expected a list of bytes")
        for sample in batch:
            index = check_sample(sample, self.size, self.count if self.ordered else None)
            if not 0 <= index < self.expected:
                raise ValueError(f"sample index {index} out of range {self.expected}")
            if self.seen[index]:
                raise ValueError(f"sample {index} delivered twice")
            self.seen[index] = 1
            self.count += 1
        self.batches += 1
        if self.t_first is None:
            self.t_first = now
            self.first_batch_samples = len(batch)
            if self.cpu_probe is not None:
                self.cpu_first = self.cpu_probe()
        self.t_last = now
        if self.count == self.expected and self.cpu_probe is not None:
            self.cpu_last = self.cpu_probe()

    def finish(self) -> None:
        """Raise unless every expected sample arrived exactly once."""
        if self.count != self.expected:
            raise ValueError(f"got {self.count} samples, expected {self.expected}")
        if self.t_first is None:
            raise ValueError("no batch arrived")

    @property
    def first_batch_s(self) -> float:
        assert self.t_first is not None
        return self.t_first - self.t0

    @property
    def cpu_us_per_sample(self) -> float:
        """CPU µs per sample (consumer process and its workers) from first to last batch."""
        if self.cpu_first is None or self.cpu_last is None:
            return float("nan")
        measured = self.count - self.first_batch_samples
        return (self.cpu_last - self.cpu_first) / measured * 1e6 if measured else float("nan")

    @property
    def samples_per_s(self) -> float:
        """Samples after the first batch divided by the time from first to last batch."""
        assert self.t_first is not None
        span = self.t_last - self.t_first
        measured = self.count - self.first_batch_samples
        return measured / span if span > 0 else float("nan")


@dataclass
class RunConfig:
    """One benchmark configuration: which loader, how many requests in flight, what latency."""

    loader: str  # "asyncload-sync" | "asyncload-async" | "plain-asyncio" | "dataloader"
    in_flight: int  # concurrency for asyncload and plain asyncio; workers for DataLoader
    latency_ms: float
    samples: int  # measured samples after the first batch
    batch_size: int = 32
    size: int = 16384

    @property
    def key(self) -> str:
        return f"{self.loader}/{self.in_flight}/{self.latency_ms:g}ms"

    @property
    def total(self) -> int:
        """Samples fetched: the first batch plus the measured ones."""
        return self.samples + self.batch_size


@dataclass
class RunResult:
    """The record of one run of one configuration (one subprocess)."""

    config: RunConfig
    round: int = 0
    ok: bool = False
    error: str | None = None
    samples_per_s: float = float("nan")
    first_batch_s: float = float("nan")
    peak_rss_bytes: int = 0
    cpu_s: float = float("nan")
    cpu_us_per_sample: float = float("nan")
    wall_s: float = float("nan")
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        data = dict(data)
        data["config"] = RunConfig(**data["config"])
        return cls(**data)


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    for name in ("torch", "aiohttp", "uvloop", "numpy", "asyncload"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
