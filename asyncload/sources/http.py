"""HTTP(S) GETs as an :class:`~asyncload.AsyncDataset` of bytes, through aiohttp."""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Hashable, Iterable, Mapping
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import sniffio
import yarl

from .._callables import PerLoop
from .._redact import redact_url
from ..datasets import AsyncDataset, normalize_index
from ..errors import HTTPStatusError, ObjectTooLargeError, TruncatedBodyError

__all__ = ["HTTPSource"]


_REDIRECTS = ("same-origin", "any", "none")
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
    return scheme, parts.hostname, parts.port or _DEFAULT_PORTS.get(scheme)


def _same_origin(a: str, b: str) -> bool:
    return _origin(a) == _origin(b)


def _encoded(response: aiohttp.ClientResponse) -> bool:
    # A compressed body's Content-Length counts compressed bytes, not what we read.
    return "Content-Encoding" in response.headers


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
    - ``timeout`` (seconds) bounds each whole request; ``headers`` are sent with each (but
      never to another origin after a redirect); ``max_connections`` caps open connections
      per event loop;
    - TLS certificates are verified; ``verify_tls=False`` turns that off, explicitly, and
      says so once in the ``asyncload`` log;
    - ``redirects``: ``"same-origin"`` (default) follows redirects to the same scheme, host
      and port only; ``"any"`` follows any http(s) redirect except https to http;
      ``"none"`` follows none. A refused redirect raises ``HTTPStatusError`` with the 3xx
      status, naming the keyword. At most ``max_redirects`` are followed.

    Runs on asyncio (and uvloop) only, as aiohttp does. It keeps one pooled session per
    event loop; ``await source.aclose()`` (or the Loader's ``aclose``/``close``) closes the
    running loop's session. Error messages never include query strings or credentials.
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
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"HTTPSource: not an http(s) URL: {redact_url(str(url))!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"HTTPSource: timeout must be > 0 seconds, got {timeout}")
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
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.verify_tls = verify_tls
        self.redirects = redirects
        self.max_redirects = max_redirects
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop(self._new_session)

    def _new_session(self) -> aiohttp.ClientSession:
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError(
                "HTTPSource uses aiohttp, which runs on asyncio only: run this loader on "
                "asyncio (or uvloop), e.g. anyio.run(main, backend='asyncio')"
            )
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections, ssl=self.verify_tls),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
        )

    def __len__(self) -> int:
        return len(self.urls)

    async def __getitem__(self, index: int) -> bytes:
        url, response = await self._open(self.urls[normalize_index(index, len(self.urls))])
        async with response:
            try:
                return await self._read(url, response)
            except aiohttp.ClientPayloadError as exc:
                raise TruncatedBodyError(f"{redact_url(url)}: body cut short") from exc

    async def iter_chunks(self, url: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The body of a GET of ``url`` as it arrives, in chunks of at most ``chunk_size``
        bytes: for streams (tar shards) too large to hold whole. The same checks as a
        sample, but for ``max_bytes``; ``timeout`` bounds the connection and each read
        rather than the whole body."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=self.timeout
        )
        url, response = await self._open(url, timeout=timeout)
        async with response:
            expected = response.content_length
            received = 0
            try:
                async for chunk in response.content.iter_chunked(chunk_size):
                    received += len(chunk)
                    yield chunk
            except aiohttp.ClientPayloadError as exc:
                raise TruncatedBodyError(f"{redact_url(url)}: body cut short") from exc
            if expected is not None and received != expected and not _encoded(response):
                raise TruncatedBodyError(
                    f"{redact_url(url)}: body has {received} of {expected} bytes"
                )

    async def _open(
        self, url: str, timeout: aiohttp.ClientTimeout | None = None
    ) -> tuple[str, aiohttp.ClientResponse]:
        """A 2xx response to a GET of ``url``, after the redirects the policy allows, with
        the URL it came from; its body not yet read: the caller reads it in ``async with
        response``, which releases the connection. A plain coroutine rather than a
        context manager: this is every sample's path, and each layer of coroutines costs
        CPU at every resumption."""
        first = url
        session = self._sessions.get()
        headers: Mapping[str, str] | None = self.headers or None
        extra = {} if timeout is None else {"timeout": timeout}
        try:
            for _ in range(self.max_redirects + 1):
                response = await session.get(url, headers=headers, allow_redirects=False, **extra)
                if 200 <= response.status < 300:
                    return url, response
                async with response:  # released: it is a redirect or an error
                    if response.status in _REDIRECT_STATUSES and "Location" in response.headers:
                        url = self._redirect_target(url, response)
                        if not _same_origin(first, url):
                            headers = None  # credentials stay with the origin they were for
                        continue
                    raise HTTPStatusError(
                        response.status,
                        redact_url(url),
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
            raise HTTPStatusError(
                response.status,
                redact_url(first),
                detail=f"more than {self.max_redirects} redirects",
            )
        except aiohttp.ClientPayloadError as exc:
            raise TruncatedBodyError(f"{redact_url(url)}: body cut short") from exc
        except aiohttp.InvalidURL:
            raise ValueError(f"HTTPSource: invalid URL {redact_url(url)}") from None

    def _redirect_target(self, url: str, response: aiohttp.ClientResponse) -> str:
        target = str(response.url.join(yarl.URL(response.headers["Location"])))
        scheme = target.split("://", 1)[0].lower()
        refused = ""
        if self.redirects == "none":
            refused = "redirects are not followed (redirects='none')"
        elif scheme not in ("http", "https"):
            refused = f"redirect to a {scheme!r} URL refused"
        elif url.startswith("https://") and scheme == "http":
            refused = "redirect from https to http refused"
        elif self.redirects == "same-origin" and not _same_origin(url, target):
            refused = (
                f"redirect to another origin ({redact_url(target)}) refused; "
                "allow it with HTTPSource(..., redirects='any')"
            )
        if refused:
            raise HTTPStatusError(response.status, redact_url(url), detail=refused)
        return target

    async def _read(self, url: str, response: aiohttp.ClientResponse) -> bytes:
        expected = response.content_length
        encoded = _encoded(response)
        if expected is not None and expected > self.max_bytes:
            raise ObjectTooLargeError(
                f"{redact_url(url)}: {expected} bytes, more than max_bytes={self.max_bytes}"
            )
        if expected is not None and not encoded:
            # HTTP framing bounds the body by its Content-Length: read it in one go.
            body = await response.read()
            if len(body) != expected:
                raise TruncatedBodyError(
                    f"{redact_url(url)}: body has {len(body)} of {expected} bytes"
                )
            return body
        # No length, or a compressed body: count as it arrives, so neither a chunked stream
        # nor a decompression bomb can grow past the limit.
        parts: list[bytes] = []
        size = 0
        async for part in response.content.iter_chunked(1 << 16):
            size += len(part)
            if size > self.max_bytes:
                raise ObjectTooLargeError(
                    f"{redact_url(url)}: body larger than max_bytes={self.max_bytes}"
                )
            parts.append(part)
        return b"".join(parts)

    def key_of(self, index: int) -> Hashable:
        return self.urls[normalize_index(index, len(self.urls))]

    async def aclose(self) -> None:
        """Close the running event loop's session (a no-op when it has none)."""
        if sniffio.current_async_library() != "asyncio":
            return
        session = self._sessions.pop()
        if session is not None:
            await session.close()

    def __repr__(self) -> str:
        return f"<HTTPSource of {len(self.urls)} URLs>"
