"""In-memory samples: asyncload vs torch DataLoader with no workers, and peak RSS against
the number of samples streamed.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--rounds R] [--render docs/benchmarks.md]

Two parts, every run a fresh child process with torch imported:

* **throughput**: a list of 65,536 samples (1 KiB float32 numpy arrays, made before the
  clock starts), 4 epochs in batches of 32, in order: ``torch.utils.data.DataLoader(list,
  batch_size=32, num_workers=0)`` against ``al.Loader(al.from_sequence(list),
  batch_size=32)`` consumed with ``for batch in loader`` (sync bridge) or ``async for``
  (uvloop). The same collate function on both sides: ``torch.utils.data.default_collate``
  (tensor batches), or ``al.default_collate`` (numpy batches; the DataLoader gets it as
  ``collate_fn``). Some asyncload settings (concurrency, prefetch, ``ordered``) get rows
  of their own.
* **alternating**: the same loaders (the DataLoader, asyncload's ``for`` and its ``async
  for`` on uvloop, default settings) over the same list in one child process, epochs
  taking turns, 8 each per collate: between fresh processes this machine's speed
  scatters by up to 30 %, which neighbouring epochs cancel.
* **rss**: 10,000, 100,000 and 1,000,000 samples made on access (a lazy sequence through
  ``al.from_sequence``, or an ``al.AsyncIterableDataset`` stream), one epoch each, numpy
  batches; peak summed RSS of each run and its ratio highest / lowest over the sizes. A
  DataLoader over the same lazy sequence is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness
from benchmarks.arrays import SAMPLE_BYTES, ArrayChecker, LazyArrays, lazy_stream, make_list
from benchmarks.common import MiB, RunConfig, RunResult, Tally, finite, median
from benchmarks.page import Column, command_block, failed_runs, num, results_table, run_line
from benchmarks.server import run_event_loop

BATCH_SIZE = 32
LIST_SAMPLES, EPOCHS = 65_536, 4
QUICK_LIST_SAMPLES, QUICK_EPOCHS = 4_096, 1
RSS_SIZES = (10_000, 100_000, 1_000_000)
QUICK_RSS_SIZES = (1_000, 10_000)
ALTERNATE_EPOCHS = 8  # per loader and collate, in the alternating part
RSS_TARGET = 1.10  # the issue's target: peak RSS within 10 % from 10,000 to 1,000,000
DEFAULTS = {"concurrency": 16, "prefetch": 2}  # al.Loader's

# (peer, collate, concurrency, prefetch, ordered) of the throughput part; a DataLoader has
# no concurrency (0: its workers).
THROUGHPUT = (
    ("dataloader", "torch", 0, 0, True),
    ("dataloader", "numpy", 0, 0, True),
    ("asyncload-sync", "torch", 16, 2, True),
    ("asyncload-sync", "numpy", 16, 2, True),
    ("asyncload-async", "torch", 16, 2, True),
    ("asyncload-async", "numpy", 16, 2, True),
    ("asyncload-sync", "numpy", 32, 2, True),
    ("asyncload-sync", "numpy", 64, 4, True),
    ("asyncload-sync", "numpy", 256, 8, True),
    ("asyncload-sync", "numpy", 16, 0, True),
    ("asyncload-sync", "numpy", 16, 2, False),
    ("asyncload-async", "numpy", 64, 4, True),
)
# (peer, source) of the rss part.
RSS_PEERS = (
    ("asyncload-sync", "map"),
    ("asyncload-async", "map"),
    ("asyncload-sync", "stream"),
    ("asyncload-async", "stream"),
    ("dataloader", "map"),
    # shuffle=True: both hold the epoch's permutation (8 bytes a sample), as they must.
    ("asyncload-sync", "map-shuffled"),
    ("dataloader", "map-shuffled"),
)


# --------------------------------------------------------------------------- plan


def plan(quick: bool) -> list[RunConfig]:
    """The configurations of one round: the throughput part, then the rss part."""
    n, epochs = (QUICK_LIST_SAMPLES, QUICK_EPOCHS) if quick else (LIST_SAMPLES, EPOCHS)
    configs = [
        RunConfig(
            peer,
            concurrency,
            n * epochs - BATCH_SIZE,
            BATCH_SIZE,
            SAMPLE_BYTES,
            params={
                "part": "throughput",
                "collate": collate,
                "prefetch": prefetch,
                "ordered": ordered,
                "list": n,
                "epochs": epochs,
            },
        )
        for peer, collate, concurrency, prefetch, ordered in THROUGHPUT
    ]
    for size in QUICK_RSS_SIZES if quick else RSS_SIZES:
        for peer, source in RSS_PEERS:
            configs.append(
                RunConfig(
                    peer,
                    0 if peer == "dataloader" else DEFAULTS["concurrency"],
                    size - BATCH_SIZE,
                    BATCH_SIZE,
                    SAMPLE_BYTES,
                    params={"part": "rss", "source": source, "n": size},
                )
            )
    return configs


# --------------------------------------------------------------------------- child side


def _collate(name: str, peer: str) -> Callable[[list[Any]], Any] | None:
    """The collate of a run: ``None`` is asyncload's default, which the DataLoader gets
    explicitly (numpy batches both ways, made by the same function)."""
    import torch.utils.data

    import asyncload as al

    if name == "torch":
        return torch.utils.data.default_collate
    return al.default_collate if peer == "dataloader" else None


def _loader(dataset: Any, cfg: RunConfig, collate: Callable[[list[Any]], Any] | None) -> Any:
    import asyncload as al

    return al.Loader(
        dataset,
        batch_size=cfg.batch_size,
        concurrency=cfg.in_flight,
        prefetch=cfg.params.get("prefetch", DEFAULTS["prefetch"]),
        ordered=cfg.params.get("ordered", True),
        shuffle=cfg.params.get("source") == "map-shuffled",
        collate_fn=collate,
    )


def _consume(cfg: RunConfig, make: Callable[[], Any], epochs: int, tally: Tally) -> None:
    """Build the loader with ``make()`` after ``tally.start()``; feed ``epochs`` epochs."""
    if cfg.peer == "asyncload-async":

        async def main() -> None:
            tally.start()
            loader = make()
            async with loader:
                for _ in range(epochs):
                    async for batch in loader:
                        tally.batch(batch)

        run_event_loop(main())
        return
    tally.start()
    loader = make()
    if cfg.peer == "dataloader":
        for _ in range(epochs):
            for batch in loader:
                tally.batch(batch)
        return
    with loader:
        for _ in range(epochs):
            for batch in loader:
                tally.batch(batch)


def run_throughput(cfg: RunConfig, tally: Tally) -> dict[str, Any]:
    import torch.utils.data

    import asyncload as al

    n, epochs = cfg.params["list"], cfg.params["epochs"]
    data = make_list(n)  # before the clock: the list is the user's
    collate = _collate(cfg.params["collate"], cfg.peer)
    if cfg.peer == "dataloader":
        make: Callable[[], Any] = lambda: torch.utils.data.DataLoader(  # noqa: E731
            data, batch_size=cfg.batch_size, num_workers=0, collate_fn=collate
        )
    else:
        make = lambda: _loader(al.from_sequence(data), cfg, collate)  # noqa: E731
    _consume(cfg, make, epochs, tally)
    return {}


def run_rss(cfg: RunConfig, tally: Tally) -> dict[str, Any]:
    import psutil
    import torch.utils.data

    import asyncload as al

    n = cfg.params["n"]
    start_rss = psutil.Process().memory_info().rss
    if cfg.peer == "dataloader":
        make: Callable[[], Any] = lambda: torch.utils.data.DataLoader(  # noqa: E731
            LazyArrays(n),
            batch_size=cfg.batch_size,
            num_workers=0,
            collate_fn=al.default_collate,
            shuffle=cfg.params["source"] == "map-shuffled",
        )
    elif cfg.params["source"] in ("map", "map-shuffled"):
        make = lambda: _loader(al.from_sequence(LazyArrays(n)), cfg, None)  # noqa: E731
    else:
        make = lambda: _loader(lazy_stream(n, sized=True), cfg, None)  # noqa: E731
    _consume(cfg, make, 1, tally)
    return {"start_rss_mib": start_rss / MiB}


def run_one(cfg: RunConfig, context: dict[str, Any]) -> RunResult:
    """Measure one configuration in this (child) process."""
    part = cfg.params["part"]
    if part == "throughput":
        checker = ArrayChecker(
            cfg.params["list"], cfg.params["epochs"], ordered=cfg.params["ordered"]
        )
        run: Callable[[Tally], dict[str, Any]] = lambda tally: run_throughput(cfg, tally)  # noqa: E731
    else:
        checker = ArrayChecker(cfg.params["n"], ordered=cfg.params["source"] != "map-shuffled")
        run = lambda tally: run_rss(cfg, tally)  # noqa: E731
    preload = ("torch", "numpy") if cfg.peer == "dataloader" else ("torch", "numpy", "asyncload")
    return harness.measure(cfg, run, checker, preload=preload)


def alternate(args: dict[str, Any]) -> dict[str, Any]:
    """In this process: for each collate, a DataLoader with no workers, asyncload's
    ``for`` and asyncload's ``async for`` (uvloop) over the same list, ``epochs`` epochs
    each, taking turns (who goes first rotates too). Per collate: each side's samples/s
    per epoch, and the ratio of each asyncload epoch to the DataLoader epoch of its turn.
    The ``async for`` epochs run in one event loop, stopped in between (a running loop
    would send the plain ``for`` through the bridge thread)."""
    import torch.utils.data

    import asyncload as al

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    n, epochs = int(args["list"]), int(args["epochs"])
    data = make_list(n)
    out: dict[str, Any] = {}

    async def async_epoch(loader: al.Loader, check: ArrayChecker) -> None:
        async for batch in loader:
            check(batch)

    try:
        for collate in ("torch", "numpy"):
            fn = torch.utils.data.default_collate if collate == "torch" else al.default_collate
            loaders: dict[str, Any] = {
                "dataloader": torch.utils.data.DataLoader(
                    data, batch_size=BATCH_SIZE, num_workers=0, collate_fn=fn
                ),
                "asyncload-sync": al.Loader(
                    al.from_sequence(data), batch_size=BATCH_SIZE, collate_fn=fn
                ),
                "asyncload-async": al.Loader(
                    al.from_sequence(data), batch_size=BATCH_SIZE, collate_fn=fn
                ),
            }
            rates: dict[str, list[float]] = {name: [] for name in loaders}
            names = list(loaders)
            for epoch in range(epochs):
                turn = epoch % len(names)
                for name in names[turn:] + names[:turn]:
                    check = ArrayChecker(n)
                    t0 = time.perf_counter()
                    if name == "asyncload-async":
                        loop.run_until_complete(async_epoch(loaders[name], check))
                    else:
                        for batch in loaders[name]:
                            check(batch)
                    rates[name].append(n / (time.perf_counter() - t0))
                    check.finish()
            out[collate] = {**rates}
            for name, key in (("asyncload-sync", ""), ("asyncload-async", "async_")):
                pairs = [a / d for a, d in zip(rates[name], rates["dataloader"], strict=True)]
                out[collate][key + "ratios"] = pairs
                out[collate][key + "ratio"] = median(pairs)
    finally:
        loop.close()
    return out


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> harness.Report:
    configs = plan(args.quick)
    print(f"{len(configs)} configs x {args.rounds} rounds", file=sys.stderr)
    results = harness.run_rounds(
        BENCH.script,
        configs,
        {},
        rounds=args.rounds,
        timeout=120.0 if args.quick else 600.0,
        one_process=args.quick,  # a smoke run: one start-up, not one per configuration
    )

    def extra(cfg: RunConfig, good: list[RunResult]) -> harness.Row:
        starts = [r.extra["start_rss_mib"] for r in good if "start_rss_mib" in r.extra]
        return {"start_rss_mib": finite(median(starts)) if starts else None}

    list_samples = QUICK_LIST_SAMPLES if args.quick else LIST_SAMPLES
    alternating = harness.run_task(
        BENCH.script,
        "alternate",
        {"list": list_samples, "epochs": 2 if args.quick else ALTERNATE_EPOCHS},
        120.0 if args.quick else 600.0,
    )
    if not alternating.pop("ok"):
        raise RuntimeError(f"alternate: {alternating.get('error')}")

    summary = harness.summarize(results, configs, extra)
    return {
        "meta": {
            "batch_size": BATCH_SIZE,
            "sample_bytes": SAMPLE_BYTES,
            "list_samples": list_samples,
            "epochs": QUICK_EPOCHS if args.quick else EPOCHS,
            "rss_sizes": list(QUICK_RSS_SIZES if args.quick else RSS_SIZES),
        },
        "summary": summary,
        "ratios": compute_ratios(summary),
        "alternating": alternating,
        "rss": compute_rss(summary),
        "runs": results,
    }


def _part(summary: list[harness.Row], part: str) -> list[harness.Row]:
    return [r for r in summary if r["params"]["part"] == part]


def _is_default(row: harness.Row) -> bool:
    p = row["params"]
    return (
        row["in_flight"] == DEFAULTS["concurrency"]
        and p["prefetch"] == DEFAULTS["prefetch"]
        and p["ordered"]
    )


def compute_ratios(summary: list[harness.Row]) -> list[dict[str, Any]]:
    """Per collate: asyncload samples/s (default settings, ``for`` and ``async for``, and
    the best row) over the DataLoader's with the same collate."""
    rows = _part(summary, "throughput")
    out = []
    for collate in ("torch", "numpy"):
        same = [r for r in rows if r["params"]["collate"] == collate]
        dl = next((r for r in same if r["peer"] == "dataloader"), None)
        if dl is None:
            continue
        entry: dict[str, Any] = {"collate": collate, "dataloader": dl["samples_per_s"]}
        for peer in ("asyncload-sync", "asyncload-async"):
            row = next((r for r in same if r["peer"] == peer and _is_default(r)), None)
            entry[peer] = harness.ratio(row["samples_per_s"] if row else None, dl["samples_per_s"])
        ours = [r for r in same if r["peer"] != "dataloader" and r["samples_per_s"]]
        if ours:
            best = max(ours, key=lambda r: r["samples_per_s"])
            entry["best"] = harness.ratio(best["samples_per_s"], dl["samples_per_s"])
            entry["best_label"] = label(best)
        out.append(entry)
    return out


