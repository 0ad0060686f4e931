"""Incremental tar parsing over an async byte stream, and WebDataset sample grouping.

A shard is read as it arrives: headers and payloads are cut out of the chunks of the
stream, so a sample can be yielded before the rest of the shard has been downloaded and
memory holds at most one sample plus one chunk. Headers are parsed by the standard
library (``tarfile.TarInfo.frombuf``: checksums, ustar, GNU and base-256 sizes); GNU long
names and pax ``path`` records are handled here, since they span two members. A shard
that starts with gzip's magic number (``.tar.gz``) is decompressed on the way.
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from .errors import ObjectTooLargeError, TruncatedBodyError
from .streaming import StreamError

__all__ = ["HardLink", "UnsafeMemberError", "iter_members", "iter_samples", "split_key"]

BLOCK = 512
_GZIP = b"\x1f\x8b"
_INFLATE = 1 << 20  # decompressed bytes per step: a small shard cannot expand without bound
# Other compressions a shard might have, named when the first header does not parse.
_UNSUPPORTED = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


class UnsafeMemberError(ValueError):
    """A tar member whose name is absolute or climbs out with ``..``: never a sample."""


class HardLink(NamedTuple):
    """A hard-link member in place of its payload: the data is that of ``target``, an
    earlier member of the shard (its normalised name)."""

    target: str


class _Bytes:
    """Exact-length reads over an async iterator of chunks, gunzipped when the stream
    starts with gzip's magic number. ``where`` names the stream in messages."""

    def __init__(self, chunks: AsyncIterator[bytes], where: str) -> None:
        self._chunks = chunks
        self._where = where
        self._buffer = bytearray()
        self.offset = 0  # bytes of the tar stream (after gunzip) consumed so far
        self._sniffed = False
        self._gunzip: Any = None  # a zlib decompressor, once the stream is known to be gzip
        self._compressed = b""  # input the decompressor has not taken yet

    async def _next_chunk(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    async def _fill(self) -> bool:
        """Add more of the tar stream to the buffer; False at its end."""
        if self._gunzip is not None:
            return await self._inflate()
        chunk = await self._next_chunk()
        if chunk is None:
            return False
        self._buffer += chunk
        if not self._sniffed and len(self._buffer) >= len(_GZIP):
            self._sniffed = True  # before anything is consumed: read() wants a whole block
            if self._buffer.startswith(_GZIP):
                self._compressed = bytes(self._buffer)
                self._buffer.clear()
                self._gunzip = zlib.decompressobj(wbits=31)
                return await self._inflate()
        return True

    async def _inflate(self) -> bool:
        while True:
            if not self._compressed:
                chunk = await self._next_chunk()
                if chunk is None:
                    if not self._gunzip.eof:
                        raise TruncatedBodyError(
                            f"{self._where}: gzip stream ends early (tar offset {self.offset})"
                        )
                    return False
                self._compressed = chunk
            if self._gunzip.eof:  # another gzip member follows (cat a.gz b.gz is valid gzip)
                self._gunzip = zlib.decompressobj(wbits=31)
            try:
                out = self._gunzip.decompress(self._compressed, _INFLATE)
            except zlib.error as exc:
                raise tarfile.ReadError(
                    f"{self._where}: corrupt gzip data (tar offset {self.offset}): {exc}"
                ) from exc
            gunzip = self._gunzip
            self._compressed = gunzip.unused_data if gunzip.eof else gunzip.unconsumed_tail
            if out:
                self._buffer += out
                return True

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes; fewer only at the end of the stream."""
        buffer = self._buffer
        while len(buffer) < n:
            if not await self._fill():
                break
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
                f"{self._where}: tar stream ends inside {what} (offset {self.offset}, "
                f"{len(data)} of {n} bytes)"
            )
        return data


def _pax_records(data: bytes) -> tuple[str | None, str | None, int | None]:
    """The ``path``, ``linkpath`` and ``size`` records of a pax extended header, where it
    has them (``size``: members of 8 GiB or more, whose ustar size field cannot hold it).
    Names are decoded as the ustar fields are: bytes that are not UTF-8
    (``hdrcharset=BINARY``) come through as surrogates instead of failing the shard."""
    pos = 0
    names: dict[bytes, str] = {}
    size: int | None = None
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if length <= space - pos:
                raise ValueError(f"record length {length}")
            record = data[space + 1 : pos + length - 1]  # without the trailing newline
            key, _, value = record.partition(b"=")
            if key in (b"path", b"linkpath"):
                names[key] = value.decode("utf-8", "surrogateescape")
            elif key == b"size":
                size = int(value)
                if size < 0:
                    raise ValueError(f"size {size}")
            pos += length
    except ValueError as exc:
        raise tarfile.HeaderError(f"malformed pax header: {exc}") from exc
    return names.get(b"path"), names.get(b"linkpath"), size


def _compression(header: bytes) -> str:
    """The compression whose magic number ``header`` starts with, or ``""``."""
    return next((kind for magic, kind in _UNSUPPORTED.items() if header.startswith(magic)), "")


def _checksum_ok(header: bytes) -> bool:
    # A plain tar whose first member is named "BZh..." starts like bzip2, but is a tar.
    try:
        tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _check_name(name: str) -> str:
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeMemberError(f"unsafe tar member name {name!r}: absolute or with '..'")
    return posixpath.normpath(name) if name else name


async def iter_members(
    chunks: AsyncIterator[bytes], max_member_bytes: int | None = None, *, where: str = "tar"
) -> AsyncIterator[tuple[str, bytes | HardLink | Exception]]:
    """``(name, payload)`` of each regular file and hard link in the tar stream, in order.

    A hard link is given as ``(name, HardLink(target))``. Directories, symbolic links and
    other special members are passed over. A member with an unsafe name, or larger than
    ``max_member_bytes``, is read past and given as ``(name, error)``
    (`UnsafeMemberError`, `~asyncload.ObjectTooLargeError`): refused as a sample, while
    the rest of the shard goes on. A stream that ends before the end-of-archive marker (or
    inside a member) raises `~asyncload.TruncatedBodyError`; a bad header raises
    ``tarfile.HeaderError``, corrupt gzip data ``tarfile.ReadError``. Messages begin with
    ``where`` (the shard's name) and give the offset in the tar stream.
    """
    stream = _Bytes(chunks, where)
    long_name: str | None = None
    long_link: str | None = None
    long_size: int | None = None  # a pax size record: the next member's real size
    while True:
        header = await stream.read(BLOCK)
        if not header:
            raise TruncatedBodyError(
                f"{where}: tar stream ends without an end-of-archive marker "
                f"(offset {stream.offset})"
            )
        at = stream.offset - len(header)
        kind = _compression(header) if at == 0 else ""
        if kind and (len(header) < BLOCK or not _checksum_ok(header)):
            raise tarfile.ReadError(
                f"{where}: the shard is {kind}-compressed; only plain and gzip tar is read"
            )
        if len(header) < BLOCK:
            raise TruncatedBodyError(
                f"{where}: tar stream ends inside a header (offset {stream.offset})"
            )
        if header == bytes(BLOCK):
            return  # end of archive (a second zero block may follow; nothing else does)
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            size = info.size
            padded = -size % BLOCK
            if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
                data = await stream.exactly(size + padded, "an extended header")
                text = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
                if info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = text
                else:
                    long_link = text
                continue
            if info.type == tarfile.XHDTYPE:
                data = await stream.exactly(size + padded, "an extended header")
                path, link, pax_size = _pax_records(data[:size])
                long_name = path if path is not None else long_name
                long_link = link if link is not None else long_link
                long_size = pax_size if pax_size is not None else long_size
                continue
        except tarfile.HeaderError as exc:
            raise type(exc)(f"{where}: {exc} in the tar header at offset {at}") from exc
        if info.type == tarfile.XGLTYPE:
            await stream.exactly(size + padded, "a global header")
            continue
        name = long_name if long_name is not None else info.name
        link = long_link if long_link is not None else info.linkname
        if long_size is not None:
            size, padded = long_size, -long_size % BLOCK
        long_name = long_link = long_size = None
        if info.type not in tarfile.REGULAR_TYPES and info.type != tarfile.LNKTYPE:
            if info.type not in (tarfile.DIRTYPE, tarfile.SYMTYPE):
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
        if info.type == tarfile.LNKTYPE:  # no data of its own (as tarfile reads it)
            yield name, HardLink(posixpath.normpath(link))
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
    members: AsyncIterator[tuple[str, bytes | HardLink | Exception]],
    url: str,
    *,
    with_url: bool = False,
) -> AsyncIterator[dict[str, Any] | StreamError]:
    """Group consecutive members with the same key into ``{"__key__", ext...}`` (and
    ``"__url__": url`` with ``with_url``).

    A sample with a member it cannot have (refused, a second one with the same extension,
    a hard link to another sample's member) is one `StreamError` in its place, keyed by
    shard and that member, and its other members are passed over: never a part of a
    sample, and one item per key, as ``samples_per_shard`` counts them.
    """
    key: str | None = None
    sample: dict[str, Any] = {}
    failed: StreamError | None = None  # stands for the current key's sample
    async for name, payload in members:
        member_key, ext = split_key(name)
        if member_key != key:
            if key is not None:
                yield failed if failed is not None else sample
            key, sample, failed = member_key, {"__key__": member_key}, None
            if with_url:
                sample["__url__"] = url
        if failed is not None:
            continue  # the rest of a failed sample
        if isinstance(payload, HardLink):
            payload = _linked(sample, name, payload.target)
        if not isinstance(payload, Exception) and ext in sample:
            payload = ValueError(f"sample {key!r} has two {ext!r} members")
        if isinstance(payload, Exception):
            failed = StreamError(payload, key=f"{url}#{name}")
            continue
        sample[ext] = payload
    if key is not None:
        yield failed if failed is not None else sample


def _linked(sample: dict[str, Any], name: str, target: str) -> bytes | Exception:
    """The data of hard link ``name``: its target's, if that is a member of ``sample``
    (still held); a target in an earlier sample was given away and not kept, to hold at
    most one sample in memory."""
    key, ext = split_key(target)
    if key == sample["__key__"] and ext in sample:
        data: bytes = sample[ext]
        return data
    return ValueError(
        f"tar member {name!r} is a hard link to {target!r}, a member of another sample, "
        "whose data is not kept while streaming (write shards with tar --hard-dereference)"
    )
