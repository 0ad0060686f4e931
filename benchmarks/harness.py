"""What every benchmark runs on: one configuration measured in a fresh child process,
interleaved rounds, medians and ranges, the results JSON, and the command line that each
``bench_*.py`` shares.

A benchmark file describes its comparison with a :class:`Benchmark` (its peers, its data,
its section of ``docs/benchmarks.md``) and ends with ``sys.exit(harness.main(BENCH))``.
That gives it these options:

* ``--quick``: smoke mode (small, one round), written to ``results/NAME-quick.json.tmp``;
* ``--rounds R``: interleaved rounds (default 3; 1 with ``--quick``);
* ``--out PATH``: the results JSON (default ``benchmarks/results/NAME.json``);
* ``--render PAGE``: also put this benchmark's section into ``PAGE`` (and its plots
  into ``PAGE``'s ``img/`` folder), keeping every other section;
* ``--from JSON`` (with ``--render``): run nothing, render stored results.

The exit status is 1 when a run is broken (an exception, a wrong or missing sample, a
child that hangs past a generous timeout), never because a run is slow.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    Checker,
    MiB,
    PeakRSS,
    RunConfig,
    RunResult,
    Tally,
    cpu_seconds,
    finite,
    machine_info,
    median,
    tree_cpu_seconds,
    write_atomic,
)
from benchmarks.page import write_section

RESULT_PREFIX = "RESULT "  # the child's answer: the one stdout line that starts so
SCHEMA = 2  # of the results JSON: runs and summary rows as RunResult and summarize() make them
Row = dict[str, Any]
Report = dict[str, Any]

# --------------------------------------------------------------------------- child side


def measure(
    cfg: RunConfig,
    run: Callable[[Tally], dict[str, Any]],
    check: Checker,
    *,
    preload: Iterable[str] = (),
) -> RunResult:
    """Run one configuration in this process and measure it.

    ``preload`` modules are imported first, before any clock starts, as a training process
    has them loaded. ``run(tally)`` builds its loader right after ``tally.start()``, feeds
    every batch to ``tally.batch`` and returns extra facts worth keeping.
    """
    for module in preload:
        importlib.import_module(module)
    rss = PeakRSS(0.05)
    tally = Tally(
        cfg.total,
        check,
        cpu_probe=lambda: tree_cpu_seconds() - rss.cpu_s,  # the sampler's CPU is not the loader's
    )
    cpu0 = cpu_seconds()
    wall0 = time.perf_counter()
    with rss:
        extra = run(tally)
    tally.finish()
    extra["loadavg_1min"] = os.getloadavg()[0]
    extra["first_to_last_per_s"] = finite(tally.first_to_last_per_s)
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


ChildRun = Callable[[RunConfig, dict[str, Any]], RunResult]
Task = Callable[[dict[str, Any]], dict[str, Any]]


def child_main(payload_json: str, run_one: ChildRun | None, tasks: Mapping[str, Task]) -> int:
    """The child side of :func:`run_child`: run the payload's configurations in order (or
    its one task), print the answer on one ``RESULT`` line; status 1 if anything failed.
    Tracebacks go to stderr, which the parent keeps the tail of."""
    payload = json.loads(payload_json)
    if "task" in payload:
        try:
            answer = {"ok": True, **tasks[payload["task"]](payload.get("args", {}))}
        except Exception as exc:
            traceback.print_exc()
            answer = {"ok": False, "error": _describe(exc)}
        print(RESULT_PREFIX + json.dumps(answer), flush=True)
        return 0 if answer["ok"] else 1
    assert run_one is not None, "this benchmark runs no configurations in children"
    results = []
    for spec in payload["configs"]:
        cfg = RunConfig(**spec)
        try:
            result = run_one(cfg, payload["context"])
        except Exception as exc:  # recorded as a failed run; the next configuration runs
            traceback.print_exc()
            result = RunResult(config=cfg, error=_describe(exc))
        results.append(result.to_json())
    print(RESULT_PREFIX + json.dumps({"results": results}), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


def _describe(exc: BaseException) -> str:
    where = traceback.format_exc().strip().splitlines()[-3:-1]
    return f"{type(exc).__name__}: {exc} [{' / '.join(w.strip() for w in where)}]"


# --------------------------------------------------------------------------- parent side


def child_command(script: Path, payload: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``script --child PAYLOAD`` (in ``ROOT``)."""
    cmd = [sys.executable, str(script), "--child", json.dumps(payload)]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    return cmd, env