def compute_rss(summary: list[harness.Row]) -> list[dict[str, Any]]:
    """Per (peer, source): peak RSS at each size, highest / lowest, and growth in MiB."""
    rows = _part(summary, "rss")
    out = []
    for peer, source in RSS_PEERS:
        mine = sorted(
            (r for r in rows if r["peer"] == peer and r["params"]["source"] == source),
            key=lambda r: r["params"]["n"],
        )
        peaks = [r["peak_rss_mib"] for r in mine]
        good = [p for p in peaks if p]
        out.append(
            {
                "peer": peer,
                "source": source,
                "sizes": [r["params"]["n"] for r in mine],
                "peak_rss_mib": peaks,
                "above_start_mib": [
                    r["peak_rss_mib"] - r["start_rss_mib"]
                    if r["peak_rss_mib"] and r.get("start_rss_mib")
                    else None
                    for r in mine
                ],
                "samples_per_s": [r["samples_per_s"] for r in mine],
                "max_over_min": max(good) / min(good) if len(good) == len(peaks) and good else None,
                "growth_mib": good[-1] - good[0] if len(good) == len(peaks) and good else None,
            }
        )
    return out


# --------------------------------------------------------------------------- output

PEER_NAMES = {
    "asyncload-sync": "asyncload, `for batch in loader`",
    "asyncload-async": "asyncload, `async for` (uvloop)",
    "dataloader": "torch DataLoader, no workers",
}
COLLATES = {"torch": "torch `default_collate` (tensor)", "numpy": "`al.default_collate` (numpy)"}


