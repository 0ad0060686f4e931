"""HTTP(S) GETs as an :class:`~asyncload.AsyncDataset` of bytes, through aiohttp."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Hashable, Iterable, Mapping

import aiohttp
import sniffio

from .._callables import PerLoop
from .._redact import redact_url
from ..datasets import AsyncDataset, normalize_index
from ..errors import HTTPStatusError, TruncatedBodyError

__all__ = ["HTTPSource"]


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
    - ``timeout`` (seconds) bounds each whole request; ``headers`` are sent with each;
      ``max_connections`` caps open connections per event loop.

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
        if (
            isinstance(max_connections, bool)
            or not isinstance(max_connections, int)
            or max_connections < 1
        ):
            raise ValueError(
                f"HTTPSource: max_connections must be a positive int, got {max_connections!r}"
            )
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.max_connections = max_connections
        self._sessions: PerLoop[aiohttp.ClientSession] = PerLoop(self._new_session)

    def _new_session(self) -> aiohttp.ClientSession:
        if sniffio.current_async_library() != "asyncio":
            raise RuntimeError(
                "HTTPSource uses aiohttp, which runs on asyncio only: run this loader on "
                "asyncio (or uvloop), e.g. anyio.run(main, backend='asyncio')"
            )
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_connections),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers=self.headers,
        )

    def __len__(self) -> int:
        return len(self.urls)

    async def __getitem__(self, index: int) -> bytes:
        url = self.urls[normalize_index(index, len(self.urls))]
        session = self._sessions.get()
        try:
            async with session.get(url) as response:
                if not 200 <= response.status < 300:
                    raise HTTPStatusError(
                        response.status,
                        redact_url(url),
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                body = await response.read()
                expected = response.content_length
                if (
                    expected is not None
                    and len(body) != expected
                    and "Content-Encoding" not in response.headers
                ):
                    raise TruncatedBodyError(
                        f"{redact_url(url)}: body has {len(body)} of {expected} bytes"
                    )
                return body
        except aiohttp.ClientPayloadError as exc:
            raise TruncatedBodyError(f"{redact_url(url)}: body cut short") from exc
        except aiohttp.InvalidURL:
            raise ValueError(f"HTTPSource: invalid URL {redact_url(url)}") from None

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
