"""A small HTTP server of deterministic samples with injected latency, for benchmarks.

``GET /sample/{i}`` answers ``size`` bytes whose content is a pure function of ``i``
(see :func:`sample_bytes`), after the latency (a timer); ``?latency_ms=X`` overrides
the latency for one request, and ``&jitter_ms=J`` spreads it over X - J to X + J
(see :func:`jitter`; uvloop's timers round each to whole milliseconds; J > X, a negative
or a malformed value is answered 400). ``GET /health`` answers ``ok`` at once. Served by a bare
asyncio protocol (keep-alive HTTP/1.1): measured 40 µs of server CPU a request against
aiohttp.web's 110 (64 in flight, 0 ms). The server shares the cores with the loaders it
measures, and at hundreds of requests in flight aiohttp.web's cost made it, not the
loaders, the bottleneck.

With ``--files DIR`` the server is instead an aiohttp.web app that answers ``GET
/health`` and ``GET /file/{name}``: the file ``DIR/name`` (tar shards, for ``bench_tar.py``) after the same
latency, streamed from disk with ``sendfile`` at full speed, so the latency delays the
first byte and nothing limits the bandwidth. The server binds
127.0.0.1 only, runs on uvloop when installed, and listens with a deep backlog so that
hundreds of clients can connect at once.

Command line (prints the URL it bound on the first line of stdout)::

    python benchmarks/server.py --port 0 --latency-ms 20 --size 16384 --count 100000

From Python::

    from benchmarks.server import start_server, stop_server
    base_url, proc = start_server(latency_ms=20, size=16384, count=4096)
    try:
        ...  # GET f"{base_url}/sample/{i}"
    finally:
        stop_server(proc)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Collection, Coroutine, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
HEADER_BYTES = 8


def sample_bytes(index: int, size: int) -> bytes:
    """The body of ``/sample/{index}``: the index as 8 little-endian bytes, then the byte
    ``index % 251`` repeated up to ``size`` bytes."""
    head = index.to_bytes(HEADER_BYTES, "little")
    if size <= HEADER_BYTES:
        return head[:size]
    return head + bytes((index % 251,)) * (size - HEADER_BYTES)


def _milliseconds(name: str, value: str) -> float:
    """A query parameter in milliseconds, as seconds; ``ValueError`` naming it unless it is
    a finite number >= 0."""
    try:
        ms = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 <= ms < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return ms / 1000.0


def jitter(index: int) -> float:
    """A number in [-1, 1) that is a fixed function of ``index``, spread evenly over the
    indices (a multiplicative hash): the same run of URLs gets the same latencies."""
    return ((index * 0x9E3779B1) & 0xFFFFFFFF) / 2**31 - 1.0


def check_sample(data: object, size: int, index: int | None = None) -> int:
    """Check that ``data`` is a sample served by this server (length, header, fill bytes)
    and, when ``index`` is given, that it is sample ``index``. Returns the embedded index;
    raises ``ValueError`` on any mismatch. Costs well under a microsecond."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"sample is {type(data).__name__}, expected bytes")
    if len(data) != size:
        raise ValueError(f"sample has {len(data)} bytes, expected {size}")
    if size < HEADER_BYTES + 1:
        return -1 if index is None else index
    got = int.from_bytes(data[:HEADER_BYTES], "little")
    fill = got % 251
    if data[HEADER_BYTES] != fill or data[size // 2] != fill or data[-1] != fill:
        raise ValueError(f"sample {got}: fill bytes differ from {fill}")
    if index is not None and got != index:
        raise ValueError(f"got sample {got}, expected sample {index}")
    return got


def _files_app(latency_s: float, files_dir: str) -> web.Application:
    """``--files``: ``/file/{name}`` and ``/health`` (``/sample`` is the protocol's)."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/file/{name}", _file_handler(Path(files_dir).resolve(), latency_s))
    return app


def _file_handler(root: Path, latency_s: float) -> Any:
    """``GET /file/{name}``: the file ``root/name`` after the latency (``?latency_ms=``
    overrides), as a ``FileResponse``: sendfile, in chunks, with its Content-Length."""

    async def file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]  # one path segment: the route matches no "/"
        path = (root / name).resolve()
        if name.startswith(".") or path.parent != root or not path.is_file():
            raise web.HTTPNotFound(text=f"no file {name!r}")
        override = request.query.get("latency_ms")
        delay = latency_s if override is None else float(override) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)  # before the headers: the first byte waits for it
        return web.FileResponse(path, chunk_size=1 << 20)

    return file


class _SampleProtocol(asyncio.Protocol):
    """``/sample/{i}`` and ``/health`` over keep-alive HTTP/1.1, one request at a time per
    connection (the next waits in the buffer), the latency waited with a timer."""

    def __init__(self, latency_s: float, size: int, count: int) -> None:
        self.latency_s = latency_s
        self.size = size
        self.count = count
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.busy = False  # answering a request: the next one waits in the buffer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        request_line = self.buffer[: self.buffer.find(b"\r\n")].decode("latin-1")
        self.buffer = self.buffer[end + 4 :]  # GETs only: no request bodies
        self.busy = True
        parts = request_line.split(" ")
        path, _, query = (parts[1] if len(parts) == 3 else "").partition("?")
        if path == "/health":
            self._answer(200, b"ok")
            return
        if not path.startswith("/sample/"):
            self._answer(404, b"not found")
            return
        try:
            index = int(path[8:])
        except ValueError:
            self._answer(400, b"index must be an integer")
            return
        if not 0 <= index < self.count:
            self._answer(404, f"no sample {index}".encode())
            return
        delay, spread = self.latency_s, 0.0
        try:
            for pair in query.split("&"):
                name, _, value = pair.partition("=")
                if name == "latency_ms":
                    delay = _milliseconds(name, value)
                elif name == "jitter_ms":
                    spread = _milliseconds(name, value)
            if spread > delay:
                # Clamping the low side at 0 would raise the mean above the latency asked.
                raise ValueError(f"jitter_ms must be <= the latency, {delay * 1000:g} ms")
        except ValueError as exc:
            self._answer(400, str(exc).encode())
            return
        delay += spread * jitter(index)
        body = sample_bytes(index, self.size)
        if delay > 0:
            self.loop.call_later(delay, self._answer, 200, body)
        else:
            self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        if self.transport is None:
            return
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        self.busy = False
        if self.buffer:
            self._next()


async def serve(
    *,
    port: int = 0,
    latency_ms: float = 20.0,
    size: int = 16384,
    count: int = 100_000,
    backlog: int = 4096,
    exit_on_stdin_eof: bool = False,
    files_dir: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or stdin EOF when asked); print the bound URL first.
    ``files_dir``: also serve its files at ``/file/{name}``."""
    loop = asyncio.get_running_loop()
    runner: web.AppRunner | None = None
    server: asyncio.AbstractServer | None = None
    if files_dir is None:
        server = await loop.create_server(
            lambda: _SampleProtocol(latency_ms / 1000.0, size, count),
            HOST,
            port,
            backlog=backlog,
            reuse_address=True,
        )
        bound = server.sockets[0].getsockname()[1]
    else:
        runner = web.AppRunner(
            _files_app(latency_ms / 1000.0, files_dir),
            access_log=None,
            handle_signals=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, HOST, port, backlog=backlog, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1]
    try:
        print(f"http://{HOST}:{bound}", flush=True)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if exit_on_stdin_eof:
            # The parent holds our stdin open; when it dies the pipe closes and we leave.
            # Raw os.read: a daemon thread must not hold the buffered stdin's lock at exit.
            def watch_stdin() -> None:
                with contextlib.suppress(OSError):
                    while os.read(0, 4096):
                        pass
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=watch_stdin, daemon=True).start()
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        if server is not None:
            server.close()


