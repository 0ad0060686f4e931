"""The parent side of ``bench`` and ``demo``: each configuration in a fresh child process
(:mod:`.measure`), one after the other, with the peak RSS of the child and its DataLoader
workers summed and sampled from here.

Summed RSS counts pages that forked workers share once per worker, as ``ps`` and ``top``
users add them up; it is what a memory-limited container feels. Without psutil, the child
reports ``resource.getrusage`` instead: its own peak plus its largest worker's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import site
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .measure import RESULT_PREFIX, Measurement, RunConfig
from .sources import SourceSpec

RSS_INTERVAL_S = 0.05

try:
    # psutil ships no type information: Any, used through the few calls below.
    psutil: Any = importlib.import_module("psutil")
except ImportError:
    psutil = None


def rss_method() -> str:
    """How peak RSS is measured on this machine, for the report."""
    if psutil is not None:
        return f"summed over the process and its workers (psutil, every {RSS_INTERVAL_S * 1000:.0f} ms)"
    return "getrusage: the process's peak plus its largest worker's (install psutil for the sum)"


@dataclass
class Result:
    """One configuration and what it measured (``ok`` is ``measurement.error is None``)."""

    config: RunConfig
    measurement: Measurement
    peak_rss_bytes: int | None

    @property
    def ok(self) -> bool:
        return self.measurement.error is None


def run_all(
    spec: SourceSpec,
    configs: Sequence[RunConfig],
    *,
    on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """Run ``configs`` in order, each in its own child; a failed or crashed child becomes a
    result with an error, and the next configuration runs. ``on_result(i, result)`` is
    called as each finishes (progress)."""
    results = []
    for i, cfg in enumerate(configs):
        result = run_one(spec, cfg)
        results.append(result)
        if on_result is not None:
            on_result(i, result)
    return results


def run_one(spec: SourceSpec, cfg: RunConfig) -> Result:
    """Run ``cfg`` over ``spec`` in a fresh interpreter. The child (and its workers) is
    killed if this returns early, by an exception, Ctrl-C or SIGTERM (which the command
    line turns into an exception)."""
    with tempfile.TemporaryDirectory(prefix="asyncload-bench-") as tmp:
        payload = os.path.join(tmp, "payload.json")
        with open(payload, "w", encoding="utf-8") as f:
            json.dump({"source": spec.to_json(), "run": cfg.to_json()}, f)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        # Files, not pipes: a chatty child can never block on a full pipe while we sample.
        with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncload._cli.measure", payload],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_child_env(),
                # Not the user's folder: `-m` puts the working directory first on sys.path,
                # where a stray `timeit.py` or `http.py` would shadow the standard library.
                cwd=tmp,
            )
            try:
                peak = _wait_sampling_rss(proc)
            finally:
                _kill_tree(proc)
            measurement = _parse(out, err, proc.returncode)
    if peak is None:
        peak = measurement.rusage_peak_rss
    return Result(config=cfg, measurement=measurement, peak_rss_bytes=peak)


def _child_env() -> dict[str, str]:
    # The child must import this very asyncload, installed or not (a source checkout).
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if package_parent in {*site.getsitepackages(), site.getusersitepackages()}:
        # Installed: the child (this interpreter) finds it there. On PYTHONPATH,
        # site-packages would come before the standard library.
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, path]))}


def _wait_sampling_rss(proc: subprocess.Popen[bytes]) -> int | None:
    """Wait for ``proc`` to exit; its tree's peak summed RSS in bytes (None without psutil)."""
    if psutil is None:
        proc.wait()
        return None
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        proc.wait()
        return None
    peak = 0
    while True:
        total = 0
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total = root.memory_info().rss
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    total += child.memory_info().rss
        peak = max(peak, total)
        # Waiting with a timeout is the sampling clock: it returns at once when the child exits.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=RSS_INTERVAL_S)
            return peak or None


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` and, with psutil, every process under it (its DataLoader workers);
    reap ``proc``. Nothing to do once it has exited."""
    if proc.poll() is not None:
        return
    try:
        if psutil is not None:
            stop = getattr(signal, "SIGSTOP", None)  # POSIX
            if stop is not None:
                # Frozen, it forks no worker between the listing below and its own kill.
                with contextlib.suppress(OSError):
                    proc.send_signal(stop)
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child.kill()
    finally:  # even if a second Ctrl-C cuts the above: never leave it stopped, or running
        proc.kill()  # DataLoader workers also exit on their own when their parent dies
        proc.wait()


def _parse(out: IO[bytes], err: IO[bytes], status: int | None) -> Measurement:
    out.seek(0)
    for line in reversed(out.read().decode(errors="replace").splitlines()):
        if line.startswith(RESULT_PREFIX):
            return Measurement(**json.loads(line[len(RESULT_PREFIX) :]))
    err.seek(0)
    tail = " | ".join(err.read().decode(errors="replace").strip().splitlines()[-4:])
    return Measurement(error=f"child exited with status {status} and no result: {tail}")
