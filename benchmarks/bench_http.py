"""Side-by-side HTTP loading benchmark: asyncload vs plain asyncio + aiohttp vs torch DataLoader.

One command runs every loader against the same local server (``benchmarks/server.py``:
16 KiB samples, 0 ms and 20 ms of injected latency per request, batches of 32)::

    .venv/bin/python benchmarks/bench_http.py [--quick] [--out benchmarks/results/http.json]

Loaders compared, each at a given number of requests in flight:

* ``asyncload-sync``: ``al.Loader(al.sources.HTTPSource(urls), batch_size=32,
  concurrency=C, prefetch=max(2, C // 32))`` consumed with ``for batch in loader``
  (the background-event-loop bridge);
* ``asyncload-async``: the same loader consumed with ``async for`` on uvloop;
* ``plain-asyncio``: hand-written aiohttp client, C worker coroutines over a shared index
  iterator, one ``ClientSession`` with connector limit C, batches of 32 as lists, uvloop;
* ``dataloader``: ``torch.utils.data.DataLoader`` over a map-style Dataset doing a blocking
  ``http.client`` GET (keep-alive, one connection per worker), ``num_workers`` = W.

Measured per run: samples/s from the first batch to the last one, time to the first
batch (from building the loader), peak summed RSS of the consumer process and all its
children (DataLoader workers included, sampled every 50 ms), and CPU time of the consumer
and its workers per sample, from the first batch to the last. Each run is a fresh
subprocess (which imports torch, as a training process would), runs are interleaved over
rounds, and the medians are reported. Every sample's
length and content are checked, and every sample must arrive exactly once: a wrong answer
fails the command (exit status 1); slowness never does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
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
    sample_urls,
    tree_cpu_seconds,
)
from benchmarks.server import run_event_loop, start_server, stop_server

BATCH_SIZE = 32
SAMPLE_BYTES = 16384
LATENCIES_MS = (0.0, 20.0)
RESULT_PREFIX = "RESULT "
LOADER_ORDER = ("asyncload-sync", "asyncload-async", "plain-asyncio", "dataloader")
ASYNCLOAD_LOADERS = ("asyncload-sync", "asyncload-async")


# --------------------------------------------------------------------------- plan


def measured_samples(requests_in_flight: int, latency_ms: float, quick: bool) -> int:
    """Samples to measure after the first batch. With latency: 4,096 (512 in quick mode)
    unless the latency bound ``in_flight / latency`` would make that take longer than
    about 8 s (1.5 s quick), never fewer than 256 (64 quick). Without latency the runs
    are CPU-bound and fast: 16,384 (2,048 quick). Always a multiple of 32."""
    max_n, target_s, min_n = (512, 1.5, 64) if quick else (4096, 8.0, 256)
    if latency_ms <= 0:
        return 4 * max_n
    bound = max(1, requests_in_flight) / (latency_ms / 1000.0) * target_s
    n = int(bound) // BATCH_SIZE * BATCH_SIZE
    return max(min_n, min(max_n, n))


def plan(quick: bool, with_dataloader_64: bool) -> list[RunConfig]:
    """The configurations of one round."""
    if quick:
        grid = {
            "asyncload-sync": (64,),
            "asyncload-async": (64,),
            "plain-asyncio": (64,),
            "dataloader": (0, 8),
        }
    else:
        grid = {
            "asyncload-sync": (64, 256),
            "asyncload-async": (64, 256),
            "plain-asyncio": (64, 256),
            "dataloader": (0, 8, 16, 64) if with_dataloader_64 else (0, 8, 16),
        }
    configs = []
    for latency in LATENCIES_MS:
        for loader in LOADER_ORDER:
            for in_flight in grid[loader]:
                n = measured_samples(in_flight, latency, quick)
                configs.append(RunConfig(loader, in_flight, latency, n, BATCH_SIZE, SAMPLE_BYTES))
    return configs


# --------------------------------------------------------------------------- loaders
# Each runner builds its loader right after ``tally.start()`` and feeds every batch to
# ``tally.batch``; it returns extra facts worth keeping (e.g. the loader's statistics).

Runner = Callable[[RunConfig, list[str], Tally], dict[str, Any]]


def _asyncload_loader(cfg: RunConfig, urls: list[str]) -> Any:
    import asyncload as al

    source = al.sources.HTTPSource(urls, max_connections=cfg.in_flight)
    return al.Loader(
        source,
        batch_size=cfg.batch_size,
        concurrency=cfg.in_flight,
        prefetch=max(2, cfg.in_flight // cfg.batch_size),
    )


def _jsonable_stats(loader: Any) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        return json.loads(json.dumps(loader.statistics(), default=str))
    return {}


def run_asyncload_sync(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """asyncload through its synchronous bridge: ``for batch in loader``."""
    tally.start()
    loader = _asyncload_loader(cfg, urls)
    with loader:
        for batch in loader:
            tally.batch(batch)
        stats = _jsonable_stats(loader)
    return {"prefetch": max(2, cfg.in_flight // cfg.batch_size), "statistics": stats}


def run_asyncload_async(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """asyncload in the caller's event loop (uvloop): ``async for batch in loader``."""

    async def main() -> dict[str, Any]:
        tally.start()
        loader = _asyncload_loader(cfg, urls)
        async with loader:
            async for batch in loader:
                tally.batch(batch)
            stats = _jsonable_stats(loader)
        return {"prefetch": max(2, cfg.in_flight // cfg.batch_size), "statistics": stats}

    result: dict[str, Any] = run_event_loop(main())
    return result


async def plain_asyncio_batches(
    urls: Sequence[str], concurrency: int, batch_size: int
) -> AsyncIterator[list[bytes]]:
    """The hand-written baseline: ``concurrency`` worker coroutines take indices from one
    shared iterator and GET them with one aiohttp session (connector limit
    ``concurrency``); bodies are batched as lists in completion order."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=concurrency)
        indices = iter(range(len(urls)))

        async def worker() -> None:
            try:
                for i in indices:
                    async with session.get(urls[i]) as resp:
                        resp.raise_for_status()
                        body = await resp.read()
                    await queue.put(body)
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put(exc)

        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        try:
            batch: list[bytes] = []
            for _ in range(len(urls)):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                batch.append(item)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def run_plain_asyncio(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """Plain asyncio + aiohttp on uvloop, ``cfg.in_flight`` requests in flight."""

    async def main() -> None:
        tally.start()
        batches = plain_asyncio_batches(urls, cfg.in_flight, cfg.batch_size)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                tally.batch(batch)

    run_event_loop(main())
    return {}


def run_dataloader(cfg: RunConfig, urls: list[str], tally: Tally) -> dict[str, Any]:
    """torch DataLoader over a blocking-HTTP map-style Dataset, ``cfg.in_flight`` workers."""
    import torch.utils.data

    from benchmarks.blocking_http import BlockingHTTPDataset

    warnings.filterwarnings("ignore", message=".*suggested max number of worker")
    tally.start()
    loader = torch.utils.data.DataLoader(
        BlockingHTTPDataset(urls), batch_size=cfg.batch_size, num_workers=cfg.in_flight
    )
    for batch in loader:
        tally.batch(batch)
    return {"requests_in_flight": max(1, cfg.in_flight)}


RUNNERS: dict[str, Runner] = {
    "asyncload-sync": run_asyncload_sync,
    "asyncload-async": run_asyncload_async,
    "plain-asyncio": run_plain_asyncio,
    "dataloader": run_dataloader,
}
ORDERED = {"asyncload-sync": True, "asyncload-async": True, "plain-asyncio": False}


def run_one(cfg: RunConfig, base_url: str) -> RunResult:
    """Run one configuration in this process and measure it (the subprocess side)."""
    import torch  # a training process has torch loaded: the same baseline RSS for all

    del torch
    if cfg.loader in ASYNCLOAD_LOADERS:
        import asyncload  # imported before the clocks start, as torch and aiohttp are

        del asyncload
    urls = sample_urls(base_url, cfg.total, cfg.latency_ms)
    rss = PeakRSS(0.05)
    tally = Tally(
        cfg.total,
        cfg.size,
        ordered=ORDERED.get(cfg.loader, True),
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


def run_in_subprocess(cfg: RunConfig, base_url: str, round_: int, timeout: float) -> RunResult:
    """Run one configuration in a fresh interpreter; any failure becomes ``ok=False``."""
    payload = json.dumps({"config": asdict(cfg), "base_url": base_url})
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


def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    """Medians over rounds, one row per configuration, in plan order."""
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.config.key, []).append(r)
    for key, runs in groups.items():
        cfg = runs[0].config
        good = [r for r in runs if r.ok]
        cpu_us = [r.cpu_us_per_sample for r in good]
        rows[key] = {
            "loader": cfg.loader,
            "in_flight": cfg.in_flight,
            "requests_in_flight": max(1, cfg.in_flight),
            "latency_ms": cfg.latency_ms,
            "samples": cfg.samples,
            "runs": len(runs),
            "ok_runs": len(good),
            "samples_per_s": _finite(median(r.samples_per_s for r in good)),
            "first_batch_s": _finite(median(r.first_batch_s for r in good)),
            "peak_rss_mib": _finite(median(r.peak_rss_bytes / MiB for r in good)),
            "cpu_us_per_sample": _finite(median(cpu_us)),
            "samples_per_s_all": [_finite(r.samples_per_s) for r in good],
            "errors": [r.error for r in runs if not r.ok],
        }
    return list(rows.values())


def compute_ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """asyncload samples/s over plain asyncio samples/s at each (latency, in flight)."""
    by = {(row["loader"], row["latency_ms"], row["in_flight"]): row for row in summary}
    out = []
    for row in summary:
        if row["loader"] != "plain-asyncio":
            continue
        lat, c = row["latency_ms"], row["in_flight"]
        entry: dict[str, Any] = {"latency_ms": lat, "in_flight": c}
        for loader in ASYNCLOAD_LOADERS:
            other = by.get((loader, lat, c))
            ratio = None
            if other and other["samples_per_s"] and row["samples_per_s"]:
                ratio = other["samples_per_s"] / row["samples_per_s"]
            entry[loader] = ratio
        out.append(entry)
    return out


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(summary: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    """A plain-text table per latency, then the asyncload / plain asyncio ratios."""
    lines = []
    for lat in sorted({row["latency_ms"] for row in summary}):
        lines.append(f"\n== {lat:g} ms per request, {SAMPLE_BYTES // 1024} KiB samples ==")
        lines.append(
            f"{'loader':<17} {'in flight':>9} {'samples/s':>10} {'1st batch s':>11} "
            f"{'peak RSS MiB':>12} {'CPU us/smp':>10} {'ok':>5}"
        )
        for row in summary:
            if row["latency_ms"] != lat:
                continue
            flight = f"{row['in_flight']}w" if row["loader"] == "dataloader" else row["in_flight"]
            lines.append(
                f"{row['loader']:<17} {flight!s:>9} {_fmt(row['samples_per_s'], ',.0f'):>10} "
                f"{_fmt(row['first_batch_s'], '.3f'):>11} {_fmt(row['peak_rss_mib'], ',.0f'):>12} "
                f"{_fmt(row['cpu_us_per_sample'], '.0f'):>10} {row['ok_runs']}/{row['runs']:<3}"
            )
    lines.append("\nasyncload / plain asyncio (samples/s):")
    for entry in ratios:
        parts = [f"{name} {_fmt(entry[name], '.3f')}" for name in ASYNCLOAD_LOADERS]
        lines.append(
            f"  {entry['latency_ms']:g} ms, {entry['in_flight']} in flight: " + ", ".join(parts)
        )
    lines.append("  ('Nw' = DataLoader with N workers, N or 1 requests in flight)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: < 60 s on 2 cores")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (1 with --quick)")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="also write this Markdown report (e.g. docs/benchmarks.md)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        spec = json.loads(args.child)
        cfg = RunConfig(**spec["config"])
        try:
            result = run_one(cfg, spec["base_url"])
        except BaseException as exc:
            where = traceback.format_exc().strip().splitlines()[-3:-1]
            result = RunResult(
                config=cfg,
                error=f"{type(exc).__name__}: {exc} [{' / '.join(w.strip() for w in where)}]",
            )
            print(RESULT_PREFIX + json.dumps(result.to_json()), flush=True)
            raise
        print(RESULT_PREFIX + json.dumps(result.to_json()), flush=True)
        return 0

    import psutil

    rounds = args.rounds or (1 if args.quick else 3)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "http-quick.json.tmp" if args.quick else "http.json"
    )
    with_dl64 = not args.quick and psutil.virtual_memory().available > 8 * 1024**3
    configs = plan(args.quick, with_dl64)
    timeout = 180.0 if args.quick else 600.0
    count = max(c.total for c in configs)
    command = "python benchmarks/bench_http.py" + (" --quick" if args.quick else "")

    started = time.time()
    load_before = list(os.getloadavg())
    results: list[RunResult] = []
    base_url, server = start_server(latency_ms=0, size=SAMPLE_BYTES, count=count)
    try:
        print(
            f"server {base_url} (pid {server.pid}); {len(configs)} configs x {rounds} rounds",
            file=sys.stderr,
        )
        for round_ in range(rounds):
            # Interleave: every round runs every config, starting at a different one.
            shift = (round_ * len(configs)) // rounds
            for cfg in itertools.islice(itertools.cycle(configs), shift, shift + len(configs)):
                r = run_in_subprocess(cfg, base_url, round_, timeout)
                results.append(r)
                status = (
                    f"{r.samples_per_s:8,.0f} samples/s  first {r.first_batch_s:6.3f} s  "
                    f"rss {r.peak_rss_bytes / MiB:6,.0f} MiB"
                    if r.ok
                    else f"FAILED: {r.error}"
                )
                print(
                    f"[round {round_ + 1}/{rounds}] {cfg.key:<28} {status}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stop_server(server)

    order = {c.key: i for i, c in enumerate(configs)}
    summary = sorted(summarize(results), key=lambda row: order[_key(row)])
    ratios = compute_ratios(summary)
    report = {
        "meta": {
            "command": command,
            "quick": args.quick,
            "rounds": rounds,
            "batch_size": BATCH_SIZE,
            "sample_bytes": SAMPLE_BYTES,
            "latencies_ms": list(LATENCIES_MS),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine_info(),
            "asyncload_version": _asyncload_version(),
            "dataloader_64_workers": with_dl64,
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
        },
        "summary": summary,
        "ratios": ratios,
        "runs": [_clean(r.to_json()) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_table(summary, ratios))
    print(f"\nwrote {out} in {report['meta']['duration_s']} s")
    if args.render:
        from benchmarks.render import render

        args.render.write_text(render(report))
        print(f"wrote {args.render}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.config.key} round {r.round + 1}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _key(row: dict[str, Any]) -> str:
    return f"{row['loader']}/{row['in_flight']}/{row['latency_ms']:g}ms"


def _asyncload_version() -> str | None:
    try:
        import asyncload
    except Exception:
        return None
    return str(getattr(asyncload, "__version__", "unknown"))


def _clean(obj: Any) -> Any:
    """NaN to None, recursively, so the JSON is standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


if __name__ == "__main__":
    sys.exit(main())
