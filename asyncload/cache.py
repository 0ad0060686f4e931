"""An in-memory sample cache with per-key single flight and a byte budget.

Eviction runs inline on insert; there are no background tasks, and the only event-loop
objects (one ``anyio.Event`` per key being loaded) are created inside the running loop and
dropped when that load ends, so a cache can be built anywhere and used from any loop.
"""

from __future__ import annotations

import itertools
import operator
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Any, Literal, Protocol, TypedDict, TypeVar, cast

import anyio
import numpy as np

__all__ = ["CacheStatistics", "LRUCache", "Policy"]

T = TypeVar("T")
Policy = Literal["lru", "lfu", "fifo"]


class CacheStatistics(TypedDict):
    hits: int  # lookups served from the cache or from a load already in flight
    misses: int  # lookups that found neither (get_or_load then runs its load)
    evictions: int
    items: int
    bytes: int
    hit_rate: float  # hits / (hits + misses), 0.0 before any lookup
    coalesced: int  # hits that waited on another caller's load
    in_flight: int  # keys being loaded now
    load_errors: int  # loads that raised (their errors are not cached)
    uncached: int  # values larger than max_bytes alone: returned, never stored


class _EvictionPolicy(Protocol):
    """Which cached key goes first; told about every insert, hit and removal."""

    def add(self, key: Hashable) -> None: ...
    def touch(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victim(self) -> Hashable: ...


class _LRU:
    """Least recently used goes first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key: Hashable) -> None:
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def victim(self) -> Hashable:
        return next(iter(self._order))


class _FIFO(_LRU):
    """Oldest insert goes first; hits do not matter."""

    def touch(self, key: Hashable) -> None:
        pass


class _LFU:
    """Least frequently used goes first; ties go to the least recently used.

    Keys sit in per-frequency buckets (each in recency order), so every operation is O(1)
    except a removal that empties the lowest bucket.
    """

    def __init__(self) -> None:
        self._freq: dict[Hashable, int] = {}
        self._buckets: dict[int, OrderedDict[Hashable, None]] = {}
        self._min = 0

    def _link(self, key: Hashable, freq: int) -> None:
        self._freq[key] = freq
        self._buckets.setdefault(freq, OrderedDict())[key] = None

    def _unlink(self, key: Hashable) -> int:
        freq = self._freq.pop(key)
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]
        return freq

    def add(self, key: Hashable) -> None:
        self._link(key, 1)
        self._min = 1

    def touch(self, key: Hashable) -> None:
        freq = self._unlink(key)
        self._link(key, freq + 1)
        if self._min == freq and freq not in self._buckets:
            self._min = freq + 1

    def remove(self, key: Hashable) -> None:
        self._unlink(key)
        if self._min not in self._buckets:
            self._min = min(self._buckets, default=0)

    def victim(self) -> Hashable:
        return next(iter(self._buckets[self._min]))


_POLICIES: dict[str, Callable[[], _EvictionPolicy]] = {"lru": _LRU, "lfu": _LFU, "fifo": _FIFO}


def _is_torch_tensor(obj: object) -> bool:
    # By module name, so sizing a value never imports torch.
    module = type(obj).__module__
    return (module == "torch" or module.startswith("torch.")) and hasattr(obj, "element_size")


def _nbytes(obj: object, hook: Callable[[Any], int] | None, seen: set[int]) -> int:
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if _is_torch_tensor(obj):
        tensor: Any = obj
        return int(tensor.element_size() * tensor.nelement())
    if isinstance(obj, (dict, list, tuple)):
        if id(obj) in seen:  # a cycle, or the same object twice: count it once
            return 0
        seen.add(id(obj))
        parts = itertools.chain.from_iterable(obj.items()) if isinstance(obj, dict) else obj
        return sum(_nbytes(part, hook, seen) for part in parts)
    if hook is None:
        return sys.getsizeof(obj)
    size = operator.index(hook(obj))
    if size < 0:
        raise ValueError(f"sizeof returned a negative size ({size}) for {type(obj).__name__}")
    return size


def _read_only(obj: Any, busy: set[int]) -> Any:
    """``obj`` with every numpy array in it (through plain dicts, lists and tuples) replaced
    by a read-only view; containers are rebuilt only where something changed."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.writeable:
            return obj
        view = obj.view()
        view.flags.writeable = False
        return view
    kind = type(obj)
    if kind not in (dict, list, tuple) or id(obj) in busy:
        return obj
    busy.add(id(obj))
    frozen: Any
    try:
        if kind is dict:
            frozen = {k: _read_only(v, busy) for k, v in obj.items()}
            changed = any(frozen[k] is not v for k, v in obj.items())
        else:
            frozen = kind(_read_only(v, busy) for v in obj)
            changed = any(a is not b for a, b in zip(frozen, obj, strict=True))
    finally:
        busy.discard(id(obj))
    return frozen if changed else obj


class _Entry:
    __slots__ = ("size", "value")

    def __init__(self, value: Any, size: int) -> None:
        self.value = value
        self.size = size


class _Flight:
    """One load in progress, and how it ended, for the callers waiting on it."""

    __slots__ = ("done", "error", "ok", "traceback", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.ok = False
        self.value: Any = None
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {value}")
    return value


class LRUCache:
    """Cache loaded values in memory, within ``max_items`` entries and ``max_bytes`` bytes.

    `get_or_load` runs a missing key's ``load`` once however many callers ask for it at the
    same time (single flight). Either limit may be ``None`` (no limit on that measure); with
    both ``None`` the cache grows without bound.

    Sizes: ``bytes``/``bytearray`` by length, ``memoryview`` and numpy arrays by ``nbytes``,
    torch tensors by ``element_size() * nelement()``, dicts (keys and values), lists and
    tuples by the sum of their contents, anything else by ``sizeof(obj)`` when given, else
    ``sys.getsizeof``. A numpy view is counted by its own size, though it keeps its base
    alive.

    ``policy`` picks the victim when a limit is reached: ``"lru"`` (least recently used),
    ``"lfu"`` (least frequently used, ties to the least recent) or ``"fifo"`` (oldest).

    Values are shared between callers, so numpy arrays are stored and served as read-only
    views (also inside plain dicts, lists and tuples): a consumer that wants to change one in
    place must copy it first. Containers and torch tensors cannot be frozen; do not mutate
    them in place.

    Use a cache from one thread at a time. It pickles without its in-flight loads.
    Raises ``ValueError`` or ``TypeError``, naming the argument, for bad settings.
    """

    def __init__(
        self,
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        sizeof: Callable[[Any], int] | None = None,
        policy: Policy = "lru",
    ) -> None:
        self.max_items = _check_limit("max_items", max_items)
        self.max_bytes = _check_limit("max_bytes", max_bytes)
        if sizeof is not None and not callable(sizeof):
            raise TypeError(f"sizeof must be callable or None, not {type(sizeof).__name__}")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be one of {tuple(_POLICIES)}, got {policy!r}")
        self.policy: Policy = policy
        self._sizeof = sizeof
        self._policy = _POLICIES[policy]()
        self._entries: dict[Hashable, _Entry] = {}
        self._flights: dict[Hashable, _Flight] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._coalesced = self._load_errors = self._uncached = 0

    def __repr__(self) -> str:
        return (
            f"LRUCache(max_items={self.max_items}, max_bytes={self.max_bytes}, "
            f"policy={self.policy!r}, items={len(self._entries)}, bytes={self._bytes})"
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached now; does not count as a use."""
        return key in self._entries

    def __getstate__(self) -> dict[str, Any]:
        # In-flight loads belong to the event loop running them.
        state = self.__dict__.copy()
        state["_flights"] = {}
        return state

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The value cached for ``key``; on a miss, ``await load()``, cache it and return it.

        Concurrent callers for a key being loaded wait for that load and share its value.
        If ``load`` raises, nothing is cached and the error propagates to this caller and to
        every caller waiting on it (the next call loads again). If the loading caller is
        cancelled, the waiters look again and one of them runs its own ``load``. A value
        larger than ``max_bytes`` is returned but not cached. Numpy arrays come back
        read-only.
        """
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                self._hits += 1
                self._policy.touch(key)
                return cast(T, entry.value)
            flight = self._flights.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                # Restart from the loader's traceback, as asyncio.Future does, so waiters do
                # not pile their frames onto one shared exception.
                raise flight.error.with_traceback(flight.traceback)
            if flight.ok:
                self._hits += 1
                self._coalesced += 1
                return cast(T, flight.value)
            # The loading caller was cancelled: look again, and maybe load in its place.

        self._misses += 1
        flight = self._flights[key] = _Flight()
        try:
            value = _read_only(await load(), set())
            self._insert(key, value)
            flight.ok, flight.value = True, value
        except Exception as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                self._load_errors += 1
                flight.error, flight.traceback = exc, exc.__traceback__
            raise
        finally:
            del self._flights[key]
            flight.done.set()
        return cast(T, value)

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value cached for ``key`` (a use, and a hit), else ``default`` (a miss).

        Never loads and never waits for a load in flight.
        """
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return default
        self._hits += 1
        self._policy.touch(key)
        return entry.value

    def clear(self) -> None:
        """Drop every cached value. Counters are kept; loads in flight still finish and are
        cached."""
        self._entries.clear()
        self._policy = _POLICIES[self.policy]()
        self._bytes = 0

    def statistics(self) -> CacheStatistics:
        """A snapshot of the counters (totals since construction) and current contents."""
        lookups = self._hits + self._misses
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "items": len(self._entries),
            "bytes": self._bytes,
            "hit_rate": self._hits / lookups if lookups else 0.0,
            "coalesced": self._coalesced,
            "in_flight": len(self._flights),
            "load_errors": self._load_errors,
            "uncached": self._uncached,
        }

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key)
        self._policy.remove(key)
        self._bytes -= entry.size

    def _insert(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value, self._sizeof, set())
        if key in self._entries:
            self._remove(key)
        if self.max_bytes is not None and size > self.max_bytes:
            self._uncached += 1
            return
        while self._entries and (
            (self.max_items is not None and len(self._entries) >= self.max_items)
            or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
        ):
            self._remove(self._policy.victim())
            self._evictions += 1
        self._entries[key] = _Entry(value, size)
        self._policy.add(key)
        self._bytes += size
