"""What one measured run needs: the RSS sampler, CPU clocks, the batch timer and the
sample checker, the run record, medians, and what the machine is.

This module runs inside the measured child processes, so it imports nothing heavy (no
torch, no asyncload, no plotting): every peer pays the same for it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from benchmarks.server import check_sample

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MiB = 1024 * 1024


def sample_urls(
    base_url: str, count: int, latency_ms: float | None = None, jitter_ms: float = 0.0
) -> list[str]:
    """URLs of samples ``0 .. count-1``; ``latency_ms`` overrides the server's latency, and
    ``jitter_ms`` (with it) spreads each over ``latency_ms`` +- ``jitter_ms``."""
    query = "" if latency_ms is None else f"?latency_ms={latency_ms:g}"
    if jitter_ms:
        if latency_ms is None:
            raise ValueError("sample_urls: jitter_ms needs latency_ms")
        query += f"&jitter_ms={jitter_ms:g}"
    return [f"{base_url}/sample/{i}{query}" for i in range(count)]


class PeakRSS:
    """Peak of the summed resident set size of this process and all its descendants
    (DataLoader workers, ``curl`` processes), sampled by a background thread every
    ``interval`` s.

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
        total: int = self._proc.memory_info().rss
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


class Checker(Protocol):
    """Checks the batches of one run: what a right answer is depends on the benchmark."""

    def __call__(self, batch: Any) -> int:
        """Check one batch; return how many samples it holds. Raises on a wrong batch."""
        ...

    def finish(self) -> None:
        """Raise unless the whole answer was right (e.g. every sample exactly once)."""
        ...


class SampleChecker:
    """Checks batches of samples served by ``benchmarks/server.py`` (lists of bytes):
    length, embedded index and fill bytes of each, its position too when ``ordered``, and
    that each of the ``expected`` samples comes exactly once."""

    def __init__(self, expected: int, size: int, *, ordered: bool) -> None:
        self.expected = expected
        self.size = size
        self.ordered = ordered
        self.seen = bytearray(expected)
        self.count = 0

    def __call__(self, batch: Any) -> int:
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
        return len(batch)

    def finish(self) -> None:
        if self.count != self.expected:
            raise ValueError(f"got {self.count} samples, expected {self.expected}")


class Tally:
    """Times the batches of one run and has ``check`` check each of them.

    Samples/s is the steady rate at which batches arrive (see :attr:`samples_per_s`), so
    start-up cost shows only in the time to the first batch. CPU per sample covers the
    span from the first batch to the last; the probe is read after the first batch and
    after the last one only, since reading it every batch would cost the loader.
    """

    def __init__(
        self,
        expected: int,
        check: Checker,
        *,
        cpu_probe: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.expected = expected
        self.clock = clock
        self.check = check
        self.cpu_probe = cpu_probe
        self.cpu_first: float | None = None
        self.cpu_last: float | None = None
        self.count = 0
        self.batches = 0
        self.first_batch_samples = 0
        self.t0 = clock()
        self.t_first: float | None = None
        self.t_last = self.t0
        self.arrivals: list[tuple[float, int]] = []  # (time, samples so far), per batch

    def start(self) -> None:
        """Mark the moment the loader is about to be built."""
        self.t0 = self.clock()

    def batch(self, batch: Any) -> None:
        """Check one batch and record its arrival time."""
        now = self.clock()  # before the check: checking is the consumer's work
        n = self.check(batch)
        self.count += n
        self.batches += 1
        self.arrivals.append((now, self.count))
        if self.t_first is None:
            self.t_first = now
            self.first_batch_samples = n
            if self.cpu_probe is not None:
                self.cpu_first = self.cpu_probe()
        self.t_last = now
        if self.count == self.expected and self.cpu_probe is not None:
            self.cpu_last = self.cpu_probe()

    def finish(self) -> None:
        """Raise unless every expected sample arrived and the checker is satisfied."""
        if self.t_first is None:
            raise ValueError("no batch arrived")
        if self.count != self.expected:
            raise ValueError(f"got {self.count} samples, expected {self.expected}")
        self.check.finish()

    @property
    def first_batch_s(self) -> float:
        """Seconds from ``start()`` to the first batch."""
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
        """The slope of the least-squares line through the batches' arrivals (time, samples
        delivered so far): the rate at which samples come, from the first batch on.

        Not the samples after the first batch over the time from the first batch to the
        last (:attr:`first_to_last_per_s`): N DataLoader workers each build a whole batch,
        so their batches come in waves of N, and that measure counts the rest of the first
        wave as if it had taken no time (16 workers at 20 ms: about 4 % more than they
        deliver). The fit weighs every arrival alike, so a wave counts as the time it took.
        """
        points = self.arrivals
        if len(points) < 2:
            return float("nan")
        n = len(points)
        mean_t = sum(t for t, _ in points) / n
        mean_c = sum(c for _, c in points) / n
        var = sum((t - mean_t) ** 2 for t, _ in points)
        cov = sum((t - mean_t) * (c - mean_c) for t, c in points)
        return cov / var if var > 0 else float("nan")

    @property
    def first_to_last_per_s(self) -> float:
        """Samples after the first batch divided by the time from first to last batch (this
        page's measure before 2026-11-27; kept in each run's JSON for comparison)."""
        assert self.t_first is not None
        span = self.t_last - self.t_first
        measured = self.count - self.first_batch_samples
        return measured / span if span > 0 else float("nan")


@dataclass
class RunConfig:
    """One configuration of one benchmark: a peer (loader or client), how much it keeps in
    flight, and what it reads."""

    peer: str  # e.g. "asyncload-sync", "plain-asyncio", "dataloader", "obstore"
    in_flight: int  # requests, shards or concurrency; for a DataLoader, its workers
    samples: int  # measured samples, after the first batch
    batch_size: int = 32
    size: int = 16384  # bytes per sample
    latency_ms: float = 0.0  # injected per request (or per shard)
    params: dict[str, Any] = field(default_factory=dict)  # what else the benchmark varies

    @property
    def name(self) -> str:
        """Peer, in flight, latency and sample size: what progress lines show."""
        return f"{self.peer}/{self.in_flight}/{self.latency_ms:g}ms/{self.size}B"

    @property
    def key(self) -> str:
        """Unique within one benchmark's plan."""
        return self.name + "".join(f"/{k}={v}" for k, v in sorted(self.params.items()))

    @property
    def total(self) -> int:
        """Samples fetched: the first batch plus the measured ones."""
        return self.samples + self.batch_size


@dataclass
class RunResult:
    """The record of one run of one configuration (in one child process)."""

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
        """The inverse of ``to_json``; ``None`` (a NaN in stored JSON) reads back as NaN."""
        fields: dict[str, Any] = {
            k: (float("nan") if v is None and k in _FLOAT_FIELDS else v) for k, v in data.items()
        }
        fields["config"] = RunConfig(**data["config"])
        return cls(**fields)


_FLOAT_FIELDS = {"samples_per_s", "first_batch_s", "cpu_s", "cpu_us_per_sample", "wall_s"}


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def finite(x: float | None) -> float | None:
    """``x``, or ``None`` for NaN: JSON has no NaN."""
    return None if x is None or math.isnan(x) else x


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of these distributions (``None`` when not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **package_versions(("torch", "aiohttp", "uvloop", "numpy", "asyncload")),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename,
    so that a reader, or a crash half-way, never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp makes the file private (0600); keep the mode a plain write would give.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
