"""Caches stacked in tiers, fastest first: memory over disk over the source."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Protocol, TypedDict

from .disk_cache import DiskCache

__all__ = ["CacheTier", "TieredCache", "TieredCacheStatistics"]


class CacheTier(Protocol):
    """What a tier needs: :class:`~asyncload.LRUCache` and :class:`~asyncload.DiskCache`
    have it (``statistics()`` and ``clear()`` are used where a tier has them)."""

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[Any]]) -> Any: ...


class TieredCacheStatistics(TypedDict):
    hits: int  # lookups that some tier answered: the source was not called
    misses: int  # lookups that called the source
    hit_rate: float  # hits / (hits + misses), 0.0 before any lookup
    tiers: list[Mapping[str, Any]]  # each tier's statistics(), first tier first ({} if none)


class TieredCache:
    """Several caches in front of one source: ``TieredCache(LRUCache(...), DiskCache(...))``.

    ``get_or_load(key, load)`` asks the first tier, whose load asks the second tier, and so
    on; the last tier's load is ``load``, the source. So a hit in the first tier touches no
    other; a hit in a later tier is stored in every tier before it (promoted); a miss
    everywhere calls the source once and stores its value in every tier. Each tier keeps its
    own single flight, budget and eviction; the first tier's single flight means one
    lookup per key at a time reaches the later tiers.

    Values pass through every tier, so each must accept them: with a :class:`DiskCache`,
    the source must return bytes (put the tiers under the transform, as
    ``Loader(cache=...)`` does).

    As ``Loader(cache=...)``, the loader counts a lookup as a cache hit when the source was
    not called, whichever tier answered. Raises ``ValueError`` with no tiers or a tier given
    twice (or two DiskCaches on one directory and namespace), ``TypeError`` for a tier
    without ``get_or_load`` (or a class).
    """

    def __init__(self, *tiers: CacheTier) -> None:
        if not tiers:
            raise ValueError("TieredCache needs at least one tier")
        for i, tier in enumerate(tiers):
            if isinstance(tier, type):  # (TieredCache(al.LRUCache, ...): the () forgotten)
                raise TypeError(f"tier {i} is the class {tier.__name__}, not a cache object")
            if not callable(getattr(tier, "get_or_load", None)):
                raise TypeError(
                    f"tier {i} ({type(tier).__name__}) has no get_or_load(key, load) method"
                )
            if any(tier is other for other in tiers[:i]):
                # Its lookup would wait for its own single flight of the same key: a hang.
                raise ValueError(f"tier {i} is the same cache object as an earlier tier")
            if any(_store(tier) == _store(other) for other in tiers[:i]):
                # The same wait, on the key's lock in the directory.
                raise ValueError(
                    f"tier {i} is a DiskCache on the same directory and namespace as an "
                    "earlier tier"
                )
        self.tiers = tiers
        self._hits = self._misses = 0

    def __repr__(self) -> str:
        return f"TieredCache({', '.join(map(repr, self.tiers))})"

    async def get_or_load(self, key: Hashable, load: Callable[[], Awaitable[Any]]) -> Any:
        """The value for ``key`` from the first tier that has it, else from ``await load()``;
        stored in the tiers that missed. Errors propagate as each tier's ``get_or_load``
        raises them (a failed load is cached by none)."""
        loaded = False

        async def source() -> Any:
            nonlocal loaded
            loaded = True
            return await load()

        try:
            value = await self._ask(0, key, source)
        except BaseException:
            self._misses += loaded  # the source was called, and failed
            raise
        if loaded:
            self._misses += 1
        else:
            self._hits += 1
        return value

    def _ask(self, i: int, key: Hashable, source: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        tier = self.tiers[i]
        if i + 1 == len(self.tiers):
            return tier.get_or_load(key, source)
        return tier.get_or_load(key, lambda: self._ask(i + 1, key, source))

    def clear(self) -> None:
        """Clear every tier that has ``clear()`` (a disk tier's is blocking)."""
        for tier in self.tiers:
            clear = getattr(tier, "clear", None)
            if callable(clear):
                clear()

    def statistics(self) -> TieredCacheStatistics:
        """Source-level hits and misses (totals since construction) and each tier's own."""
        lookups = self._hits + self._misses
        tiers: list[Mapping[str, Any]] = []
        for tier in self.tiers:
            stats = getattr(tier, "statistics", None)
            tiers.append(dict(stats()) if callable(stats) else {})
        return {
            "hits": self._hits,
            "misses": self._misses,
            "hit_rate": self._hits / lookups if lookups else 0.0,
            "tiers": tiers,
        }


def _store(tier: object) -> object:
    """Where a tier keeps its entries: a DiskCache's directory and namespace."""
    if isinstance(tier, DiskCache):
        return (os.path.realpath(tier.path), tier._prefix)
    return id(tier)
