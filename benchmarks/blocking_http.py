"""The baseline a PyTorch user writes today: a map-style torch ``Dataset`` whose
``__getitem__`` does a blocking HTTP GET, parallelised by ``DataLoader`` worker processes.

Each process (the main one with ``num_workers=0``, else each worker) keeps one keep-alive
``http.client`` connection, opened on first use, so the baseline pays no TCP handshake
per sample.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import torch.utils.data


class BlockingHTTPDataset(torch.utils.data.Dataset[Any]):
    """``dataset[i]`` GETs ``urls[i]`` and returns the body (through ``transform`` if given).

    A non-200 answer raises ``OSError``; a body shorter than its Content-Length raises
    ``http.client.IncompleteRead``. A stale keep-alive connection is reopened once.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[bytes], Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.urls = list(urls)
        self.transform = transform
        self.timeout = timeout
        self._host, self._port, self._paths = _target(self.urls)
        self._conn: http.client.HTTPConnection | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> Any:
        body = _get(self._connection, self._forget, self._paths[index])
        return body if self.transform is None else self.transform(body)

    def _connection(self) -> http.client.HTTPConnection:
        # One connection per process: a forked worker must not share its parent's socket.
        if self._conn is None or self._pid != os.getpid():
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._pid = os.getpid()
        return self._conn

    def _forget(self) -> None:
        self._conn = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_conn"] = None
        state["_pid"] = -1
        return state


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _target(urls: list[str]) -> tuple[str, int, list[str]]:
    """(host, port) of the first URL (every URL is on one server), and each URL's path."""
    parts = urlsplit(urls[0]) if urls else urlsplit("http://127.0.0.1")
    return parts.hostname or "127.0.0.1", parts.port or 80, [_path_of(u) for u in urls]


def _get(
    connection: Callable[[], http.client.HTTPConnection], forget: Callable[[], None], path: str
) -> bytes:
    """GET ``path`` over ``connection()``; a stale keep-alive connection is dropped
    (``forget()``) and the request sent once more on a new one."""
    for attempt in (0, 1):
        conn = connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()
            forget()
            if attempt:
                raise
            continue
        if resp.status != 200:
            raise OSError(f"GET {path}: HTTP {resp.status}")
        return body
    raise AssertionError("unreachable")


class ThreadLocalGetter:
    """``getter(i)`` GETs ``urls[i]`` over a keep-alive ``http.client`` connection of the
    calling thread's own (opened on first use): the map function of a thread pool such as
    torchdata's ``ParallelMapper(method="thread")``, where one shared connection would be
    used from many threads at once. A non-200 answer raises ``OSError``."""

    def __init__(self, urls: Sequence[str], timeout: float = 30.0) -> None:
        self.urls = list(urls)
        self._host, self._port, self._paths = _target(self.urls)
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []

    def __call__(self, index: int) -> bytes:
        return _get(self._connection, self._forget, self._paths[index])

    def _forget(self) -> None:
        self._local.conn = None

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
