"""A bounded on-disk cache of bytes, shared safely by the processes of one host.

The disk tier for remote objects: it stores what a source returns (bytes), so put it under
the transform. It keeps :class:`~asyncload.LRUCache`'s interface and semantics (per-key
single flight, failed or cancelled loads never cached, ``statistics()``), adds a
cross-process lock per key, and survives restarts: a new run over the same directory is
served from it.

Layout of the directory (flat; ``<digest>`` is the hex SHA-256 of the encoded key):

- ``<digest>``: one entry: a 24-byte header (magic, format version, key length, payload
  length, CRC-32 of header fields + key + payload), the encoded key, then the payload.
- ``<digest>.<pid>.<token>.tmp``: an entry being written, renamed over ``<digest>`` once
  complete, so a reader sees a whole entry or none.
- ``locks``: the cross-process single flight. A process loading a key holds a write
  lock on one byte of it (the offset is 60 bits of ``<digest>``), an open file
  description lock (Linux ``F_OFD_SETLK``), released when it is done or its file closes,
  also if it is killed.
- ``<digest>.lock``: the same where such locks are missing (not Linux): it exists while a
  process loads that key, its ``flock`` is the lock, and its holder deletes it before
  unlocking.
- ``usage``: the ledger (total bytes and number of entries); its ``flock`` serializes
  every change to the set of entries (insert, evict, delete), so the budget holds across
  processes.
- ``CACHEDIR.TAG``: tells backup tools to skip the directory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import operator
import os
import re
import secrets
import struct
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any, TypedDict, cast

import anyio
from anyio.lowlevel import RunVar

from ._batched import ThreadBatcher
from ._callables import PerLoop
from ._redact import redact_key
from ._threads import run_in_daemon_thread
from .cache import _check_limit, _Flight, forget_loads_when_forked
from .errors import SampleFiltered

if sys.platform != "win32":
    import fcntl

__all__ = ["DiskCache", "DiskCacheStatistics", "encode_key"]

_log = logging.getLogger("asyncload")

# magic, format version, key length, payload length, CRC-32; the CRC covers the fields before
# it, the key and the payload.
_HEADER = struct.Struct("<4sB3xIQI")
_MAGIC = b"ALDC"
_VERSION = 1
_CRC = struct.Struct("<I")
_LEDGER = struct.Struct("<4s4xQQ")  # magic, total bytes of entries, number of entries
_LEDGER_MAGIC = b"ALDU"
_LEDGER_NAME = "usage"
_LOCKS_NAME = "locks"
# struct flock on 64-bit Linux: l_type, l_whence, (pad), l_start, l_len, l_pid, (pad).
_FLOCK = struct.Struct("hhqqi4x")
_NAME_PREFIX = b"asyncload.DiskCache/1\0"
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}")
_TEMP_NAME = re.compile(r"[0-9a-f]{64}\.(\d+)\.[0-9a-f]+\.tmp")
# What a directory we may read but not write answers (read-only, or out of space or inodes).
_CANNOT_WRITE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
_STALE_TEMP_SECONDS = 3600.0  # a temp file untouched this long is abandoned, whatever its pid
_WAIT_THREADS = 32  # threads per event loop that may block waiting for other processes' loads
_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by asyncload.DiskCache.\n"
)


class DiskCacheStatistics(TypedDict):
    hits: int  # lookups served from disk, or by a load in flight (here or in another process)
    misses: int  # lookups that ran their load in this process
    evictions: int  # entries this process deleted to keep within max_bytes
    items: int  # entries in the directory (all processes), as the ledger says now
    bytes: int  # their total size on disk (headers and keys included)
    hit_rate: float  # hits / (hits + misses), 0.0 before any lookup
    coalesced: int  # hits that waited on another caller's load in this process
    lock_waits: int  # lookups that found another process loading the key and waited for it
    in_flight: int  # keys being loaded by this process now
    load_errors: int  # loads that raised or returned a value that is not bytes-like
    uncached: int  # values larger than max_bytes alone: returned, never stored
    corrupt: int  # entries found damaged (bad header, length or checksum), deleted, reloaded
    write_errors: int  # loaded values that could not be stored (e.g. disk full): returned anyway


def encode_key(key: object) -> bytes:
    """The encoding of ``key`` that names its entry: stable across processes and runs.

    Supported keys: ``str`` (UTF-8), ``bytes``, ``int`` (``bool`` as ``0``/``1``, since
    ``True == 1``), ``None``, and tuples of these, nested freely. Each part is tagged and
    length-prefixed, so distinct keys never share an encoding, and keys that compare equal
    share one (``1``, ``True``; a tuple and a namedtuple). Anything else (floats, objects
    whose ``repr`` holds an address, sets with no stable order) raises ``TypeError``.
    """
    parts: list[bytes] = []
    _encode(key, parts, key)
    return b"".join(parts)


def _encode(obj: object, parts: list[bytes], whole: object) -> None:
    if isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        parts += (b"s%d:" % len(raw), raw)
    elif isinstance(obj, bytes):
        parts += (b"b%d:" % len(obj), obj)
    elif isinstance(obj, int):
        parts.append(b"i%x;" % obj)  # hex: no digit limit on huge ints
    elif type(obj).__module__ == "numpy" and hasattr(obj, "__index__"):
        # A numpy integer equals the int (a key_of or index may hand one): the same entry.
        parts.append(b"i%x;" % operator.index(obj))
    elif obj is None:
        parts.append(b"n")
    elif isinstance(obj, tuple):
        parts.append(b"t%d(" % len(obj))
        for item in obj:
            _encode(item, parts, whole)
        parts.append(b")")
    else:
        what = "" if obj is whole else f" (inside key {redact_key(whole)!r})"
        raise TypeError(
            f"DiskCache keys must be str, bytes, int, None or tuples of them, whose encoding "
            f"is the same in every process; got {type(obj).__name__}{what}"
        )


def _as_bytes(key: Hashable, value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, memoryview):
        return value.tobytes()
    raise TypeError(
        f"DiskCache stores bytes-like values (bytes, bytearray, memoryview), but the load "
        f"for key {redact_key(key)!r} ({type(key).__name__}) returned "
        f"{type(value).__name__}: put the disk tier under the transform, caching what the "
        f"source returns"
    )


_WAIT_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("asyncload.DiskCache.wait_limiter")


def _wait_limiter() -> anyio.CapacityLimiter:
    # Waits for other processes' loads get their own threads: were they to take the default
    # limiter's, two processes waiting on each other's keys could leave neither a thread to
    # store the value that would release the other.
    limiter = _WAIT_LIMITER.get(None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(_WAIT_THREADS)
        _WAIT_LIMITER.set(limiter)
    return limiter


class _KeyLock:
    """The right to load one key, across processes: held while ``fd`` is not None. Made by
    a subclass's ``acquire``; a bare ``_KeyLock(None)`` is the right without a lock (a
    directory where no lock can be made)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def acquire(cls, directory: str, name: str, *, blocking: bool) -> _KeyLock | None:
        """The lock on entry ``name`` (blocking until it is free, if ``blocking``); None if
        another holds it."""
        raise NotImplementedError

    def release(self) -> None:
        """Unlock. Idempotent."""
        self.fd = None


