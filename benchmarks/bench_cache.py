"""Cache benchmark: epoch 1 vs epoch 2 over HTTP per cache tier, and hit rate vs budget.

.venv/bin/python benchmarks/bench_cache.py [--quick] [--rounds R] [--out PATH] [--render PAGE ...]
.venv/bin/python benchmarks/bench_cache.py --from-json benchmarks/results/cache.json --render PAGE

Part 1, epochs over HTTP. A local server answers ``GET /sample/{i}`` with the bytes of
``benchmarks/server.py`` (``sample_bytes``: 16 KiB) after 20 ms (``asyncio.sleep``), and
counts the requests. It runs in a thread of this process, which otherwise only waits for
its children: each configuration runs in a fresh subprocess (so peak RSS is its own), on
uvloop, ``async for``, two epochs over the same ``al.Loader(HTTPSource(urls),
batch_size=32, concurrency=64, cache=...)``:

* ``none``: no cache;
* ``memory``: ``LRUCache(max_bytes=2 x data)``;
* ``disk``: ``DiskCache(<temp dir>, max_bytes=4 x data)``;
* ``memory+disk``: ``TieredCache(LRUCache(...), DiskCache(...))``;
* ``memory+disk, restarted``: a new process over the directory ``memory+disk`` filled.

Per epoch: samples/s from the first batch to the last, time to the first batch (epoch 1:
from building the loader; epoch 2: from starting the loop), peak RSS so far, and the
requests the server saw. Every sample's bytes are checked, each must arrive exactly once
per epoch, and a cached epoch must send zero requests: a wrong answer exits with status 1.

Part 2, hit rate vs budget. A trace of keys drawn from a Zipf law (``p(rank r) ~ r**-s``,
s = 1.1) over N keys of 1 KiB each, replayed through the real ``LRUCache.get_or_load``
(in-memory loads) for each policy (lru, lfu, fifo) and byte budget (1 % to 100 % of the
data): exact and repeatable (seeded). A shorter prefix of the trace also goes through a
``Loader`` (``sampler=`` the trace, ``concurrency=1``, a dataset without ``getitems``), whose
``cache_hits`` must equal the direct replay's.

Writes ``benchmarks/results/cache.json`` and ``docs/img/cache_hit_rate.png``; ``--render``
replaces the section between the ``cache-benchmark`` markers of each page given (appends it
if absent). ``--quick`` (a few seconds, for CI) writes only ``.tmp`` files under
``benchmarks/results/`` (rendered pages too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from aiohttp import web

from benchmarks.server import check_sample, sample_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "img" / "cache_hit_rate.png"
BEGIN = "<!-- cache-benchmark: begin (benchmarks/bench_cache.py --render) -->"
END = "<!-- cache-benchmark: end -->"
RESULT_PREFIX = "RESULT "
MiB = 1 << 20

SIZE = 16384
LATENCY_MS = 20.0
BATCH_SIZE = 32
CONCURRENCY = 64
CONFIGS = ("none", "memory", "disk", "memory+disk", "memory+disk, restarted")
POLICIES = ("lru", "lfu", "fifo")
BUDGETS_PCT = (1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)
ZIPF_S = 1.1
ITEM_BYTES = 1024
SEED = 20240611


# --------------------------------------------------------------------------- measuring
# Self-contained on purpose: benchmarks/common.py is being reworked; only the server's sample
# format (benchmarks/server.py) is shared.


class PeakRSS:
    """Peak resident set size of this process, sampled every ``interval`` s by a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class EpochTimer:
    """Checks every sample of an ordered epoch (bytes and position) and times its batches:
    samples/s from the first batch to the last, and the time to the first batch."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first_batch_samples = 0
        self.t0 = time.perf_counter()
        self.t_first: float | None = None
        self.t_last = self.t0

    def batch(self, batch: list[bytes]) -> None:
        now = time.perf_counter()
        for sample in batch:
            check_sample(sample, SIZE, self.count)
            self.count += 1
        if self.t_first is None:
            self.t_first, self.first_batch_samples = now, len(batch)
        self.t_last = now

    def result(self) -> tuple[float, float]:
        """``(samples_per_s, first_batch_s)``; raises unless every sample came."""
        if self.count != self.expected or self.t_first is None:
            raise ValueError(f"got {self.count} samples, expected {self.expected}")
        span = self.t_last - self.t_first
        measured = self.count - self.first_batch_samples
        return (measured / span if span > 0 else math.nan), self.t_first - self.t0


def median(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def machine_info() -> dict[str, Any]:
    import psutil

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for name in ("asyncload", "aiohttp", "uvloop", "numpy", "matplotlib"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def run_event_loop(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --------------------------------------------------------------------------- part 1: epochs


class CountingServer:
    """``GET /sample/{i}``: ``sample_bytes(i, size)`` after ``latency_ms``; ``GET /count``:
    the number of ``/sample`` requests so far. Runs its own event loop in a thread."""

    def __init__(self, latency_ms: float, size: int) -> None:
        self.latency_s = latency_ms / 1000.0
        self.size = size
        self.requests = 0
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="counting-server", daemon=True)

    async def _sample(self, request: web.Request) -> web.Response:
        self.requests += 1  # only this loop's thread writes it
        await asyncio.sleep(self.latency_s)
        body = sample_bytes(int(request.match_info["index"]), self.size)
        return web.Response(body=body, content_type="application/octet-stream")

    async def _count(self, request: web.Request) -> web.Response:
        return web.Response(text=str(self.requests))

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/sample/{index}", self._sample)
        app.router.add_get("/count", self._count)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> CountingServer:
        self._thread.start()
        if not self._ready.wait(15):
            raise TimeoutError("the counting server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def server_count(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url}/count", timeout=10) as response:
        return int(response.read())


def make_cache(name: str, data_bytes: int, directory: str) -> Any:
    import asyncload as al

    def memory() -> al.LRUCache:
        return al.LRUCache(max_bytes=2 * data_bytes)

    def disk() -> al.DiskCache:
        return al.DiskCache(directory, max_bytes=4 * data_bytes)

    if name == "none":
        return None
    if name == "memory":
        return memory()
    if name == "disk":
        return disk()
    return al.TieredCache(memory(), disk())


async def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Two epochs of one configuration, in this (fresh) process."""
    import asyncload as al

    n, base_url = spec["samples"], spec["base_url"]
    urls = [f"{base_url}/sample/{i}" for i in range(n)]
    epochs: list[dict[str, Any]] = []
    loader: al.Loader | None = None
    with PeakRSS(0.05) as rss:
        for epoch in (1, 2):
            before = server_count(base_url)
            timer = EpochTimer(n)
            if loader is None:  # epoch 1 times the loader's construction too
                cache = make_cache(spec["cache"], n * SIZE, spec["dir"])
                loader = al.Loader(
                    al.sources.HTTPSource(urls),
                    batch_size=BATCH_SIZE,
                    concurrency=CONCURRENCY,
                    prefetch=2,
                    cache=cache,
                )
            async for batch in loader:
                timer.batch(batch)
            samples_per_s, first_batch_s = timer.result()
            stats = loader.statistics()
            rss.sample()
            epochs.append(
                {
                    "epoch": epoch,
                    "samples_per_s": samples_per_s if math.isfinite(samples_per_s) else None,
                    "first_batch_s": first_batch_s,
                    "peak_rss_mib": rss.peak / MiB,
                    "requests": server_count(base_url) - before,
                    "cache_hits": stats["cache_hits"],
                    "cache_misses": stats["cache_misses"],
                }
            )
        assert loader is not None
        await loader.aclose()
    return {"cache": spec["cache"], "epochs": epochs}