def label(row: harness.Row) -> str:
    p = row["params"]
    name = PEER_NAMES[row["peer"]]
    if row["peer"] == "dataloader" or p.get("part") == "rss":
        return name
    settings = f"concurrency={row['in_flight']}, prefetch={p['prefetch']}"
    if not p["ordered"]:
        settings += ", ordered=False"
    return f"{name} ({settings})"


def console(report: harness.Report) -> str:
    lines = [
        harness.console_table(
            report["summary"],
            lambda r: (
                f"{r['params']['part']} {r['params'].get('collate', r['params'].get('source'))} "
                f"{r['peer']} c={r['in_flight']} {r['params'].get('prefetch', '')}"
                f"{'' if r['params'].get('ordered', True) else ' unordered'}"
                f"{' n=' + str(r['params']['n']) if 'n' in r['params'] else ''}"
            ),
        ),
        "\nasyncload / DataLoader (same collate):",
    ]
    for e in report["ratios"]:
        lines.append(
            f"  {e['collate']}: for {num(e.get('asyncload-sync'), '.2f')}, async for "
            f"{num(e.get('asyncload-async'), '.2f')}, best {num(e.get('best'), '.2f')} "
            f"({e.get('best_label')})"
        )
    lines.append("\npeak RSS over sizes (MiB):")
    for e in report["rss"]:
        peaks = ", ".join(num(p, ",.0f") for p in e["peak_rss_mib"])
        lines.append(
            f"  {e['peer']} {e['source']}: {peaks}; max/min {num(e['max_over_min'], '.3f')}, "
            f"growth {num(e['growth_mib'], ',.1f')} MiB"
        )
    return "\n".join(lines)


