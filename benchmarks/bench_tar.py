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

Measured per run (each in a fresh subprocess that has torch imported, runs interleaved
over rounds, medians reported): samples/s from the first batch to the last, time to the
first batch (from building the loader), peak summed RSS of the consumer process and all
its children (DataLoader workers and ``curl`` processes included, sampled every 50 ms),
and CPU µs per sample of that process tree. Exit status 1 only when a run is broken (an
exception, a sample missing, repeated or with wrong bytes), never for slowness.

``--render PAGE`` adds (or replaces) only this benchmark's section of ``PAGE``, between
its ``tar-benchmark`` markers; the other sections are left as they are. With ``--from
JSON`` it renders stored results instead of running the benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    ROOT,
    MiB,
    PeakRSS,
    RunConfig,
    RunResult,
    Tally,
    cpu_seconds,
    machine_info,
    median,
    tree_cpu_seconds,
)
from benchmarks.server import run_event_loop, sample_bytes, start_server, stop_server

BATCH_SIZE = 32
SAMPLE_BYTES = 16384
LATENCY_MS = 20.0
RESULT_PREFIX = "RESULT "
PEERS = ("asyncload-async", "asyncload-sync", "webdataset")
TAR_JSON = ROOT / "benchmarks" / "results" / "tar.json"
TAR_BEGIN = "<!-- tar-benchmark: begin (benchmarks/bench_tar.py --render) -->"
TAR_END = "<!-- tar-benchmark: end -->"


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
        RunConfig(peer, k, LATENCY_MS, measured, BATCH_SIZE, SAMPLE_BYTES)
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


# --------------------------------------------------------------------------- loaders
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
    return {"webdataset": _version("webdataset")}


RUNNERS: dict[str, Runner] = {
    "asyncload-async": run_asyncload_async,
    "asyncload-sync": run_asyncload_sync,
    "webdataset": run_webdataset,
}


def is_ordered(cfg: RunConfig) -> bool:
    """Whether samples arrive in shard order (checked sample by sample): asyncload keeps it;
    a DataLoader interleaves its workers' shards."""
    return cfg.loader != "webdataset" or cfg.in_flight <= 1


def run_one(cfg: RunConfig, urls: list[str]) -> RunResult:
    """Run one configuration in this process and measure it (the subprocess side)."""
    import torch  # a training process has torch loaded: the same baseline RSS for all

    del torch
    # The peer's package is imported before the clocks start, as torch is.
    importlib.import_module("webdataset" if cfg.loader == "webdataset" else "asyncload.sources")
    rss = PeakRSS(0.05)
    tally = Tally(
        cfg.total,
        cfg.size,
        ordered=is_ordered(cfg),
        cpu_probe=lambda: tree_cpu_seconds() - rss.cpu_s,  # the sampler's CPU is not the loader's
    )
    cpu0 = cpu_seconds()
    wall0 = time.perf_counter()
    with rss:
        extra = RUNNERS[cfg.loader](cfg, urls, tally)
    tally.finish()
    extra["loadavg_1min"] = os.getloadavg()[0]
    return RunResult(
        config=cfg,
        ok=True,
        samples_per_s=tally.samples_per_s,
        first_batch_s=tally.first_batch_s,
        peak_rss_bytes=rss.peak,
        cpu_s=cpu_seconds() - cpu0 - rss.cpu_s,
        cpu_us_per_sample=tally.cpu_us_per_sample,
        wall_s=time.perf_counter() - wall0,
        batches=tally.batches,
        extra=extra,
    )


# --------------------------------------------------------------------------- orchestration


def run_in_subprocess(cfg: RunConfig, urls: list[str], round_: int, timeout: float) -> RunResult:
    """Run one configuration in a fresh interpreter; any failure becomes ``ok=False``."""
    payload = json.dumps({"config": asdict(cfg), "urls": urls})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", payload]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return RunResult(config=cfg, round=round_, error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = RunResult.from_json(json.loads(line[len(RESULT_PREFIX) :]))
            result.round = round_
            if proc.returncode != 0 and result.ok:
                result.ok = False
                result.error = f"exit status {proc.returncode}: {_tail(proc.stderr)}"
            return result
    return RunResult(
        config=cfg,
        round=round_,
        error=f"exit status {proc.returncode}, no result: {_tail(proc.stderr or proc.stdout)}",
    )


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def summarize(results: list[RunResult], configs: list[RunConfig]) -> list[dict[str, Any]]:
    """Medians over rounds, one row per configuration, in plan order."""
    rows = []
    for cfg in configs:
        runs = [r for r in results if r.config.key == cfg.key]
        good = [r for r in runs if r.ok]
        rows.append(
            {
                "loader": cfg.loader,
                "shards_in_flight": cfg.in_flight,
                "samples": cfg.total,
                "runs": len(runs),
                "ok_runs": len(good),
                "samples_per_s": _finite(median(r.samples_per_s for r in good)),
                "first_batch_s": _finite(median(r.first_batch_s for r in good)),
                "peak_rss_mib": _finite(median(r.peak_rss_bytes / MiB for r in good)),
                "cpu_us_per_sample": _finite(median(r.cpu_us_per_sample for r in good)),
                "samples_per_s_all": [_finite(r.samples_per_s) for r in good],
                "errors": [r.error for r in runs if not r.ok],
            }
        )
    return rows