class _RangeLock(_KeyLock):
    """A write lock on one byte of the directory's ``locks`` file, at an offset taken from
    the entry's name: an open file description lock (Linux ``F_OFD_SETLK``), so it is held
    by this open file (not the process: two in one process exclude each other, as two
    processes do) and released when it is closed. Nothing is created or deleted per key:
    on ext4 without a journal, a lock file made and deleted per miss cost more kernel time
    than the entry itself (inodes freed in the last minute are skipped, one by one, when
    the next is allocated)."""

    __slots__ = ("offset",)

    def __init__(self, fd: int | None, offset: int = 0) -> None:
        super().__init__(fd)
        self.offset = offset

    @classmethod
    def acquire(cls, directory: str, name: str, *, blocking: bool) -> _RangeLock | None:
        offset = int(name[:15], 16)  # 60 bits of the digest: keys do not share a byte
        fd = os.open(
            os.path.join(directory, _LOCKS_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666
        )
        try:
            fcntl.fcntl(
                fd,
                fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK,
                _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0),
            )
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):  # held by another open file
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, offset)

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            # Unlock explicitly: a forked child may share this open file.
            fcntl.fcntl(
                fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self.offset, 1, 0)
            )
        finally:
            os.close(fd)


class _FileLock(_KeyLock):
    """An exclusive ``flock`` on ``<digest>.lock``, made for the load and deleted after it:
    where open file description locks are missing (not Linux, or a 32-bit build)."""

    __slots__ = ("path",)

    def __init__(self, fd: int | None, path: str = "") -> None:
        super().__init__(fd)
        self.path = path

    @classmethod
    def acquire(cls, directory: str, name: str, *, blocking: bool) -> _FileLock | None:
        return cls.acquire_path(os.path.join(directory, name + ".lock"), blocking=blocking)

    @classmethod
    def acquire_path(cls, path: str, *, blocking: bool) -> _FileLock | None:
        flags = fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            keep = False
            try:
                try:
                    fcntl.flock(fd, flags)
                except BlockingIOError:
                    return None
                keep = _same_file(fd, path)
            finally:
                if not keep:
                    os.close(fd)
            if keep:
                return cls(fd, path)
            # The previous holder deleted the file after we opened it: lock the new one.

    def release(self) -> None:
        """Delete the lock file, then unlock. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            # Delete while still holding it: whoever opened this file meanwhile finds it is
            # no longer the one at ``path`` (see acquire_path) and retries on a fresh one.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            # Unlock explicitly: a forked child may share this descriptor.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# Open file description locks where their struct layout is known; else a lock file per key.
# Every process sharing a directory picks the same on one host (a mix would only load a key
# twice: a store replaces an entry it finds).
_key_lock: type[_KeyLock] = (
    _RangeLock
    if sys.platform == "linux" and hasattr(fcntl, "F_OFD_SETLK") and struct.calcsize("P") == 8
    else _FileLock
)


def _release_probe(probe: _Probe) -> None:
    """What a lookup whose caller was cancelled got: its key's lock goes."""
    if probe.lock is not None:
        probe.lock.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


