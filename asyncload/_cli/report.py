"""The console table and the JSON file of a ``bench`` or ``demo`` run."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from .runner import Result, rss_method
from .sources import SourceSpec

MiB = 1 << 20


def best(results: Sequence[Result], loader: str) -> Result | None:
    """The fastest run of ``loader`` that succeeded, or None."""
    runs = [r for r in results if r.ok and r.config.loader == loader]
    return max(runs, key=lambda r: r.measurement.samples_per_s or 0.0, default=None)


def ratio(results: Sequence[Result]) -> float | None:
    """Best asyncload samples/s over best DataLoader samples/s; None without both."""
    a, b = best(results, "asyncload"), best(results, "dataloader")
    if a is None or b is None:
        return None
    x, y = a.measurement.samples_per_s, b.measurement.samples_per_s
    return x / y if x and y else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: Sequence[Result]) -> str:
    """One row per configuration, in run order; a failed one shows its error."""
    baseline = best(results, "dataloader")
    base_rate = baseline.measurement.samples_per_s if baseline is not None else None
    width = max([len(r.config.label) for r in results] + [len("loader")])
    header = (
        f"{'loader':<{width}}  {'in flight':>9}  {'samples/s':>9}  {'MiB/s':>7}  "
        f"{'first batch s':>13}  {'peak RSS MiB':>12}  {'vs DataLoader':>13}"
    )
    lines = [header]
    for r in results:
        m = r.measurement
        head = f"{r.config.label:<{width}}  {r.config.requests_in_flight:>9}"
        if not r.ok:
            lines.append(f"{head}  FAILED: {m.error}")
            continue
        mib_s = (
            m.bytes / MiB * m.samples_per_s / m.samples if m.samples_per_s and m.samples else None
        )
        rss = r.peak_rss_bytes / MiB if r.peak_rss_bytes is not None else None
        vs = m.samples_per_s / base_rate if m.samples_per_s and base_rate else None
        lines.append(
            f"{head}  {_fmt(m.samples_per_s, ',.0f'):>9}  {_fmt(mib_s, ',.1f'):>7}  "
            f"{_fmt(m.first_batch_s, '.3f'):>13}  {_fmt(rss, ',.0f'):>12}  "
            f"{_fmt(vs, '.2f') + ('x' if vs is not None else ''):>13}"
        )
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    """The verdict line under the table."""
    a, b = best(results, "asyncload"), best(results, "dataloader")
    x = ratio(results)
    if a is None or b is None or x is None:
        return "asyncload / best DataLoader: n/a (needs a successful run of each)"
    return (
        f"asyncload / best DataLoader: {x:.2f}x samples/s "
        f"({a.config.label}, {a.config.requests_in_flight} in flight, vs "
        f"{b.config.label})"
    )


def footnote() -> str:
    return (
        "samples/s: all samples over the time from building the loader to the last batch;"
        f" first batch s: from building the loader.\npeak RSS: {rss_method()}."
    )


def to_json(
    command: str, spec: SourceSpec, results: Sequence[Result], settings: dict[str, Any]
) -> dict[str, Any]:
    """The results as plain JSON: ``command``, ``source``, ``settings``, ``machine``,
    ``results`` (one per configuration, in run order), ``ratio``, ``peak_rss_method``."""
    rows = []
    for r in results:
        m = r.measurement
        rows.append(
            {
                "loader": r.config.loader,
                "label": r.config.label,
                "consume": r.config.consume if r.config.loader == "asyncload" else "for",
                "concurrency" if r.config.loader == "asyncload" else "workers": r.config.in_flight,
                "in_flight": r.config.requests_in_flight,
                "batch_size": r.config.batch_size,
                "ok": r.ok,
                "error": m.error,
                "samples": m.samples,
                "bytes": m.bytes,
                "batches": m.batches,
                "samples_per_s": m.samples_per_s,
                "first_batch_s": m.first_batch_s,
                "wall_s": m.wall_s,
                "peak_rss_mib": r.peak_rss_bytes / MiB if r.peak_rss_bytes is not None else None,
            }
        )
    return {
        "command": command,
        "source": {"kind": spec.kind, "location": spec.location, "samples": len(spec.keys)},
        "settings": settings,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "peak_rss_method": rss_method(),
        "results": rows,
        "ratio": ratio(results),
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` whole (through a temporary file in the same folder)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
