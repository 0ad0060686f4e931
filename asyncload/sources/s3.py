"""S3 and S3-compatible object stores (AWS, SeaweedFS, MinIO, R2, ...) as datasets of bytes.

Requests go through obstore (Rust ``object_store``: HTTP, signing and retries-if-asked run
on its own tokio threads); a GET is two awaits of obstore's futures. obstore is imported on
first use, never by ``import asyncload``; install it with ``pip install 'asyncload[s3]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import sniffio

from .._callables import PerLoop, gather
from .._redact import redact_url
from ..datasets import AsyncDataset, AsyncIterableDataset, normalize_index
from ..errors import HTTPStatusError, ObjectTooLargeError, TruncatedBodyError
from ..resilience.classify import obstore_error_facts
from ..streaming import StreamEpoch, shuffle_buffer

if TYPE_CHECKING:
    from obstore.store import S3Store

    from ..resilience.retry import Retry

__all__ = ["S3PrefixStream", "S3Source"]

DEFAULT_MAX_OBJECT_BYTES = 1 << 30
"""Objects larger than this (1 GiB) are refused unless ``max_object_bytes`` says otherwise."""

_S3_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_REQUEST = re.compile(r"Error performing ([A-Z]+) (\S+)")
_USERINFO = re.compile(r"(?<=://)[^/\s@]*@")


def _scrub(exc: BaseException) -> None:
    """Take ``user:password@`` out of the URLs in ``exc``'s message, in place."""
    # obstore's messages name the request URL as configured, an endpoint's userinfo
    # included, and the original error is chained to ours (tracebacks print it).
    if any(isinstance(arg, str) and "@" in arg for arg in exc.args):
        exc.args = tuple(_USERINFO.sub("", a) if isinstance(a, str) else a for a in exc.args)


# The process whose obstore (tokio) runtime has run requests. Its threads do not survive a
# fork: a forked child's requests would hang forever, so the child gets an error instead.
_runtime_pid: int | None = None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}"


# Where obstore finds an endpoint besides the endpoint_url argument, in the order it ranks
# them: the S3-specific one over the general ones; each from config keys (any case), then
# from environment variables.
_ENDPOINT_SOURCES = (
    (("aws_endpoint_url_s3",), ("AWS_ENDPOINT_URL_S3",)),
    (
        ("endpoint", "aws_endpoint", "endpoint_url", "aws_endpoint_url"),
        ("AWS_ENDPOINT", "AWS_ENDPOINT_URL"),
    ),
)


def _endpoint_in_use(endpoint_url: str | None, config: Mapping[str, Any]) -> str | None:
    """The endpoint the store will talk to: ``endpoint_url`` (which _Client passes as both
    of obstore's endpoint keys, so that it wins), else the one obstore takes from ``config``
    or the environment; None for AWS's own."""
    if endpoint_url is not None:
        return endpoint_url
    given = {str(name).lower(): value for name, value in config.items()}
    for config_names, environment_names in _ENDPOINT_SOURCES:
        for name in config_names:
            if isinstance(given.get(name), str) and given[name]:
                return str(given[name])
        for name in environment_names:
            if os.environ.get(name):
                return os.environ[name]
    return None


def check_key(key: object, who: str) -> None:
    """``ValueError`` naming ``key`` (and ``who`` asked) unless it can be asked for as
    written. obstore drops a leading or trailing ``/`` (``"dir/"`` would fetch ``"dir"``,
    and ``"/"`` the bucket's listing), and refuses empty, ``.`` and ``..`` segments and
    ASCII control characters."""
    if not isinstance(key, str) or not key:
        problem = "must be a non-empty string"
    elif key.startswith("/") or key.endswith("/"):
        problem = "starts or ends with '/': obstore would fetch another key (folder markers are not samples)"
    elif any(part in ("", ".", "..") for part in key.split("/")):
        problem = "has an empty, '.' or '..' path segment, which obstore cannot address"
    elif any(c < " " or c == "\x7f" for c in key):
        problem = "has an ASCII control character, which obstore cannot address"
    else:
        return
    raise ValueError(f"{who}: key {key!r} {problem}")


class _StaticCredentials:
    """The keys given to S3Source, as obstore's credential provider. Given in its config
    instead, obstore adds the environment's ``AWS_SESSION_TOKEN`` to them (the shell's
    temporary credentials), a mix that AWS refuses. Picklable, for DataLoader workers."""

    def __init__(self, access_key_id: str, secret_access_key: str, token: str | None) -> None:
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.token = token

    def __call__(self) -> dict[str, Any]:
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "token": self.token,
            "expires_at": None,  # static: never refreshed
        }

    def __repr__(self) -> str:
        return "<S3 credentials given to S3Source>"  # (never the secret)


