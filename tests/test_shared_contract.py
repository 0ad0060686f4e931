"""/work/shared/guide/api.md read line by line (helper-72): behaviours of the shared
contract that did not hold, since fixed. Each test names the contract line it checks."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import asyncload as al

# -- Ranks: shards that do not divide evenly ------------------------------------------------


def write_shard(path: Path, shard: int, samples: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            data = f"{shard}-{i}".encode()
            info = tarfile.TarInfo(f"s{shard}_{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def put(cache: al.LRUCache, items: dict[Any, Any]) -> None:
    """``cache.get_or_load`` each of ``items`` (its value as the load's)."""

    async def main() -> None:
        for key, value in items.items():

            async def load(value: Any = value) -> Any:
                return value

            await cache.get_or_load(key, load)

    anyio.run(main)


def rank_samples(shards: list[str], rank: int, world_size: int, drop_last: bool) -> list[bytes]:
    loader = al.Loader(
        al.sources.TarShardSource(shards),
        batch_size=None,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
    )
    return [sample["txt"] for sample in loader]


@pytest.mark.parametrize("drop_last", [False, True])
def test_uneven_tar_shards_give_every_rank_the_same_count(tmp_path: Path, drop_last: bool) -> None:
    """api.md, "Ranks: when the number of samples (or shards) does not divide evenly, every
    rank gets the same count, padded by wrapping around as torch's DistributedSampler does,
    or trimmed with drop_last=True." Three shards of 2 samples over 2 ranks: rank 0 reads
    shards 0 and 2 (4 samples), rank 1 only shard 1 (2 samples), with or without
    drop_last. DDP then waits for ever on rank 1's missing batches. Expected: 2 shards each
    (rank 1 wrapping round to shard 0), or 1 shard each with drop_last=True."""
    shards = [write_shard(tmp_path / f"{s}.tar", s, 2) for s in range(3)]
    per_rank = [rank_samples(shards, r, 2, drop_last) for r in range(2)]
    counts = [len(samples) for samples in per_rank]
    assert counts[0] == counts[1], f"ranks got {counts} samples: {per_rank}"
    assert counts[0] == (2 if drop_last else 4)


# -- LRUCache: max_bytes by the buffers ---------------------------------------------------------


def test_lru_cache_max_bytes_counts_the_buffer_a_view_holds() -> None:
    """api.md, LRUCache: "Never holds more than ... max_bytes bytes (size of bytes, numpy
    arrays and tensors by their buffers)". A view (a crop, a slice of a decoded record)
    keeps its whole buffer alive, but ``_nbytes`` counts only the view's own elements: a
    cache with max_bytes=100 holds three 10-element slices of 1000-byte buffers, 3000
    bytes of buffers, and reports bytes=30."""
    torch = pytest.importorskip("torch")
    cache = al.LRUCache(max_bytes=100)
    array_base = np.zeros(1000, np.uint8)
    tensor_base = torch.zeros(1000, dtype=torch.uint8)
    values: dict[str, Any] = {
        "array": array_base[:10],
        "tensor": tensor_base[:10],
        "strided": tensor_base[::100],
    }

    put(cache, values)

    def buffer_bytes(value: Any) -> int:
        if isinstance(value, np.ndarray):
            while isinstance(value.base, np.ndarray):
                value = value.base
            return int(value.nbytes)
        return int(value.untyped_storage().nbytes())

    held = sum(buffer_bytes(cache.get(key)) for key in values if key in cache)
    assert held <= 100, f"the cache holds {held} bytes of buffers: {cache.statistics()}"


# -- TarShardSource: the sample's entries --------------------------------------------------------


def test_tar_sample_is_its_key_and_one_bytes_entry_per_extension(tmp_path: Path) -> None:
    """api.md, TarShardSource: "each sample is a dict of "__key__" plus one entry per file
    extension, bytes values". Every sample also carried "__url__" (the shard path, a
    str), which is neither (now only with with_url=True); code that decodes every entry but "__key__" as bytes, or
    counts entries as extensions, breaks on it, and each collated batch gets a
    "__url__" list."""
    shard = write_shard(tmp_path / "a.tar", 0, 2)

    async def main() -> list[dict[str, Any]]:
        return [s async for s in al.sources.TarShardSource([shard])]

    samples = anyio.run(main)
    assert [sorted(s) for s in samples] == [["__key__", "txt"], ["__key__", "txt"]]
    assert all(isinstance(v, bytes) for s in samples for k, v in s.items() if k != "__key__")
