"""Benchmark: WebDataset-layout tar shards over HTTP, asyncload vs WebDataset.

    .venv/bin/python benchmarks/bench_tar.py [--quick] [--rounds R] [--out PATH] [--render docs/benchmarks.md]
    .venv/bin/python benchmarks/bench_tar.py --from benchmarks/results/tar.json --render docs/benchmarks.md

The command writes 32 shards of 256 samples (``--quick``: 4 of 64) to a temporary folder;
sample ``g`` is a 16 KiB ``.bin`` member (``benchmarks.server.sample_bytes(g)``, so every
sample's bytes are checked) and a ``.cls`` member. The local server of
``benchmarks/server.py`` serves them at ``/file/{name}``, waiting 20 ms before the first
byte of each shard and then sending it at full speed. Side by side, each reading every
sample once, in batches of 32:

* ``asyncload-async``: ``al.Loader(TarShardSource(urls, prefetch_shards=k),
  batch_size=32)`` consumed with ``async for`` on uvloop (``k`` shards read at once);
* ``asyncload-sync``: the same loader consumed with ``for batch in loader``;
* ``webdataset``: ``torch.utils.data.DataLoader(wds.WebDataset(urls, shardshuffle=False)
  .batched(32), batch_size=None, num_workers=w)``; WebDataset reads each shard through a
  ``curl`` subprocess and splits the shards across the ``w`` workers (one at a time each).

Each child process imports torch; its summed RSS and CPU include the DataLoader workers
and the ``curl`` processes. What is measured, and the options, are the harness's
(``benchmarks/harness.py``).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.common import MiB, RunConfig, RunResult, SampleChecker, Tally, package_versions
from benchmarks.page import command_block, failed_runs, results_table, run_line
from benchmarks.server import run_event_loop, sample_bytes, start_server, stop_server

BATCH_SIZE = 32
SAMPLE_BYTES = 16384
LATENCY_MS = 20.0
PEERS = ("asyncload-async", "asyncload-sync", "webdataset")


# --------------------------------------------------------------------------- plan


def shard_layout(quick: bool) -> tuple[int, int]:
    """(shards, samples per shard): 32 x 256 (8,192 samples, about 140 MiB), or 4 x 64."""
    return (4, 64) if quick else (32, 256)


def plan(quick: bool) -> list[RunConfig]:
    """The configurations of one round. ``in_flight`` is the number of shards read at once:
    ``prefetch_shards`` for asyncload, DataLoader workers for WebDataset (0: the main
    process reads one shard at a time)."""
    shards, per_shard = shard_layout(quick)
    grid: dict[str, tuple[int, ...]] = (
        {"asyncload-async": (4,), "asyncload-sync": (4,), "webdataset": (0, 2)}
        if quick
        else {"asyncload-async": (1, 4), "asyncload-sync": (1, 4), "webdataset": (0, 2, 4, 8)}
    )
    measured = shards * per_shard - BATCH_SIZE  # every sample; the first batch is not timed
    return [
        RunConfig(peer, k, measured, BATCH_SIZE, SAMPLE_BYTES, LATENCY_MS)
        for peer in PEERS
        for k in grid[peer]
    ]


def shard_name(shard: int) -> str:
    return f"shard-{shard:04d}.tar"


def write_shards(directory: Path, shards: int, per_shard: int) -> int:
    """Write the shards into ``directory``; return their total size in bytes."""
    cls_of = [str(g % 10).encode() for g in range(10)]
    total = 0
    for shard in range(shards):
        path = directory / shard_name(shard)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                g = shard * per_shard + i
                for ext, data in (("bin", sample_bytes(g, SAMPLE_BYTES)), ("cls", cls_of[g % 10])):
                    info = tarfile.TarInfo(f"sample{g:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        total += path.stat().st_size
    return total


# --------------------------------------------------------------------------- peers
# Each runner builds its loader right after ``tally.start()`` and feeds each batch's list
# of ``.bin`` samples to ``tally.batch``; it returns extra facts worth keeping.

Runner = Callable[[RunConfig, list[str], Tally], dict[str, Any]]


def _asyncload_loader(cfg: RunConfig, urls: list[str]) -> Any:
    import asyncload as al
    from asyncload.sources import TarShardSource

    return al.Loader(TarShardSource(urls, prefetch_shards=max(1, cfg.in_flight)), batch_size=32)


def _jsonable_stats(loader: Any) -> dict[str, Any]:
    try:
        stats: dict[str, Any] = json.loads(json.dumps(loader.statistics(), default=str))
    except Exception:  # statistics are a nicety here; the run's numbers do not need them
        return {}
    return stats


def run_asyncload_async(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """asyncload in the caller's event loop (uvloop): ``async for batch in loader``."""

    async def main() -> dict[str, Any]:
        tally.start()
        loader = _asyncload_loader(cfg, urls)
        async with loader:
            async for batch in loader:
                tally.batch(batch["bin"])
            return {"statistics": _jsonable_stats(loader)}

    result: dict[str, Any] = run_event_loop(main())
    return result