def expected_requests(config: str, epoch: int, n: int) -> int:
    if config == "none":
        return n
    if config == "memory+disk, restarted":
        return 0
    return n if epoch == 1 else 0


def run_config(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One configuration in a fresh interpreter; a failure becomes ``{"error": ...}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"cache": spec["cache"], "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            break
    else:
        tail = " | ".join(proc.stderr.strip().splitlines()[-4:])
        return {"cache": spec["cache"], "error": f"exit status {proc.returncode}: {tail}"}
    wrong = [
        f"epoch {e['epoch']}: {e['requests']} requests, expected {want}"
        for e in result["epochs"]
        if e["requests"] != (want := expected_requests(spec["cache"], e["epoch"], spec["samples"]))
    ]
    if wrong:
        result["error"] = "; ".join(wrong)
    return result


def run_epochs(samples: int, rounds: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with CountingServer(LATENCY_MS, SIZE) as server:
        for round_ in range(rounds):
            directory = tempfile.mkdtemp(prefix="asyncload-bench-cache-")
            try:
                for config in CONFIGS:
                    if config in ("disk", "memory+disk"):  # each starts from an empty directory
                        shutil.rmtree(directory)
                        os.makedirs(directory)
                    spec = {
                        "cache": config,
                        "samples": samples,
                        "base_url": server.base_url,
                        "dir": directory,
                    }
                    result = run_config(spec, timeout=300.0)
                    result["round"] = round_
                    runs.append(result)
                    if "error" in result:
                        status = f"FAILED: {result['error']}"
                    else:
                        status = "  ".join(
                            f"epoch {e['epoch']}: {e['samples_per_s']:9,.0f}/s "
                            f"first {e['first_batch_s']:.3f} s {e['requests']:5d} req"
                            for e in result["epochs"]
                        )
                    print(
                        f"[round {round_ + 1}/{rounds}] {config:<24} {status}",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    summary = []
    for config in CONFIGS:
        good = [r for r in runs if r["cache"] == config and "error" not in r]
        total = sum(r["cache"] == config for r in runs)
        for epoch in (1, 2):
            rows = [r["epochs"][epoch - 1] for r in good]
            summary.append(
                {
                    "cache": config,
                    "epoch": epoch,
                    "samples_per_s": median([e["samples_per_s"] for e in rows]),
                    "samples_per_s_all": [e["samples_per_s"] for e in rows if e["samples_per_s"]],
                    "first_batch_s": median([e["first_batch_s"] for e in rows]),
                    "peak_rss_mib": median([e["peak_rss_mib"] for e in rows]),
                    "requests": sorted({e["requests"] for e in rows}),
                    "cache_hits": sorted({e["cache_hits"] for e in rows}),
                    "cache_misses": sorted({e["cache_misses"] for e in rows}),
                    "ok_runs": len(good),
                    "runs": total,
                }
            )
    return {"samples": samples, "rounds": rounds, "summary": summary, "runs": runs}


# --------------------------------------------------------------------------- part 2: hit rate


def zipf_trace(keys: int, length: int, s: float, seed: int) -> np.ndarray:
    """``length`` keys in ``range(keys)``, key of popularity rank r drawn with probability
    proportional to ``r**-s``; which key has which rank is a seeded permutation."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, keys + 1, dtype=np.float64) ** -s
    ranks = rng.choice(keys, size=length, p=weights / weights.sum())
    return rng.permutation(keys)[ranks]


def epoch_trace(keys: int, epochs: int, seed: int, *, shuffle: bool) -> np.ndarray:
    """``epochs`` passes over ``range(keys)``: each a fresh seeded permutation, or in order."""
    rng = np.random.default_rng(seed)
    passes = [rng.permutation(keys) if shuffle else np.arange(keys) for _ in range(epochs)]
    return np.concatenate(passes)


async def replay(trace: list[int], policy: str, max_bytes: int) -> dict[str, Any]:
    import asyncload as al

    cache = al.LRUCache(max_bytes=max_bytes, policy=policy)  # type: ignore[arg-type]
    value = bytes(ITEM_BYTES)

    async def load() -> bytes:
        return value

    get = cache.get_or_load
    for key in trace:
        await get(key, load)
    return dict(cache.statistics())


async def through_loader(trace: list[int], keys: int, policy: str, max_bytes: int) -> int:
    """Cache hits of a Loader whose sampler is ``trace`` (one fetch at a time: exact).

    The dataset fetches one sample per call: one with ``getitems`` (``from_sequence``) is
    fetched by chunks, whose hits are taken before their misses are stored, so that an
    eviction policy sees the chunk's accesses in another order than the trace's."""
    import asyncload as al

    class OneByOne(al.AsyncDataset[bytes]):
        def __len__(self) -> int:
            return keys

        async def __getitem__(self, index: int) -> bytes:
            return bytes(ITEM_BYTES)

    dataset = OneByOne()  # cache key: the index
    cache = al.LRUCache(max_bytes=max_bytes, policy=policy)  # type: ignore[arg-type]
    loader = al.Loader(dataset, batch_size=64, sampler=trace, concurrency=1, cache=cache)
    async with loader:
        async for _ in loader:
            pass
    return int(loader.statistics()["cache_hits"])


def top_k_static(trace: np.ndarray, keys: int, k: int) -> float:
    """Hit rate of a cache that holds the ``k`` keys this trace asks for most, each from its
    first use on (hindsight: a reference line, not a bound for adaptive policies)."""
    counts = np.sort(np.bincount(trace, minlength=keys))[::-1][:k]
    return float(np.clip(counts - 1, 0, None).sum() / len(trace))


def run_hit_rate(
    keys: int, length: int, budgets: tuple[int, ...], check_length: int
) -> dict[str, Any]:
    trace_np = zipf_trace(keys, length, ZIPF_S, SEED)
    trace = trace_np.tolist()
    epochs = length // keys
    shuffled = epoch_trace(keys, epochs, SEED, shuffle=True).tolist()
    in_order = epoch_trace(keys, epochs, SEED, shuffle=False).tolist()
    curves: dict[str, list[float]] = {p: [] for p in POLICIES}
    evictions: dict[str, list[int]] = {p: [] for p in POLICIES}
    uniform: dict[str, dict[str, list[float]]] = {
        order: {p: [] for p in POLICIES} for order in ("shuffled", "in_order")
    }
    for pct in budgets:
        max_bytes = max(1, keys * pct // 100) * ITEM_BYTES
        for policy in POLICIES:
            stats = asyncio.run(replay(trace, policy, max_bytes))
            curves[policy].append(stats["hit_rate"])
            evictions[policy].append(stats["evictions"])
            for order, passes in (("shuffled", shuffled), ("in_order", in_order)):
                hit_rate = asyncio.run(replay(passes, policy, max_bytes))["hit_rate"]
                uniform[order][policy].append(hit_rate)
    check_budget = max(1, keys // 10) * ITEM_BYTES
    checks = []
    for policy in POLICIES:
        prefix = trace[:check_length]
        direct = asyncio.run(replay(prefix, policy, check_budget))["hits"]
        via_loader = asyncio.run(through_loader(prefix, keys, policy, check_budget))
        checks.append({"policy": policy, "direct_hits": direct, "loader_hits": via_loader})
    return {
        "keys": keys,
        "accesses": length,
        "distinct_keys": int(np.count_nonzero(np.bincount(trace_np, minlength=keys))),
        "zipf_s": ZIPF_S,
        "item_bytes": ITEM_BYTES,
        "seed": SEED,
        "budgets_pct": list(budgets),
        "hit_rate": curves,
        "evictions": evictions,
        "top_k_static": [top_k_static(trace_np, keys, max(1, keys * p // 100)) for p in budgets],
        # Uniform access for comparison: every key once per epoch.
        "epochs": epochs,
        "uniform": uniform,
        "loader_check": {"budget_pct": 10, "accesses": check_length, "results": checks},
    }


# --------------------------------------------------------------------------- rendering


def plot(hit: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (zipf, flat) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    x = hit["budgets_pct"]
    styles = ("o-", "s-", "^-")
    for policy, style in zip(POLICIES, styles, strict=True):
        zipf.plot(x, [100 * h for h in hit["hit_rate"][policy]], style, ms=4, label=policy.upper())
        flat.plot(
            x,
            [100 * h for h in hit["uniform"]["shuffled"][policy]],
            style,
            ms=4,
            label=policy.upper(),
        )
    zipf.plot(
        x, [100 * h for h in hit["top_k_static"]], "k--", lw=1, label="top-k static (hindsight)"
    )
    static = [p * (1 - 1 / hit["epochs"]) for p in x]  # a fixed budget's worth of keys
    flat.plot(x, static, "k:", lw=1, label="static: the same keys all along")
    zipf.set_title(
        f"Zipf s={hit['zipf_s']}: {hit['accesses']:,} lookups over {hit['keys']:,} keys",
        fontsize=10,
    )
    flat.set_title(
        f"uniform: {hit['epochs']} shuffled epochs, each key once per epoch", fontsize=10
    )
    ticks = [p for p in (1, 2, 5, 10, 20, 50, 100) if x[0] <= p <= x[-1]]
    for ax in (zipf, flat):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(p) for p in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("cache budget (% of the data's bytes, log scale)")
        ax.set_ylim(0, 100)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="upper left" if ax is flat else "lower right", fontsize=9)
    zipf.set_ylabel("hit rate (% of lookups)")
    fig.suptitle("LRUCache hit rate against budget, by policy", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


NAMES = {
    "none": "no cache",
    "memory": "memory (`LRUCache`)",
    "disk": "disk (`DiskCache`)",
    "memory+disk": "memory over disk (`TieredCache`)",
    "memory+disk, restarted": "memory over disk, restarted process",
}


def _num(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _set(values: list[int]) -> str:
    return " or ".join(f"{v:,}" for v in values) if values else "n/a"


def render_section(report: dict[str, Any]) -> str:
    meta, ep, hit = report["meta"], report["epochs"], report["hit_rate"]
    machine = meta["machine"]
    n = ep["samples"]
    lines = [
        BEGIN,
        "",
        "## Caching: epoch 1 vs epoch 2 over HTTP, and hit rate vs budget",
        "",
        f"{n:,} samples of {SIZE // 1024} KiB ({n * SIZE / MiB:.0f} MiB) from a local HTTP "
        f"server that waits {LATENCY_MS:g} ms before each answer (the bytes of "
        "`benchmarks/server.py`, served from a thread of the benchmark process with a "
        "request counter). Each cache runs in a fresh process: two epochs of "
        f"`al.Loader(HTTPSource(urls), batch_size={BATCH_SIZE}, concurrency={CONCURRENCY}, "
        "cache=...)`, `async for` on uvloop. Memory tier: `LRUCache(max_bytes=2 x data)`; disk "
        "tier: `DiskCache(tmpdir, max_bytes=4 x data)` (a temporary directory on the local "
        "disk, whose pages the OS caches); the restarted process opens the directory that the "
        "memory-over-disk run filled, with a new, empty memory tier. samples/s counts from the "
        "first batch to the last; epoch 1's first batch includes building the loader; peak "
        "RSS is the process's so far (no torch imported). Requests are counted by the server; "
        "every sample's bytes are checked.",
        "",
        "```sh",
        ".venv/bin/python benchmarks/bench_cache.py --render docs/benchmarks.md --render docs/caching.md",
        "```",
        "",
        f"This section: {'quick smoke mode' if meta['quick'] else 'full mode'}, "
        f"{ep['rounds']} interleaved round(s), medians; run on {meta['started']}, "
        f"{meta['duration_s']:.0f} s in all, on {machine['cpu_count']} cores "
        f"({machine['cpu_model']}), Python {machine['python']}. The server and the loader "
        "share those cores, so samples/s is noisy: compare rows of one run. Load average "
        f"before: {', '.join(f'{v:.2f}' for v in meta['loadavg_before'])}; after: "
        f"{', '.join(f'{v:.2f}' for v in meta['loadavg_after'])}.",
        "",
        "| cache | epoch | samples/s | samples/s range | first batch (s) | peak RSS (MiB) "
        "| requests to the server | loader cache hits / misses | runs ok |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in ep["summary"]:
        runs = [x for x in row["samples_per_s_all"] if x is not None]
        spread = f"{min(runs):,.0f} to {max(runs):,.0f}" if len(runs) > 1 else "n/a"
        hits_misses = (
            "n/a"
            if row["cache"] == "none"
            else f"{_set(row['cache_hits'])} / {_set(row['cache_misses'])}"
        )
        lines.append(
            f"| {NAMES[row['cache']]} | {row['epoch']} | {_num(row['samples_per_s'], ',.0f')} "
            f"| {spread} | {_num(row['first_batch_s'], '.3f')} | {_num(row['peak_rss_mib'], ',.0f')} "
            f"| {_set(row['requests'])} | {hits_misses} "
            f"| {row['ok_runs']}/{row['runs']} |"
        )
    by = {(r["cache"], r["epoch"]): r for r in ep["summary"]}
    lines.append("")
    base = by[("none", 2)]["samples_per_s"]
    for config in ("memory", "disk", "memory+disk"):
        one, two = by[(config, 1)]["samples_per_s"], by[(config, 2)]["samples_per_s"]
        if one and two and base:
            lines.append(
                f"- {NAMES[config]}: epoch 2 read {two:,.0f} samples/s with "
                f"{_set(by[(config, 2)]['requests'])} requests, {two / one:.1f}x its epoch 1 "
                f"and {two / base:.1f}x a second epoch without a cache."
            )
    restarted = by[("memory+disk, restarted", 1)]
    if restarted["samples_per_s"]:
        lines.append(
            f"- A restarted process over the filled directory read its first epoch at "
            f"{restarted['samples_per_s']:,.0f} samples/s with "
            f"{_set(restarted['requests'])} requests."
        )
    pct = hit["budgets_pct"]
    lines += [
        "",
        f"### Hit rate against budget, Zipf s={hit['zipf_s']}",
        "",
        f"A seeded trace of {hit['accesses']:,} lookups over {hit['keys']:,} keys of "
        f"{hit['item_bytes']:,} bytes ({hit['distinct_keys']:,} of them asked for at least "
        "once), the key of popularity rank r drawn with probability proportional to "
        f"r^-{hit['zipf_s']}, replayed through `LRUCache.get_or_load` with "
        "`max_bytes` = the budget; cold start included (at 100 % only first uses miss). "
        'Exact and repeatable. "top-k static" holds, from their first use, the keys the '
        "trace asks for most (hindsight; a reference, not a bound). For comparison, "
        f"uniform access: {hit['epochs']} epochs over the same keys, each key once per epoch, "
        "in a fresh shuffled order per epoch (right panel), or in the same order every epoch. "
        "Through a `Loader` "
        f"(`sampler=` the first {hit['loader_check']['accesses']:,} lookups, `concurrency=1`, "
        "a dataset that fetches one sample per call, "
        f"{hit['loader_check']['budget_pct']} % budget) the loader's `cache_hits` equal the "
        "direct replay's: "
        + ", ".join(
            f"{c['policy']} {c['loader_hits']:,} / {c['direct_hits']:,}"
            for c in hit["loader_check"]["results"]
        )
        + ".",
        "",
        "![hit rate against cache budget](img/cache_hit_rate.png)",
        "",
        "| budget (% of data) | Zipf: LRU | LFU | FIFO | top-k static "
        "| shuffled epochs: LRU | LFU | FIFO | same-order epochs: best policy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, p in enumerate(pct):
        values = [hit["hit_rate"][pol][i] for pol in POLICIES]
        values.append(hit["top_k_static"][i])
        values += [hit["uniform"]["shuffled"][pol][i] for pol in POLICIES]
        values.append(max(hit["uniform"]["in_order"][pol][i] for pol in POLICIES))
        lines.append(f"| {p} % | " + " | ".join(f"{100 * v:.1f} %" for v in values) + " |")
    lines.append("")
    for target in (0.5, 0.8):
        need = []
        for policy in POLICIES:
            first = next(
                (p for p, h in zip(pct, hit["hit_rate"][policy], strict=True) if h >= target), None
            )
            need.append(
                f"{policy.upper()} {first} %" if first is not None else f"{policy.upper()} never"
            )
        lines.append(
            f"- Zipf: the smallest budget measured that reaches a {100 * target:.0f} % hit rate: "
            f"{', '.join(need)}."
        )
    gaps = [
        (100 * (lfu - lru), p)
        for p, lfu, lru in zip(pct, hit["hit_rate"]["lfu"], hit["hit_rate"]["lru"], strict=True)
    ]
    best_gap, at = max(gaps)
    ahead = [p for g, p in gaps if g > 0.5]
    behind = [p for g, p in gaps if g < -0.5]
    close = [p for g, p in gaps if abs(g) <= 0.5]
    sentence = f"- Zipf: LFU leads LRU by up to {best_gap:.1f} points (at a {at} % budget)"
    if ahead:
        sentence += f"; by more than half a point at {ahead[0]} % to {ahead[-1]} %"
    if close:
        sentence += f"; within half a point at {', '.join(f'{p} %' for p in close)}"
    if behind:
        sentence += f"; LRU leads at {', '.join(f'{p} %' for p in behind)}"
    lines.append(sentence + ".")
    half = min(range(len(pct)), key=lambda i: abs(pct[i] - 50))
    shuffled = ", ".join(
        f"{policy.upper()} {100 * hit['uniform']['shuffled'][policy][half]:.1f} %"
        for policy in POLICIES
    )
    in_order = max(hit["uniform"]["in_order"][policy][half] for policy in POLICIES)
    lines.append(
        f"- Uniform access (each key once per epoch) at a {pct[half]} % budget: shuffled "
        f"epochs get {shuffled} hits; epochs in the same order get at most "
        f"{100 * in_order:.1f} %."
    )
    lines += ["", END]
    return "\n".join(lines)


# Also read the shorter "<!-- cache:begin -->" / "<!-- cache:end -->" forms of the markers,
# so that a page whose markers were rewritten that way is still spliced, not appended to.
_BEGIN_RE = re.compile(r"<!--\s*cache(?:-benchmark)?:\s*begin\b[^>]*-->")
_END_RE = re.compile(r"<!--\s*cache(?:-benchmark)?:\s*end\s*-->")


def splice(page: str, section: str) -> str:
    """``page`` with its cache section replaced by ``section`` (appended if it has none)."""
    begin = _BEGIN_RE.search(page)
    end = _END_RE.search(page, begin.end()) if begin else None
    if begin is None or end is None:
        return page.rstrip("\n") + ("\n\n" if page.strip() else "") + section + "\n"
    return page[: begin.start()] + section + page[end.end() :]


def write_outputs(report: dict[str, Any], pages: list[Path], quick: bool) -> None:
    plot_path = RESULTS / "cache_hit_rate-quick.png.tmp" if quick else PLOT
    plot(report["hit_rate"], plot_path)
    print(f"wrote {plot_path}")
    section = render_section(report)
    for page in pages:
        target = RESULTS / f"{page.stem}-cache-quick.md.tmp" if quick else page
        text = page.read_text() if page.exists() else ""
        target.write_text(splice(text, section))
        print(f"wrote the cache section of {target}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: a few seconds, .tmp outputs"
    )
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (1 with --quick)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results path")
    parser.add_argument(
        "--render",
        type=Path,
        action="append",
        default=[],
        help="replace (or add) the cache section of this Markdown page; may be repeated",
    )
    parser.add_argument(
        "--from-json", type=Path, default=None, help="run nothing: plot and render this report"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = run_event_loop(run_child(json.loads(args.child)))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        write_outputs(report, args.render, quick=bool(report["meta"]["quick"]))
        return 0

    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    started = time.time()
    load_before = list(os.getloadavg())
    epochs = run_epochs(samples=256 if quick else 4096, rounds=rounds)
    t_hit = time.perf_counter()
    hit = run_hit_rate(
        keys=1000 if quick else 10_000,
        length=20_000 if quick else 200_000,
        budgets=(1, 10, 50, 100) if quick else BUDGETS_PCT,
        check_length=2_000 if quick else 20_000,
    )
    hit["seconds"] = round(time.perf_counter() - t_hit, 1)
    report = {
        "meta": {
            "command": "python benchmarks/bench_cache.py" + (" --quick" if quick else ""),
            "quick": quick,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "machine": machine_info(),
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
            "sample_bytes": SIZE,
            "latency_ms": LATENCY_MS,
            "batch_size": BATCH_SIZE,
            "concurrency": CONCURRENCY,
        },
        "epochs": epochs,
        "hit_rate": hit,
    }
    out = args.out or RESULTS / ("cache-quick.json.tmp" if quick else "cache.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    write_outputs(report, args.render, quick)

    failures = [
        f"{r['cache']} round {r['round'] + 1}: {r['error']}" for r in epochs["runs"] if "error" in r
    ]
    failures += [
        f"loader check ({c['policy']}): loader {c['loader_hits']} hits, replay {c['direct_hits']}"
        for c in hit["loader_check"]["results"]
        if c["loader_hits"] != c["direct_hits"]
    ]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
