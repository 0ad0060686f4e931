"""Keep secrets out of messages: URLs lose their credentials and query strings."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_key", "redact_url"]


def redact_url(url: str) -> str:
    """``url`` without credentials or query string (signed URLs carry secrets there)."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        return "<unparsable URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, "..." if parts.query else "", ""))


def redact_key(key: object) -> object:
    """A sample key fit for a message or a log: URLs redacted, anything else as it is."""
    if isinstance(key, str) and "://" in key:
        return redact_url(key)
    return key
