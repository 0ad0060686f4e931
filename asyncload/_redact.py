"""Keep secrets out of messages: URLs lose their credentials and query strings."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_key", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` without credentials or query string (signed URLs carry secrets there); its
    host and port as written (an IPv6 address keeps its brackets), and its fragment (a tar
    member's name in a sample key)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = "..." if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_key(key: object) -> object:
    """A sample key fit for a message or a log: URLs redacted, in tuples too (a concat
    view's keys are ``(part, key)``), anything else as it is."""
    if isinstance(key, str) and "://" in key:
        return redact_url(key)
    if type(key) is tuple:
        return tuple(redact_key(item) for item in key)
    return key
