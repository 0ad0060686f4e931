"""Streams split over ranks inside a mix (stream parts and sized tar parts: every sample
once), pax size records, and tar parsers closed when a piece or an iterator stops early."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any

import pytest
from test_mixing import Letters  # a stream that splits by the default stride

import asyncload as al
from asyncload.sources import TarShardSource
from asyncload.streaming import aclosing

pytestmark = pytest.mark.anyio


async def collect(loader: al.Loader) -> list[Any]:
    async with loader:
        return [x async for x in loader]


def write_shard(path: Path, shard: int, samples: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(samples):
            data = f"{shard}-{i}".encode()
            info = tarfile.TarInfo(f"s{shard}/{i:03d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


# -- mix(stop="all") over ranks ------------------------------------------------------------


async def test_mix_all_of_streams_over_ranks_reads_every_sample_once() -> None:
    """Two streams of 3 over 2 ranks: 6 samples, 3 per rank, each sample once. Each part
    is strided on its own (a0 a2 | a1, b0 b2 | b1), so rank 0 has 4 and rank 1 has 2;
    equal_length then cuts rank 0 to 3 (a sample lost) and pads rank 1 (a repeat)."""
    got = []
    for rank in range(2):
        mixed = al.mix([Letters("a", 3), Letters("b", 3)], stop="all")
        loader = al.Loader(mixed, batch_size=None, rank=rank, world_size=2)
        got.append(await collect(loader))
    assert [len(share) for share in got] == [3, 3]
    assert sorted(got[0] + got[1]) == ["a0", "a1", "a2", "b0", "b1", "b2"]


async def test_mix_all_of_tar_shards_with_known_sizes_over_ranks(tmp_path: Path) -> None:
    """Three shards of 4 samples (samples_per_shard given) in a mix over 2 ranks: 6 per
    rank, every sample once. The mix hands the part a spec with length=None, so the tar
    source deals whole shards (2 to rank 0, 1 to rank 1) and equal_length drops 2 samples
    of rank 0 and repeats 2 on rank 1."""
    shards = [write_shard(tmp_path / f"shard-{s}.tar", s, 4) for s in range(3)]
    got = []
    for rank in range(2):
        source = TarShardSource(shards, samples_per_shard=4)
        loader = al.Loader(al.mix([source], stop="all"), batch_size=None, rank=rank, world_size=2)
        got.append([sample["__key__"] for sample in await collect(loader)])
    assert [len(share) for share in got] == [6, 6]
    assert sorted(got[0] + got[1]) == [f"s{s}/{i:03d}" for s in range(3) for i in range(4)]


# -- tar parsing ---------------------------------------------------------------------------


async def test_pax_size_record_is_honoured(tmp_path: Path) -> None:
    """A pax ``size`` record overrides the ustar size field: that is how tarfile, GNU tar
    (--format=posix) and bsdtar store a member of 8 GiB or more (ustar field 0, real size in
    the pax header). The parser ignores it, reads 0 bytes of payload, then parses the
    payload as a header: the shard fails instead of the member being read (or, past
    max_member_bytes, refused as one sample error while the rest of the shard goes on)."""
    info = tarfile.TarInfo("k0.bin")
    info.size = 0  # as tarfile writes the ustar field when the size needs a pax record
    info.pax_headers = {"size": "2000"}
    raw = info.tobuf(tarfile.PAX_FORMAT) + b"P" * 2000 + bytes(-2000 % 512)
    rest = io.BytesIO()
    with tarfile.open(fileobj=rest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tail = tarfile.TarInfo("k1.txt")
        tail.size = 3
        tar.addfile(tail, io.BytesIO(b"abc"))
    path = tmp_path / "pax-size.tar"
    path.write_bytes(raw + rest.getvalue())
    with tarfile.open(path) as tar:  # the standard library's reading, for reference
        assert [(m.name, m.size) for m in tar] == [("k0.bin", 2000), ("k1.txt", 3)]

    got = await collect(al.Loader(TarShardSource([str(path)]), batch_size=None))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in got] == [
        ("k0", ["bin"]),
        ("k1", ["txt"]),
    ]
    assert got[0]["bin"] == b"P" * 2000

    # Over max_member_bytes: one sample error, and the rest of the shard still comes.
    loader = al.Loader(
        TarShardSource([str(path)], max_member_bytes=1000), batch_size=None, on_error="skip"
    )
    assert [s["__key__"] for s in await collect(loader)] == ["k1"]


# -- generators left for the garbage collector ----------------------------------------------


def unclosed_generator_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and "garbage collected" in str(w.message)
    ]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_piece_that_stops_mid_shard_closes_its_member_parser(
    tmp_path: Path, anyio_backend: str
) -> None:
    """With samples_per_shard, a shard on a share boundary is read in part: _shard_items
    returns at ``stop`` and closes iter_samples, but never the iter_members generator under
    it (not wrapped in aclosing), which is left to the garbage collector; trio reports each
    such generator with a ResourceWarning (an error under this project's -W error)."""
    shards = [write_shard(tmp_path / f"shard-{s}.tar", s, 4) for s in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rank in range(2):  # 12 samples, 6 a rank: shard 1 is split between them
            loader = al.Loader(
                TarShardSource(shards, samples_per_shard=4),
                batch_size=None,
                rank=rank,
                world_size=2,
            )
            assert len(await collect(loader)) == 6
        gc.collect()
    assert unclosed_generator_warnings(caught) == []


def open_files() -> list[str]:
    fds = Path("/proc/self/fd")
    names = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # an fd closed since the listing
            names.append(os.readlink(fd))
    return names


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_iterating_a_tar_source_directly_closes_its_shard(tmp_path: Path) -> None:
    """``async for sample in source`` left early and closed (aclosing): TarShardSource's
    __aiter__ iterates its epoch stream without aclosing (MixedDataset's __aiter__ does),
    so that stream, and the shard file open under it, are left to the garbage collector's
    async-generator hook: the file is still open when the iterator has been closed (and
    trio warns that the generator was never closed)."""
    shard = write_shard(tmp_path / "shard-0.tar", 0, 4)
    async with aclosing(TarShardSource([shard]).__aiter__()) as samples:
        async for sample in samples:
            assert sample["__key__"] == "s0/000"
            assert shard in open_files()
            break
    assert shard not in open_files()
