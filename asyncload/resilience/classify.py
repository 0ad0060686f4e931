"""Which failures are worth another try: the default policy of `Retry` and `CircuitBreaker`.

Classification is conservative: an error is transient only when it says the storage or the
network failed for now (connection trouble, timeouts, throttling, 5xx, a cut-off body).
Anything unknown, and every "your request is wrong" error, is permanent.
"""

from __future__ import annotations

import builtins
import errno
import math
import re
import socket
import sys
from collections.abc import Callable
from typing import TypeAlias

from asyncload.errors import CircuitOpenError, HTTPStatusError, TruncatedBodyError

__all__ = ["ExceptionFilter", "as_predicate", "is_transient", "retry_after"]
# Also used by asyncload.sources.s3, not part of the public API: obstore_error_facts.

ExceptionFilter: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
"""What `Retry(retry_on=...)` and `CircuitBreaker(counts=...)` accept."""

# Errors that say "the request is wrong", never "try again".
_PERMANENT: tuple[type[BaseException], ...] = (
    CircuitOpenError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    LookupError,  # IndexError, KeyError, SampleFiltered
    ValueError,  # also ssl certificate failures, which subclass it
    TypeError,
)

# errno values of OSErrors that come from the network rather than the local file system.
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "ENOTCONN",
        "ESHUTDOWN",
    )
    if hasattr(errno, name)
)

# Error codes that S3 and compatible stores use for "slow down / try again".
# Whole codes (AWS adds "Exception" to some: ThrottlingException), not the start of another
# word: "InternalErrorsInUserCode" or "SlowDownsampler" are no store's answer.
_S3_TRANSIENT = re.compile(
    r"(?<![A-Za-z])(SlowDown|InternalError|ServiceUnavailable|RequestTimeout|Throttling"
    r"|TooManyRequests|RequestLimitExceeded)(?:Exception)?(?![A-Za-z])"
)


# obstore (object_store) errors carry no attributes: their status and kind of HTTP failure
# are only in the message, which embeds the Rust error's Debug form.
_OBSTORE_STATUS = re.compile(r"non-2xx status code: (\d{3})|\bstatus: (\d{3}),")
_OBSTORE_HTTP_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
# object_store's HttpErrorKind values that mean "the network failed", as opposed to
# Decode (a malformed answer) and Unknown.
_OBSTORE_TRANSIENT_KINDS = frozenset({"Connect", "Request", "Timeout", "Interrupted"})


def obstore_error_facts(exc: BaseException) -> tuple[int | None, str | None]:
    """``(HTTP status, HTTP error kind)`` read from an obstore exception's message, each
    ``None`` when the message does not say. Kinds are object_store's ``HttpErrorKind``
    names: ``Connect``, ``Request``, ``Timeout``, ``Interrupted`` (a connection or body cut
    short), ``Decode``, ``Unknown``."""
    text = str(exc)
    status_match = _OBSTORE_STATUS.search(text)
    status = int(status_match.group(1) or status_match.group(2)) if status_match else None
    kind_match = _OBSTORE_HTTP_KIND.search(text)
    return status, kind_match.group(1) if kind_match else None


def _obstore_verdict(exc: BaseException) -> bool | None:
    """Transient or not for an obstore exception; ``None`` when it is not one or says nothing."""
    exceptions = sys.modules.get("obstore.exceptions")
    base = getattr(exceptions, "BaseError", None)
    if base is None or not isinstance(exc, base):
        return None
    status, kind = obstore_error_facts(exc)
    if status is not None:
        # A 4xx whose S3 code says "try again" (400 RequestTimeout) is transient too.
        return _is_retryable_status(status) or _S3_TRANSIENT.search(str(exc)) is not None
    if kind is not None:
        return kind in _OBSTORE_TRANSIENT_KINDS
    return None


def _is_retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def _third_party_transient(exc: BaseException) -> bool:
    # Looked up in sys.modules, never imported: an exception of a library that was never
    # imported cannot exist, and importing aiohttp or botocore here would cost a second.
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        if isinstance(
            exc,
            (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError),
        ):
            return True
        if isinstance(exc, aiohttp.ClientResponseError):
            return _is_retryable_status(exc.status)
    urllib_error = sys.modules.get("urllib.error")
    if urllib_error is not None and isinstance(exc, urllib_error.URLError):
        # A failed connection ("connection refused") comes wrapped: judge what it wraps.
        reason = exc.reason
        if isinstance(reason, BaseException) and not isinstance(exc, urllib_error.HTTPError):
            return is_transient(reason)
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        transport = tuple(
            getattr(botocore, name)
            for name in ("ConnectionError", "HTTPClientError", "ResponseStreamingError")
            if hasattr(botocore, name)
        )
        if transport and isinstance(exc, transport):
            return True
        client_error = getattr(botocore, "ClientError", None)
        if client_error is not None and isinstance(exc, client_error):
            # A 5xx with an empty body (any HEAD) or a proxy's page has no S3 code to go
            # by ("503"): its HTTP status says it all.
            metadata = exc.response.get("ResponseMetadata") or {}
            status = metadata.get("HTTPStatusCode")
            if type(status) is int and _is_retryable_status(status):
                return True
    trio = sys.modules.get("trio")
    return trio is not None and isinstance(exc, trio.TooSlowError)


def _s3_code(exc: BaseException) -> str:
    # botocore's ClientError carries the service's error code in ``response["Error"]["Code"]``.
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error")
        if isinstance(error, dict):
            return str(error.get("Code", ""))
    return ""


