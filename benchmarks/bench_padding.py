"""Padding saved by length bucketing on a skewed length distribution.

Token sequences with log-normal lengths (most short, a few long), batched by asyncload
three ways: fixed batches of 32 in shuffled order; fixed batches of 32 with ``bucket=``
windows; and a token budget per batch with buckets. Prints the padded fraction of each
(padding tokens / all tokens in padded batches): a property of the batches, not a
timing, so it is exact and repeatable.

    python benchmarks/bench_padding.py [--samples 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

import asyncload as al


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = al.from_sequence(sequences(args.samples, seed=0))
    common: dict[str, Any] = {"shuffle": True, "seed": 0, "collate_fn": keep}
    runs = {
        "fixed 32": al.Loader(data, batch_size=32, **common),
        "fixed 32, bucket=1024": al.Loader(data, batch_size=32, bucket=1024, **common),
        "budget 4096 tokens, bucket=1024": al.Loader(
            data, batch_size=512, batch_budget=4096, batch_cost=len, bucket=1024, **common
        ),
    }
    results = {name: measure(loader) for name, loader in runs.items()}
    print(f"{args.samples} sequences, log-normal lengths (median ~33, max 2048 tokens)")
    print(f"{'batching':34} {'batches':>8} {'padding':>8} {'padded tokens':>14}")
    for name, r in results.items():
        print(
            f"{name:34} {r['batches']:>8,} {r['padding_fraction']:>8.1%} {r['padded_tokens']:>14,}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": args.samples, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