def run_asyncload_sync(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """asyncload through its synchronous bridge: ``for batch in loader``."""
    tally.start()
    loader = _asyncload_loader(cfg, urls)
    with loader:
        for batch in loader:
            tally.batch(batch["bin"])
        return {"statistics": _jsonable_stats(loader)}


def run_webdataset(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """WebDataset's pipeline, batched by WebDataset, in a torch DataLoader with
    ``cfg.in_flight`` workers."""
    import torch.utils.data
    import webdataset as wds

    warnings.filterwarnings("ignore", message=".*suggested max number of worker")
    tally.start()
    dataset = wds.WebDataset(urls, shardshuffle=False).batched(cfg.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=cfg.in_flight)
    for batch in loader:
        tally.batch(batch["bin"])
    return {"webdataset": package_versions(["webdataset"])["webdataset"]}


RUNNERS: dict[str, Runner] = {
    "asyncload-async": run_asyncload_async,
    "asyncload-sync": run_asyncload_sync,
    "webdataset": run_webdataset,
}


def is_ordered(cfg: RunConfig) -> bool:
    """Whether samples arrive in shard order (checked sample by sample): asyncload keeps it;
    a DataLoader interleaves its workers' shards."""
    return cfg.peer != "webdataset" or cfg.in_flight <= 1


def run_one(cfg: RunConfig, context: dict[str, Any]) -> RunResult:
    """Measure one configuration in this (child) process."""
    # torch, as a training process has it loaded (the same baseline RSS for all), and the
    # peer's package, imported before the clocks start.
    peer_module = "webdataset" if cfg.peer == "webdataset" else "asyncload.sources"
    return harness.measure(
        cfg,
        lambda tally: RUNNERS[cfg.peer](cfg, context["urls"], tally),
        SampleChecker(cfg.total, cfg.size, ordered=is_ordered(cfg)),
        preload=("torch", peer_module),
    )


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> harness.Report:
    """Write the shards, serve them, run every configuration over the rounds."""
    configs = plan(args.quick)
    shards, per_shard = shard_layout(args.quick)
    directory = Path(tempfile.mkdtemp(prefix="asyncload-bench-tar-"))
    try:
        shard_bytes = write_shards(directory, shards, per_shard)
        base_url, server = start_server(
            latency_ms=LATENCY_MS, size=SAMPLE_BYTES, count=1, files_dir=directory
        )
        try:
            urls = [f"{base_url}/file/{shard_name(i)}" for i in range(shards)]
            print(
                f"server {base_url} (pid {server.pid}); {shards} shards, "
                f"{shard_bytes / MiB:.0f} MiB; {len(configs)} configs x {args.rounds} rounds",
                file=sys.stderr,
            )
            results = harness.run_rounds(
                BENCH.script,
                configs,
                {"urls": urls},
                rounds=args.rounds,
                timeout=180.0 if args.quick else 600.0,
            )
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "meta": {
            "shards": shards,
            "samples_per_shard": per_shard,
            "shard_mib": shard_bytes / MiB,
            "sample_bytes": SAMPLE_BYTES,
            "batch_size": BATCH_SIZE,
            "latency_ms": LATENCY_MS,
            "versions": package_versions(("asyncload", "webdataset", "torch", "aiohttp")),
        },
        "summary": harness.summarize(results, configs),
        "runs": results,
    }


# --------------------------------------------------------------------------- output


def label(row: harness.Row) -> str:
    k = row["in_flight"]
    if row["peer"] == "webdataset":
        return f"WebDataset + DataLoader, {k} workers"
    how = "`async for`" if row["peer"] == "asyncload-async" else "`for`"
    return f"asyncload, {how}, prefetch_shards={k}"


def _headline(summary: list[harness.Row]) -> list[str]:
    """One sentence computed from the numbers, so that it stays true when regenerated."""
    ok = [r for r in summary if r["samples_per_s"] and r["peak_rss_mib"]]
    ours = [r for r in ok if r["peer"] != "webdataset"]
    theirs = [r for r in ok if r["peer"] == "webdataset"]
    if not ours or not theirs:
        return []
    a = max(ours, key=lambda r: r["samples_per_s"])
    w = max(theirs, key=lambda r: r["samples_per_s"])
    return [
        "### In short",
        "",
        f"- The fastest asyncload run ({label(a)}) read {a['samples_per_s']:,.0f} "
        f"samples/s, {a['samples_per_s'] / w['samples_per_s']:.2f}x the fastest WebDataset "
        f"run ({label(w)}, {w['samples_per_s']:,.0f} samples/s), in "
        f"{a['peak_rss_mib']:,.0f} MiB of summed RSS against {w['peak_rss_mib']:,.0f} MiB, "
        f"first batch after {a['first_batch_s']:.2f} s against {w['first_batch_s']:.2f} s.",
        "",
    ]


def render(report: harness.Report) -> str:
    """The tar section of ``docs/benchmarks.md``."""
    meta = report["meta"]
    versions = meta.get("versions", {})
    lines = [
        "## Tar shards over HTTP",
        "",
        f"{meta['shards']} WebDataset-layout tar shards of {meta['samples_per_shard']} samples "
        f"({meta['shard_mib']:.0f} MiB in all; each sample a {meta['sample_bytes'] // 1024} KiB "
        "`.bin` and a `.cls` member) from the local server (`benchmarks/server.py`, "
        f"`/file/{{name}}`), which waits {meta['latency_ms']:g} ms before the first byte of "
        "each shard and then streams it at full speed (sendfile). Every peer reads every "
        f"sample once, in batches of {meta['batch_size']}; every consumer process has torch "
        f"imported. asyncload {versions.get('asyncload')}, webdataset "
        f"{versions.get('webdataset')}, torch {versions.get('torch')}.",
        "",
        "- asyncload: `al.Loader(TarShardSource(urls, prefetch_shards=k), batch_size=32)`, "
        "`async for` on uvloop or `for` (the sync bridge); `k` shards are read at once.",
        "- WebDataset: `DataLoader(wds.WebDataset(urls, shardshuffle=False).batched(32), "
        "batch_size=None, num_workers=w)`; each worker reads its shards one at a time, each "
        "through a `curl` subprocess (counted in the summed RSS and CPU).",
        "",
        *command_block(meta),
        "",
        run_line(meta),
        "",
        *results_table(report["summary"], label),
        "",
        *_headline(report["summary"]),
        *failed_runs(report["summary"], label),
    ]
    return "\n".join(lines)


BENCH = harness.Benchmark(
    name="tar",
    file=__file__,
    doc=__doc__,
    run=run,
    render=render,
    child=run_one,
    label=label,
)

if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
