"""``python -m asyncload``: argument parsing and the two subcommands.

Exit status: 0 when every configuration read every sample; 1 when a run failed or no
sample could be read; 2 for a bad argument (the message names it); 130 on Ctrl-C (SIGINT),
143 on SIGTERM. Either signal stops the running child and the demo server first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from .._redact import redact_url
from ..sources.s3 import endpoint_url_problem
from .measure import Consume, RunConfig
from .sources import ArgumentError, NoSamplesError, S3Options, SourceSpec, resolve

PROG = "python -m asyncload"


# -- argument types: a ValueError/ArgumentTypeError here makes argparse name the argument --


def _int_list(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        values: list[int] = []
        for part in text.split(","):
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected integers separated by commas, got {text!r}"
                ) from None
            if value < minimum:
                raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
            if value not in values:
                values.append(value)
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    # NaN fails the comparison; an infinite latency would wait forever.
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _endpoint_url(text: str) -> str:
    problem = endpoint_url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _add_comparison_options(parser: argparse.ArgumentParser, *, workers: str) -> None:
    group = parser.add_argument_group("what to compare")
    group.add_argument(
        "--concurrency",
        type=_int_list(1),
        default=[64],
        metavar="C[,C...]",
        help="asyncload fetches in flight; a list runs each (default: 64)",
    )
    group.add_argument(
        "--workers",
        type=_int_list(0),
        default=_int_list(0)(workers),
        metavar="W[,W...]",
        help=f"DataLoader worker processes; a list runs each, 0 reads in the main process "
        f"(default: {workers})",
    )
    group.add_argument(
        "--batch-size", type=_positive_int, default=32, metavar="B", help="default: 32"
    )
    group.add_argument(
        "--consume",
        choices=("for", "async", "both"),
        default="for",
        help="how asyncload is iterated: 'for' (the sync bridge, as a plain training loop), "
        "'async' ('async for' in an event loop) or both (default: for)",
    )
    group.add_argument(
        "--json", metavar="PATH", default=None, help="also write the results to this JSON file"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="asyncload's command line: compare asyncload with torch's DataLoader "
        "on your own data (bench) or on a local slow server (demo).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    bench = commands.add_parser(
        "bench",
        help="asyncload next to a DataLoader baseline, on your own data",
        description="Read the first --limit samples of SOURCE with asyncload's Loader and "
        "with torch's DataLoader over a blocking map-style Dataset, each configuration in a "
        "fresh process, and print samples/s, time to the first batch and peak RSS.",
    )
    bench.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="a file of http(s) URLs (one per line), a local directory (its files, "
        "recursively), or s3://bucket/prefix",
    )
    bench.add_argument("--urls", metavar="FILE", help="a file of http(s) URLs, instead of SOURCE")
    bench.add_argument(
        "--limit",
        type=_positive_int,
        default=2048,
        metavar="N",
        help="read the first N samples (default: 2048)",
    )
    s3 = bench.add_argument_group("S3 (credentials from the AWS_* environment variables)")
    s3.add_argument(
        "--endpoint-url",
        type=_endpoint_url,
        # (Not a default here: argparse would check $AWS_ENDPOINT_URL, set for some other
        # tool, on every command. It is read, and checked, for an s3:// source only.)
        default=None,
        help="an S3-compatible endpoint (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    s3.add_argument("--region", default=None, help="default: from the environment")
    s3.add_argument("--anonymous", action="store_true", help="unsigned requests (public buckets)")
    _add_comparison_options(bench, workers="8")
    bench.set_defaults(command_parser=bench)

    demo = commands.add_parser(
        "demo",
        help="the same comparison against a local HTTP server with injected latency",
        description="Start a local HTTP server (127.0.0.1, no network needed) that waits "
        "--latency-ms per request, then run bench's comparison against it.",
    )
    demo.add_argument(
        "--samples", type=_positive_int, default=2048, metavar="N", help="default: 2048"
    )
    demo.add_argument(
        "--latency-ms",
        type=_non_negative_float,
        default=20.0,
        metavar="MS",
        help="server wait per request, in milliseconds (default: 20)",
    )
    demo.add_argument(
        "--sample-kib",
        type=_positive_int,
        default=16,
        metavar="KIB",
        help="bytes per sample, in KiB (default: 16)",
    )
    _add_comparison_options(demo, workers="8")
    demo.set_defaults(command_parser=demo)
    return parser


# -- the comparison ---------------------------------------------------------------------------


def _torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _configs(args: argparse.Namespace, with_torch: bool) -> list[RunConfig]:
    consumes: list[Consume] = ["for", "async"] if args.consume == "both" else [args.consume]
    configs = [
        RunConfig(
            loader="asyncload",
            in_flight=c,
            batch_size=args.batch_size,
            consume=consume,
            preload_torch=with_torch,
        )
        for c in args.concurrency
        for consume in consumes
    ]
    if with_torch:
        configs += [
            RunConfig(loader="dataloader", in_flight=w, batch_size=args.batch_size)
            for w in args.workers
        ]
    return configs


def _check_json_path(path: str | None) -> None:
    if path is None:
        return
    if not os.path.basename(path):  # "" or a folder's path ("out/")
        raise ArgumentError("--json", f"{path!r} names no file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ArgumentError("--json", f"no such directory: {folder!r}")
    if os.path.isdir(path):
        raise ArgumentError("--json", f"{path!r} is a directory")


def _compare(
    command: str, spec: SourceSpec, args: argparse.Namespace, settings: dict[str, Any]
) -> int:
    from . import report
    from .runner import Result, run_all

    with_torch = _torch_available()
    if not with_torch:
        print("torch is not importable: the DataLoader baseline is skipped (pip install torch)")
    configs = _configs(args, with_torch)

    def progress(i: int, result: Result) -> None:
        m = result.measurement
        status = (
            f"{m.samples_per_s or 0:,.0f} samples/s, first batch {m.first_batch_s or 0:.3f} s"
            if result.ok
            else f"FAILED: {m.error}"
        )
        print(
            f"[{i + 1}/{len(configs)}] {result.config.label} "
            f"({result.config.requests_in_flight} in flight): {status}",
            file=sys.stderr,
            flush=True,
        )

    results = run_all(spec, configs, on_result=progress)
    print()
    print(report.table(results))
    print()
    print(report.summary(results))
    print(report.footnote())
    if args.json is not None:
        report.write_json(args.json, report.to_json(command, spec, results, settings))
        print(f"wrote {args.json}")

    failed = [r for r in results if not r.ok]
    if failed:
        print(
            f"error: {len(failed)} of {len(results)} runs failed (see the table)", file=sys.stderr
        )
        return 1
    sizes = {r.measurement.bytes for r in results}
    if len(sizes) > 1:
        print(f"error: the runs read different numbers of bytes: {sorted(sizes)}", file=sys.stderr)
        return 1
    return 0


def _preflight(spec: SourceSpec) -> None:
    """Read the first sample here, blocking: a source that cannot be read at all is
    reported once, clearly, instead of as one failure per configuration."""
    from .baselines import blocking_dataset

    dataset = blocking_dataset(spec)
    try:
        dataset[0]
    except Exception as exc:
        key = redact_url(spec.keys[0]) if spec.kind == "http" else spec.keys[0]
        raise NoSamplesError(
            f"cannot read the first sample ({key}): {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        dataset.close()


def _bench(args: argparse.Namespace) -> int:
    endpoint_url = args.endpoint_url
    if endpoint_url is None and str(args.source).startswith("s3://"):
        endpoint_url = os.environ.get("AWS_ENDPOINT_URL") or None
        problem = None if endpoint_url is None else endpoint_url_problem(endpoint_url)
        if problem is not None:
            raise ArgumentError("--endpoint-url", f"(from $AWS_ENDPOINT_URL) {problem}")
    spec = resolve(
        args.source,
        urls_file=args.urls,
        limit=args.limit,
        s3=S3Options(endpoint_url=endpoint_url, region=args.region, anonymous=args.anonymous),
    )
    _preflight(spec)
    what = {"http": "URLs", "files": "files", "s3": "objects"}[spec.kind]
    location = redact_url(spec.location) if spec.kind == "s3" else spec.location
    note = "" if len(spec.keys) == args.limit else f" (all there are; --limit {args.limit})"
    print(f"bench: the first {len(spec.keys):,} {what} of {location}{note}")
    settings = {
        "limit": args.limit,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "workers": args.workers,
        "consume": args.consume,
    }
    return _compare("bench", spec, args, settings)


def _demo(args: argparse.Namespace) -> int:
    from .demo_server import DemoServer

    size = args.sample_kib * 1024
    with DemoServer(latency_ms=args.latency_ms, size=size, count=args.samples) as server:
        print(
            f"demo: local server {server.base_url}, {args.samples:,} samples of "
            f"{args.sample_kib} KiB, {args.latency_ms:g} ms per request"
        )
        spec = SourceSpec(kind="http", location=server.base_url, keys=server.urls())
        settings = {
            "samples": args.samples,
            "latency_ms": args.latency_ms,
            "sample_kib": args.sample_kib,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "workers": args.workers,
            "consume": args.consume,
        }
        return _compare("demo", spec, args, settings)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as ``KeyboardInterrupt`` is for SIGINT, so that
    the same ``finally`` blocks stop the running child and the demo server on the way out.
    A ``BaseException``: no ``except Exception`` may take it for a failed read."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # One is enough: a second SIGTERM must not cut the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated`; the previous handler is back
    after it. Nothing changes off the main thread (no handler can be set there) or where
    SIGTERM is ignored (whoever started us chose that, as Python does for SIGINT)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    ):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    subparser: argparse.ArgumentParser = args.command_parser
    try:
        with _sigterm_raises():
            _check_json_path(args.json)
            return _bench(args) if args.command == "bench" else _demo(args)
    except ArgumentError as exc:
        subparser.error(str(exc))  # exits with status 2, after the usage line
    except NoSamplesError as exc:
        print(f"{PROG} {args.command}: error: no samples can be read: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG} {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:
        # The reader went away (`... | head`): quiet, and stdout pointed at nothing so
        # that flushing it at exit raises no second error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