class _Waiter:
    """A blocking lock acquisition in a worker thread that its caller may abandon (on
    cancellation): the lock goes to the caller, or the thread releases it, never neither."""

    __slots__ = ("_abandoned", "_lock", "_mutex", "directory", "name")

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.name = name
        self._mutex = threading.Lock()
        self._abandoned = False
        self._lock: _KeyLock | None = None

    def run(self) -> None:
        lock = _key_lock.acquire(self.directory, self.name, blocking=True)
        assert lock is not None
        with self._mutex:
            if not self._abandoned:
                self._lock = lock
                return
        lock.release()

    def take(self) -> _KeyLock:
        with self._mutex:
            lock, self._lock = self._lock, None
        assert lock is not None
        return lock

    def abandon(self) -> _KeyLock | None:
        """Stop wanting the lock; returns it if the thread already got it (caller releases)."""
        with self._mutex:
            self._abandoned = True
            lock, self._lock = self._lock, None
        return lock


class _Ledger:
    """The ``usage`` file, read and written under its ``flock``."""

    __slots__ = ("bytes", "fd", "items", "valid")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        raw = os.pread(fd, _LEDGER.size, 0)
        self.valid = len(raw) == _LEDGER.size and raw[:4] == _LEDGER_MAGIC
        _, self.bytes, self.items = _LEDGER.unpack(raw) if self.valid else (b"", 0, 0)

    def save(self) -> None:
        os.pwrite(self.fd, _LEDGER.pack(_LEDGER_MAGIC, max(self.bytes, 0), max(self.items, 0)), 0)


class _Probe:
    """What a lookup on disk found: the payload, or the key's lock (now ours), or neither
    (another process holds the lock); and how many damaged entries it deleted."""

    __slots__ = ("corrupt", "lock", "payload")

    def __init__(
        self, payload: bytes | None = None, lock: _KeyLock | None = None, corrupt: int = 0
    ) -> None:
        self.payload = payload
        self.lock = lock
        self.corrupt = corrupt


