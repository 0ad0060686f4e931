"""The exceptions asyncload raises to its users."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

__all__ = [
    "AsyncloadError",
    "CircuitOpenError",
    "ErrorBudgetExceeded",
    "HTTPStatusError",
    "ObjectTooLargeError",
    "SampleError",
    "SampleFiltered",
    "TruncatedBodyError",
    "ValidationError",
]


class AsyncloadError(Exception):
    """Base class of every error that asyncload itself raises."""


class SampleError(AsyncloadError):
    """One sample could not be produced.

    ``index`` is the dataset index, ``key`` the storage key where the dataset has keys
    (else ``None``); the original exception is chained as ``__cause__``. Raised in a
    ``torch.utils.data.DataLoader`` worker, it reaches the main process as a
    ``SampleError`` whose message carries the worker's traceback (torch rebuilds
    exceptions from their message alone, so ``index`` and ``key`` are ``None`` there).
    """

    def __init__(
        self, message: str, *, index: int | None = None, key: Hashable | None = None
    ) -> None:
        super().__init__(message)
        self.index = index
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class ValidationError(AsyncloadError):
    """A sample failed the loader's ``validate`` check."""


class ErrorBudgetExceeded(AsyncloadError):
    """More samples failed in one epoch than ``max_errors`` allows."""

    def __init__(
        self, message: str, *, errors: int = 0, causes: list[BaseException] | None = None
    ) -> None:
        super().__init__(message)
        self.errors = errors
        self.causes = causes if causes is not None else []

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class CircuitOpenError(AsyncloadError):
    """A circuit breaker is open: the call was refused without being made."""


class HTTPStatusError(AsyncloadError):
    """An HTTP request was answered with a non-2xx status (``status``); ``code`` is the
    store's error code where it gave one (S3's ``<Code>``: ``SlowDown``, ``RequestTimeout``)."""

    def __init__(
        self,
        status: int,
        url: str,
        retry_after: float | None = None,
        detail: str = "",
        code: str | None = None,
    ) -> None:
        what = f"HTTP {status} ({code})" if code else f"HTTP {status}"
        super().__init__(f"{what} for {url}" + (f": {detail}" if detail else ""))
        self.status = status
        self.url = url
        # Seconds the server asked us to wait (Retry-After), when it said so.
        self.retry_after = retry_after
        self.detail = detail
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, self.url, self.retry_after, self.detail, self.code))


class TruncatedBodyError(AsyncloadError):
    """A response body ended before its announced length: never served as a short sample."""


class ObjectTooLargeError(AsyncloadError, ValueError):
    """An object is larger than the source's size limit (``max_bytes``): refused before or
    while reading it, so one broken or hostile server cannot exhaust memory. A
    ``ValueError`` too: retrying does not make it smaller."""


class SampleFiltered(LookupError):
    """The sample at this index was dropped by a ``filter`` predicate.

    A ``LookupError`` so that ``await ds.filter(pred)[i]`` on a dropped index fails the way a
    missing key does; the Loader counts it as ``filtered``, never as an error.
    """

    def __init__(self, index: int) -> None:
        super().__init__(f"sample {index} was dropped by the dataset's filter")
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.index,))


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    # Exceptions pickle as ``cls(*args)``; ours keep keyword-only fields in ``__dict__``,
    # so they travel to other processes (multiprocessing, DataLoader workers) whole.
    error = cls(*args)
    error.__dict__.update(state)
    return error
