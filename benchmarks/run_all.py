"""The whole comparison in one command: every benchmark, one after the other.

    .venv/bin/python benchmarks/run_all.py                  # full: about 30 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick          # smoke run, what CI runs: about 1-2 minutes
    .venv/bin/python benchmarks/run_all.py --from-results   # run nothing: re-render the page

Full mode runs each ``bench_*.py --render docs/benchmarks.md``: each writes
``benchmarks/results/NAME.json`` and replaces its own section of the page (the HTTP one
also draws ``docs/img/http-*.png``), so a benchmark that breaks leaves the other sections
as they were. ``--quick`` runs each one's smoke mode instead, writing the git-ignored
``results/NAME-quick.json.tmp`` and rendering into a temporary copy of the page, so that
running, recording, rendering and splicing are all checked and nothing committed changes;
it fails (exit status 1) when a benchmark breaks or the page loses a section, never
because a run is slow. ``--from-results`` renders every stored ``results/NAME.json`` into
the page and plots again.

A benchmark here is a ``bench_NAME.py`` that takes the harness options (``--quick``,
``--render PAGE``, ``--from-json JSON``; ``--rounds R`` when timed: see
``benchmarks/harness.py``), writes ``results/NAME.json`` and owns the page section
between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT
from benchmarks.page import refresh_contents, sections

HERE = Path(__file__).resolve().parent
PAGE = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Entry:
    name: str  # results/NAME.json, the NAME section of the page
    script: str  # in benchmarks/
    timed: bool = True  # takes --rounds
    optional: bool = False  # skipped, not failed, while its file does not exist
    quick_page: bool = True  # with --quick, renders into the page it is given
    also_render: tuple[str, ...] = ()  # other pages its section goes into (not with --quick)


BENCHMARKS = (
    Entry("http", "bench_http.py"),
    Entry("memory", "bench_memory.py"),
    Entry("scaling", "bench_scaling.py"),
    Entry("s3", "bench_s3.py"),
    Entry("tar", "bench_tar.py"),
    Entry("images", "bench_images.py"),
    Entry("padding", "bench_padding.py", timed=False),
    # The cache benchmark is being written alongside (issue 6), on its own command line
    # for now: it runs here as soon as its file exists, and owns the "cache" section (its
    # "cache-benchmark: begin" markers are read as that). Its --quick renders into its own
    # results/*.tmp page rather than the one given: hence quick_page=False, until it is
    # moved onto the harness like the others.
    Entry(
        "cache",
        "bench_cache.py",
        optional=True,
        quick_page=False,
        also_render=("docs/caching.md",),
    ),
)


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "skipped: why" or "FAILED: why"
    seconds: float = 0.0


def run_entry(entry: Entry, args: argparse.Namespace, page: Path) -> Outcome:
    """Run (or re-render) one benchmark as its own command, output passed through."""
    script = HERE / entry.script
    if not script.is_file():
        if entry.optional:
            return Outcome(entry.name, f"skipped: {script.relative_to(ROOT)} does not exist yet")
        return Outcome(entry.name, f"FAILED: {script.relative_to(ROOT)} is missing")
    cmd = [sys.executable, str(script)]
    if args.from_results:
        stored = RESULTS / f"{entry.name}.json"
        if not stored.is_file():
            return Outcome(entry.name, f"skipped: no {stored.relative_to(ROOT)}; section kept")
        # --from-json: the harness's --from under the name bench_cache.py knows too.
        cmd += ["--from-json", str(stored), "--render", str(page)]
    else:
        cmd += ["--render", str(page)]
        if args.quick:
            cmd.append("--quick")
        if args.rounds and entry.timed:
            cmd += ["--rounds", str(args.rounds)]
    if not args.quick and args.page is None:
        for other in entry.also_render:
            cmd += ["--render", str(ROOT / other)]
    print(f"\n=== {entry.name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    status = subprocess.run(cmd, cwd=ROOT).returncode
    seconds = time.perf_counter() - t0
    return Outcome(entry.name, "ok" if status == 0 else f"FAILED: exit status {status}", seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="every benchmark's smoke mode (CI)")
    modes.add_argument(
        "--from-results", action="store_true", help="run nothing: re-render the stored results"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated names, of: " + ", ".join(e.name for e in BENCHMARKS),
    )
    parser.add_argument("--rounds", type=int, default=None, help="passed to timed benchmarks")
    parser.add_argument(
        "--page",
        type=Path,
        default=None,
        help="the page to write (default: docs/benchmarks.md; with --quick a temporary copy)",
    )
    args = parser.parse_args(argv)
    chosen: tuple[Entry, ...] = BENCHMARKS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {e.name for e in BENCHMARKS}
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        chosen = tuple(e for e in BENCHMARKS if e.name in names)

    with tempfile.TemporaryDirectory(prefix="asyncload-bench-page-") as tmp:
        page = args.page or (Path(tmp) / "benchmarks.md" if args.quick else PAGE)
        if args.quick and args.page is None and PAGE.is_file():
            # Splice into a copy of the real page: checks that no section gets lost.
            shutil.copyfile(PAGE, page)
        before = {s.name for s in sections(page.read_text())} if page.is_file() else set()
        t0 = time.perf_counter()
        outcomes = [run_entry(entry, args, page) for entry in chosen]
        total = time.perf_counter() - t0
        after: set[str] = set()
        if page.is_file():
            refresh_contents(page)  # a benchmark with its own splicing leaves it stale
            after = {s.name for s in sections(page.read_text())}

    for entry, outcome in zip(chosen, outcomes, strict=True):
        expected = entry.quick_page or not args.quick
        if outcome.status == "ok" and expected and outcome.name not in after:
            outcome.status = f"FAILED: no {outcome.name} section on the page"
    lost = before - after
    mode = "quick" if args.quick else "render" if args.from_results else "full"
    temporary = " (a temporary copy, removed)" if args.quick and args.page is None else ""
    print(f"\n=== {mode} run, {total:.0f} s in all; page: {page}{temporary}")
    for outcome in outcomes:
        print(f"  {outcome.name:<8} {outcome.seconds:6.1f} s  {outcome.status}")
    if lost:
        print(f"  FAILED: the page lost its section(s): {', '.join(sorted(lost))}")
    failed = lost or any(o.status.startswith("FAILED") for o in outcomes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
