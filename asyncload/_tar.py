"""Incremental tar parsing over an async byte stream, and WebDataset sample grouping.

A shard is read as it arrives: headers and payloads are cut out of the chunks of the
stream, so a sample can be yielded before the rest of the shard has been downloaded and
memory holds at most one member plus one chunk. Headers are parsed by the standard
library (``tarfile.TarInfo.frombuf``: checksums, ustar, GNU and base-256 sizes); GNU long
names and pax ``path`` records are handled here, since they span two members.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import AsyncIterator
from typing import Any

from .errors import ObjectTooLargeError, TruncatedBodyError
from .streaming import StreamError

__all__ = ["UnsafeMemberError", "iter_members", "iter_samples", "split_key"]

BLOCK = 512


class UnsafeMemberError(ValueError):
    """A tar member whose name is absolute or climbs out with ``..``: never a sample."""


class _Bytes:
    """Exact-length reads over an async iterator of chunks."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self.offset = 0  # bytes consumed so far, for messages

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; fewer only at the end of the stream."""
        buffer = self._buffer
        while len(buffer) < n:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                break
            buffer += chunk
        data = bytes(buffer[:n])
        del buffer[:n]
        self.offset += len(data)
        return data

    async def skip(self, n: int, what: str) -> None:
        """Pass over ``n`` bytes without holding them all."""
        while n > 0:
            step = min(n, 1 << 20)
            await self.exactly(step, what)
            n -= step

    async def exactly(self, n: int, what: str) -> bytes:
        data = await self.read(n)
        if len(data) != n:
            raise TruncatedBodyError(
                f"tar stream ends inside {what} (offset {self.offset}, {len(data)} of {n} bytes)"
            )
        return data


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if it has one."""
    pos = 0
    path = None
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1 : pos + length - 1]  # without the trailing newline
        key, _, value = record.partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        pos += length
    return path


def _check_name(name: str) -> str:
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeMemberError(f"unsafe tar member name {name!r}: absolute or with '..'")
    return posixpath.normpath(name) if name else name


async def iter_members(
    chunks: AsyncIterator[bytes], max_member_bytes: int | None = None
) -> AsyncIterator[tuple[str, bytes | Exception]]:
    """``(name, payload)`` of each regular file in the tar stream, in order.

    Directories, links and other special members are passed over. A member with an unsafe
    name, or larger than ``max_member_bytes``, is read past and given as
    ``(name, error)`` (`UnsafeMemberError`, `~asyncload.ObjectTooLargeError`): refused as a
    sample, while the rest of the shard goes on. A stream that ends before the
    end-of-archive marker (or inside a member) raises `~asyncload.TruncatedBodyError`; a
    bad header raises ``tarfile.HeaderError``.
    """
    stream = _Bytes(chunks)
    long_name: str | None = None
    while True:
        header = await stream.read(BLOCK)
        if not header:
            raise TruncatedBodyError(
                f"tar stream ends without an end-of-archive marker (offset {stream.offset})"
            )
        if len(header) < BLOCK:
            raise TruncatedBodyError(f"tar stream ends inside a header (offset {stream.offset})")
        if header == bytes(BLOCK):
            return  # end of archive (a second zero block may follow; nothing else does)
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        size = info.size
        padded = -size % BLOCK
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE):
            data = await stream.exactly(size + padded, "an extended header")
            data = data[:size]
            long_name = (
                data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                if info.type == tarfile.GNUTYPE_LONGNAME
                else _pax_path(data)
            )
            continue
        if info.type == tarfile.XGLTYPE:
            await stream.exactly(size + padded, "a global header")
            continue
        name = long_name if long_name is not None else info.name
        long_name = None
        if info.type not in tarfile.REGULAR_TYPES:
            if info.type not in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE):
                await stream.exactly(size + padded, f"member {name!r}")
            continue
        try:
            name = _check_name(name)
            if max_member_bytes is not None and size > max_member_bytes:
                raise ObjectTooLargeError(
                    f"tar member {name!r}: {size} bytes, more than max_member_bytes="
                    f"{max_member_bytes}"
                )
        except ValueError as refused:
            await stream.skip(size + padded, f"member {name!r}")
            yield name, refused
            continue
        payload = await stream.exactly(size + padded, f"member {name!r}")
        yield name, payload[:size] if padded else payload


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name, the
    extension is the rest (``a/b.seg.png`` -> ``("a/b", "seg.png")``)."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext if dot else ""


async def iter_samples(
    members: AsyncIterator[tuple[str, bytes | Exception]], url: str
) -> AsyncIterator[dict[str, Any] | StreamError]:
    """Group consecutive members with the same key into ``{"__key__", "__url__", ext...}``;
    a refused member becomes a `StreamError` in its place."""
    sample: dict[str, Any] | None = None
    async for name, payload in members:
        if isinstance(payload, Exception):
            if sample is not None:
                yield sample
                sample = None
            yield StreamError(payload, key=f"{url}#{name}")
            continue
        key, ext = split_key(name)
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            yield StreamError(
                ValueError(f"sample {key!r} has two {ext!r} members"), key=f"{url}#{name}"
            )
            continue
        sample[ext] = payload
    if sample is not None:
        yield sample