def _note_runtime() -> None:
    global _runtime_pid
    if _runtime_pid is None:
        _runtime_pid = os.getpid()


def _check_not_forked() -> None:
    if _runtime_pid is not None and _runtime_pid != os.getpid():
        raise RuntimeError(
            f"S3Source: obstore ran requests in process {_runtime_pid}, which then forked "
            "this one; its runtime does not survive a fork (requests would hang). Start "
            "DataLoader workers with multiprocessing_context='spawn' or 'forkserver', or "
            "make no S3 request in the parent before forking."
        )


_obstore: Any = None  # the obstore module, once imported


def _import_obstore() -> Any:
    global _obstore
    if _obstore is None:
        try:
            import obstore
        except ImportError:
            raise ImportError(
                "S3Source needs obstore: pip install 'asyncload[s3]' (or pip install obstore)"
            ) from None
        _obstore = obstore
    return _obstore


def _check_positive(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"S3Source: {name} must be {what}, got {value!r}")


def endpoint_url_problem(url: object) -> str | None:
    """What is wrong with ``url`` as an S3 endpoint (``None``: nothing), with the URL as
    given: it must be an http(s) URL with a host, a valid port and no query. obstore
    would panic (``RustPanic``, "unknown error") at the first request on one it cannot
    sign for, far from the mistake."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        problem = "must be an http(s) URL"
    elif any(c.isspace() for c in url):
        problem = "must not contain spaces"
    else:
        try:
            parts = urlsplit(url)
            port = parts.port  # ValueError for a port that is not a number in 0-65535
        except ValueError as exc:
            problem = f"is not a valid URL ({exc})"
        else:
            if not parts.hostname:
                problem = "has no host"
            elif port == 0 or (port is None and parts.netloc.endswith(":")):
                problem = "has an empty or zero port"
            elif parts.query or parts.fragment:
                problem = "must not have a query string or fragment"
            else:
                return None
    # As written, so that the mistake shows, unless it may hold a secret.
    shown = redact_url(url) if isinstance(url, str) and ("@" in url or "?" in url) else url
    return f"{problem}, got {shown!r}"


class _Client:
    """What every S3 request needs: the store settings, one obstore ``S3Store`` per event
    loop (created on first use), the optional connection limit, and error translation.

    One store per loop, not one shared: the sync bridge and each DataLoader worker run their
    own loop, and a forked worker must not reuse its parent's connections.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        session_token: str | None,
        anonymous: bool,
        allow_http: bool | None,
        max_object_bytes: int | None,
        max_connections: int | None,
        config: Mapping[str, Any] | None,
        client_options: Mapping[str, Any] | None,
        retry_config: Mapping[str, Any] | None,
        credential_provider: Callable[[], Any] | None,
    ) -> None:
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ValueError(f"S3Source: bucket must be a bucket name (no '/'), got {bucket!r}")
        problem = None if endpoint_url is None else endpoint_url_problem(endpoint_url)
        if problem is not None:
            raise ValueError(f"S3Source: endpoint_url {problem}")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("S3Source: give both access_key_id and secret_access_key, or neither")
        if anonymous and (access_key_id is not None or credential_provider is not None):
            raise ValueError("S3Source: anonymous=True takes no credentials")
        if credential_provider is not None and (
            access_key_id is not None or session_token is not None
        ):
            raise ValueError(
                "S3Source: give access_key_id/secret_access_key/session_token or "
                "credential_provider, not both"
            )
        _check_positive("max_object_bytes", max_object_bytes)
        _check_positive("max_connections", max_connections)
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        # Where the objects live, without credentials or path: "aws" for AWS (whose
        # bucket names are global).
        endpoint = _endpoint_in_use(endpoint_url, config or {})
        self.origin = _origin(endpoint) if endpoint is not None else "aws"
        self.max_object_bytes = max_object_bytes
        self.max_connections = max_connections
        store_config: dict[str, Any] = dict(config or {})
        if endpoint_url is not None:
            # Both keys: obstore ranks the S3-specific one (AWS_ENDPOINT_URL_S3 from the
            # environment too) above "endpoint", and the argument must win.
            store_config["endpoint"] = store_config["aws_endpoint_url_s3"] = endpoint_url
        if region is not None:
            store_config["region"] = region
        if access_key_id is not None:
            assert secret_access_key is not None
            credential_provider = _StaticCredentials(
                access_key_id, secret_access_key, session_token
            )
        elif session_token is not None:
            store_config["session_token"] = session_token
        if anonymous:
            store_config["skip_signature"] = True
        self._config = store_config
        options: dict[str, Any] = dict(client_options or {})
        if allow_http is None:
            # An explicit http:// endpoint means plain HTTP is wanted (a local store).
            allow_http = endpoint_url is not None and endpoint_url.startswith("http://")
        if allow_http:
            options.setdefault("allow_http", True)
        self._client_options = options
        # Off by default: the Loader's retry, timeout and breaker must see every failure.
        self._retry_config: dict[str, Any] = (
            {"max_retries": 0} if retry_config is None else dict(retry_config)
        )
        self._credential_provider = credential_provider
        self._stores: PerLoop[S3Store] = PerLoop(self._new_store)
        self._limits: PerLoop[asyncio.Semaphore] = PerLoop(self._new_limit)

    def _new_store(self) -> S3Store:
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError(
                "S3Source uses obstore, which runs on asyncio only: run this loader on "
                "asyncio (or uvloop), e.g. anyio.run(main, backend='asyncio')"
            )
        _check_not_forked()
        _import_obstore()
        from obstore.store import S3Store

        return S3Store(
            self.bucket,
            config=self._config,  # type: ignore[arg-type]
            client_options=self._client_options,  # type: ignore[arg-type]
            retry_config=self._retry_config,  # type: ignore[arg-type]
            credential_provider=self._credential_provider,
        )

    def _new_limit(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.max_connections or 1)

    def store(self) -> S3Store:
        """The running event loop's store; ``RuntimeError`` outside asyncio."""
        return self._stores.get()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """One of the running loop's ``max_connections``, held while the context is open
        (a no-op without a limit)."""
        if self.max_connections is None:
            return contextlib.nullcontext()
        return self._limits.get()

    async def get(
        self,
        key: str,
        store: S3Store | None = None,
        seconds: float | None = None,
    ) -> bytes:
        """The whole object at ``key``, through ``store`` (default: the running loop's),
        holding one of ``max_connections`` while it runs; ``seconds`` bounds the request
        from when it holds that connection (``TimeoutError`` naming the key)."""
        if store is None:
            store = self.store()
        if self.max_connections is None:
            return await self._timed_get(store, key, seconds)
        async with self._limits.get():
            return await self._timed_get(store, key, seconds)

    async def _timed_get(self, store: S3Store, key: str, seconds: float | None) -> bytes:
        if seconds is None:
            return await self._get(store, key)
        with anyio.move_on_after(seconds):
            return await self._get(store, key)
        raise TimeoutError(f"{self.url(key)}: no answer within {seconds} s")

    async def _get(self, store: S3Store, key: str) -> bytes:
        # Two awaits of obstore's own futures and nothing else: every extra hop through the
        # event loop costs several microseconds per object (measured against raw obstore).
        _note_runtime()
        try:
            result = await _obstore.get_async(store, key)  # imported with the store
        except Exception as exc:
            error = self.translate(exc, key, reading_body=False)
            if error is exc:
                raise
            raise error from exc
        start, end = result.range  # a tuple: cheaper than the meta dict
        size = end - start
        limit = self.max_object_bytes
        if limit is not None and size > limit:
            # Refused from the headers: the body is never read, its connection is dropped.
            raise ObjectTooLargeError(
                f"{self.url(key)}: object is {size:,} bytes, more than max_object_bytes={limit:,}"
            )
        try:
            data: bytes = (await result.bytes_async()).to_bytes()
        except Exception as exc:
            error = self.translate(exc, key, reading_body=True)
            if error is exc:
                raise
            raise error from exc
        if len(data) != size:
            raise TruncatedBodyError(f"{self.url(key)}: body has {len(data)} of {size} bytes")
        return data

    async def exists(self, key: str, store: S3Store, seconds: float | None = None) -> bool:
        """Whether a HEAD of ``key`` finds it, holding one of ``max_connections`` while it
        runs; ``seconds`` bounds it from when it holds that connection (``TimeoutError``
        naming the key). Failures other than "not found" raise, translated as for a GET."""
        _note_runtime()
        try:
            async with self.slot():
                with anyio.move_on_after(seconds) as waited:  # (None: no limit)
                    await _obstore.head_async(store, key)  # imported with the store
        except Exception as exc:
            error = self.translate(exc, key, reading_body=False, method="HEAD")
            if isinstance(error, FileNotFoundError):
                return False
            if error is exc:
                raise
            raise error from exc
        if waited.cancelled_caught:
            raise TimeoutError(f"{self.url(key)}: no answer to HEAD within {seconds} s")
        return True

    async def iter_chunks(self, key: str, chunk_size: int) -> AsyncIterator[bytes]:
        """The object at ``key`` as it arrives, in chunks of about ``chunk_size`` bytes
        (for tar shards, too large to hold whole; ``max_object_bytes`` does not apply).

        Holds one of ``max_connections`` from the request until the stream ends or is
        closed, also while its consumer is not reading: an open stream keeps its connection.
        """
        store = self.store()
        _note_runtime()
        async with self.slot():
            try:
                result = await _obstore.get_async(store, key)
            except Exception as exc:
                error = self.translate(exc, key, reading_body=False)
                if error is exc:
                    raise
                raise error from exc
            start, end = result.range
            received = 0
            try:
                async for chunk in result.stream(min_chunk_size=chunk_size):
                    data = chunk if type(chunk) is bytes else bytes(chunk)
                    received += len(data)
                    yield data
            except Exception as exc:
                error = self.translate(exc, key, reading_body=True)
                if error is exc:
                    raise
                raise error from exc
            if received != end - start:
                raise TruncatedBodyError(
                    f"{self.url(key)}: body has {received} of {end - start} bytes"
                )

    def translate(
        self,
        exc: BaseException,
        key: str,
        *,
        reading_body: bool,
        method: str = "GET",
        listing: bool = False,
    ) -> BaseException:
        """An obstore error from a ``method`` request for ``key`` (or, with ``listing``, from
        listing the prefix ``key``) as the error asyncload users expect (the caller chains
        the original as ``__cause__``):

        - a missing key or bucket: ``FileNotFoundError`` (``filename`` is ``s3://bucket/key``);
          a listing fails only for a missing bucket (an empty prefix lists nothing);
        - 401/403: ``PermissionError``;
        - any other non-2xx answer: `HTTPStatusError` (status, S3 error code in the message);
        - a body cut short: `TruncatedBodyError`; a timeout: ``TimeoutError``; a failed
          connection or request: ``ConnectionError``.

        Anything else is returned as it is. Messages name the key (or prefix), never
        credentials: the original's message loses any ``user:password@`` of the endpoint.
        """
        if not isinstance(exc, Exception):
            return exc
        _scrub(exc)
        url = self.url(key)
        text = str(exc)
        code_match = _S3_CODE.search(text)
        code = code_match.group(1) if code_match else None
        new: BaseException | None = None
        request = _REQUEST.search(text)
        ours = request is None or request.group(1) == method
        if request is not None and not ours:
            # Not the request we made: e.g. a credentials request to instance metadata.
            url = f"{url} (failed on {request.group(1)} {redact_url(request.group(2))})"
        status, kind = obstore_error_facts(exc)
        if (
            isinstance(exc, FileNotFoundError)
            or code == "NoSuchBucket"
            or (listing and ours and status == 404)
        ):
            # obstore reports a listing's 404 as a GenericError, not as NotFoundError.
            missing_bucket = listing or code == "NoSuchBucket"
            what = "the bucket does not exist" if missing_bucket else "no such key"
            new = FileNotFoundError(errno.ENOENT, what, url)
        elif not isinstance(exc, (TruncatedBodyError, ValueError)):
            name = type(exc).__name__
            if status in (401, 403) or name in ("PermissionDeniedError", "UnauthenticatedError"):
                new = PermissionError(errno.EACCES, f"access denied ({code or status})", url)
            elif status is not None and not 200 <= status < 300:
                new = HTTPStatusError(status, url, code=code)
            elif kind == "Interrupted" and reading_body:
                new = TruncatedBodyError(f"{url}: body cut short")
            elif kind == "Timeout":
                new = TimeoutError(f"{url}: the request timed out")
            elif kind in ("Connect", "Request", "Interrupted"):
                new = ConnectionError(f"{url}: the request failed ({kind.lower()})")
        return exc if new is None else new


