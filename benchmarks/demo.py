"""The README's main job, end to end: stream samples from slow HTTP storage into training.

Starts the local latency server (20 ms per request, 16 KiB samples), then trains a tiny
linear model twice on the same 4,096 samples:

1. with ``al.Loader(al.sources.HTTPSource(urls), batch_size=32, concurrency=64,
   transform=to_features)``, consumed with a plain ``for`` loop;
2. with ``torch.utils.data.DataLoader(..., num_workers=8)`` over a Dataset that does a
   blocking GET and the same transform.

Prints, for each, the throughput (samples/s from the first batch to the last), the time
to the first batch, the final loss, and asyncload's ``loader.statistics()``::

    .venv/bin/python benchmarks/demo.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from benchmarks.common import sample_urls
from benchmarks.server import start_server, stop_server

FEATURES = 64


def to_features(body: bytes) -> np.ndarray:
    """Sample bytes to a float32 vector in [0, 1] (the per-sample ``transform``)."""
    return np.frombuffer(body, dtype=np.uint8).astype(np.float32) / 255.0


def train(batches: Iterable[Any], t0: float, steps_per_batch: int = 3) -> dict[str, float]:
    """SGD on a linear model: the first 64 features predict the sample's last byte.
    Returns samples, time to first batch (from ``t0``, when the loader was built),
    samples/s after the first batch, and the final loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t_first = t_last = t0
    samples = first = 0
    loss = torch.tensor(float("nan"))
    for batch in batches:
        x = torch.as_tensor(batch)  # numpy (asyncload) or tensor (DataLoader): no copy
        inputs, target = x[:, :FEATURES], x[:, -1:]
        for _ in range(steps_per_batch):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), target)
            loss.backward()
            opt.step()
        t_last = time.perf_counter()
        if samples == 0:
            t_first, first = t_last, len(x)
        samples += len(x)
    span = t_last - t_first
    return {
        "samples": samples,
        "first_batch_s": t_first - t0,
        "samples_per_s": (samples - first) / span if span > 0 else float("nan"),
        "final_loss": loss.item(),
    }


def run_asyncload(urls: list[str], concurrency: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Train from an asyncload Loader through its synchronous bridge."""
    import asyncload as al

    t0 = time.perf_counter()
    loader = al.Loader(
        al.sources.HTTPSource(urls),
        batch_size=32,
        concurrency=concurrency,
        transform=to_features,
    )
    with loader:
        result = train(loader, t0)
        stats = loader.statistics()
    return result, stats


def run_dataloader(urls: list[str], workers: int) -> dict[str, float]:
    """Train from a torch DataLoader over a blocking-HTTP Dataset."""
    from benchmarks.blocking_http import BlockingHTTPDataset

    # 8 workers on 2 cores is the point of the comparison: silence torch's advice.
    warnings.filterwarnings("ignore", message=".*suggested max number of worker")
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(
        BlockingHTTPDataset(urls, transform=to_features), batch_size=32, num_workers=workers
    )
    return train(loader, t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=16384, help="bytes per sample")
    parser.add_argument("--concurrency", type=int, default=64, help="asyncload fetches in flight")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    args = parser.parse_args(argv)

    base_url, server = start_server(latency_ms=args.latency_ms, size=args.size, count=args.samples)
    try:
        urls = sample_urls(base_url, args.samples)
        print(
            f"server {base_url}: {args.samples:,} samples of {args.size:,} bytes, "
            f"{args.latency_ms:g} ms per request"
        )
        # Torch's first autograd step costs about a second of one-off set-up: pay it here,
        # so that neither loader's time to first batch includes it.
        train([np.zeros((32, args.size), dtype=np.float32)], time.perf_counter())
        al_result, stats = run_asyncload(urls, args.concurrency)
        dl_result = run_dataloader(urls, args.workers)
    finally:
        stop_server(server)

    rows = [
        (f"asyncload Loader, concurrency={args.concurrency}", al_result),
        (f"torch DataLoader, num_workers={args.workers}", dl_result),
    ]
    print(f"\n{'':<36} {'samples':>8} {'samples/s':>10} {'first batch s':>13} {'final loss':>10}")
    for name, r in rows:
        print(
            f"{name:<36} {r['samples']:>8,.0f} {r['samples_per_s']:>10,.0f} "
            f"{r['first_batch_s']:>13.3f} {r['final_loss']:>10.4f}"
        )
    print(
        f"\nasyncload / DataLoader: {al_result['samples_per_s'] / dl_result['samples_per_s']:.1f}x"
    )
    print("\nloader.statistics():")
    print(json.dumps(stats, indent=2, default=str))
    for name, r in rows:
        if r["samples"] != args.samples:
            print(f"error: {name} yielded {r['samples']} samples, expected {args.samples}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
