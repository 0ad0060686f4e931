"""Padding saved by length bucketing on a skewed length distribution.

    .venv/bin/python benchmarks/bench_padding.py [--quick] [--samples 20000] [--out PATH] [--render docs/benchmarks.md]
    .venv/bin/python benchmarks/bench_padding.py --from benchmarks/results/padding.json --render docs/benchmarks.md

Token sequences with log-normal lengths (most short, a few long), batched by asyncload
three ways: fixed batches of 32 in shuffled order; fixed batches of 32 with ``bucket=``
windows; and a token budget per batch with buckets. Prints the padded fraction of each
(padding tokens / all tokens in padded batches): a property of the batches, not a
timing, so it is exact and repeatable (no rounds, no child processes). ``--json PATH``
is the older name of ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

import asyncload as al
from benchmarks import harness
from benchmarks.page import command_block

QUICK_SAMPLES = 2_000


def sequences(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(3.5, 0.9, n).astype(int) + 1, 2048)
    return [np.zeros(length, dtype=np.int32) for length in lengths]


def keep(values: list[Any]) -> list[Any]:
    return values


def measure(loader: al.Loader) -> dict[str, float]:
    real = padded = batches = 0
    for batch in loader:
        lengths = [len(a) for a in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
        batches += 1
    return {"batches": batches, "padding_fraction": 1 - real / padded, "padded_tokens": padded}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help=f"default: 20,000 ({QUICK_SAMPLES:,} with --quick)",
    )
    parser.add_argument("--json", dest="out", type=Path, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> harness.Report:
    samples = args.samples or (QUICK_SAMPLES if args.quick else 20_000)
    data = al.from_sequence(sequences(samples, seed=0))
    common: dict[str, Any] = {"shuffle": True, "seed": 0, "collate_fn": keep}
    runs = {
        "fixed 32": al.Loader(data, batch_size=32, **common),
        "fixed 32, bucket=1024": al.Loader(data, batch_size=32, bucket=1024, **common),
        "budget 4096 tokens, bucket=1024": al.Loader(
            data, batch_size=512, batch_budget=4096, batch_cost=len, bucket=1024, **common
        ),
    }
    return {"samples": samples, "results": {name: measure(loader) for name, loader in runs.items()}}


def console(report: harness.Report) -> str:
    lines = [
        f"{report['samples']} sequences, log-normal lengths (median ~33, max 2048 tokens)",
        f"{'batching':34} {'batches':>8} {'padding':>8} {'padded tokens':>14}",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"{name:34} {r['batches']:>8,} {r['padding_fraction']:>8.1%} {r['padded_tokens']:>14,}"
        )
    return "\n".join(lines)


def render(report: harness.Report) -> str:
    """The padding section of ``docs/benchmarks.md``."""
    results = report["results"]
    lines = [
        "## Padding saved by bucketing",
        "",
        f"{report['samples']:,} token sequences with log-normal lengths (median about 33 "
        "tokens, at most 2,048), shuffled, batched by asyncload three ways; padded fraction "
        "= padding tokens / all tokens in the padded batches. A count, not a timing: exact "
        "and the same on any machine (see [Batching](batching.md) for `bucket=` and "
        "`batch_budget=`).",
        "",
        *command_block(report["meta"]),
        "",
        "| batching | batches | padding | padded tokens |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['batches']:,} | {r['padding_fraction']:.1%} | {r['padded_tokens']:,} |"
        )
    fixed, bucketed = results.get("fixed 32"), results.get("fixed 32, bucket=1024")
    if fixed and bucketed:
        lines += [
            "",
            f"Bucketing alone cuts the padded tokens "
            f"{fixed['padded_tokens'] / bucketed['padded_tokens']:.1f}x at the same batch count.",
        ]
    return "\n".join(lines)


BENCH = harness.Benchmark(
    name="padding",
    file=__file__,
    doc=__doc__,
    run=run,
    render=render,
    console=console,
    add_arguments=add_arguments,
    timed=False,
)

if __name__ == "__main__":
    sys.exit(harness.main(BENCH))
