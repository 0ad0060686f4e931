"""An in-memory sample cache with per-key single flight and a byte budget.

Eviction runs inline on insert; there are no background tasks, and the only event-loop
objects (one ``anyio.Event`` per key being loaded) are created inside the running loop and
dropped when that load ends, so a cache can be built anywhere and used from any loop.
"""

from __future__ import annotations

import itertools
import numbers
import operator
import os
import sys
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, TypedDict, TypeVar, cast

import anyio
import numpy as np

from ._redact import redact_key
from .datasets import DROPPED, AsyncDataset, _dataset_token, normalize_index
from .errors import SampleError, SampleFiltered

__all__ = ["CacheStatistics", "LRUCache", "Policy", "WarmResult", "cache_key"]

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
    load_errors: int  # loads that raised (their errors are not cached; a filter's drop is none)
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
    # Looked up, never imported: a tensor exists only once torch was. (Not by module name:
    # a subclass, torchvision's tv_tensors.Image or a user's, lives in another module.)
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _nbytes(obj: object, hook: Callable[[Any], int] | None, seen: set[object]) -> int:
    """``obj``'s size as the docstring of :class:`LRUCache` says; ``seen``: what this value
    has counted already (containers, and the buffers that views keep alive)."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, memoryview):
        return obj.nbytes
    if isinstance(obj, np.ndarray):
        return _array_bytes(obj, seen)
    if _is_torch_tensor(obj):
        return _tensor_bytes(obj, seen)
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


def _array_bytes(array: np.ndarray, seen: set[object]) -> int:
    """The memory an array keeps alive: its own bytes, or for a view (a crop, a slice of a
    decoded record) its root buffer's, once per value (a sample holding an image and its
    crops counts the image once). A view of a mapped file counts as itself: its pages are
    the file's, not memory the cache holds."""
    root: object = array
    while True:
        if isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        elif isinstance(root, memoryview):
            root = root.obj
        else:
            break
    if isinstance(root, np.ndarray):
        held = root.nbytes
    elif isinstance(root, (bytes, bytearray)):
        held = len(root)
    else:  # (an mmap, or another exporter of memory)
        return int(array.nbytes)
    if id(root) in seen:
        return 0
    seen.add(id(root))
    return int(max(array.nbytes, held))


def _tensor_bytes(tensor: Any, seen: set[object]) -> int:
    """A tensor's storage, which a view (a crop, a strided slice) keeps alive whole, once per
    value. (torch cannot tell a storage over a mapped file from memory: a tensor made by
    ``torch.from_numpy`` from a memory-mapped array counts its whole mapping; nor which
    numpy array a ``from_numpy`` storage keeps alive beyond its own extent.)"""
    own = tensor.element_size() * tensor.nelement()
    try:
        storage = tensor.untyped_storage()
        key, held = ("storage", storage.data_ptr()), storage.nbytes()
    except (NotImplementedError, RuntimeError):  # sparse and mkldnn tensors have none
        return int(own)
    if key in seen and key[1] != 0:  # (0: no memory, as meta tensors have)
        return 0
    seen.add(key)
    return int(max(own, held))


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

    async def join(self) -> bool:
        """Wait for the load to end: True when it stored ``value``, False when the loading
        caller was cancelled (look again, and maybe load in its place); its error raised."""
        await self.done.wait()
        if self.error is not None:
            # Restart from the loader's traceback, as asyncio.Future does, so waiters do
            # not pile their frames onto one shared exception.
            raise self.error.with_traceback(self.traceback)
        return self.ok


def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {value}")
    return int(value)  # (a numpy integer stored as int)


def cache_key(dataset: AsyncDataset[Any], index: int) -> Hashable:
    """The key under which sample ``index`` of ``dataset`` is cached (the Loader's and
    :meth:`LRUCache.warm`'s): ``dataset.key_of(index)`` for a source with keys (a path, a
    URL, an object key: the same in every process and run), else ``(token, index)`` with a
    random token of the dataset object, kept by its pickled copies (DataLoader workers);
    views add their part (a ``map`` or ``filter`` view its function's tag, a
    ``ConcatDataset`` the part's number), and a ``Subset`` passes its parent's key on.
    So datasets and views that share a cache never share an entry unless they hold the
    same value, and a dataset without keys never finds entries stored by another run.

    ``index`` must already be in ``range(len(dataset))`` (as the Loader's plan gives it), so
    that ``-1`` and ``len - 1`` share one entry.
    """
    get = getattr(dataset, "_cache_key", None)
    if get is not None:
        return get(index)  # type: ignore[no-any-return]
    key = dataset.key_of(index)  # a duck-typed dataset
    return (_dataset_token(dataset), index) if key is None else key