def child_answer(stdout: str) -> dict[str, Any] | None:
    """The answer a child printed (its last ``RESULT`` line), or ``None``."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            answer: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return answer
    return None


def run_child(script: Path, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``script --child PAYLOAD`` in a fresh interpreter and return its answer, with
    ``exit_status`` and ``stderr_tail`` added; ``{"error": ...}`` when it gave none."""
    cmd, env = child_command(script, payload)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    answer = child_answer(proc.stdout)
    if answer is not None:
        answer["exit_status"] = proc.returncode
        answer["stderr_tail"] = _tail(proc.stderr)
        return answer
    return {
        "error": f"exit status {proc.returncode}, no result: {_tail(proc.stderr or proc.stdout)}"
    }


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run_configs(
    script: Path,
    configs: Sequence[RunConfig],
    context: dict[str, Any],
    *,
    round_: int,
    timeout: float,
) -> list[RunResult]:
    """Run ``configs`` one after the other in one child process; any failure, a child
    that crashed or hung included, becomes a result with ``ok=False``."""
    answer = run_child(
        script, {"configs": [asdict(c) for c in configs], "context": context}, timeout
    )
    got = answer.get("results") or []
    out = []
    for i, cfg in enumerate(configs):
        if i < len(got):
            result = RunResult.from_json(got[i])
        else:
            result = RunResult(config=cfg, error=answer.get("error") or "no result")
        result.round = round_
        out.append(result)
    # Every run fine, then a bad exit (e.g. a crash at shutdown): the child broke all the same.
    if answer.get("exit_status") not in (None, 0) and all(r.ok for r in out):
        for result in out:
            result.ok = False
            result.error = f"exit status {answer['exit_status']}: {answer.get('stderr_tail')}"
    return out


