"""The baseline a PyTorch user writes today: a map-style dataset whose ``__getitem__``
does one blocking read, parallelised by ``torch.utils.data.DataLoader`` worker processes.

The datasets are plain classes (``__len__`` and ``__getitem__`` are all a DataLoader
needs), so this module imports neither torch nor asyncload's event-loop code. Each process
(the main one, or each forked worker) opens its own connections on first use and keeps
them alive, so the baseline pays no handshake per sample.
"""

from __future__ import annotations

import http.client
import os
from typing import Any, Protocol
from urllib.parse import urlsplit

from .._redact import redact_url
from ..sources._http1 import basic_auth
from .sources import SourceSpec

TIMEOUT_S = 60.0  # per blocking request: generous, a slow store must not fail the run


class BlockingDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> bytes: ...

    def close(self) -> None:
        """Release this process's connections (a DataLoader's workers just exit)."""


def blocking_dataset(spec: SourceSpec) -> BlockingDataset:
    """The blocking reader for ``spec``'s samples, in ``spec.keys`` order."""
    if spec.kind == "http":
        return BlockingHTTP(spec.keys)
    if spec.kind == "files":
        assert spec.root is not None
        return BlockingFiles(spec.root, spec.keys)
    assert spec.bucket is not None
    return BlockingS3(spec.bucket, spec.keys, spec.s3.store_config(), spec.s3.client_options())


class BlockingHTTP:
    """``ds[i]``: the body of a GET of ``urls[i]`` with ``http.client``.

    A URL's ``user:password@`` is sent as Basic auth, as ``HTTPSource`` sends it. A non-2xx
    answer raises ``OSError`` (its message names the URL without credentials or query); a
    body shorter than its Content-Length raises ``http.client.IncompleteRead``. A
    keep-alive connection the server closed is reopened once. Redirects are not followed.
    """

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> bytes:
        url = self.urls[index]
        parts = urlsplit(url)
        # http.client takes host[:port] only: credentials go in a header, never to the resolver.
        origin = (parts.scheme, parts.netloc.rpartition("@")[2])
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        auth = basic_auth(parts)
        headers = {"Authorization": auth} if auth is not None else {}
        for attempt in (0, 1):
            conn = self._connection(*origin)
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                del self._conns[origin]
                if attempt:
                    raise
                continue
            if not 200 <= response.status < 300:
                raise OSError(f"GET {redact_url(url)}: HTTP {response.status}")
            return body
        raise AssertionError("unreachable")

    def _connection(self, scheme: str, host: str) -> http.client.HTTPConnection:
        # A forked worker must not share its parent's sockets: one set per process.
        if self._pid != os.getpid():
            self._conns, self._pid = {}, os.getpid()
        conn = self._conns.get((scheme, host))
        if conn is None:
            factory = (
                http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            )
            conn = self._conns[scheme, host] = factory(host, timeout=TIMEOUT_S)
        return conn

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_conns": {}, "_pid": -1}


class BlockingFiles:
    """``ds[i]``: the bytes of ``root/keys[i]``, with ``open`` and ``read``."""

    def __init__(self, root: str, keys: list[str]) -> None:
        self.root = root
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> bytes:
        with open(os.path.join(self.root, self.keys[index]), "rb") as f:
            return f.read()

    def close(self) -> None:
        pass


class BlockingS3:
    """``ds[i]``: the object ``keys[i]`` with obstore's blocking ``get`` (credentials from
    the environment). One store per process, made on first use: obstore's runtime does
    not survive a fork."""

    def __init__(
        self, bucket: str, keys: list[str], config: dict[str, Any], client_options: dict[str, Any]
    ) -> None:
        self.bucket = bucket
        self.keys = keys
        self.config = config
        self.client_options = client_options
        self._store: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> bytes:
        import obstore

        if self._store is None or self._pid != os.getpid():
            from obstore.store import S3Store

            self._store = S3Store(
                self.bucket,
                config=self.config,  # type: ignore[arg-type]
                client_options=self.client_options,  # type: ignore[arg-type]
            )
            self._pid = os.getpid()
        data: bytes = obstore.get(self._store, self.keys[index]).bytes().to_bytes()
        return data

    def close(self) -> None:
        self._store = None  # obstore closes its pool when the store is dropped

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None, "_pid": -1}
