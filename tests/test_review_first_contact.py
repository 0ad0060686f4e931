"""Review (helper-79): what a new user meets first (the command line, the getting-started path,
progress and statistics). Each test failed before its fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import asyncload as al

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncload", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def run_script(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO
    )


# -- command line ------------------------------------------------------------------------


def test_unopenable_url_list_is_named_not_a_traceback(tmp_path: Path) -> None:
    """A SOURCE that exists but cannot be opened (here a Unix socket; for a non-root user
    the common case is a permission-denied file) crashes with an OSError traceback,
    exit 1. Expected: exit 2, ``argument SOURCE: ...`` naming the problem, no traceback
    (the code's own comment says 'open() says what is wrong with anything else that
    exists', but only UnicodeDecodeError is caught)."""
    path = tmp_path / "urls.sock"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        proc = run_cli("bench", str(path))
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 2, proc.stderr
        assert "argument SOURCE" in proc.stderr
        proc = run_cli("bench", "--urls", str(path))
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 2 and "argument --urls" in proc.stderr
    finally:
        sock.close()


def test_demo_server_stop_leaves_no_pending_handler_task(tmp_path: Path) -> None:
    """Ctrl-C (or SIGTERM) while a demo request is being served: ``DemoServer.stop()``
    waits aiohttp's 1 s shutdown_timeout, then stops and closes the loop with the request
    handler still pending, so the user sees 'Task was destroyed but it is pending!' (two
    aiohttp task reprs) on stderr after 'interrupted'. Reproduced deterministically
    in-process: a request is in the handler (checked on the server's loop), the client
    goes away (as the killed child does), stop() is called. Expected: stop() cancels and
    awaits what it started; no pending task, no such message."""
    script = tmp_path / "stop.py"
    script.write_text(
        "import asyncio, socket, time\n"
        "from asyncload._cli.demo_server import DemoServer\n"
        "server = DemoServer(latency_ms=600_000, size=16, count=1)\n"
        "server.start()\n"
        "host, port = server.base_url.rsplit('/', 1)[1].split(':')\n"
        "sock = socket.create_connection((host, int(port)))\n"
        "sock.sendall(b'GET /sample/0 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
        "async def handling():\n"
        "    return any('_handle_request' in repr(t.get_coro()) for t in asyncio.all_tasks())\n"
        "deadline = time.monotonic() + 30\n"
        "while not asyncio.run_coroutine_threadsafe(handling(), server._loop).result():\n"
        "    assert time.monotonic() < deadline, 'the request never reached the handler'\n"
        "    time.sleep(0.01)\n"
        "sock.close()\n"
        "server.stop()\n"
        "pending = [t for t in asyncio.all_tasks(server._loop) if not t.done()]\n"
        "print('PENDING', len(pending))\n"
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    assert "PENDING 0" in proc.stdout, proc.stdout
    assert "Task was destroyed but it is pending" not in proc.stderr, proc.stderr


def test_output_to_a_closed_pipe_is_no_traceback() -> None:
    """``python -m asyncload demo | head -1`` (the reader gone): the command dies with a
    BrokenPipeError traceback from a bare print() (main.py:322 for demo, main.py:250
    onwards for the table). Expected: a quiet exit (no traceback), as CLI tools do on
    EPIPE. Deterministic: stdout is a pipe whose read end is closed before the start."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "asyncload",
                "demo",
                "--samples",
                "4",
                "--latency-ms",
                "0",
                "--workers",
                "0",
                "--concurrency",
                "2",
            ],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(w)
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert proc.returncode != 0


def test_url_list_accepts_an_uppercase_scheme(tmp_path: Path) -> None:
    """A URL list line ``HTTP://127.0.0.1:PORT/sample/0`` (schemes are case-insensitive,
    RFC 3986 3.1; ``al.sources.HTTPSource`` reads it, and so does the baseline's
    urlsplit) is refused: exit 2 with 'not an http(s) URL: 'http://127...'' (the message
    even shows the URL lower-cased by redact_url, contradicting itself). Expected: the
    bench runs (exit 0), as the library it measures accepts the URL."""
    from asyncload._cli.demo_server import DemoServer

    with DemoServer(latency_ms=0, size=64, count=2) as server:
        urls = [u.replace("http://", "HTTP://", 1) for u in server.urls()]
        import asyncio

        async def library_reads_it() -> bytes:
            source = al.sources.HTTPSource(urls[:1])
            try:
                return await source[0]
            finally:
                await source.aclose()

        assert asyncio.run(library_reads_it())
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls) + "\n")
        proc = run_cli("bench", str(listing), "--workers", "0", "--concurrency", "1")
    assert proc.returncode == 0, proc.stderr[-400:]


# -- progress ----------------------------------------------------------------------------


def test_progress_under_to_torch_loader_workers_is_one_bar_for_the_epoch(
    tmp_path: Path,
) -> None:
    """``Loader(progress=True)`` consumed through ``loader.to_torch_loader(num_workers=2)``
    (the README's third loop): each worker process draws its own tqdm bar on the shared
    stderr, 0/5 ... 5/5 twice, interleaved on one terminal line; no bar ever counts the 10
    batches the training loop gets. Expected (nothing in the docs says otherwise): one bar
    in the training process, as for a plain for loop, ending at 10/10 (to_torch_loader
    runs in the main process and knows len() == 10)."""
    pytest.importorskip("torch")
    pytest.importorskip("tqdm")
    script = tmp_path / "bar.py"
    script.write_text(
        "import numpy as np, asyncload as al\n"
        "loader = al.Loader(al.from_sequence(np.arange(40)), batch_size=4, progress=True)\n"
        "got = list(loader.to_torch_loader(num_workers=2))\n"
        "assert len(got) == 10, len(got)\n"
    )
    proc = run_script(script)
    assert proc.returncode == 0, proc.stderr
    frames = [f for f in proc.stderr.replace("\r", "\n").splitlines() if "batch" in f]
    assert any("10/10" in f for f in frames), frames[-4:]
    assert not any("5/5" in f for f in frames), frames[-4:]