class S3Source(AsyncDataset[bytes]):
    """The bytes of each object ``keys[i]`` in ``bucket``.

    - a missing key (or bucket) raises ``FileNotFoundError`` naming ``s3://bucket/key``;
      401/403 raise ``PermissionError``; other non-2xx answers raise `HTTPStatusError`
      (503 SlowDown and 5xx are transient for `Retry`, 4xx are not); a failed connection
      raises ``ConnectionError``, an obstore timeout ``TimeoutError``, and a body shorter
      than announced `TruncatedBodyError`, never a short sample. The obstore error is
      chained as ``__cause__``. Messages never contain credentials.
    - an object larger than ``max_object_bytes`` (default 1 GiB; ``None``: no limit) is
      refused with ``ValueError`` from the GET's headers, before its body is read.

    Store settings:

    - ``endpoint_url``: an S3-compatible endpoint (``http://127.0.0.1:8333``); default AWS.
      ``region``: default from the environment, else ``us-east-1``.
    - credentials: ``access_key_id`` + ``secret_access_key`` (+ ``session_token``), or a
      ``credential_provider`` (obstore's, e.g.
      ``obstore.auth.boto3.Boto3CredentialProvider()`` for ``~/.aws`` profiles). Without
      them, obstore reads the ``AWS_*`` environment variables, web identity, ECS or instance
      metadata. ``anonymous=True`` sends unsigned requests (public buckets).
    - ``allow_http``: plain HTTP to the endpoint; default True exactly when
      ``endpoint_url`` starts with ``http://``.
    - ``max_connections``: requests in flight at most per event loop (default ``None``:
      bounded only by the Loader's ``concurrency``); an :meth:`iter_chunks` stream counts
      as one for as long as it is open.
    - ``config``, ``client_options``, ``retry_config``: passed to obstore's ``S3Store``
      (``S3Config``, ``ClientConfig`` e.g. ``{"timeout": "120s"}`` for large objects,
      ``RetryConfig``). obstore's own retries are off unless ``retry_config`` turns them on,
      so that the Loader's ``retry``, ``timeout`` and ``breaker`` see every failure.
      obstore does not expose a throttling answer's ``Retry-After``: `Retry` backs off by its
      own schedule.

    Runs on asyncio (and uvloop) only, as obstore does: on trio the first fetch raises
    ``RuntimeError``. One store (connection pool) per event loop, made on first use;
    ``await source.aclose()`` drops the running loop's. :meth:`getitems` starts all its
    GETs at once (for direct use; the Loader fetches per sample).
    """

    def __init__(
        self,
        bucket: str,
        keys: Iterable[str],
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        anonymous: bool = False,
        allow_http: bool | None = None,
        max_object_bytes: int | None = DEFAULT_MAX_OBJECT_BYTES,
        max_connections: int | None = None,
        config: Mapping[str, Any] | None = None,
        client_options: Mapping[str, Any] | None = None,
        retry_config: Mapping[str, Any] | None = None,
        credential_provider: Callable[[], Any] | None = None,
    ) -> None:
        if isinstance(keys, str):
            raise TypeError("S3Source: keys must be a list of keys, not a single string")
        self.keys = list(keys)
        for key in self.keys:
            check_key(key, "S3Source")
        self._client = _Client(
            bucket,
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            anonymous=anonymous,
            allow_http=allow_http,
            max_object_bytes=max_object_bytes,
            max_connections=max_connections,
            config=config,
            client_options=client_options,
            retry_config=retry_config,
            credential_provider=credential_provider,
        )

    @property
    def bucket(self) -> str:
        return self._client.bucket

    @property
    def max_connections(self) -> int | None:
        """Requests in flight (open :meth:`iter_chunks` streams included) at most per event
        loop; ``None``: no limit."""
        return self._client.max_connections

    @classmethod
    def from_prefix(
        cls,
        bucket: str,
        prefix: str = "",
        *,
        in_flight: int = 64,
        page_size: int = 1000,
        retry: Retry | None = None,
        timeout: float | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        anonymous: bool = False,
        allow_http: bool | None = None,
        max_object_bytes: int | None = DEFAULT_MAX_OBJECT_BYTES,
        max_connections: int | None = None,
        config: Mapping[str, Any] | None = None,
        client_options: Mapping[str, Any] | None = None,
        retry_config: Mapping[str, Any] | None = None,
        credential_provider: Callable[[], Any] | None = None,
    ) -> S3PrefixStream:
        """Every object whose key starts with ``prefix``, as a *stream*
        (:class:`S3PrefixStream`, an ``AsyncIterableDataset[bytes]``).

        Lazy: the listing is read page by page as the stream goes, so the first sample
        comes after one listing page, not after listing millions of keys. A stream has no
        ``len()`` and no random access; for a map-style dataset (shuffle by index, exact
        length), list the keys first (``[k async for k in S3Source.from_prefix(...).list_keys()]``)
        and build ``S3Source(bucket, keys)``. See :class:`S3PrefixStream` for ``in_flight``,
        ``page_size``, ``retry`` and ``timeout``; the other keywords are as for S3Source.
        """
        client = _Client(
            bucket,
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            anonymous=anonymous,
            allow_http=allow_http,
            max_object_bytes=max_object_bytes,
            max_connections=max_connections,
            config=config,
            client_options=client_options,
            retry_config=retry_config,
            credential_provider=credential_provider,
        )
        return S3PrefixStream(
            client, prefix, in_flight=in_flight, page_size=page_size, retry=retry, timeout=timeout
        )

    def __len__(self) -> int:
        return len(self.keys)

    async def __getitem__(self, index: int) -> bytes:
        return await self._client.get(self.keys[normalize_index(index, len(self.keys))])

    async def getitems(self, indices: Sequence[int]) -> list[bytes]:
        """The objects at ``indices``, in that order, fetched concurrently (at most
        ``max_connections`` at once). The first failure is raised and the other fetches
        are cancelled."""
        n, client = len(self.keys), self._client
        keys = [self.keys[normalize_index(i, n)] for i in indices]
        store = client.store()
        return await gather(lambda key: client.get(key, store), keys)

    @property
    def batched(self) -> bool:
        # The Loader fetches one sample per task instead of chunks through getitems:
        # measured no faster here (obstore's I/O is in Rust either way), and a chunk is one
        # attempt, so one failed object would re-fetch its whole chunk and retries would
        # count per chunk.
        return False

    def key_of(self, index: int) -> Hashable:
        return self.keys[normalize_index(index, len(self.keys))]

    def _cache_key(self, index: int) -> Hashable:
        """The object named in full (endpoint, bucket, key), so that sources over two
        buckets or stores with the same keys never share a cache entry. The endpoint is
        its scheme, host and port only: DiskCache writes keys into its files, and an
        endpoint URL may carry credentials."""
        return ("s3", self._client.origin, self.bucket, self.key_of(index))

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object at ``key`` (any key of the bucket) as it arrives, in chunks: for
        streams too large to hold whole, such as tar shards. Errors are as for a sample.

        The stream holds one of ``max_connections`` from its request until it ends or is
        closed (``aclose()``), also while nobody reads it: whoever keeps several streams
        open at once must need no more than ``max_connections`` of them to make progress.
        ``ValueError`` for a key that cannot be asked for as written (see :func:`check_key`).
        """
        check_key(key, "S3Source")
        return self._client.iter_chunks(key, chunk_size)

    async def aclose(self) -> None:
        """Drop the running event loop's store and its connections (no-op outside asyncio)."""
        if sniffio.current_async_library() == "asyncio":
            self._client._stores.pop()

    def __repr__(self) -> str:
        where = f" at {redact_url(self._client.endpoint_url)}" if self._client.endpoint_url else ""
        return f"<S3Source of {len(self.keys)} objects in s3://{self.bucket}{where}>"