class _Stored:
    __slots__ = ("error", "evicted", "stored")

    def __init__(self, stored: bool, evicted: int = 0, error: OSError | None = None) -> None:
        self.stored = stored
        self.evicted = evicted
        self.error = error


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class DiskCache:
    """Cache bytes in files under ``path``, within ``max_bytes`` in total, evicting the least
    recently used entries; several processes may share one directory.

    ``await cache.get_or_load(key, load)`` returns the bytes stored for ``key``; on a miss it
    awaits ``load()`` (a zero-argument async callable), stores the result and returns it.

    Values: bytes-like only (``bytes``, ``bytearray``, ``memoryview``), always returned as
    ``bytes``; anything else raises ``TypeError`` and is not stored. The cache holds what the
    source returns, so put it under the transform (as ``Loader(cache=...)`` does).

    Keys: see :func:`encode_key` (``str``, ``bytes``, ``int``, ``None``, tuples of them;
    anything else raises ``TypeError``). The file name is the SHA-256 of ``namespace`` and
    the encoded key. The Loader's keys (:func:`~asyncload.cache.cache_key`) from ``key_of``
    are the same in every process and run, so entries outlive restarts; those of a dataset
    without ``key_of`` hold a random token of the dataset object (kept by its pickled
    copies, DataLoader workers), so they are shared by its workers and never served to
    another dataset or a restarted run.

    Single flight: concurrent calls for one key in one process run ``load`` once (as
    :class:`~asyncload.LRUCache`); across processes a per-key lock (a byte-range lock on the
    directory's ``locks`` file on Linux, a ``flock``-ed lock file per key elsewhere) makes
    the others wait for the loader and then read its entry, so a key is fetched once
    however many processes ask. A failed load stores nothing and raises to its caller and
    the callers waiting on it in this process; the next call (or a waiting process) loads
    again. If the loading caller is cancelled, its waiters look again and one of them
    loads in its place. A forked child (a DataLoader worker) forgets the parent's loads in
    flight; it waits on their keys' locks like any other process.

    Entries: written to a temp file in the directory and renamed into place, so readers see
    a whole entry or none, even if the writer is killed. Each carries its length and a
    CRC-32 of key and payload: a truncated or damaged entry is counted (``corrupt``),
    deleted and reloaded, never served. ``fsync=False`` (default) skips ``fsync`` before the
    rename: an entry lost or torn by a power failure is caught by the checksum and fetched
    again, while ``fsync`` makes every store wait for the disk (on a local ext4 disk, a
    1 KiB store took ~0.3 ms without it and 0.7-4 ms with it). ``fsync=True`` makes each
    entry's bytes durable before it is renamed into place (the directory is not synced:
    after a power loss an entry may be missing, not torn).

    Budget: ``max_bytes`` bounds the total size of entry files (payload + 24-byte header +
    encoded key), across every process using the directory: a shared ledger, updated under
    a directory-wide ``flock`` with each insert and eviction, tracks the total; entries
    being written (temp files) are not counted until renamed into place. When an insert
    would exceed the budget, the directory is scanned and entries are deleted oldest
    ``mtime`` first (a hit sets the entry's ``mtime``, so this is least recently used, also
    across processes and restarts, to the filesystem's timestamp resolution) until the
    total is at most ``evict_to * max_bytes``: below 1, one scan makes room for several
    inserts (a scan of 10,000 entries took 50-120 ms here). A value larger than
    ``max_bytes`` alone is returned and not stored (``uncached``). Each process enforces
    its own ``max_bytes`` on its inserts: give all users of a directory the same one.
    Scans also delete temp files left by dead writers and lock files nobody holds.

    A value that cannot be stored (disk full, unwritable directory) is still returned, and
    counted as ``write_errors``. Reading an entry fails loudly only for errors other than a
    missing or damaged entry (e.g. permissions).

    I/O runs in worker threads: a lookup before each load, a store after it, each in a
    batch with the lookups (or stores) asked for while the previous batch ran, so a thread
    hop carries many of them (with ``fsync``, up to 8 batches of stores at once). The
    directory is for processes on one host (file locks are not reliable over network
    filesystems). It is created if missing. Use one ``DiskCache`` object from one thread at
    a time; any number of objects (copies, other processes) may share the directory. A
    ``DiskCache`` pickles (DataLoader workers get copies that share the directory) without
    its loads in flight, and binds no event loop.
    Raises ``ValueError`` or ``TypeError``, naming the argument, for bad settings.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int,
        namespace: str = "",
        evict_to: float = 0.9,
        fsync: bool = False,
    ) -> None:
        if sys.platform == "win32":  # pragma: no cover
            raise NotImplementedError("DiskCache needs POSIX file locks (fcntl.flock)")
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
        if max_bytes is None:
            raise TypeError("max_bytes must be an int: a disk cache needs a budget")
        limit = _check_limit("max_bytes", max_bytes)
        assert limit is not None
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, not {type(namespace).__name__}")
        if isinstance(evict_to, bool) or not isinstance(evict_to, (int, float)):
            raise TypeError(f"evict_to must be a float, not {type(evict_to).__name__}")
        if not 0 < evict_to <= 1:
            raise ValueError(f"evict_to must be in (0, 1], got {evict_to}")
        self.path = os.path.abspath(os.fspath(path))
        self.max_bytes = limit
        self.namespace = namespace
        self.evict_to = float(evict_to)
        self.fsync = bool(fsync)
        self._prefix = _NAME_PREFIX + encode_key(namespace)
        os.makedirs(self.path, exist_ok=True)
        tag = os.path.join(self.path, "CACHEDIR.TAG")
        if not os.path.exists(tag):
            with contextlib.suppress(OSError), open(tag, "wb") as f:
                f.write(_CACHEDIR_TAG)
        self._forget_loads()
        forget_loads_when_forked(self)
        self._last_stamp = 0
        self._hits = self._misses = self._evictions = self._coalesced = 0
        self._lock_waits = self._load_errors = self._uncached = 0
        self._corrupt = self._write_errors = 0
        self._warned_write = False

    def __repr__(self) -> str:
        return (
            f"DiskCache({self.path!r}, max_bytes={self.max_bytes}, "
            f"namespace={self.namespace!r}, evict_to={self.evict_to}, fsync={self.fsync})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # In-flight loads and file operations belong to the event loop running them.
        state = self.__dict__.copy()
        del state["_flights"], state["_lookups"], state["_stores"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_loads()
        forget_loads_when_forked(self)

    def _forget_loads(self) -> None:
        """No loads or file operations in flight: a new object's, a copy's, and in a forked
        child (the parent's are not this process's: nothing here would finish them)."""
        # Per event loop: two sync loaders (each its own loop thread) may share the cache,
        # and what a load or a batch waits on belongs to one loop. (Loads of one key in
        # two loops at once both run; the key's lock on disk keeps the entry whole.)
        self._flights: PerLoop[dict[str, _Flight]] = PerLoop(dict)
        # Lookups and stores each go in their own batches: a lookup (before the fetch) does
        # not wait behind a batch of stores (after it). With fsync, each store waits for
        # the disk: several batches run at once, as the disk takes several writes at once.
        self._lookups: PerLoop[ThreadBatcher] = PerLoop(ThreadBatcher)
        self._stores: PerLoop[ThreadBatcher] = PerLoop(
            functools.partial(ThreadBatcher, 8 if self.fsync else 1)
        )

    def path_of(self, key: Hashable) -> str:
        """The file that holds (or would hold) ``key``'s entry. ``TypeError`` for keys that
        :func:`encode_key` refuses."""
        return self._entry(self._name(encode_key(key)))

    def __contains__(self, key: object) -> bool:
        """Whether an entry for ``key`` exists now (one ``stat``, blocking; not validated,
        not a use)."""
        return os.path.exists(self._entry(self._name(encode_key(key))))

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[Any]]) -> bytes:
        """The bytes stored for ``key``; on a miss, ``await load()``, store and return it.

        Raises ``TypeError`` for an unsupported key, or when ``load`` returns something
        that is not bytes-like; whatever ``load`` raises (nothing is stored, and callers
        waiting on this load get the same error); ``OSError`` when the directory cannot be
        read.
        """
        material = encode_key(key)
        name = self._name(material)
        flights = self._flights.get()
        while True:
            flight = flights.get(name)
            if flight is None:
                break
            if await flight.join():
                self._hits += 1
                self._coalesced += 1
                return cast(bytes, flight.value)

        flight = flights[name] = _Flight()
        try:
            value = await self._fetch(key, name, material, load)
            flight.ok, flight.value = True, value
        except Exception as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                flight.error, flight.traceback = exc, exc.__traceback__
            raise
        finally:
            del flights[name]
            flight.done.set()
        return value

    async def _fetch(
        self, key: Hashable, name: str, material: bytes, load: Callable[[], Awaitable[Any]]
    ) -> bytes:
        probe = await self._lookups.get().run(
            self._probe, name, material, self._stamp(), release=_release_probe
        )
        self._corrupt += probe.corrupt
        if probe.payload is None and probe.lock is None:
            self._lock_waits += 1
            probe = await self._wait_for(name, material)
            self._corrupt += probe.corrupt
        if probe.payload is not None:
            self._hits += 1
            return probe.payload
        # From here the key's lock is ours (no checkpoint since the thread handed it over):
        # every way out releases it.
        lock = probe.lock
        assert lock is not None
        try:
            self._misses += 1
            try:
                data = _as_bytes(key, await load())
            except SampleFiltered:
                raise  # (counted as filtered by the loader, not as a load error)
            except Exception:
                self._load_errors += 1
                raise
            # The value is loaded: store it (which releases the lock) even if cancelled now.
            with anyio.CancelScope(shield=True):
                stored = await self._stores.get().run(
                    self._store, name, material, data, self._stamp(), lock
                )
        except BaseException:
            # Here, not in a thread: an await could be cancelled again and lose the lock
            # (an unlock and a close, in a rare path).
            lock.release()
            raise
        self._evictions += stored.evicted
        if stored.error is not None:
            self._write_errors += 1
            if not self._warned_write:
                self._warned_write = True
                _log.warning(
                    "DiskCache %s: could not store an entry (%s); values are returned "
                    "uncached (counted as write_errors)",
                    self.path,
                    stored.error,
                )
        elif not stored.stored:
            self._uncached += 1
        return data

    async def _wait_for(self, name: str, material: bytes) -> _Probe:
        """Wait until the process loading ``name`` is done, then look again, holding the lock."""
        waiter = _Waiter(self.path, name)
        held: _KeyLock | None = None
        try:
            # Abandoned on cancellation: a thread blocked in flock cannot be interrupted.
            await run_in_daemon_thread(waiter.run, _wait_limiter())
            held = waiter.take()
            return await self._lookups.get().run(
                self._recheck, held, name, material, self._stamp(), release=_release_probe
            )
        except BaseException:
            held = held or waiter.abandon()
            if held is not None:
                held.release()  # (here, as in _fetch)
            raise

    def clear(self) -> None:
        """Delete every entry. Blocking (it lists and deletes files): from async code, run it
        in a thread. Counters are kept; loads in flight, here or in other processes, still
        finish and are stored."""
        with self._ledger() as ledger:
            for _, _, name in self._scan(ledger):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._entry(name))
            ledger.bytes = ledger.items = 0
            ledger.save()

    def statistics(self) -> DiskCacheStatistics:
        """A snapshot: this object's counters (totals since construction, per process) and
        the directory's ``items`` and ``bytes`` (one small read of the ledger)."""
        items, size = self._usage()
        lookups = self._hits + self._misses
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "items": items,
            "bytes": size,
            "hit_rate": self._hits / lookups if lookups else 0.0,
            "coalesced": self._coalesced,
            "lock_waits": self._lock_waits,
            "in_flight": self._flights.total(len),
            "load_errors": self._load_errors,
            "uncached": self._uncached,
            "corrupt": self._corrupt,
            "write_errors": self._write_errors,
        }

    # -- helpers on the event loop ------------------------------------------------------------

    def _name(self, material: bytes) -> str:
        return hashlib.sha256(self._prefix + material).hexdigest()

    def _entry(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _stamp(self) -> int:
        # The mtime given to an entry on write and hit, strictly increasing in this process,
        # so the eviction order is exact even within one clock tick.
        now = time.time_ns()
        if now <= self._last_stamp:
            now = self._last_stamp + 1
        self._last_stamp = now
        return now

    def _usage(self) -> tuple[int, int]:
        try:
            with open(os.path.join(self.path, _LEDGER_NAME), "rb") as f:
                raw = f.read(_LEDGER.size)
        except OSError:
            return 0, 0
        if len(raw) != _LEDGER.size or raw[:4] != _LEDGER_MAGIC:
            return 0, 0
        _, size, items = _LEDGER.unpack(raw)
        return items, size

    # -- worker-thread side: blocking file I/O ------------------------------------------------

    def _read(
        self, path: str, material: bytes, stamp: int
    ) -> tuple[bytes | None, os.stat_result | None]:
        """``(payload, None)`` for a sound entry (its mtime set to ``stamp``), ``(None,
        None)`` for none, ``(None, stat)`` for a damaged one."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        try:
            st = os.fstat(fd)
            prefix = _HEADER.size + len(material)
            head = os.pread(fd, prefix, 0)
            if len(head) == prefix:
                magic, version, key_len, size, crc = _HEADER.unpack_from(head)
                if (
                    magic == _MAGIC
                    and version == _VERSION
                    and key_len == len(material)
                    and st.st_size == prefix + size
                    and head[_HEADER.size :] == material
                ):
                    payload = _pread_exact(fd, size, prefix)
                    checked = head[: _HEADER.size - _CRC.size] + material
                    if payload is not None and zlib.crc32(payload, zlib.crc32(checked)) == crc:
                        # A read-only directory still serves hits; only the order suffers.
                        with contextlib.suppress(OSError):
                            os.utime(fd, ns=(stamp, stamp))
                        return payload, None
            return None, st
        finally:
            os.close(fd)

    def _discard(self, path: str, st: os.stat_result) -> None:
        """Delete the damaged entry seen as ``st``, unless it has been replaced since."""
        with self._ledger() as ledger:
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return
            os.unlink(path)
            # Whatever damaged it may have changed other files too, and the size it was
            # counted at is unknown: recount (damage is rare, a scan is cheap enough).
            self._scan(ledger)
            ledger.save()

    def _look(self, name: str, material: bytes, stamp: int) -> tuple[bytes | None, int]:
        path = self._entry(name)
        payload, damaged = self._read(path, material, stamp)
        if damaged is None:
            return payload, 0
        try:
            self._discard(path, damaged)
        except OSError as exc:
            if exc.errno not in _CANNOT_WRITE:
                raise
            # It stays on disk, but is never served: its check failed (and so will a store).
        return None, 1

    def _probe(self, name: str, material: bytes, stamp: int) -> _Probe:
        """The entry's payload; else the key's lock, taken without waiting; else neither."""
        payload, corrupt = self._look(name, material, stamp)
        if payload is not None:
            return _Probe(payload=payload)
        try:
            lock = _key_lock.acquire(self.path, name, blocking=False)
        except OSError as exc:
            if exc.errno not in _CANNOT_WRITE and exc.errno != errno.ENOENT:
                raise
            # No locks where no file can be made (the directory read-only, full, or deleted
            # while in use): load without one; storing fails too, counted as write_errors.
            return _Probe(lock=_KeyLock(None), corrupt=corrupt)
        if lock is None:
            return _Probe(corrupt=corrupt)
        probe = self._recheck(lock, name, material, stamp)
        probe.corrupt += corrupt
        return probe

    def _recheck(self, lock: _KeyLock, name: str, material: bytes, stamp: int) -> _Probe:
        """Look again with the lock held: a process may have stored the entry just before
        releasing it. Releases the lock on a hit or an error."""
        try:
            payload, corrupt = self._look(name, material, stamp)
        except BaseException:
            lock.release()
            raise
        if payload is not None:
            lock.release()
            return _Probe(payload=payload, corrupt=corrupt)
        return _Probe(lock=lock, corrupt=corrupt)

    def _store(
        self, name: str, material: bytes, data: bytes, stamp: int, lock: _KeyLock
    ) -> _Stored:
        """Write the entry and make room for it; always releases ``lock``, after the rename,
        so processes waiting on it find the entry."""
        try:
            size = _HEADER.size + len(material) + len(data)
            if size > self.max_bytes:
                return _Stored(False)
            temp: str | None = None
            try:
                temp = self._write_temp(name, material, data, stamp)
                with self._ledger() as ledger:
                    evicted = self._make_room(ledger, name, size)
                    if ledger.bytes + size > self.max_bytes:  # entries we could not delete
                        ledger.save()
                        return _Stored(False, evicted)
                    ledger.bytes += size
                    ledger.items += 1
                    # Ledger first: a writer killed between the two leaves it counting too
                    # much (safe for the budget, fixed by the next scan), never too little.
                    ledger.save()
                    os.replace(temp, self._entry(name))
                    temp = None
                return _Stored(True, evicted)
            except OSError as exc:
                return _Stored(False, error=exc)
            finally:
                if temp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(temp)
        finally:
            lock.release()

    def _write_temp(self, name: str, material: bytes, data: bytes, stamp: int) -> str:
        temp = self._entry(f"{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fields = _HEADER.pack(_MAGIC, _VERSION, len(material), len(data), 0)[: -_CRC.size]
        crc = zlib.crc32(data, zlib.crc32(fields + material))
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            _write_all(fd, fields + _CRC.pack(crc) + material)
            _write_all(fd, data)
            os.utime(fd, ns=(stamp, stamp))
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        os.close(fd)
        return temp

    def _make_room(self, ledger: _Ledger, name: str, size: int) -> int:
        """Delete entries (least recently used first) until ``size`` more bytes fit; returns
        how many. Runs under the ledger's lock."""
        entries = None
        if not ledger.valid:  # a new directory, or a ledger lost: count what is there
            entries = self._scan(ledger)
        old = self._entry(name)
        with contextlib.suppress(FileNotFoundError):
            # Only a process that ignores the key lock leaves an entry to replace; drop it.
            old_size = os.stat(old).st_size
            os.unlink(old)
            ledger.bytes -= old_size
            ledger.items -= 1
            entries = None
        if ledger.bytes + size <= self.max_bytes:
            return 0
        if entries is None:
            # Recount before deleting anything: the ledger may have drifted (a killed
            # process, files deleted by hand), and other processes' recent uses are only
            # visible as mtimes.
            entries = self._scan(ledger)
            if ledger.bytes + size <= self.max_bytes:
                return 0
        target = int(self.max_bytes * self.evict_to)
        if size > target:
            target = self.max_bytes
        evicted = 0
        for _, entry_size, entry in entries:
            if ledger.bytes + size <= target:
                break
            try:
                os.unlink(self._entry(entry))
            except FileNotFoundError:
                continue
            ledger.bytes -= entry_size
            ledger.items -= 1
            evicted += 1
        return evicted

    def _scan(self, ledger: _Ledger) -> list[tuple[int, int, str]]:
        """Every entry as ``(mtime_ns, size, name)``, oldest first; sets the ledger's totals
        to them and deletes temp files of dead writers and lock files nobody holds."""
        entries = []
        now = time.time()
        with os.scandir(self.path) as listing:
            for item in listing:
                name = item.name
                try:
                    if _ENTRY_NAME.fullmatch(name):
                        st = item.stat(follow_symlinks=False)
                        entries.append((st.st_mtime_ns, st.st_size, name))
                    elif name.endswith(".tmp"):
                        match = _TEMP_NAME.fullmatch(name)
                        if match is not None and (
                            not _pid_alive(int(match.group(1)))
                            or now - item.stat(follow_symlinks=False).st_mtime > _STALE_TEMP_SECONDS
                        ):
                            os.unlink(item.path)
                    elif name.endswith(".lock") and _ENTRY_NAME.fullmatch(name[:-5]):
                        lock = _FileLock.acquire_path(item.path, blocking=False)
                        if lock is not None:
                            lock.release()
                except FileNotFoundError:
                    continue
        entries.sort()
        ledger.bytes = sum(size for _, size, _ in entries)
        ledger.items = len(entries)
        ledger.valid = True
        return entries

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[_Ledger]:
        """The ledger, locked: every change to the set of entries happens inside."""
        fd = os.open(
            os.path.join(self.path, _LEDGER_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield _Ledger(fd)
            finally:
                # Explicitly: a child forked meanwhile shares this open file, and closing
                # our descriptor would leave the lock held for as long as the child lives.
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _pread_exact(fd: int, size: int, offset: int) -> bytes | None:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    # Linux returns at most ~2 GiB per read: gather the rest.
    chunks, got = [data], len(data)
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            return None  # the file shrank under us
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