def _loadavg(values: list[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def peer_name(row: dict[str, Any]) -> str:
    k = row["shards_in_flight"]
    if row["loader"] == "webdataset":
        return f"WebDataset + DataLoader, {k} workers"
    how = "`async for`" if row["loader"] == "asyncload-async" else "`for`"
    return f"asyncload, {how}, prefetch_shards={k}"


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = [
        f"{'loader':<44} {'samples/s':>10} {'1st batch s':>11} {'peak RSS MiB':>12} "
        f"{'CPU us/smp':>10} {'ok':>5}"
    ]
    for row in summary:
        lines.append(
            f"{peer_name(row):<44} {_fmt(row['samples_per_s'], ',.0f'):>10} "
            f"{_fmt(row['first_batch_s'], '.3f'):>11} {_fmt(row['peak_rss_mib'], ',.0f'):>12} "
            f"{_fmt(row['cpu_us_per_sample'], '.0f'):>10} {row['ok_runs']}/{row['runs']:<3}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the Markdown section


def _headline(summary: list[dict[str, Any]]) -> list[str]:
    """One sentence computed from the numbers, so that it stays true when regenerated."""
    ok = [r for r in summary if r["samples_per_s"] and r["peak_rss_mib"]]
    ours = [r for r in ok if r["loader"] != "webdataset"]
    theirs = [r for r in ok if r["loader"] == "webdataset"]
    if not ours or not theirs:
        return []
    a = max(ours, key=lambda r: r["samples_per_s"])
    w = max(theirs, key=lambda r: r["samples_per_s"])
    return [
        f"- The fastest asyncload run ({peer_name(a)}) read {a['samples_per_s']:,.0f} "
        f"samples/s, {a['samples_per_s'] / w['samples_per_s']:.2f}x the fastest WebDataset "
        f"run ({peer_name(w)}, {w['samples_per_s']:,.0f} samples/s), in "
        f"{a['peak_rss_mib']:,.0f} MiB of summed RSS against {w['peak_rss_mib']:,.0f} MiB, "
        f"first batch after {a['first_batch_s']:.2f} s against {w['first_batch_s']:.2f} s.",
        "",
    ]


def render_tar(report: dict[str, Any]) -> str:
    """This benchmark's section of ``docs/benchmarks.md``, markers included."""
    meta = report["meta"]
    mode = "quick smoke mode (4 shards, one round)" if meta["quick"] else "full mode"
    versions = meta.get("versions", {})
    lines = [
        TAR_BEGIN,
        "",
        "## Tar shards over HTTP",
        "",
        f"{meta['shards']} WebDataset-layout tar shards of {meta['samples_per_shard']} samples "
        f"({meta['shard_mib']:.0f} MiB in all; each sample a {meta['sample_bytes'] // 1024} KiB "
        "`.bin` and a `.cls` member) from the local server (`benchmarks/server.py`, "
        f"`/file/{{name}}`), which waits {meta['latency_ms']:g} ms before the first byte of "
        "each shard and then streams it at full speed (sendfile). Every peer reads every "
        f"sample once, in batches of {meta['batch_size']}; every sample's bytes are checked. "
        f"asyncload {versions.get('asyncload')}, webdataset {versions.get('webdataset')}, "
        f"torch {versions.get('torch')}.",
        "",
        "- asyncload: `al.Loader(TarShardSource(urls, prefetch_shards=k), batch_size=32)`, "
        "`async for` on uvloop or `for` (the sync bridge); `k` shards are read at once.",
        "- WebDataset: `DataLoader(wds.WebDataset(urls, shardshuffle=False).batched(32), "
        "batch_size=None, num_workers=w)`; each worker reads its shards one at a time, each "
        "through a `curl` subprocess.",
        "",
        "```sh",
        f".venv/bin/python {meta['command'].removeprefix('python ')} --render docs/benchmarks.md",
        "```",
        "",
        f"This section: {mode}, {meta['rounds']} interleaved round(s), each run a fresh "
        f"process with torch imported, run on {meta['started']}, {meta['duration_s']:.0f} s "
        "in all; medians. samples/s counts from the first batch to the last; first batch is "
        "from building the loader; peak RSS is summed over the consumer process and all its "
        "children (DataLoader workers and `curl` included), sampled every 50 ms; CPU is that "
        "process tree's, per sample. The server shares the 2 cores: compare rows of one run.",
        f"Load average (1, 5, 15 min) before the run: {_loadavg(meta.get('loadavg_before'))}; "
        f"after: {_loadavg(meta.get('loadavg_after'))}.",
        "",
        "| loader | samples/s | samples/s range | first batch (s) | peak RSS (MiB) "
        "| CPU µs/sample | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in report["summary"]:
        runs = [x for x in row["samples_per_s_all"] if x is not None]
        spread = f"{min(runs):,.0f} to {max(runs):,.0f}" if len(runs) > 1 else "n/a"
        lines.append(
            f"| {peer_name(row)} | {_fmt(row['samples_per_s'], ',.0f')} | {spread} "
            f"| {_fmt(row['first_batch_s'], '.3f')} | {_fmt(row['peak_rss_mib'], ',.0f')} "
            f"| {_fmt(row['cpu_us_per_sample'], '.0f')} | {row['ok_runs']}/{row['runs']} |"
        )
    lines.append("")
    lines += _headline(report["summary"])
    errors = [(peer_name(r), e) for r in report["summary"] for e in r["errors"]]
    if errors:
        lines += ["### Failed runs", ""]
        lines += [f"- {name}: `{e}`" for name, e in errors]
        lines.append("")
    lines.append(TAR_END)
    return "\n".join(lines)


def splice_tar(page: str, section: str) -> str:
    """``page`` with its tar section replaced by ``section``, or ``section`` appended: the
    rest of the page (the HTTP and S3 sections) is kept as it is."""
    start, end = page.find(TAR_BEGIN), page.find(TAR_END)
    if start != -1 and end > start:
        return page[:start] + section + page[end + len(TAR_END) :]
    return page.rstrip("\n") + ("\n\n" if page.strip() else "") + section + "\n"


def write_section(page_path: Path, report: dict[str, Any]) -> None:
    """Add or replace this benchmark's section of the Markdown page at ``page_path``."""
    page = page_path.read_text() if page_path.is_file() else ""
    page_path.write_text(splice_tar(page, render_tar(report)))
    print(f"wrote the tar section of {page_path}")


# --------------------------------------------------------------------------- main


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _clean(obj: Any) -> Any:
    """NaN to None, recursively, so the JSON is standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def child_main(payload: str) -> int:
    spec = json.loads(payload)
    cfg = RunConfig(**spec["config"])
    try:
        result = run_one(cfg, spec["urls"])
    except BaseException as exc:
        where = traceback.format_exc().strip().splitlines()[-3:-1]
        result = RunResult(
            config=cfg,
            error=f"{type(exc).__name__}: {exc} [{' / '.join(w.strip() for w in where)}]",
        )
        print(RESULT_PREFIX + json.dumps(_clean(result.to_json())), flush=True)
        raise
    print(RESULT_PREFIX + json.dumps(_clean(result.to_json())), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: seconds, for CI")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (1 with --quick)")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="also add (or replace) the tar section of this Markdown page (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--from",
        dest="from_json",
        type=Path,
        default=None,
        help="with --render: render this results JSON (e.g. benchmarks/results/tar.json) "
        "instead of running the benchmark",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.from_json is not None:
        if args.render is None:
            parser.error("--from needs --render")
        write_section(args.render, json.loads(args.from_json.read_text()))
        return 0

    rounds = args.rounds or (1 if args.quick else 3)
    out = args.out or (
        ROOT / "benchmarks" / "results" / "tar-quick.json.tmp" if args.quick else TAR_JSON
    )
    configs = plan(args.quick)
    shards, per_shard = shard_layout(args.quick)
    timeout = 120.0 if args.quick else 600.0
    command = "python benchmarks/bench_tar.py" + (" --quick" if args.quick else "")
    command += f" --rounds {args.rounds}" if args.rounds else ""

    started = time.time()
    load_before = list(os.getloadavg())
    results: list[RunResult] = []
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
                f"{shard_bytes / MiB:.0f} MiB; {len(configs)} configs x {rounds} rounds",
                file=sys.stderr,
            )
            for round_ in range(rounds):
                # Interleave: every round runs every config, starting at a different one.
                shift = (round_ * len(configs)) // rounds
                for cfg in itertools.islice(itertools.cycle(configs), shift, shift + len(configs)):
                    r = run_in_subprocess(cfg, urls, round_, timeout)
                    results.append(r)
                    status = (
                        f"{r.samples_per_s:8,.0f} samples/s  first {r.first_batch_s:6.3f} s  "
                        f"rss {r.peak_rss_bytes / MiB:6,.0f} MiB"
                        if r.ok
                        else f"FAILED: {r.error}"
                    )
                    print(
                        f"[round {round_ + 1}/{rounds}] {cfg.loader:<16} {cfg.in_flight:>2} {status}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    summary = summarize(results, configs)
    report: dict[str, Any] = {
        "meta": {
            "command": command,
            "quick": args.quick,
            "rounds": rounds,
            "shards": shards,
            "samples_per_shard": per_shard,
            "shard_mib": shard_bytes / MiB,
            "sample_bytes": SAMPLE_BYTES,
            "batch_size": BATCH_SIZE,
            "latency_ms": LATENCY_MS,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine_info(),
            "versions": {
                name: _version(name) for name in ("asyncload", "webdataset", "torch", "aiohttp")
            },
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
        },
        "summary": summary,
        "runs": [_clean(r.to_json()) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(summary))
    print(f"\nwrote {out} in {report['meta']['duration_s']} s")
    if args.render:
        write_section(args.render, report)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.config.key} round {r.round + 1}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
