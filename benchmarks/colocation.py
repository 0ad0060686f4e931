"""How often Linux runs a loader on the same core as the local server it reads.

    .venv/bin/python benchmarks/colocation.py [--rounds R] [--interval-ms MS]

A diagnostic behind ``docs/performance.md``, not part of ``run_all.py``. It runs
asyncload (``async for``) and plain asyncio + aiohttp at 20 ms and 64 requests in flight
against ``benchmarks/server.py``, each in a child process exactly as ``bench_http.py``
runs it, with both cores shared as in that benchmark's main tables. While a child runs,
this process reads ``/proc/PID/stat`` of the child and of the server every few
milliseconds: the core each last ran on, and whether each is running or waiting to run.
Both peers run their event loop in their main thread, the one ``/proc/PID/stat`` shows.

It prints, per peer and round: samples/s, the share of readings with both processes on
one core, and the share with both runnable on one core (one of them waiting for the
other while the other core may idle). Reading ``/proc`` costs this process some CPU too,
the same for both peers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_http, harness
from benchmarks.common import ROOT, RunConfig
from benchmarks.server import start_server, stop_server

PEERS = ("asyncload-async", "plain-asyncio")
IN_FLIGHT = 64
LATENCY_MS = 20.0
SAMPLES = 16384


def where(pid: int) -> tuple[int, bool] | None:
    """(the core ``pid`` last ran on, whether it is runnable), or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[36]), fields[0] == "R"  # "processor" and "state", from man 5 proc


def observe(peer: str, base_url: str, server_pid: int, interval_s: float) -> dict[str, float]:
    """Run one peer in a child and read where it and the server run until it exits."""
    cfg = RunConfig(peer, IN_FLIGHT, SAMPLES, bench_http.BATCH_SIZE, 16384, LATENCY_MS)
    payload = {"configs": [asdict(cfg)], "context": {"base_url": base_url}}
    cmd, env = harness.child_command(bench_http.BENCH.script, payload)
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    readings = same_core = both_runnable = 0
    while child.poll() is None:
        mine, theirs = where(child.pid), where(server_pid)
        if mine and theirs:
            readings += 1
            if mine[0] == theirs[0]:
                same_core += 1
                both_runnable += mine[1] and theirs[1]
        time.sleep(interval_s)
    out, _ = child.communicate()
    answer = harness.child_answer(out)
    if answer is None:
        raise RuntimeError(f"{peer}: the child gave no result (exit status {child.returncode})")
    result = answer["results"][0]
    if not result.get("ok"):
        raise RuntimeError(f"{peer}: {result.get('error')}")
    return {
        "samples_per_s": result["samples_per_s"],
        "same_core": same_core / max(1, readings),
        "both_runnable_same_core": both_runnable / max(1, readings),
        "readings": readings,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--interval-ms", type=float, default=2.0)
    args = parser.parse_args()
    base_url, server = start_server(latency_ms=0, size=16384, count=SAMPLES + 64)
    try:
        for round_ in range(args.rounds):
            for peer in PEERS if round_ % 2 == 0 else reversed(PEERS):
                got = observe(peer, base_url, server.pid, args.interval_ms / 1000.0)
                print(
                    f"round {round_ + 1} {peer:16s} {got['samples_per_s']:7,.0f} samples/s  "
                    f"same core {got['same_core']:6.1%}  both runnable there "
                    f"{got['both_runnable_same_core']:6.1%}  ({got['readings']} readings)"
                )
    finally:
        stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
