"""Caches in front of a real HTTP server (conftest's ``http_server``), counted by the server.

- a cache large enough makes the second epoch send zero requests, with the same batches;
- memory over disk does too, and so does a restarted run (new loader, new memory tier)
  over the same disk directory;
- a cache too small for the epoch: the requests the server sees are exactly the misses the
  cache and the loader report;
- single flight: a key that appears many times in one epoch is requested once, also while
  its first request is still in flight.

aiohttp runs on asyncio only: these tests run on asyncio and uvloop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import ASYNCIO_BACKENDS, HTTPServer, sample_body

import asyncload as al
from asyncload.sources import HTTPSource

pytestmark = pytest.mark.anyio

N = 24


ANYIO_BACKENDS = ASYNCIO_BACKENDS


def sample_urls(server: HTTPServer, n: int = N) -> list[str]:
    return [server.url(f"/sample/{i}") for i in range(n)]


def total_bytes(n: int = N) -> int:
    return sum(len(sample_body(i)) for i in range(n))


async def run_epoch(loader: al.Loader) -> list[list[bytes]]:
    return [batch async for batch in loader]


def flat(batches: list[list[bytes]]) -> list[bytes]:
    return [sample for batch in batches for sample in batch]


def hits_misses(loader: al.Loader) -> tuple[int, int]:
    stats = loader.statistics()  # counts of the current (last) epoch
    return stats["cache_hits"], stats["cache_misses"]


# -- a cache large enough: the second epoch sends nothing ----------------------------------


async def test_memory_cache_second_epoch_sends_zero_requests(http_server: HTTPServer) -> None:
    # A byte budget of exactly the data: everything fits, nothing is evicted.
    cache = al.LRUCache(max_bytes=total_bytes())
    loader = al.Loader(HTTPSource(sample_urls(http_server)), batch_size=5, cache=cache)

    first = await run_epoch(loader)
    assert flat(first) == [sample_body(i) for i in range(N)]
    assert http_server.total == N
    assert all(http_server.count(f"/sample/{i}") == 1 for i in range(N))
    assert hits_misses(loader) == (0, N)

    second = await run_epoch(loader)
    assert second == first
    assert http_server.total == N  # zero requests in epoch 2
    assert hits_misses(loader) == (N, 0)

    # Another order (a shuffled epoch) is served from the cache too.
    shuffled = al.Loader(
        loader.dataset, batch_size=5, cache=cache, shuffle=True, seed=1, concurrency=4
    )
    third = flat(await run_epoch(shuffled))
    assert third != flat(first) and sorted(third) == sorted(flat(first))
    assert http_server.total == N
    assert hits_misses(shuffled) == (N, 0)

    stats = cache.statistics()
    assert (stats["items"], stats["bytes"], stats["evictions"]) == (N, total_bytes(), 0)
    assert (stats["hits"], stats["misses"]) == (2 * N, N)
    await loader.aclose()
    await shuffled.aclose()


async def test_memory_over_disk_second_epoch_and_restarted_run_send_zero_requests(
    http_server: HTTPServer, tmp_path: Path
) -> None:
    def build() -> tuple[al.Loader, al.TieredCache]:
        tiers = al.TieredCache(
            al.LRUCache(max_bytes=total_bytes()), al.DiskCache(tmp_path, max_bytes=1 << 20)
        )
        loader = al.Loader(
            HTTPSource(sample_urls(http_server)), batch_size=5, concurrency=6, cache=tiers
        )
        return loader, tiers

    loader, tiers = build()
    first = await run_epoch(loader)
    assert flat(first) == [sample_body(i) for i in range(N)]
    assert http_server.total == N
    second = await run_epoch(loader)
    assert second == first
    assert http_server.total == N  # zero requests in epoch 2
    assert hits_misses(loader) == (N, 0)
    memory, disk = tiers.statistics()["tiers"]
    assert (memory["hits"], memory["misses"]) == (N, N)  # epoch 2 never reached the disk
    assert (disk["hits"], disk["misses"], disk["items"]) == (0, N, N)
    await loader.aclose()

    # A restarted run: new source, loader, memory tier and DiskCache over the same directory.
    loader, tiers = build()
    restarted = await run_epoch(loader)
    await loader.aclose()
    assert restarted == first
    assert http_server.total == N  # zero requests: the disk tier answered everything
    assert hits_misses(loader) == (N, 0)
    stats = tiers.statistics()
    assert (stats["hits"], stats["misses"]) == (N, 0)
    memory, disk = stats["tiers"]
    assert (memory["misses"], memory["items"]) == (N, N)  # promoted into the new memory tier
    assert (disk["hits"], disk["misses"], disk["corrupt"]) == (N, 0, 0)


# -- a cache too small: requests == misses, as every counter tells it ----------------------


def small_cache(kind: str, tmp_path: Path) -> tuple[Any, Callable[[], tuple[int, int]]]:
    """A cache that holds well under half of the epoch, and a function that returns its
    source-level ``(hits, misses)`` totals."""
    budget = total_bytes() * 2 // 5
    if kind == "memory-over-disk":
        disk = al.DiskCache(tmp_path, max_bytes=budget + 64 * N)  # entries carry a key and header
        tiers = al.TieredCache(al.LRUCache(max_items=N // 4), disk)

        def tiered_counts() -> tuple[int, int]:
            stats = tiers.statistics()
            # What the disk tier missed is what the source was asked for.
            assert stats["misses"] == stats["tiers"][1]["misses"]
            return stats["hits"], stats["misses"]

        return tiers, tiered_counts
    cache = al.LRUCache(max_bytes=budget, policy=kind)  # type: ignore[arg-type]

    def counts() -> tuple[int, int]:
        stats = cache.statistics()
        assert stats["bytes"] <= budget
        return stats["hits"], stats["misses"]

    return cache, counts


@pytest.mark.parametrize("kind", ["lru", "lfu", "fifo", "memory-over-disk"])
async def test_too_small_cache_requests_equal_reported_misses(
    http_server: HTTPServer, tmp_path: Path, kind: str
) -> None:
    cache, counts = small_cache(kind, tmp_path)
    loader = al.Loader(
        HTTPSource(sample_urls(http_server)),
        batch_size=4,
        concurrency=4,
        shuffle=True,
        cache=cache,
    )
    first = flat(await run_epoch(loader))
    assert sorted(first) == sorted(sample_body(i) for i in range(N))
    assert http_server.total == N
    assert hits_misses(loader) == (0, N)
    assert counts() == (0, N)

    loader.set_epoch(1)  # another order, so that some of what the cache kept is asked for
    second = flat(await run_epoch(loader))
    assert sorted(second) == sorted(first)
    requests = http_server.total - N
    hits, misses = hits_misses(loader)
    cache_hits, cache_misses = counts()
    assert hits + misses == N
    assert (cache_hits, cache_misses - N) == (hits, misses)
    assert requests == misses
    assert misses > 0  # it cannot hold the epoch
    # No key was requested twice within an epoch: each at most once per epoch.
    assert all(http_server.count(f"/sample/{i}") in (1, 2) for i in range(N))
    assert sum(http_server.count(f"/sample/{i}") == 2 for i in range(N)) == misses
    await loader.aclose()


# -- single flight over HTTP -----------------------------------------------------------------


def first_tier(cache: Any) -> dict[str, Any]:
    stats = dict(cache.statistics())
    return dict(stats["tiers"][0]) if "tiers" in stats else stats


@pytest.mark.parametrize("kind", ["memory", "disk", "memory-over-disk"])
async def test_repeated_keys_are_requested_once_per_key(
    http_server: HTTPServer, tmp_path: Path, kind: str
) -> None:
    # Sixteen samples, two keys: a dataset whose keys repeat (HTTPSource keys by URL).
    urls = [http_server.url(f"/gate/{i % 2}") for i in range(16)]
    memory = al.LRUCache(max_items=4)
    disk = al.DiskCache(tmp_path, max_bytes=1 << 16)
    cache: Any = {"memory": memory, "disk": disk, "memory-over-disk": al.TieredCache(memory, disk)}
    cache = cache[kind]
    loader = al.Loader(HTTPSource(urls), batch_size=4, concurrency=8, prefetch=4, cache=cache)
    got: list[bytes] = []

    async def consume() -> None:
        async for batch in loader:
            got.extend(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        # Both keys' first requests are at the server, held there; every other fetch in
        # flight has found its key being loaded and waits on that load.
        await anyio.to_thread.run_sync(http_server.wait_arrived, 2)
        await anyio.wait_all_tasks_blocked()
        waiting = loader.statistics()["in_flight"] - 2
        assert waiting > 0
        assert first_tier(cache)["in_flight"] == 2
        assert len(http_server.arrived) == 2
        http_server.release_all()
    await loader.aclose()

    assert got == [sample_body(i % 2) for i in range(16)]
    assert (http_server.count("/gate/0"), http_server.count("/gate/1")) == (1, 1)
    assert http_server.total == 2
    assert hits_misses(loader) == (14, 2)
    stats = first_tier(cache)
    assert (stats["hits"], stats["misses"]) == (14, 2)
    # Those waiters shared the two loads (and fetches started after the release may have
    # joined them too, before the responses were read).
    assert stats["coalesced"] >= waiting


# -- credentials in URLs ------------------------------------------------------------------


async def test_a_disk_cache_never_writes_a_urls_credentials(
    http_server: HTTPServer, tmp_path: Path
) -> None:
    """The entry files hold each key: a URL's ``user:password@`` must not be among them.
    The same URL with other credentials is the same object: one entry."""

    def with_credentials(user: str) -> list[str]:
        return [
            u.replace("://", f"://{user}:s3cret-{user}@", 1) for u in sample_urls(http_server, 4)
        ]

    cache = al.DiskCache(tmp_path / "cache", max_bytes=1 << 20)
    first = al.Loader(HTTPSource(with_credentials("ann")), batch_size=4, cache=cache)
    assert flat(await run_epoch(first)) == [sample_body(i) for i in range(4)]
    await first.aclose()
    assert http_server.total == 4
    second = al.Loader(HTTPSource(with_credentials("bob")), batch_size=4, cache=cache)
    assert flat(await run_epoch(second)) == [sample_body(i) for i in range(4)]
    await second.aclose()
    assert http_server.total == 4  # served from the first's entries
    written = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert b"/sample/3" in written  # (the keys are there...)
    assert b"s3cret" not in written and b"ann:" not in written  # (...without credentials)