def run_task(script: Path, name: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the benchmark's task ``name`` in a child; its answer has ``ok`` (and ``error``)."""
    answer = run_child(script, {"task": name, "args": args}, timeout)
    answer.pop("stderr_tail", None)
    answer.pop("exit_status", None)
    answer.setdefault("ok", False)
    return answer


def run_rounds(
    script: Path,
    configs: Sequence[RunConfig],
    context: dict[str, Any],
    *,
    rounds: int,
    timeout: float,
    unit: str = "sample",
    one_process: bool = False,
) -> list[RunResult]:
    """Every configuration once per round, each in a fresh child process; each round
    starts at a different configuration, so that a slow spell of the machine does not
    always hit the same one. ``one_process``: each round runs all configurations in one
    child, in plan order (a smoke run: one start-up instead of many, RSS not comparable)."""
    results: list[RunResult] = []
    for round_ in range(rounds):
        if one_process:
            groups = [list(configs)]
        else:
            shift = (round_ * len(configs)) // rounds
            order = itertools.islice(itertools.cycle(configs), shift, shift + len(configs))
            groups = [[cfg] for cfg in order]
        for group in groups:
            for result in run_configs(script, group, context, round_=round_, timeout=timeout):
                _progress(result, rounds, unit)
                results.append(result)
    return results


def _progress(r: RunResult, rounds: int, unit: str) -> None:
    status = (
        f"{r.samples_per_s:8,.0f} {unit}s/s  first {r.first_batch_s:6.3f} s  "
        f"rss {r.peak_rss_bytes / MiB:6,.0f} MiB  cpu {r.cpu_us_per_sample:4.0f} us/{unit}"
        if r.ok
        else f"FAILED: {r.error}"
    )
    print(
        f"[round {r.round + 1}/{rounds}] {r.config.name:<34} {status}", file=sys.stderr, flush=True
    )


# --------------------------------------------------------------------------- results


def summarize(
    results: Sequence[RunResult],
    configs: Sequence[RunConfig],
    extra: Callable[[RunConfig, list[RunResult]], Row] | None = None,
) -> list[Row]:
    """One row per configuration, in plan order: its identity, medians over the runs that
    passed (and every run's samples/s, for the range), the errors of those that did not.
    ``extra(cfg, good_runs)`` adds a benchmark's own fields."""
    rows = []
    for cfg in configs:
        runs = [r for r in results if r.config.key == cfg.key]
        good = [r for r in runs if r.ok]
        row: Row = {
            "peer": cfg.peer,
            "in_flight": cfg.in_flight,
            "latency_ms": cfg.latency_ms,
            "size": cfg.size,
            "batch_size": cfg.batch_size,
            "params": cfg.params,
            "samples": cfg.samples,
            "total": cfg.total,
            "runs": len(runs),
            "ok_runs": len(good),
            "samples_per_s": finite(median(r.samples_per_s for r in good)),
            "samples_per_s_all": [finite(r.samples_per_s) for r in good],
            "first_batch_s": finite(median(r.first_batch_s for r in good)),
            "peak_rss_mib": finite(median(r.peak_rss_bytes / MiB for r in good)),
            "cpu_us_per_sample": finite(median(r.cpu_us_per_sample for r in good)),
            "errors": [r.error for r in runs if not r.ok],
        }
        if extra is not None:
            row.update(extra(cfg, good))
        rows.append(row)
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or ``None`` when either is missing (a failed configuration) or zero."""
    return a / b if a and b else None


def clean(obj: Any) -> Any:
    """Plain JSON: dataclasses to dicts, tuples to lists, NaN to ``None``, recursively."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return clean(asdict(obj))
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def write_json(path: Path, report: Report) -> None:
    """Write a results file atomically (an interrupted run leaves the old one whole)."""
    write_atomic(path, json.dumps(clean(report), indent=1) + "\n")


def console_table(rows: Iterable[Row], label: Callable[[Row], str], unit: str = "sample") -> str:
    """The summary as a plain-text table, for the terminal."""
    rows = list(rows)
    width = max([len(label(row)) for row in rows] + [6])
    lines = [
        f"{'peer':<{width}} {unit + 's/s':>10} {'1st batch s':>11} {'peak RSS MiB':>12} "
        f"{'CPU us/' + unit:>13} {'ok':>5}"
    ]
    for row in rows:
        lines.append(
            f"{label(row):<{width}} {_fmt(row['samples_per_s'], ',.0f'):>10} "
            f"{_fmt(row['first_batch_s'], '.3f'):>11} {_fmt(row['peak_rss_mib'], ',.0f'):>12} "
            f"{_fmt(row['cpu_us_per_sample'], '.0f'):>13} {row['ok_runs']}/{row['runs']:<3}"
        )
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def failures(report: Report) -> list[str]:
    """What broke in a report: failed runs, and the benchmark's other ``errors``."""
    out = [
        f"{RunConfig(**r['config']).key} round {r['round'] + 1}: {r['error']}"
        for r in report.get("runs", [])
        if not r["ok"]
    ]
    return out + list(report.get("errors", []))


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class Benchmark:
    """One comparison: what :func:`main` needs to run, record and render it."""

    name: str  # results/NAME.json and the NAME section of docs/benchmarks.md
    file: str  # the bench_*.py's __file__: children run it with --child
    doc: str | None  # its __doc__: the first paragraph is the command's description
    # Runs the comparison (args has quick, rounds, and its own options) and returns the
    # report: {"meta": {its own facts}, "summary": [...], "runs": [...], ...}.
    run: Callable[[argparse.Namespace], Report]
    render: Callable[[Report], str]  # its section of the page, from "## Title" on
    child: ChildRun | None = None  # measures one configuration in a child process
    tasks: Mapping[str, Task] = field(default_factory=dict)  # other child work, by name
    label: Callable[[Row], str] = lambda row: str(row["peer"])
    unit: str = "sample"
    console: Callable[[Report], str] | None = None  # default: console_table of the summary
    plot: Callable[[Report, Path], None] | None = None  # writes PNGs into the page's img/
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    timed: bool = True  # False: an exact count, not a timing (no rounds, no children)

    @property
    def script(self) -> Path:
        return Path(self.file).resolve()

    @property
    def description(self) -> str:
        return (self.doc or "").split("\n\n")[0]

    def default_out(self, quick: bool) -> Path:
        return RESULTS / (f"{self.name}-quick.json.tmp" if quick else f"{self.name}.json")


# Options that only say where output goes: not part of the command a section quotes.
_OUTPUT_OPTIONS = ("--out", "--json", "--render")


def main(bench: Benchmark, argv: list[str] | None = None) -> int:
    """The command line of a ``bench_*.py`` (see this module's docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=bench.description)
    parser.add_argument("--quick", action="store_true", help="smoke mode: small, one round")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results JSON (default: results/{bench.name}.json)"
    )
    if bench.timed:
        parser.add_argument("--rounds", type=int, default=None, help="default: 3 (1 with --quick)")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="PAGE",
        help=f"also put the {bench.name} section into this page (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--from",
        "--from-json",
        dest="from_json",
        type=Path,
        default=None,
        metavar="JSON",
        help="with --render: render these stored results instead of running",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    if bench.add_arguments is not None:
        bench.add_arguments(parser)
    args = parser.parse_args(argv)

    if args.child:
        return child_main(args.child, bench.child, bench.tasks)
    if args.from_json is not None:
        if args.render is None:
            parser.error("--from needs --render")
        render_into(bench, json.loads(args.from_json.read_text()), args.render)
        return 0

    if bench.timed:
        args.rounds = args.rounds or (1 if args.quick else 3)
    started = time.time()
    load_before = list(os.getloadavg())
    report = bench.run(args)
    report["meta"] = {
        "benchmark": bench.name,
        "schema": SCHEMA,
        "command": " ".join(["python", f"benchmarks/{bench.script.name}", *_command(argv)]),
        "quick": args.quick,
        **({"rounds": args.rounds} if bench.timed else {}),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        **report.get("meta", {}),
    }
    report = clean(report)
    out = args.out or bench.default_out(args.quick)
    write_json(out, report)
    if bench.console is not None:
        print(bench.console(report))
    else:
        print(console_table(report["summary"], bench.label, bench.unit))
    print(f"\nwrote {out} in {report['meta']['duration_s']} s")
    if args.render:
        render_into(bench, report, args.render)
    broken = failures(report)
    for line in broken:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if broken else 0


def _command(argv: list[str]) -> list[str]:
    """``argv`` without the output options (and their values)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OUTPUT_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(o + "=" for o in _OUTPUT_OPTIONS)):
            out.append(arg)
    return out


def render_into(bench: Benchmark, report: Report, page: Path) -> None:
    """Put ``report``'s section (and plots) into ``page``, keeping the other sections."""
    if bench.plot is not None:
        bench.plot(report, page.parent / "img")
    write_section(page, bench.name, bench.render(report), machine=report["meta"].get("machine"))