@dataclass(frozen=True)
class WarmResult:
    """What :meth:`LRUCache.warm` did. ``done`` of ``total`` samples were settled: loaded and
    cached (``warmed``), found cached already, or dropped by a filter; ``full`` says it
    stopped early because the next sample would not fit in the cache."""

    total: int
    warmed: int
    already_cached: int
    filtered: int
    bytes: int  # added to the cache by the warmed samples
    full: bool

    @property
    def done(self) -> int:
        return self.warmed + self.already_cached + self.filtered


class _Turns:
    """Lets numbered chunks commit strictly in order: ``await wait(n)`` returns once chunks
    ``0 .. n-1`` have called ``done``. One waiter per number."""

    def __init__(self) -> None:
        self._next = 0
        self._events: dict[int, anyio.Event] = {}

    async def wait(self, seq: int) -> None:
        if self._next != seq:
            event = self._events[seq] = anyio.Event()
            await event.wait()

    def done(self, seq: int) -> None:
        self._next = seq + 1
        event = self._events.pop(seq + 1, None)
        if event is not None:
            event.set()


async def _fetch_partial(dataset: AsyncDataset[Any], indices: list[int]) -> list[Any]:
    """Samples ``indices`` (``DROPPED`` where a filter says no) in one ``getitems`` call; if
    that fails, one fetch per sample, so that a failure names the sample that caused it."""
    try:
        return await dataset._getitems_partial(indices)
    except Exception as exc:
        if len(indices) == 1:
            if isinstance(exc, SampleFiltered):
                return [DROPPED]
            index, key = indices[0], dataset.key_of(indices[0])
            where = f"sample {index}" + (f" (key {redact_key(key)!r})" if key is not None else "")
            raise SampleError(
                f"warm: {where} failed: {type(exc).__name__}: {exc}", index=index, key=key
            ) from exc
    out: list[Any] = []
    for index in indices:
        out.extend(await _fetch_partial(dataset, [index]))
    return out


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class LRUCache:
    """Cache loaded values in memory, within ``max_items`` entries and ``max_bytes`` bytes.

    `get_or_load` runs a missing key's ``load`` once however many callers ask for it at the
    same time (single flight). Either limit may be ``None`` (no limit on that measure); with
    both ``None`` the cache grows without bound.

    Sizes: ``bytes``/``bytearray`` by length, ``memoryview`` by ``nbytes``, numpy arrays
    and torch tensors by the buffer they keep alive (a view, such as a crop of a decoded
    image, by its base's whole buffer or its tensor's whole storage, counted once per
    value however many views of it the value holds; a numpy view of a mapped file by its
    own ``nbytes``), dicts (keys and values), lists and tuples by the sum of their
    contents, anything else by ``sizeof(obj)`` when given, else ``sys.getsizeof``. torch
    cannot say what a storage made by ``torch.from_numpy`` keeps alive: such a tensor
    counts its own storage only (a crop of a numpy image keeps the image: copy it), and
    one over a memory-mapped array counts the whole mapping (copy rows out of it).

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
        forget_loads_when_forked(self)
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        forget_loads_when_forked(self)

    def _forget_loads(self) -> None:
        self._flights = {}

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
            if await flight.join():
                self._hits += 1
                self._coalesced += 1
                return cast(T, flight.value)

        self._misses += 1
        flight = self._flights[key] = _Flight()
        try:
            value = _read_only(await load(), set())
            self._insert(key, value)
            flight.ok, flight.value = True, value
        except Exception as exc:
            if not isinstance(exc, (anyio.get_cancelled_exc_class(), SampleFiltered)):
                self._load_errors += 1  # (a filter's drop is counted as filtered, not here)
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

    async def warm(
        self,
        dataset: AsyncDataset[Any],
        *,
        indices: Iterable[int] | None = None,
        concurrency: int = 16,
        chunk_size: int = 64,
        progress: Callable[[int, int], object] | None = None,
    ) -> WarmResult:
        """Load samples of ``dataset`` (all, or ``indices`` in that order) into this cache
        ahead of training, so that a ``Loader(dataset, cache=cache)`` finds them there.

        Each sample is stored through :meth:`get_or_load` under :func:`cache_key` (the key
        the Loader looks up), as the raw sample, before any Loader ``transform``: warm with
        the same dataset object (or an equal one) that the Loader gets. Samples already
        cached are neither loaded nor touched; samples a ``filter`` drops are counted, not
        cached. At most ``concurrency`` fetches run at once; a fetch is one ``getitems``
        call of up to ``chunk_size`` samples where the dataset batches (``ds.batched``: a
        local file source reads a chunk in one thread call), else one ``await ds[i]``. A
        fetched chunk is stored only after the chunks before it, and holds its slot until
        then, so at most ``concurrency`` chunks are held in memory outside the cache.

        Warming never evicts: it stops at the first sample (in ``indices`` order) that
        would not fit in what remains of ``max_items`` / ``max_bytes`` (or in the whole
        budget), with ``full=True``; what it stored is the samples before that one, so
        re-running it with the rest of the indices after raising the budget continues.

        ``progress(done, total)``, when given, is called (synchronously, in the event loop)
        with ``0`` first, then after each chunk with the samples settled so far, in
        increasing order; the last call has ``done == total``, or, when the cache filled
        up, the count settled before it did. Default: silent.

        Returns a :class:`WarmResult`. A sample that fails raises :class:`SampleError`
        (``index``, ``key``, the cause chained) once the fetches in flight have stopped;
        what was stored before stays cached. Raises ``IndexError``/``TypeError`` for a bad
        index and ``ValueError``/``TypeError`` for bad options, before loading anything.
        """
        if not isinstance(dataset, AsyncDataset):
            raise TypeError(
                f"warm: dataset must be an asyncload AsyncDataset, got {type(dataset).__name__}"
            )
        _check_positive("concurrency", concurrency)
        _check_positive("chunk_size", chunk_size)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be callable or None, not {type(progress).__name__}")
        n = len(dataset)
        order: Sequence[int] = (
            range(n) if indices is None else [normalize_index(i, n) for i in indices]
        )
        total = len(order)
        # Per-sample datasets fetch one at a time: a chunk would serialise its fetches.
        step = chunk_size if dataset.batched else 1
        chunks = range(0, total, step)
        next_chunk = 0
        turns = _Turns()
        warmed = already = filtered = added = 0
        full = False
        failure: Exception | None = None
        if progress is not None:
            progress(0, total)

        async def worker(scope: anyio.CancelScope) -> None:
            nonlocal next_chunk, warmed, already, filtered, added, full, failure
            try:
                while next_chunk < len(chunks):
                    # No await between the check and the claim: workers never share a chunk.
                    seq, next_chunk = next_chunk, next_chunk + 1
                    start = chunks[seq]
                    wanted = [(i, cache_key(dataset, i)) for i in order[start : start + step]]
                    missing = [(i, key) for i, key in wanted if key not in self._entries]
                    samples = (
                        await _fetch_partial(dataset, [i for i, _ in missing]) if missing else []
                    )
                    # Commit in chunk order: the stored samples are a prefix of ``order`` and
                    # progress counts only grow.
                    await turns.wait(seq)
                    already += len(wanted) - len(missing)
                    for (_, key), sample in zip(missing, samples, strict=True):
                        if sample is DROPPED:
                            filtered += 1
                            continue
                        if key in self._entries:  # a duplicate index, or cached meanwhile
                            already += 1
                            continue
                        size = _nbytes(sample, self._sizeof, set())
                        if not self._fits(size):
                            full = True
                            scope.cancel()
                            if progress is not None:
                                progress(warmed + already + filtered, total)
                            return
                        stored = False

                        async def load(value: Any = sample) -> Any:
                            nonlocal stored
                            stored = True
                            return value

                        await self.get_or_load(key, load)
                        if stored:
                            warmed += 1
                            added += size
                        else:  # another caller's load of this key got there first
                            already += 1
                    if progress is not None:
                        progress(warmed + already + filtered, total)
                    turns.done(seq)
            except Exception as exc:
                # Raised after the task group, as itself: not wrapped in an exception group.
                if failure is None:
                    failure = exc
                scope.cancel()

        async with anyio.create_task_group() as tg:
            for _ in range(min(concurrency, len(chunks))):
                tg.start_soon(worker, tg.cancel_scope)
        if failure is not None:
            raise failure
        return WarmResult(
            total=total,
            warmed=warmed,
            already_cached=already,
            filtered=filtered,
            bytes=added,
            full=full,
        )

    def _fits(self, size: int) -> bool:
        """Whether one more entry of ``size`` bytes fits without evicting anything."""
        if self.max_items is not None and len(self._entries) >= self.max_items:
            return False
        return self.max_bytes is None or self._bytes + size <= self.max_bytes

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


# A forked child (a DataLoader worker, fork being the default on Linux) gets each cache as
# it was, loads in flight included: nothing there would ever finish them, so they go.
_FORKED_FORGET: weakref.WeakSet[Any] = weakref.WeakSet()


def forget_loads_when_forked(cache: Any) -> None:
    """Have ``cache._forget_loads()`` called in every child this process forks."""
    _FORKED_FORGET.add(cache)


def _forget_loads_in_child() -> None:
    for cache in _FORKED_FORGET:
        cache._forget_loads()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loads_in_child)
