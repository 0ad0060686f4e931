"""HTTP(S) GETs as an :class:`~asyncload.AsyncDataset` of bytes, through a lean HTTP/1.1
client (:mod:`asyncload.sources._http1`)."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Hashable, Iterable, Mapping
from typing import Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

import anyio
import sniffio

from .._callables import PerLoop
from .._redact import redact_url
from ..datasets import AsyncDataset, normalize_index
from ..errors import HTTPStatusError, ObjectTooLargeError, TruncatedBodyError
from ._http1 import Pool, RequestError, Response

__all__ = ["HTTPSource"]


_REDIRECTS = ("same-origin", "any", "none")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in a header value (tab is fine)
_REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
_DEFAULT_PORTS = {"http": 80, "https": 443}
_log = logging.getLogger("asyncload")
_warned_unverified = False


def _warn_unverified_once() -> None:
    global _warned_unverified
    if not _warned_unverified:
        _warned_unverified = True
        _log.warning("HTTPSource(verify_tls=False): TLS certificates are NOT verified")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port  # (0 is a port of its own, not the default)
    return scheme, parts.hostname, _DEFAULT_PORTS.get(scheme) if port is None else port


class _Clock:
    """A request's ``timeout``, counted only while it holds a connection slot (over its
    redirect hops): with max_connections below the loader's concurrency, a request queued
    behind busy connections is not late."""

    __slots__ = ("left", "scope", "started")

    def __init__(self, scope: anyio.CancelScope, seconds: float) -> None:
        self.scope, self.left = scope, seconds
        self.started: float | None = None

    def start(self) -> None:
        self.started = anyio.current_time()
        self.scope.deadline = self.started + self.left

    def pause(self) -> None:
        if self.started is not None:
            self.left -= anyio.current_time() - self.started
            self.started = None
            self.scope.deadline = math.inf


def _is_http(url: str) -> bool:
    """An http(s) URL whatever the case of its scheme (RFC 3986 3.1: "HTTP://" too)."""
    return url[:8].lower().startswith(("http://", "https://"))


def _same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


# What the client raises without the URL (it does not know it): a malformed or cut-short
# answer, a body too large, a timeout, a refused or closed connection (OSErrors all).
_UNNAMED_ERRORS = (TruncatedBodyError, ObjectTooLargeError, RequestError, OSError)


def _at(url: str, exc: Exception) -> Exception:
    """``exc`` again, its message led by the (redacted) URL; its type (but the client's
    private RequestError becomes a ValueError), errno and attributes kept."""
    where = redact_url(url)
    kind = ValueError if type(exc) is RequestError else type(exc)
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror is not None:
        named = kind(exc.errno, f"{where}: {exc.strerror}")  # is_transient reads errno
    else:
        named = kind(f"{where}: {str(exc) or type(exc).__name__}")
    named.__dict__.update(exc.__dict__)  # (ssl's reason and verify_message, notes)
    return named


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # (the asctime form: HTTP dates are always GMT)
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


class HTTPSource(AsyncDataset[bytes]):
    """The body of an HTTP(S) GET of each URL in ``urls``.

    - a non-2xx answer raises :class:`~asyncload.HTTPStatusError` (``.status``, and
      ``.retry_after`` when the server sent Retry-After);
    - a body shorter than its Content-Length raises :class:`~asyncload.TruncatedBodyError`,
      never a short sample;
    - a body larger than ``max_bytes`` (default 1 GiB) raises
      :class:`~asyncload.ObjectTooLargeError`: refused from its Content-Length before
      reading, or as soon as a body without one grows past the limit;
    - ``timeout`` (seconds) bounds each whole request, redirects included, from when it
      has a connection (waiting for one of ``max_connections`` does not count); ``headers`` are sent with each (but
      never to another origin after a redirect); ``max_connections`` caps open connections
      per event loop;
    - TLS certificates are verified; ``verify_tls=False`` turns that off, explicitly, and
      says so once in the ``asyncload`` log;
    - ``redirects``: ``"same-origin"`` (default) follows redirects to the same scheme, host
      and port only; ``"any"`` follows any http(s) redirect except https to http;
      ``"none"`` follows none. A refused redirect raises ``HTTPStatusError`` with the 3xx
      status, naming the keyword. At most ``max_redirects`` are followed.

    Runs on asyncio (and uvloop) only. It keeps one pool of keep-alive connections per
    event loop; ``await source.aclose()`` (or the Loader's ``aclose``/``close``) closes the
    running loop's connections. It asks for uncompressed bodies (and decodes gzip or
    deflate when a server compresses anyway); it sends no cookies and uses no proxy.
    Every error names its URL, but no message includes query strings or credentials.
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 256,
        max_bytes: int = 1 << 30,
        verify_tls: bool = True,
        redirects: Literal["same-origin", "any", "none"] = "same-origin",
        max_redirects: int = 10,
    ) -> None:
        if isinstance(urls, str):
            raise TypeError("HTTPSource: urls must be a list of URLs, not a single string")
        self.urls = list(urls)
        for url in self.urls:
            # A prefix check, not a parse: it runs once per URL, for millions of URLs.
            if not isinstance(url, str) or not (
                url.startswith(("http://", "https://")) or _is_http(url)
            ):
                raise ValueError(f"HTTPSource: not an http(s) URL: {redact_url(str(url))!r}")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < math.inf  # (NaN too)
        ):
            raise ValueError(
                f"HTTPSource: timeout must be a finite number of seconds > 0, got {timeout!r}"
            )
        for name, value, minimum in (
            ("max_connections", max_connections, 1),
            ("max_bytes", max_bytes, 1),
            ("max_redirects", max_redirects, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"HTTPSource: {name} must be an int >= {minimum}, got {value!r}")
        if redirects not in _REDIRECTS:
            raise ValueError(
                f"HTTPSource: redirects must be one of {_REDIRECTS}, got {redirects!r}"
            )
        if not isinstance(verify_tls, bool):
            raise TypeError(f"HTTPSource: verify_tls must be True or False, got {verify_tls!r}")
        if not verify_tls:
            _warn_unverified_once()
        self.timeout = timeout
        self.headers = dict(headers or {})
        for field, text in self.headers.items():
            if not isinstance(field, str) or not isinstance(text, str):
                raise TypeError(f"HTTPSource: headers must map str to str, got {field!r}")
            if not _TOKEN.fullmatch(field) or _CONTROL.search(text):
                raise ValueError(
                    f"HTTPSource: bad header {field!r}: a name is a token (no spaces, ':' "
                    "or controls), a value has no control characters (CR, LF, NUL...)"
                )
            if not _latin1(field + text):
                raise ValueError(f"HTTPSource: header {field!r} has characters outside Latin-1")
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.verify_tls = verify_tls
        self.redirects = redirects
        self.max_redirects = max_redirects
        self._pools: PerLoop[Pool] = PerLoop(self._new_pool)

    def _new_pool(self) -> Pool:
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError(
                "HTTPSource runs on asyncio only: run this loader on asyncio (or uvloop), "
                "e.g. anyio.run(main, backend='asyncio')"
            )
        return Pool(self.max_connections, self.verify_tls, self.headers)

    def __len__(self) -> int:
        return len(self.urls)

    async def __getitem__(self, index: int) -> bytes:
        url = self.urls[normalize_index(index, len(self.urls))]
        timeout = self.timeout
        if timeout is None:
            return await self._get(url)
        with anyio.CancelScope() as scope:
            return await self._get(url, _Clock(scope, timeout))
        raise TimeoutError(f"HTTPSource: no whole answer within {timeout} s ({redact_url(url)})")

    async def _get(self, url: str, clock: _Clock | None = None) -> bytes:
        response = await self._open(url, clock=clock)
        try:
            return await response.read(self.max_bytes)
        except _UNNAMED_ERRORS as exc:
            raise _at(response.url, exc) from exc.__cause__
        finally:
            response.release()

    async def iter_chunks(self, url: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The body of a GET of ``url`` as it arrives, in chunks of at most ``chunk_size``
        bytes: for streams (tar shards) too large to hold whole. The same checks as a
        sample, but for ``max_bytes``; ``timeout`` bounds the connection and each wait for
        data rather than the whole body."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            # (0 would yield b"" for ever)
            raise ValueError(f"iter_chunks: chunk_size must be an int >= 1, got {chunk_size!r}")
        response = await self._open(url, read_timeout=self.timeout)
        try:
            async for chunk in response.chunks(chunk_size):
                yield chunk
        except _UNNAMED_ERRORS as exc:
            raise _at(response.url, exc) from exc.__cause__
        finally:
            response.release()

    async def _open(
        self,
        url: str,
        read_timeout: float | None = None,
        clock: _Clock | None = None,
    ) -> Response:
        """A 2xx response to a GET of ``url``, after the redirects the policy allows; its
        body not yet read: the caller reads it and must ``release()`` it on every path.
        ``clock`` runs while a request holds its connection slot."""
        first = url
        pool = self._pools.get()
        with_headers = True
        on_slot = None if clock is None else clock.start
        try:
            for _ in range(self.max_redirects + 1):
                response = await pool.get(
                    url, with_headers=with_headers, timeout=read_timeout, on_slot=on_slot
                )
                if 200 <= response.status < 300:
                    return response
                try:  # released: it is a redirect or an error
                    location = response.headers.get("location")
                    if response.status in _REDIRECT_STATUSES and location is not None:
                        url = self._redirect_target(url, response.status, location)
                        if not _same_origin(first, url):
                            with_headers = False  # credentials stay with their origin
                        continue
                    raise HTTPStatusError(
                        response.status,
                        redact_url(url),
                        retry_after=_retry_after(response.headers.get("retry-after")),
                    )
                finally:
                    response.release()
                    if clock is not None:  # (the next hop waits for a slot off the clock)
                        clock.pause()
            raise HTTPStatusError(
                response.status,
                redact_url(first),
                detail=f"more than {self.max_redirects} redirects",
            )
        except RequestError as exc:
            raise ValueError(f"HTTPSource: {exc} ({redact_url(url)})") from None
        except OSError as exc:  # no answer (a connection refused or closed, a timeout...)
            raise _at(url, exc) from exc.__cause__

    def _redirect_target(self, url: str, status: int, location: str) -> str:
        if not location.isascii():
            # The head is read as Latin-1; servers send a raw non-ASCII Location as UTF-8
            # (as requests and browsers read it), to be percent-encoded once.
            with contextlib.suppress(UnicodeError):
                location = location.encode("latin-1").decode("utf-8")
        try:
            target = urljoin(url, location)
            _origin(target)  # (a port out of range or a broken IPv6 host raises here)
        except ValueError as exc:
            raise HTTPStatusError(
                status, redact_url(url), detail=f"malformed Location header ({exc})"
            ) from None
        scheme = target.split("://", 1)[0].lower()
        refused = ""
        if self.redirects == "none":
            refused = "redirects are not followed (redirects='none')"
        elif scheme not in ("http", "https"):
            refused = f"redirect to a {scheme!r} URL refused"
        elif url[:8].lower() == "https://" and scheme == "http":
            refused = "redirect from https to http refused"
        elif self.redirects == "same-origin" and not _same_origin(url, target):
            refused = (
                f"redirect to another origin ({redact_url(target)}) refused; "
                "allow it with HTTPSource(..., redirects='any')"
            )
        if refused:
            raise HTTPStatusError(status, redact_url(url), detail=refused)
        return target

    def key_of(self, index: int) -> Hashable:
        return self.urls[normalize_index(index, len(self.urls))]

    def _cache_key(self, index: int) -> Hashable:
        """The URL without its ``user:password@``: a DiskCache writes keys into its files,
        and the same URL read with other credentials is the same object. (The query string
        stays, since it may name the object: a signed URL's signature is written too.)"""
        url = self.urls[normalize_index(index, len(self.urls))]
        if "@" not in url:
            return url
        parts = urlsplit(url)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

    async def aclose(self) -> None:
        """Close the running event loop's connections (a no-op when it has none)."""
        if sniffio.current_async_library() != "asyncio":
            return
        pool = self._pools.pop()
        if pool is not None:
            await pool.aclose()

    def __repr__(self) -> str:
        return f"<HTTPSource of {len(self.urls)} URLs>"