def _headlines(report: harness.Report) -> list[str]:
    lines = []
    for e in report["ratios"]:
        sync, best = e.get("asyncload-sync"), e.get("best")
        if sync is None:
            continue
        verdict = "meets" if sync >= 1.0 else "misses"
        lines.append(
            f"- With {COLLATES[e['collate']]} on both sides, asyncload's `for batch in loader` "
            f"at its default settings runs at {sync:.2f}x the DataLoader's samples/s "
            f"({verdict} the target of at least 1.0x); `async for` "
            f"{num(e.get('asyncload-async'), '.2f')}x; its best row here, "
            f"{e.get('best_label')}, {num(best, '.2f')}x."
        )
    for collate, e in (report.get("alternating") or {}).items():
        verdict = "meets" if e["ratio"] >= 1.0 else "misses"
        line = (
            f"- In one process, epochs alternating, with {COLLATES[collate]}: asyncload's "
            f"`for` at {e['ratio']:.2f}x the DataLoader ({verdict} the target of at least "
            "1.0x)"
        )
        if "async_ratio" in e:
            verdict = "meets" if e["async_ratio"] >= 1.0 else "misses"
            line += f", `async for` at {e['async_ratio']:.2f}x ({verdict} it)"
        lines.append(line + ".")
    for e in report["rss"]:
        if e["max_over_min"] is None or e["peer"] == "dataloader":
            continue
        verdict = "flat" if e["max_over_min"] <= RSS_TARGET else "NOT flat"
        lines.append(
            f"- Peak RSS, {PEER_NAMES[e['peer']]} over a {e['source']} source: "
            f"{e['peak_rss_mib'][0]:,.0f} MiB at {e['sizes'][0]:,} samples, "
            f"{e['peak_rss_mib'][-1]:,.0f} MiB at {e['sizes'][-1]:,}: highest / lowest "
            f"{e['max_over_min']:.3f} ({verdict} by the target of {RSS_TARGET:.2f})."
        )
    return lines


