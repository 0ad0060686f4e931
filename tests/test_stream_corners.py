"""Corners of the streaming datasets (found by helper-52): shares with nothing of their
own padded from the whole stream, views closing what they iterate, a mix's map-style
parts under the Loader's retry and timeout, async with left by cancellation, file://
shard URLs, StratifiedSampler seeds."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import ASYNCIO_BACKENDS
from test_loader import Hanging  # indices from `free` on never answer
from test_mixing import Letters  # a sized stream that splits by the default stride
from test_tar_and_mix_edges import collect, write_shard

import asyncload as al
from asyncload.sources import TarShardSource
from asyncload.streaming import aclosing

pytestmark = pytest.mark.anyio
ANYIO_BACKENDS = ASYNCIO_BACKENDS[:1]


def open_files() -> list[str]:
    names = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # an fd closed since the listing
            names.append(os.readlink(fd))
    return names


# -- padding shares to equal lengths -----------------------------------------------------


@pytest.mark.parametrize("mixed", [False, True], ids=["stream", "mix"])
async def test_a_sized_stream_with_fewer_samples_than_ranks_pads_like_distributed_sampler(
    mixed: bool,
) -> None:
    """3 samples over 4 ranks: DistributedSampler gives each rank 1 (rank 3 wraps around
    to sample 0), as api.md promises for streams too ("padded by wrapping around"). The
    default epoch_stream (and a mix) pads each share from its own stream, and rank 3's is
    empty: its epoch fails with "this share's stream is empty; it cannot be padded". The
    same happens to a small stream under to_torch() with more workers than samples."""
    got = []
    for rank in range(4):
        dataset: al.AsyncIterableDataset[str] = Letters("a", 3)
        if mixed:
            dataset = al.mix([dataset], stop="all")
        loader = al.Loader(dataset, batch_size=None, rank=rank, world_size=4)
        assert len(loader) == 1
        got.append(await collect(loader))
    assert [len(share) for share in got] == [1, 1, 1, 1]
    assert {x for share in got for x in share} == {"a0", "a1", "a2"}


# -- closing -------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
@pytest.mark.parametrize("view", ["map", "filter"])
async def test_a_stream_view_iterated_directly_closes_its_source(tmp_path: Path, view: str) -> None:
    """``async for`` over ``source.map(fn)`` (or ``.filter``), left early and closed:
    the view iterates its source without aclosing, so the source's generator (and the
    shard file under it) is left to the garbage collector: still open after the view's
    iterator was closed (TarShardSource's own __aiter__ closes it: see
    test_iterating_a_tar_source_directly_closes_its_shard)."""
    shard = write_shard(tmp_path / "shard-0.tar", 0, 4)
    source = TarShardSource([shard])
    dataset = source.map(lambda s: s) if view == "map" else source.filter(lambda s: True)
    async with aclosing(dataset.__aiter__()) as samples:
        async for sample in samples:
            assert sample["__key__"] == "s0/000"
            break
    assert shard not in open_files()


# -- mix: map-style parts under the loader's policies ----------------------------------------


async def no_sleep(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


class FlakyOnce(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``; the first fetch of index 1 fails with a transient error."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.failed = False

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        await anyio.lowlevel.checkpoint()
        if index == 1 and not self.failed:
            self.failed = True
            raise ConnectionResetError("transient")
        return index


async def test_a_map_style_part_of_a_mix_is_retried_under_the_loaders_retry() -> None:
    """The Loader's ``retry`` applies to every fetch (api.md), and StreamEpoch carries it
    to streams; but a mix reads its map-style parts with a bare ``await dataset[i]``
    (mixing._map_share), so one transient error fails the sample (here the epoch)."""
    retry = al.Retry(attempts=3, initial_delay=0, sleep=no_sleep)
    loader = al.Loader(al.mix([FlakyOnce(4)]), batch_size=None, retry=retry)
    assert await collect(loader) == [0, 1, 2, 3]
    assert loader.statistics()["retries"] == 1


async def test_a_map_style_part_of_a_mix_is_bounded_by_the_loaders_timeout() -> None:
    """``timeout`` bounds each fetch attempt; a mix's map-style part ignores it, so one
    fetch that never answers hangs the epoch for good (guarded here by fail_after)."""
    loader = al.Loader(al.mix([Hanging(3, free=2)]), batch_size=None, timeout=0.05, on_error="skip")
    with anyio.fail_after(3):
        assert await collect(loader) == [0, 1]
    assert loader.statistics()["skipped"] == 1


# -- the loader closed under cancellation -----------------------------------------------------


class ClosingLetters(Letters):
    """A stream whose aclose() awaits (as HTTPSource's and S3Source's pools do)."""

    closed = False

    async def aclose(self) -> None:
        await anyio.lowlevel.checkpoint()
        self.closed = True


async def test_async_with_loader_left_by_cancellation_still_closes_the_dataset() -> None:
    """``async with loader`` left because the task was cancelled (a timeout around the
    training step, a task group failing): Loader.aclose() runs in the cancelled scope, its
    first await raises the cancellation, and ``await self.dataset.aclose()`` (in its
    ``finally``) is cancelled too: the dataset's connections are never released. An
    aclose() must finish its job when cancelled (shielded), as anyio's and trio's do."""
    dataset = ClosingLetters("a", 100)
    loader = al.Loader(dataset, batch_size=2)
    with anyio.CancelScope() as scope:
        async with loader:
            async for _ in loader:
                scope.cancel()
                await anyio.lowlevel.checkpoint()
    assert dataset.closed


# -- tar shards: file:// URLs ---------------------------------------------------------------


async def test_a_file_url_shard_is_percent_decoded(tmp_path: Path) -> None:
    """``file://`` shards are taken (api.md), but the URL is used as a path by removing the
    scheme only: ``Path.as_uri()`` of a path with a space or a non-ASCII letter
    (``file:///.../a%20shard%20%C3%A9.tar``) names no file, and the shard fails with
    FileNotFoundError."""
    path = tmp_path / "a shard é.tar"
    write_shard(path, 0, 2)
    samples = [s async for s in TarShardSource([path.as_uri()])]
    assert [s["__key__"] for s in samples] == ["s0/000", "s0/001"]


# -- StratifiedSampler arguments --------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 1.5])
def test_stratified_sampler_refuses_a_bad_seed_when_made(seed: Any) -> None:
    """batch_size is checked when the sampler is made, seed is not: a negative or float
    seed is taken, and every epoch then fails inside numpy ('expected non-negative
    integer', 'seed must be integer'), naming neither the sampler nor the argument."""
    with pytest.raises((ValueError, TypeError), match="seed"):
        al.StratifiedSampler([0, 1, 0, 1], 2, seed=seed)