# An S3 error body quoted in a message, and what in a message is a path or a URL: a file
# named "Throttling.png" that fails to decode is no store's answer.
_XML_CODE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_PATH_LIKE = re.compile(r"[^\s'\"]*[/\\][^\s'\"]*")


def _code_text(exc: BaseException) -> str:
    """Where an error's S3-style code may be: its class name, its code, and its message
    with paths and URLs left out (an S3 error body's ``<Code>`` kept)."""
    message = str(exc)
    quoted = " ".join(_XML_CODE.findall(message))
    return f"{type(exc).__name__} {_s3_code(exc)} {quoted} {_PATH_LIKE.sub(' ', message)}"


def _is_exception_group(exc: BaseException) -> bool:
    group_type = getattr(builtins, "BaseExceptionGroup", None)
    if group_type is None:  # Python 3.10: the backport, if anything imported it
        group_type = getattr(sys.modules.get("exceptiongroup"), "BaseExceptionGroup", None)
    return group_type is not None and isinstance(exc, group_type)


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` is a failure that may go away if the same request is made again.

    Transient: ``ConnectionError``, ``TimeoutError`` (what ``anyio.fail_after`` raises),
    network ``OSError``s (by errno), `HTTPStatusError` with status 408, 429 or >= 500,
    `TruncatedBodyError`, aiohttp connection/payload/timeout errors (and its
    ``ClientResponseError`` with a retryable status), urllib's ``URLError`` when the error
    it wraps is transient, any other exception with a retryable HTTP ``status`` attribute
    (urllib's ``HTTPError``), botocore transport errors and ``ClientError``s with a
    retryable HTTP status, obstore errors whose message gives a retryable status or a
    connection, request, timeout or interrupted-transfer failure, and S3-style errors
    whose class name, error code (`HTTPStatusError.code` too) or message says
    ``SlowDown``, ``InternalError``, ``ServiceUnavailable``, ``RequestTimeout``,
    ``Throttling``, ``TooManyRequests`` or ``RequestLimitExceeded``. An exception group is
    transient when every exception in it is.

    Permanent: cancellation and every other ``BaseException`` that is not an ``Exception``,
    ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``,
    ``NotADirectoryError``, ``LookupError`` (``IndexError``, ``KeyError``), ``ValueError``,
    ``TypeError``, `CircuitOpenError` (retrying into an open breaker only spins), other 4xx
    statuses, and anything not listed above.
    """
    if _is_exception_group(exc):
        inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
        return bool(inner) and all(is_transient(e) for e in inner)
    if not isinstance(exc, Exception) or isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, HTTPStatusError):
        # A 4xx whose S3 code says "try again" (400 RequestTimeout) is transient too.
        code = exc.code
        return _is_retryable_status(exc.status) or (
            code is not None and _S3_TRANSIENT.fullmatch(code) is not None
        )
    if isinstance(exc, (TruncatedBodyError, ConnectionError, TimeoutError)):
        return True
    if _third_party_transient(exc):
        return True
    verdict = _obstore_verdict(exc)
    if verdict is not None:
        return verdict
    status = getattr(exc, "status", None)
    if type(status) is int and 100 <= status <= 599:
        # An HTTP answer by another client (urllib's HTTPError, ...): by its status.
        return _is_retryable_status(status)
    if isinstance(exc, socket.gaierror):
        # DNS: only "temporary failure in name resolution" is worth another try.
        return exc.errno == socket.EAI_AGAIN
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    if sys.version_info < (3, 11):
        asyncio = sys.modules.get("asyncio")
        # Before 3.11, asyncio.TimeoutError is not the builtin TimeoutError.
        if asyncio is not None and isinstance(exc, asyncio.TimeoutError):
            return True
    return _S3_TRANSIENT.search(_code_text(exc)) is not None


def retry_after(exc: BaseException) -> float | None:
    """The delay in seconds the server asked for before the next try, or ``None``.

    Read from `HTTPStatusError.retry_after` (an HTTP ``Retry-After`` header), or from a
    numeric ``retry_after`` attribute on any other exception. Negative, NaN or infinite
    values are ignored.
    """
    value = getattr(exc, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


class _InstanceOf:
    """``isinstance(exc, types)`` as a predicate that pickles (a lambda would not: a Retry
    or a breaker goes to spawned DataLoader workers with its loader)."""

    __slots__ = ("types",)

    def __init__(self, types: type[BaseException] | tuple[type[BaseException], ...]) -> None:
        self.types = types

    def __call__(self, exc: BaseException) -> bool:
        return isinstance(exc, self.types)

    def __repr__(self) -> str:
        return f"isinstance(exc, {self.types!r})"


def as_predicate(spec: ExceptionFilter, *, name: str) -> Callable[[BaseException], bool]:
    """Turn an exception type, a tuple of them, or a predicate into a predicate.

    Raises ``TypeError`` naming the argument ``name`` for anything else.
    """
    if isinstance(spec, type):
        if not issubclass(spec, BaseException):
            raise TypeError(f"{name} must be an exception type, a tuple of them or a predicate")
        return _InstanceOf(spec)
    if isinstance(spec, tuple):
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in spec):
            raise TypeError(f"{name}: every item of the tuple must be an exception type")
        return _InstanceOf(spec)
    if callable(spec):
        return spec
    raise TypeError(
        f"{name} must be an exception type, a tuple of them or a predicate, not {type(spec).__name__}"
    )