def run_event_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine on uvloop when installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def start_server(
    *,
    latency_ms: float = 20.0,
    size: int = 16384,
    count: int = 100_000,
    backlog: int = 4096,
    ready_timeout: float = 15.0,
    files_dir: str | os.PathLike[str] | None = None,
    cpus: Collection[int] | None = None,
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start the server in a subprocess on an ephemeral port; return ``(base_url, process)``
    once ``/health`` answers. The server exits by itself if this process dies.
    ``files_dir``: also serve that folder's files at ``/file/{name}``. ``cpus``: the only
    cores the server may run on (``os.sched_setaffinity``, set while it starts up)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--port",
        "0",
        "--latency-ms",
        str(latency_ms),
        "--size",
        str(size),
        "--count",
        str(count),
        "--backlog",
        str(backlog),
        "--exit-on-stdin-eof",
    ]
    if files_dir is not None:
        cmd += ["--files", str(files_dir)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        if cpus is not None:
            # Set at once, while the server still imports: its event loop thread, the one
            # that matters, is the process's main thread and keeps this affinity.
            os.sched_setaffinity(proc.pid, cpus)
        base_url = _read_url(proc, ready_timeout)
        _wait_healthy(base_url, proc, ready_timeout)
    except BaseException:
        stop_server(proc)
        raise
    return base_url, proc


def _read_url(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"server did not print its URL within {timeout} s")
            if not sel.select(left):
                continue
            chunk = proc.stdout.read(4096)  # unbuffered: one os.read
            if not chunk:
                raise RuntimeError(f"server exited early (status {proc.wait(timeout=5)})")
            buf += chunk
    return buf.split(b"\n", 1)[0].decode().strip()


def _wait_healthy(base_url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early (status {proc.returncode})")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"server at {base_url} not healthy within {timeout} s: {last!r}")


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop the server process by its PID (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@contextlib.contextmanager
def running_server(
    *, latency_ms: float = 20.0, size: int = 16384, count: int = 100_000
) -> Iterator[str]:
    """``with running_server(...) as base_url:``: start, yield the base URL, always stop."""
    base_url, proc = start_server(latency_ms=latency_ms, size=size, count=count)
    try:
        yield base_url
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=16384, help="bytes per sample")
    parser.add_argument("--count", type=int, default=100_000, help="number of samples")
    parser.add_argument("--backlog", type=int, default=4096)
    parser.add_argument("--files", default=None, help="also serve this folder at /file/{name}")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    run_event_loop(
        serve(
            port=args.port,
            latency_ms=args.latency_ms,
            size=args.size,
            count=args.count,
            backlog=args.backlog,
            exit_on_stdin_eof=args.exit_on_stdin_eof,
            files_dir=args.files,
        )
    )


if __name__ == "__main__":
    main()
