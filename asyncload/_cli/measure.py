"""The child side of ``bench``: build one loader, read every sample once, time it.

Run as ``python -m asyncload._cli.measure PAYLOAD.json`` by :mod:`.runner`, in a fresh
interpreter per configuration, so that no run inherits another's memory, threads or
connections. The payload is ``{"source": SourceSpec.to_json(), "run": RunConfig.to_json()}``.
The answer is the last stdout line, ``RESULT {json}`` (a :class:`Measurement`); the exit
status is 1 when the run failed, with the traceback on stderr.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import AsyncIterable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from .sources import SourceSpec

if TYPE_CHECKING:
    from ..loader import Loader

RESULT_PREFIX = "RESULT "

LoaderKind = Literal["asyncload", "dataloader"]
Consume = Literal["for", "async"]


@dataclass(frozen=True)
class RunConfig:
    """One configuration. ``in_flight``: the Loader's ``concurrency``, or the DataLoader's
    ``num_workers`` (0: reads in the main process). ``consume`` picks ``for`` (the sync
    bridge) or ``async for`` for asyncload; the DataLoader is always a ``for``."""

    loader: LoaderKind
    in_flight: int
    batch_size: int
    consume: Consume = "for"
    preload_torch: bool = True  # a training process has torch loaded before its loader

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        if self.loader == "asyncload":
            return f"asyncload, {'async for' if self.consume == 'async' else 'for'}"
        return f"DataLoader, {self.in_flight} worker{'s' if self.in_flight != 1 else ''}"

    @property
    def requests_in_flight(self) -> int:
        """Reads running at once at most: a DataLoader worker does one at a time."""
        return max(1, self.in_flight) if self.loader == "dataloader" else self.in_flight


@dataclass
class Measurement:
    """What one run measured. Times are seconds from just before the loader was built;
    ``samples_per_s`` is every sample over the time from then to the last batch, the same
    span for every loader: timed from the first batch, a DataLoader whose workers filled
    their prefetch queues during start-up would be credited with a burst no storage gave
    (start-up also shows alone in ``first_batch_s``)."""

    samples: int = 0
    bytes: int = 0
    batches: int = 0
    first_batch_s: float | None = None
    wall_s: float = 0.0
    samples_per_s: float | None = None
    # resource.getrusage fallback: this process's peak plus its largest child's (bytes).
    rusage_peak_rss: int | None = None
    error: str | None = None


class Tally:
    """Counts the batches as they arrive and times them."""

    def __init__(self) -> None:
        self.result = Measurement()
        self.t0 = time.perf_counter()
        self._t_last = self.t0

    def add(self, batch: list[bytes]) -> None:
        now = time.perf_counter()
        r = self.result
        if r.batches == 0:
            r.first_batch_s = now - self.t0
        self._t_last = now
        r.batches += 1
        r.samples += len(batch)
        r.bytes += sum(len(sample) for sample in batch)

    def finish(self) -> Measurement:
        r = self.result
        r.wall_s = time.perf_counter() - self.t0
        span = self._t_last - self.t0
        if r.samples and span > 0:
            r.samples_per_s = r.samples / span
        return r


def run(spec: SourceSpec, cfg: RunConfig) -> Measurement:
    """Read every sample of ``spec`` once with ``cfg``'s loader; raises on any failure,
    and ``RuntimeError`` when the count of samples read is not ``len(spec.keys)``."""
    if cfg.preload_torch:
        importlib.import_module("torch")
    tally = Tally()
    if cfg.loader == "dataloader":
        _run_dataloader(spec, cfg, tally)
    elif cfg.consume == "async":
        _run_event_loop(_run_asyncload_async(spec, cfg, tally))
    else:
        with _asyncload_loader(spec, cfg) as loader:
            _consume(loader, tally)
    result = tally.finish()
    if result.samples != len(spec.keys):
        raise RuntimeError(f"read {result.samples} samples, expected {len(spec.keys)}")
    return result


def _asyncload_loader(spec: SourceSpec, cfg: RunConfig) -> Loader:
    import asyncload as al

    dataset: al.AsyncDataset[bytes]
    if spec.kind == "http":
        # The source's own connection cap must not be what limits the concurrency measured.
        dataset = al.sources.HTTPSource(spec.keys, max_connections=max(256, cfg.in_flight))
    elif spec.kind == "files":
        assert spec.root is not None
        # Absolute paths, no root: the user named this directory, and symlinks that point
        # out of it (a common dataset layout) are theirs to follow.
        dataset = al.sources.FileSource([os.path.join(spec.root, key) for key in spec.keys])
    else:
        assert spec.bucket is not None
        dataset = al.sources.S3Source(
            spec.bucket,
            spec.keys,
            endpoint_url=spec.s3.endpoint_url,
            region=spec.s3.region,
            anonymous=spec.s3.anonymous,
        )
    return al.Loader(dataset, batch_size=cfg.batch_size, concurrency=cfg.in_flight)


def _consume(batches: Iterable[list[bytes]], tally: Tally) -> None:
    for batch in batches:
        tally.add(batch)


async def _run_asyncload_async(spec: SourceSpec, cfg: RunConfig, tally: Tally) -> None:
    async with _asyncload_loader(spec, cfg) as loader:
        batches: AsyncIterable[list[bytes]] = loader
        async for batch in batches:
            tally.add(batch)


def _run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    # The loop the sync bridge uses too: uvloop where installed.
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _run_dataloader(spec: SourceSpec, cfg: RunConfig, tally: Tally) -> None:
    from torch.utils.data import DataLoader

    from .baselines import blocking_dataset

    # More workers than cores is the point of this baseline (I/O bound): no advice wanted.
    warnings.filterwarnings("ignore", message=".*suggested max number of worker")
    dataset = blocking_dataset(spec)
    loader: Iterable[list[bytes]] = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=cfg.batch_size,
        num_workers=cfg.in_flight,
        collate_fn=list,  # bytes as a list, as asyncload's default collate gives them
        # obstore's runtime does not survive a fork; HTTP and files workers fork as usual.
        multiprocessing_context="spawn" if spec.kind == "s3" and cfg.in_flight else None,
    )
    try:
        _consume(loader, tally)
    finally:
        dataset.close()  # with num_workers=0 the connections are this process's


def _rusage_peak() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    # ru_maxrss is in KiB on Linux (bytes on macOS); children: the largest one reaped.
    scale = 1 if sys.platform == "darwin" else 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + child) * scale


def _die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when ``bench`` dies: a
    ``bench`` killed with SIGKILL (or SIGHUP'd alone) runs no cleanup, and this child would
    go on reading the whole source. Its DataLoader workers leave when torch's watchdog sees
    their parent gone (after the batch they are reading). The signal follows the thread
    that started this process, which :mod:`.runner` keeps waiting for it: it never ends
    first."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # bench died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str]) -> int:
    _die_with_parent()
    with open(argv[0], encoding="utf-8") as f:
        payload = json.load(f)
    spec = SourceSpec.from_json(payload["source"])
    cfg = RunConfig(**payload["run"])
    try:
        result = run(spec, cfg)
    except Exception as exc:
        traceback.print_exc()
        result = Measurement(error=f"{type(exc).__name__}: {exc}")
    result.rusage_peak_rss = _rusage_peak()
    print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0 if result.error is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
