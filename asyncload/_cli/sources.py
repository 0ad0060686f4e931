"""What a ``bench`` SOURCE names, resolved once in the parent into a :class:`SourceSpec`:
the exact list of samples every configuration then reads, in the same order.

- an ``s3://bucket/prefix``: the first ``limit`` keys under the prefix, in listing order;
- a directory: the first ``limit`` files under it (recursively, sorted by relative path);
- a file: a URL list, one ``http(s)://`` URL per line (blank lines and ``#`` comments are
  skipped), the first ``limit`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

from .._redact import redact_url

Kind = Literal["http", "files", "s3"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class ArgumentError(Exception):
    """A bad command-line argument: ``argument`` is its name as the user typed it."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"argument {argument}: {message}")
        self.argument = argument


class NoSamplesError(Exception):
    """The source was named correctly but no sample could be read from it."""


@dataclass(frozen=True)
class S3Options:
    """How to reach the store; credentials come from the environment (``AWS_*``), never
    from the command line, so that they stay out of ``ps`` and shell history."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False

    def store_config(self) -> dict[str, Any]:
        """obstore ``S3Store`` ``config``, as :class:`~asyncload.sources.S3Source` builds it."""
        config: dict[str, Any] = {}
        if self.endpoint_url is not None:
            config["endpoint"] = self.endpoint_url
        if self.region is not None:
            config["region"] = self.region
        if self.anonymous:
            config["skip_signature"] = True
        return config

    def client_options(self) -> dict[str, Any]:
        # An explicit http:// endpoint means plain HTTP is wanted (a local store).
        plain = self.endpoint_url is not None and self.endpoint_url.startswith("http://")
        return {"allow_http": True} if plain else {}


@dataclass(frozen=True)
class SourceSpec:
    """The samples of one run: ``keys`` are URLs (``http``), paths relative to ``root``
    (``files``) or object keys in ``bucket`` (``s3``). JSON-able, for the child processes."""

    kind: Kind
    location: str  # what the user named, for messages (query strings and credentials redacted)
    keys: list[str]
    root: str | None = None
    bucket: str | None = None
    s3: S3Options = field(default_factory=S3Options)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceSpec:
        return cls(**{**data, "s3": S3Options(**data["s3"])})


def resolve(source: str | None, *, urls_file: str | None, limit: int, s3: S3Options) -> SourceSpec:
    """The first ``limit`` samples of ``source`` (or of the URL list ``urls_file``).

    Raises :class:`ArgumentError` for a missing, nonexistent or malformed source and
    :class:`NoSamplesError` when it holds no samples (an empty directory, list or prefix).
    """
    if source is not None and urls_file is not None:
        raise ArgumentError("--urls", "give SOURCE or --urls, not both")
    if urls_file is not None:
        if not _readable_file(urls_file):
            raise ArgumentError("--urls", f"no such file: {urls_file!r}")
        return _url_list(urls_file, "--urls", limit)
    if source is None:
        raise ArgumentError(
            "SOURCE", "required: a URL list file, a directory or s3://bucket/prefix"
        )
    scheme = source.partition("://")[0].lower()  # (schemes are case-insensitive)
    if scheme == "s3" and "://" in source:
        return _s3_prefix(source, limit, s3)
    if scheme in ("http", "https") and "://" in source:
        raise ArgumentError(
            "SOURCE",
            f"{redact_url(source)!r} is one URL: write the URLs one per line into a file "
            "and pass that file",
        )
    if os.path.isdir(source):
        return _directory(os.path.abspath(source), limit)
    if _readable_file(source):
        return _url_list(source, "SOURCE", limit)
    raise ArgumentError("SOURCE", f"no such file or directory: {source!r}")


def _readable_file(path: str) -> bool:
    # Not os.path.isfile: a shell's <(...) is a pipe (/dev/fd/N), and open() says what
    # is wrong with anything else that exists.
    return os.path.exists(path) and not os.path.isdir(path)


def _url_list(path: str, argument: str, limit: int) -> SourceSpec:
    urls: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # (-sig: a BOM some editors write)
            for number, line in enumerate(f, 1):
                url = line.strip()
                if not url or url.startswith("#"):
                    continue
                if not url[:8].lower().startswith(("http://", "https://")):
                    raise ArgumentError(
                        argument,
                        f"{path}, line {number}: not an http(s) URL: {redact_url(url)[:80]!r} "
                        "(a URL list has one http(s) URL per line)",
                    )
                urls.append(url)
                if len(urls) == limit:
                    break
    except UnicodeDecodeError:
        raise ArgumentError(argument, f"{path} is not a text file of URLs") from None
    except OSError as exc:  # (no permission to read it, a socket, ...)
        raise ArgumentError(argument, f"cannot read {path}: {exc.strerror or exc}") from None
    if not urls:
        raise NoSamplesError(f"{path} lists no URLs")
    return SourceSpec(kind="http", location=path, keys=urls)


def _directory(root: str, limit: int) -> SourceSpec:
    keys: list[str] = []
    # Walk in sorted order and stop at the limit: a huge directory is not listed whole.
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                keys.append(os.path.relpath(path, root))
                if len(keys) == limit:
                    return SourceSpec(kind="files", location=root, keys=keys, root=root)
    if not keys:
        raise NoSamplesError(f"directory {root!r} holds no files")
    return SourceSpec(kind="files", location=root, keys=keys, root=root)


def _s3_prefix(url: str, limit: int, s3: S3Options) -> SourceSpec:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ArgumentError("SOURCE", f"{url!r} names no bucket (s3://bucket/prefix)")
    keys = asyncio.run(_list_keys(bucket, prefix, limit, s3))
    if not keys:
        raise NoSamplesError(f"no objects under {url}")
    return SourceSpec(kind="s3", location=url, keys=keys, bucket=bucket, s3=s3)


async def _list_keys(bucket: str, prefix: str, limit: int, s3: S3Options) -> list[str]:
    from ..sources import S3Source

    stream = S3Source.from_prefix(
        bucket,
        prefix,
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        anonymous=s3.anonymous,
    )
    keys: list[str] = []
    try:
        # list_keys is an async generator: aclosing ends the listing when we stop early.
        listing = cast("AsyncGenerator[str, None]", stream.list_keys())
        async with contextlib.aclosing(listing):
            async for key in listing:  # (folder markers are left out by list_keys)
                keys.append(key)
                if len(keys) == limit:
                    break
    except Exception as exc:
        raise NoSamplesError(f"cannot list s3://{bucket}/{prefix}: {_reason(exc)}") from exc
    finally:
        await stream.aclose()
    return keys


def _reason(exc: Exception) -> str:
    """Why ``exc`` happened: an OSError's strerror (its filename is the prefix, named
    already), else its message; URLs in it redacted either way."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    # The endpoint may carry user:password@, and a request URL a signed query string.
    return _URL.sub(lambda url: redact_url(url.group()), text)