def render(report: harness.Report) -> str:
    """The ``memory`` section of ``docs/benchmarks.md``."""
    meta = report["meta"]
    summary = report["summary"]
    through = _part(summary, "throughput")
    lines = [
        "## In-memory samples: asyncload vs DataLoader with no workers",
        "",
        "What asyncload costs where there is no I/O to overlap: samples already in memory, "
        f"1 KiB float32 numpy arrays, a list of {meta['list_samples']:,} of them read "
        f"{meta['epochs']} times over, in order, in batches of {meta['batch_size']}. The "
        "DataLoader is `torch.utils.data.DataLoader(list, batch_size=32, num_workers=0)`; "
        "asyncload is `al.Loader(al.from_sequence(list), batch_size=32, ...)`, consumed "
        "with `for batch in loader` (in memory, the epoch runs in the calling thread: no bridge thread) or "
        "`async for` on uvloop. Both sides collate with the same function: torch's "
        "`default_collate` (what a DataLoader does by default: tensor batches), or "
        "asyncload's `al.default_collate` (its default: numpy batches; the DataLoader gets "
        "it as `collate_fn`; it stacks same-shape arrays with `np.array`, about 2.5x faster "
        "than `np.stack` here). Every batch is checked (order and content). The "
        "rows below the first four vary asyncload's settings (defaults: concurrency=16, "
        "prefetch=2, ordered).",
        "",
        *command_block(meta),
        "",
        run_line(meta),
        "",
        "### asyncload / DataLoader, same collate",
        "",
        "Target: at least 1.0 (asyncload at least as fast as a DataLoader with no workers).",
        "",
        "| collate | DataLoader samples/s | asyncload `for` (defaults) | asyncload `async for` "
        "(defaults) | best asyncload row | that row |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for e in report["ratios"]:
        lines.append(
            f"| {COLLATES[e['collate']]} | {num(e['dataloader'], ',.0f')} | "
            f"{num(e.get('asyncload-sync'), '.2f')} | {num(e.get('asyncload-async'), '.2f')} | "
            f"{num(e.get('best'), '.2f')} | {e.get('best_label', 'n/a')} |"
        )
    alternating = report.get("alternating")
    if alternating:
        lines += [
            "",
            "### In one process, epochs alternating",
            "",
            "The DataLoader and asyncload's loaders (default settings) over the same list in "
            "one process, epochs taking turns "
            f"({len(alternating['numpy']['ratios'])} each per collate; the `async for` "
            "epochs in one uvloop event loop, stopped in between), every batch checked: "
            "between the fresh processes of the other tables this machine's speed scatters "
            "by up to 30 %, which neighbouring epochs share. Ratio: the median over the "
            "turns of asyncload's samples/s over the DataLoader's in the same turn.",
            "",
            "| collate | loop | DataLoader samples/s (median) | asyncload samples/s (median) "
            "| asyncload / DataLoader | turns' range |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for collate, e in alternating.items():
            for name, key, shown in (
                ("asyncload-sync", "", "`for`"),
                ("asyncload-async", "async_", "`async for`"),
            ):
                if name not in e:
                    continue
                pairs = e[key + "ratios"]
                lines.append(
                    f"| {COLLATES[collate]} | {shown} | {num(median(e['dataloader']), ',.0f')} | "
                    f"{num(median(e[name]), ',.0f')} | {num(e[key + 'ratio'], '.2f')} | "
                    f"{min(pairs):.2f} to {max(pairs):.2f} |"
                )
    lines += ["", "### Throughput", ""]
    lines += results_table(
        through,
        label,
        lead=[Column("collate", lambda r: COLLATES[r["params"]["collate"]], "---")],
    )
    lines += [
        "",
        "### Peak RSS against samples streamed",
        "",
        "One epoch over samples made on access (nothing held per sample by the source): "
        "`al.from_sequence` over a lazy sequence (map), or an `al.AsyncIterableDataset` "
        "that yields them (stream, `num_samples()` known), numpy batches, default settings; "
        "the DataLoader (no workers, `al.default_collate`) over the same lazy sequence for "
        "reference. "
        "map-shuffled: `shuffle=True` on both, which holds the epoch's permutation (8 bytes "
        "a sample: 7.6 MiB at 1,000,000) on either side, as any exact shuffle must. "
        'Peak summed RSS of the run\'s process (torch imported: most of it); "above start" '
        "is the peak minus the RSS just before the loader was built. Target: highest / "
        f"lowest peak at most {RSS_TARGET:.2f} from {meta['rss_sizes'][0]:,} to "
        f"{meta['rss_sizes'][-1]:,} samples.",
        "",
    ]
    sizes = meta["rss_sizes"]
    lines += [
        "| loader | source | "
        + " | ".join(f"peak RSS MiB at {n:,}" for n in sizes)
        + " | highest / lowest | growth (MiB) | "
        + " | ".join(f"above start at {n:,}" for n in sizes)
        + " | samples/s at the largest |",
        "| --- | --- | " + " | ".join(["---:"] * (2 * len(sizes) + 3)) + " |",
    ]
    for e in report["rss"]:
        lines.append(
            f"| {PEER_NAMES[e['peer']]} | {e['source']} | "
            + " | ".join(num(p, ",.0f") for p in e["peak_rss_mib"])
            + f" | {num(e['max_over_min'], '.3f')} | {num(e['growth_mib'], ',.1f')} | "
            + " | ".join(num(p, ",.1f") for p in e["above_start_mib"])
            + f" | {num(e['samples_per_s'][-1] if e['samples_per_s'] else None, ',.0f')} |"
        )
    lines.append("")
    headlines = _headlines(report)
    if headlines:
        lines += ["### In short", "", *headlines, ""]
    lines += failed_runs(summary, lambda r: f"{r['params']['part']}: {label(r)}")
    return "\n".join(lines)


BENCH = harness.Benchmark(
    name="memory",
    file=__file__,
    doc=__doc__,
    run=run,
    render=render,
    child=run_one,
    tasks={"alternate": alternate},
    label=label,
    console=console,
)

if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
