"""Corners of streams split over ranks and DataLoader workers (found by helpers 55 and
58): a failed shard under known sizes, the rank's share split between workers in runs of
whole batches (padded for the rank, not per worker), odd shard arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ASYNCIO_BACKENDS
from test_tar_and_mix_edges import collect, write_shard

import asyncload as al
from asyncload.sources import TarShardSource
from asyncload.streaming import worker_run

pytestmark = pytest.mark.anyio
ANYIO_BACKENDS = ASYNCIO_BACKENDS[:1]


def keys(samples: list[dict[str, Any]]) -> list[str]:
    return [s["__key__"] for s in samples]


@pytest.mark.parametrize("bad", [0, 1], ids=["first", "middle"])
async def test_a_failed_shard_under_known_sizes_is_not_padded_with_repeats(
    tmp_path: Path, bad: int
) -> None:
    """One rank, three shards of 4 (samples_per_shard=4), one missing, under
    on_error="skip": the good shards' 8 samples come once each. The failed shard is one
    StreamError (one position) where 4 samples were counted, so equal_length "pads" the
    share by reading the stream again from its start: 3 good samples came twice (and a
    missing first shard was opened and counted as an error twice)."""
    good = [s for s in range(3) if s != bad]
    shards = [
        str(tmp_path / "missing.tar") if s == bad else write_shard(tmp_path / f"s{s}.tar", s, 4)
        for s in range(3)
    ]
    source = TarShardSource(shards, samples_per_shard=4)
    got = keys(await collect(al.Loader(source, batch_size=None, on_error="skip")))
    assert len(got) == len(set(got)), f"samples repeated: {got}"
    assert sorted(got) == [f"s{s}/{i:03d}" for s in good for i in range(4)]


@pytest.mark.parametrize("batch_size", [None, 2])
async def test_dataloader_workers_do_not_pad_a_single_ranks_stream(
    tmp_path: Path, batch_size: int | None
) -> None:
    """api.md: DataLoader(loader.to_torch(), num_workers=k) yields each of this rank's
    batches exactly once. One rank, 9 samples of known size, 2 workers: each worker is
    padded on its own to ceil(9 / 2) = 5, so the epoch has 10 samples (one twice) and
    more batches than len(loader). The workers' shares are taken in this process
    (Loader.for_worker, what each DataLoader worker iterates), so no processes are forked."""
    shards = [write_shard(tmp_path / f"s{s}.tar", s, 3) for s in range(3)]
    loader = al.Loader(TarShardSource(shards, samples_per_shard=3), batch_size=batch_size)
    batches = [b for w in range(2) for b in await collect(loader.for_worker(w, 2))]
    got = keys(batches) if batch_size is None else [k for b in batches for k in b["__key__"]]
    assert sorted(got) == [f"s{s}/{i:03d}" for s in range(3) for i in range(3)]
    assert len(batches) == len(loader)


def test_samples_per_shard_as_a_0d_array_or_tensor_is_one_count(tmp_path: Path) -> None:
    """One count may be a numpy integer; a 0-d array (np.load of a saved count, or
    counts.sum()) is one too, but it has __iter__, so it was iterated: TypeError
    'iteration over a 0-d array', naming neither the argument nor the problem."""
    shards = [write_shard(tmp_path / f"s{s}.tar", s, 4) for s in range(2)]
    assert TarShardSource(shards, samples_per_shard=np.array(4)).num_samples() == 8
    torch = pytest.importorskip("torch")
    assert TarShardSource(shards, samples_per_shard=torch.tensor(4)).num_samples() == 8


def test_bytes_shard_paths_are_refused_when_made(tmp_path: Path) -> None:
    """str(b"/x.tar") is "b'/x.tar'": a bytes path became a path that does not exist, and
    the run failed at the first shard with FileNotFoundError("b'/x.tar'") instead of a
    TypeError at construction (FileSource and NpySource refuse bytes)."""
    shard = write_shard(tmp_path / "s0.tar", 0, 2)
    with pytest.raises(TypeError, match="shards"):
        TarShardSource([shard.encode()])  # type: ignore[list-item]


@pytest.mark.parametrize("length", [0, 1, 7, 20, 21])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_worker_runs_tile_the_share_in_whole_batches(length: int, workers: int, batch: int) -> None:
    runs = [worker_run(length, workers, w, batch) for w in range(workers)]
    at = 0
    for offset, count in runs:
        assert offset == at  # consecutive, no gap, no overlap
        at += count
    assert at == length
    partial = [count for _, count in runs if count % batch]
    assert len(partial) <= 1  # only the share's last batch may be short
    assert sum(-(-count // batch) for _, count in runs) == -(-length // batch)


class SizedStream(al.AsyncIterableDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    async def __aiter__(self) -> Any:
        for i in range(self.n):
            yield i

    def num_samples(self) -> int:
        return self.n


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_sized_stream_under_two_dataloader_workers_yields_the_ranks_batches(
    drop_last: bool,
) -> None:
    """20 samples in batches of 4 are 5 whole batches: drop_last has nothing to drop, and
    len(loader) says 5. Under 2 DataLoader workers each worker's share (10 samples) was
    cut on its own and its incomplete tail dropped: 4 batches, samples 16-19 never seen.
    And 22 samples: 5 whole batches and 2 more, which drop_last drops once."""
    torch = pytest.importorskip("torch")
    for n in (20, 22):
        loader = al.Loader(SizedStream(n), batch_size=4, drop_last=drop_last)
        batches = list(
            torch.utils.data.DataLoader(
                loader.to_torch(), batch_size=None, num_workers=2, multiprocessing_context="fork"
            )
        )
        got = [int(x) for batch in batches for x in batch]
        expected = n - n % 4 if drop_last else n
        assert sorted(got) == list(range(expected))
        assert len(batches) == len(loader) == len(loader.to_torch_loader(num_workers=2))


def test_shard_url_schemes_in_any_case_are_urls(tmp_path: Path) -> None:
    """``FILE://`` or ``HTTP://`` was taken for a local path (and not found)."""
    shard = write_shard(tmp_path / "s0.tar", 0, 2)
    source = TarShardSource(["FILE://" + shard, "HTTP://127.0.0.1:1/a.tar"])
    assert source.shards == ["file://" + shard, "http://127.0.0.1:1/a.tar"]