class _MarkerTwins:
    """Spots the second listing of a key: obstore lists a folder marker ``k/`` as ``k``, so
    beside an object ``k`` the same key comes twice, the marker's with size 0 (and its
    GET would fetch the object ``k`` again). The listing is in key order, where ``k/``
    comes after ``k`` with only keys that start with ``k`` between them, so the keys
    that are prefixes of the current one (a few, however long the listing) suffice."""

    def __init__(self) -> None:
        self._prefixes: list[str] = []  # each a prefix of the next

    def repeated(self, key: str, size: int) -> bool:
        """Whether ``key``, listed with ``size`` bytes, is a marker's twin of one listed."""
        prefixes = self._prefixes
        while prefixes and not key.startswith(prefixes[-1]):
            prefixes.pop()
        if prefixes and prefixes[-1] == key:
            return size == 0
        prefixes.append(key)
        return False


class S3PrefixStream(AsyncIterableDataset[bytes]):
    """The objects under a prefix, streamed in listing order (lexicographic on S3), made
    by :meth:`S3Source.from_prefix`.

    - the listing comes ``page_size`` keys at a time (S3 answers up to 1,000 keys per
      listing request), one chunk ahead of the fetches;
    - ``in_flight`` GETs run at once (the Loader's ``concurrency`` does not apply to
      streams); samples still come out in listing order;
    - ``timeout`` (seconds) bounds each GET attempt from when it holds its connection (a
      GET started ahead that stalls frees it in time), and each listing request
      (``TimeoutError`` naming the key or the prefix); ``retry`` (an `asyncload.Retry`)
      retries a failed GET, its first attempt being the one started ahead, and a failed
      listing request (listing again after the greatest key received). Without
      ``retry``, a failed GET ends the stream with its error (``FileNotFoundError`` for a
      key deleted since it was listed), which the Loader raises as a `SampleError`;
    - a failed listing (after ``retry``, if any) ends the stream with the error a GET
      would raise, naming ``s3://bucket/prefix`` (``FileNotFoundError`` for a bucket
      that does not exist); listing requests hold one of ``max_connections`` as GETs do;
    - folder markers (zero-size objects whose key ends with ``/``, as the S3 console's
      "Create folder" makes) are not samples: they are skipped. obstore lists such a key
      without its ``/``, so a zero-size key that a GET does not find is taken for one
      (an empty object deleted since it was listed is skipped too), and so is the second
      listing of a key (the marker ``k/`` beside an object ``k``).

    Every pass lists afresh. Under a Loader with several ranks or workers, each one reads
    the whole listing but fetches only its share of the objects (every ``shares``-th key).
    asyncio (and uvloop) only.
    """

    def __init__(
        self,
        client: _Client,
        prefix: str = "",
        *,
        in_flight: int = 64,
        page_size: int = 1000,
        retry: Retry | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"from_prefix: prefix must be a string, got {type(prefix).__name__}")
        _check_positive("in_flight", in_flight, optional=False)
        _check_positive("page_size", page_size, optional=False)
        if timeout is not None and not timeout > 0:
            raise ValueError(f"from_prefix: timeout must be > 0 seconds, got {timeout!r}")
        if retry is not None and not callable(getattr(retry, "run", None)):
            raise TypeError("from_prefix: retry must be an asyncload.Retry")
        self._client = client
        self.prefix = prefix.lstrip("/")
        self.in_flight = in_flight
        self.page_size = page_size
        self.retry = retry
        self.timeout = timeout

    @property
    def bucket(self) -> str:
        return self._client.bucket

    def _listing(self, store: S3Store, after: str | None = None) -> Any:
        """obstore's listing of the prefix, from the first key after ``after`` (all of it
        when None)."""
        obstore = _import_obstore()
        prefix = self.prefix
        if not prefix or prefix.endswith("/"):
            return obstore.list(store, prefix or None, offset=after, chunk_size=self.page_size)
        # object_store lists whole path segments ("data/ab" would miss "data/abc"): list the
        # parent folder, starting just before the prefix, and filter by _accept().
        parent, _, _ = prefix.rpartition("/")
        start: str | None = prefix[:-1] if after is None else after
        if start is not None and start.rpartition("/")[2] in ("", ".", ".."):
            # obstore refuses such an offset as a path ("dir/." for the prefix "dir/.h"):
            # list the folder from its start; _accept() passes over the keys before.
            start = None
        return obstore.list(store, parent or None, offset=start, chunk_size=self.page_size)

    def _pages(self, store: S3Store) -> Callable[[], asyncio.Future[Any]]:
        """A function that starts reading the next listing page: its future gives the page's
        object metas, raises ``StopAsyncIteration`` after the last, or a translated error.

        Each page's request holds one of ``max_connections``, and runs under ``timeout``
        and ``retry`` as a GET does. A failed listing cannot go on, so a retry lists
        afresh after the greatest key received: nothing is listed twice."""
        _note_runtime()
        client, prefix, timeout = self._client, self.prefix, self.timeout
        listing: Any = None
        # The greatest key received: where a retried listing goes on. (Not the last one:
        # a folder marker "k/" comes as "k", out of order; listed again, it is a twin.)
        last: str | None = None

        async def read() -> Any:
            """The next page, or None after the last (not StopAsyncIteration: a retry
            would take that for an error)."""
            nonlocal listing, last
            try:
                if listing is None:
                    listing = self._listing(store, last)
                async with client.slot():
                    with anyio.move_on_after(timeout) as waited:  # (None: no limit)
                        page = await listing.__anext__()
                    if waited.cancelled_caught:
                        raise TimeoutError(
                            f"{client.url(prefix)}: no listing page within {timeout} s"
                        )
            except StopAsyncIteration:
                return None
            except Exception as exc:
                listing = None  # (a listing that failed ends; a retry starts another)
                error = client.translate(exc, prefix, reading_body=False, listing=True)
                if error is exc:
                    raise
                raise error from exc
            if page:
                greatest = max(meta["path"] for meta in page)
                last = greatest if last is None else max(last, greatest)
            return page

        async def next_page() -> Any:
            page = await (read() if self.retry is None else self.retry.run(read))
            if page is None:
                raise StopAsyncIteration
            return page

        return lambda: asyncio.ensure_future(next_page())

    def _accept(self, key: str) -> bool | None:
        """True to keep ``key``, False to skip it, None when the listing is past the prefix."""
        if key.startswith(self.prefix):
            return True
        # Keys come sorted: one after the prefix ends it (the parent folder goes on).
        return None if key > self.prefix else False

    async def list_keys(self) -> AsyncIterator[str]:
        """The keys under the prefix, listed lazily, page by page, in listing order.

        Folder markers are left out: each zero-size key costs a HEAD request (at most
        ``in_flight`` at once), since only that tells a marker (not found) from an empty
        object; each HEAD runs under ``timeout`` and ``retry`` as a GET does. A failed
        listing or HEAD raises as :class:`S3PrefixStream` says.
        """
        store = self._client.store()
        next_page = self._pages(store)
        twins = _MarkerTwins()
        past_prefix = False
        while not past_prefix:
            try:
                page = await next_page()
            except StopAsyncIteration:
                return
            metas = []
            for meta in page:
                verdict = self._accept(meta["path"])
                if verdict is None:
                    past_prefix = True
                    break
                if verdict and not twins.repeated(meta["path"], meta["size"]):
                    metas.append(meta)
            markers = await self._folder_markers(
                store, [meta["path"] for meta in metas if meta["size"] == 0]
            )
            for meta in metas:
                if meta["path"] not in markers:
                    yield meta["path"]

    async def _folder_markers(self, store: S3Store, empty: list[str]) -> set[str]:
        """Those of the listed zero-size keys ``empty`` that a HEAD does not find."""
        if not empty:
            return set()
        limiter = anyio.CapacityLimiter(self.in_flight)

        async def exists(key: str) -> bool:
            # Under the stream's timeout and retry, as its GETs and listing requests are.
            head = functools.partial(self._client.exists, key, store, self.timeout)
            async with limiter:
                return await (head() if self.retry is None else self.retry.run(head))

        found = await gather(exists, empty)
        return {key for key, there in zip(empty, found, strict=True) if not there}

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._objects(0, 1)

    def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[Any]:
        """This share's objects: the listing is read whole by every share (it is cheap),
        but each share fetches only its own keys (every ``shares``-th from ``slot``)."""
        stream = self._objects(spec.slot, spec.shares)
        if spec.shuffle:
            stream = shuffle_buffer(stream, spec.buffer_size, spec.rng(spec.slot))
        return stream

    async def _objects(self, slot: int, shares: int) -> AsyncIterator[bytes]:
        client = self._client
        store = client.store()
        listed = 0  # keys under the prefix listed so far
        next_page = self._pages(store)
        twins = _MarkerTwins()
        keys: deque[tuple[str, int]] = deque()  # (key, listed size) to fetch
        page: asyncio.Future[Any] | None = None
        listed_all = False
        # (key, listed size, its fetch, when it started), in listing order. Tasks owned by
        # this window and cancelled when the stream ends: a generator cannot hold a task
        # group open across its yields, and obstore runs on asyncio only anyway.
        window: deque[tuple[str, int, asyncio.Task[bytes]]] = deque()
        try:
            while True:
                if page is None and not listed_all and len(keys) < self.in_flight:
                    page = next_page()  # the next chunk of the listing, fetched ahead
                if page is not None and (page.done() or not (keys or window)):
                    try:
                        chunk = await page
                    except StopAsyncIteration:
                        listed_all = True
                        chunk = ()
                    page = None
                    for meta in chunk:
                        verdict = self._accept(meta["path"])
                        if verdict is None:
                            listed_all = True
                            break
                        if verdict and not twins.repeated(meta["path"], meta["size"]):
                            if listed % shares == slot:
                                keys.append((meta["path"], meta["size"]))
                            listed += 1
                    continue
                while keys and len(window) < self.in_flight:
                    key, size = keys.popleft()
                    # Each GET times itself, from when it holds a connection: one started
                    # ahead that stalls frees its connection for the others in time.
                    fetch = asyncio.ensure_future(client.get(key, store, self.timeout))
                    window.append((key, size, fetch))
                if not window:
                    if listed_all and page is None:
                        return
                    continue
                key, size, fetch = window.popleft()
                try:
                    data = await self._finish(store, key, fetch)
                except FileNotFoundError:
                    # Listed with size 0 but not there: a folder marker ("key/", which
                    # obstore lists as "key"), and its GET costs no more than an empty
                    # object's would.
                    if size == 0:
                        continue
                    raise
                yield data
        finally:
            pending: list[asyncio.Future[Any]] = [fetch for _, _, fetch in window]
            if page is not None:
                pending.append(page)
            for future in pending:
                future.cancel()
            if pending:
                with anyio.CancelScope(shield=True):
                    # Wait for the cancellations: no fetch outlives the stream.
                    await asyncio.gather(*pending, return_exceptions=True)

    async def _finish(self, store: S3Store, key: str, fetch: asyncio.Task[bytes]) -> bytes:
        """The result of ``fetch`` (which times itself), under the retry; retries fetch
        ``key`` again."""
        first: list[asyncio.Task[bytes]] = [fetch]

        async def attempt() -> bytes:
            if first:
                return await first.pop()
            return await self._client.get(key, store, self.timeout)

        if self.retry is None:
            return await attempt()
        return await self.retry.run(attempt)

    async def aclose(self) -> None:
        """Drop the running event loop's store and its connections (no-op outside asyncio)."""
        if sniffio.current_async_library() == "asyncio":
            self._client._stores.pop()

    def __repr__(self) -> str:
        return f"<S3PrefixStream of s3://{self.bucket}/{self.prefix}*>"
