"""TarShardSource: WebDataset-layout shards from local files and a real HTTP server, split
across ranks and workers, shuffled reproducibly, resumed exactly, and robust to truncated
shards, unsafe member names and failed reads.

Shards are written with the standard library's tarfile (ustar, GNU and pax formats).
"""

from __future__ import annotations

import bz2
import gzip
import io
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from aiohttp import web
from conftest import ASYNCIO_BACKENDS, HTTPServer

import asyncload as al
from asyncload.sources import TarShardSource

pytestmark = pytest.mark.anyio


async def no_sleep(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


def member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, shard: int, samples: int, fmt: int = tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(samples):
            key = f"s{shard:02d}/{i:04d}"
            member(tar, f"{key}.txt", f"shard {shard} sample {i}".encode())
            member(tar, f"{key}.cls", str((shard * 7 + i) % 10).encode())
            member(tar, f"{key}.bin", bytes([shard, i % 256]) * (100 + i))


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    """Four shards of 5, 6, 7 and 8 samples."""
    paths = []
    for shard, n in enumerate((5, 6, 7, 8)):
        path = tmp_path / f"shard-{shard}.tar"
        write_shard(path, shard, n)
        paths.append(str(path))
    return paths


def rewrite(path: str, suffix: str, change: Callable[[bytes], bytes]) -> str:
    """A copy of the file at ``path``, changed, at ``path + suffix``."""
    Path(path + suffix).write_bytes(change(Path(path).read_bytes()))
    return path + suffix


def keys(samples: list[dict[str, Any]]) -> list[str]:
    return [s["__key__"] for s in samples]


ALL_KEYS = [f"s{shard:02d}/{i:04d}" for shard, n in enumerate((5, 6, 7, 8)) for i in range(n)]


async def collect(loader: al.Loader) -> list[dict[str, Any]]:
    async with loader:
        return [sample async for sample in loader]


# -- reading -------------------------------------------------------------------------------


async def test_samples_are_grouped_by_key(shards: list[str]) -> None:
    """The shared contract: "__key__" plus one bytes entry per extension; "__url__" (the
    shard, as WebDataset gives it) only with with_url=True."""
    got = [s async for s in TarShardSource(shards)]
    assert keys(got) == ALL_KEYS
    first = got[0]
    assert set(first) == {"__key__", "txt", "cls", "bin"}
    assert first["txt"] == b"shard 0 sample 0"
    assert first["bin"] == bytes([0, 0]) * 100
    with_url = [s async for s in TarShardSource(shards, with_url=True)]
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in with_url] == got
    assert [s["__url__"] for s in with_url[:6]] == [shards[0]] * 5 + [shards[1]]
    with pytest.raises(TypeError, match="with_url must be True or False"):
        TarShardSource(shards, with_url="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
async def test_long_names(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "long.tar"
    long_key = "d" * 90 + "/" + "k" * 120
    with tarfile.open(path, "w", format=fmt) as tar:
        member(tar, f"{long_key}.txt", b"long")
        member(tar, "short.txt", b"short")
    got = [s async for s in TarShardSource([str(path)])]
    assert [(s["__key__"], s["txt"]) for s in got] == [(long_key, b"long"), ("short", b"short")]


async def test_pax_names_that_are_not_utf8(tmp_path: Path) -> None:
    """GNU tar --format=posix writes such names with hdrcharset=BINARY; they are read as
    the ustar fields are, with surrogates, not as a failure of the whole shard."""
    path = tmp_path / "latin1.tar"
    with tarfile.open(
        path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        member(tar, "caf\udce9.jpg", b"j")
        member(tar, "caf\udce9.cls", b"c")
        member(tar, "ok.jpg", b"ok")
    got = [s async for s in TarShardSource([str(path)])]
    assert [(s["__key__"], sorted(s)[:2]) for s in got] == [
        ("caf\udce9", ["__key__", "cls"]),
        ("ok", ["__key__", "jpg"]),
    ]
    assert got[0]["jpg"] == b"j" and got[0]["cls"] == b"c"


@pytest.mark.parametrize("chunk_size", [1, 1 << 20])
async def test_gzip_shards_are_decompressed(shards: list[str], chunk_size: int) -> None:
    """.tar.gz, recognised by gzip's magic number (split over two chunks at chunk_size=1);
    a shard written as two gzip members (cat a.gz b.gz) reads as one."""
    plain = [s async for s in TarShardSource([shards[1]])]
    one = rewrite(shards[1], ".gz", gzip.compress)
    two = rewrite(shards[1], ".2.gz", lambda b: gzip.compress(b[:5000]) + gzip.compress(b[5000:]))
    for path in (one, two):
        got = [s async for s in TarShardSource([path], chunk_size=chunk_size)]
        assert got == plain
        assert keys(got) == [k for k in ALL_KEYS if k.startswith("s01")]


async def test_a_cut_or_corrupt_gzip_shard(shards: list[str]) -> None:
    cut = rewrite(shards[1], ".cut.gz", lambda b: gzip.compress(b)[: len(gzip.compress(b)) // 2])
    with pytest.raises(al.TruncatedBodyError, match="gzip stream ends early"):
        _ = [s async for s in TarShardSource([cut])]
    corrupt = rewrite(shards[1], ".bad.gz", lambda b: gzip.compress(b)[:20] + bytes(500))
    with pytest.raises(tarfile.ReadError, match="corrupt gzip data") as info:
        _ = [s async for s in TarShardSource([corrupt])]
    assert not al.resilience.is_transient(info.value)  # no retries of a broken file


async def test_other_compressions_are_named(tmp_path: Path, shards: list[str]) -> None:
    """Not retried as a transient short read, and not a puzzling bad header."""
    small = tmp_path / "small.tar"
    with tarfile.open(small, "w") as tar:
        member(tar, "a.txt", b"a")
    for shard in (str(small), shards[1]):  # smaller than a header once compressed, larger
        path = rewrite(shard, ".bz2", bz2.compress)
        with pytest.raises(tarfile.ReadError, match="bzip2-compressed"):
            _ = [s async for s in TarShardSource([path])]
    named = tmp_path / "named.tar"
    with tarfile.open(named, "w") as tar:
        member(tar, "BZh.txt", b"a plain tar that starts like bzip2")
    assert len([s async for s in TarShardSource([str(named)])]) == 1


async def test_a_bad_header_names_the_shard_and_offset(shards: list[str]) -> None:
    """Iterated directly, a shard that fails raises its error; the message must say which
    of the shards is broken, and where."""
    # The checksum of the second member's header.
    bad = rewrite(shards[1], ".bad", lambda b: b[:1172] + bytes([b[1172] ^ 1]) + b[1173:])
    with pytest.raises(tarfile.HeaderError) as info:
        _ = [s async for s in TarShardSource([shards[0], bad, shards[2]])]
    assert str(info.value) == f"{bad}: bad checksum in the tar header at offset 1024"


async def test_a_hard_link_in_its_own_sample_is_resolved(tmp_path: Path) -> None:
    path = tmp_path / "linked.tar"
    with tarfile.open(path, "w") as tar:
        member(tar, "a.jpg", b"JPEG")
        link = tarfile.TarInfo("a.orig.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "./a.jpg"
        tar.addfile(link)
        member(tar, "b.jpg", b"B")
    got = [s async for s in TarShardSource([str(path)])]
    assert [(s["__key__"], s.get("jpg"), s.get("orig.jpg")) for s in got] == [
        ("a", b"JPEG", b"JPEG"),
        ("b", b"B", None),
    ]


async def test_a_hard_link_to_another_sample_is_an_error(tmp_path: Path) -> None:
    """`tar cf` stores a second name of a file as a link to the first: its data went out
    with an earlier sample and is not kept, so the sample fails, naming the member,
    instead of coming without that field."""
    path = tmp_path / "linked.tar"
    with tarfile.open(path, "w") as tar:
        member(tar, "a.cls", b"0")
        member(tar, "a.jpg", b"JPEG")
        member(tar, "c.cls", b"1")
        link = tarfile.TarInfo("c.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "a.jpg"
        tar.addfile(link)
        member(tar, "d.cls", b"2")
    loader = al.Loader(TarShardSource([str(path)]), batch_size=None, on_error="skip")
    assert keys(await collect(loader)) == ["a", "d"]
    (error,) = loader.statistics()["error_log"]
    assert error["key"] == f"{path}#c.jpg"
    assert "hard link to 'a.jpg'" in error["error"]


async def test_loader_yields_every_sample_once(shards: list[str]) -> None:
    loader = al.Loader(TarShardSource(shards), batch_size=None)
    assert keys(await collect(loader)) == ALL_KEYS


async def test_prefetching_keeps_the_order(shards: list[str]) -> None:
    one = await collect(al.Loader(TarShardSource(shards, prefetch_shards=1), batch_size=None))
    four = await collect(al.Loader(TarShardSource(shards, prefetch_shards=4), batch_size=None))
    assert keys(one) == keys(four) == ALL_KEYS


async def test_batches_collate_bytes_into_lists(shards: list[str]) -> None:
    loader = al.Loader(TarShardSource(shards), batch_size=4)
    batches = await collect(loader)
    assert batches[0]["__key__"] == ALL_KEYS[:4]
    assert batches[0]["txt"][1] == b"shard 0 sample 1"
    assert sum(len(b["__key__"]) for b in batches) == len(ALL_KEYS)


# -- shuffling, ranks, equal lengths ------------------------------------------------------------


async def test_shuffle_is_a_reproducible_permutation(shards: list[str]) -> None:
    def loader(epoch: int) -> al.Loader:
        result = al.Loader(
            TarShardSource(shards), batch_size=None, shuffle=True, seed=3, shuffle_buffer=8
        )
        result.set_epoch(epoch)
        return result

    a, again, other = [keys(await collect(loader(e))) for e in (0, 0, 1)]
    assert sorted(a) == sorted(ALL_KEYS)
    assert a != ALL_KEYS
    assert a == again
    assert other != a


async def test_ranks_read_disjoint_shards(shards: list[str]) -> None:
    parts = [
        keys(
            await collect(al.Loader(TarShardSource(shards), batch_size=None, rank=r, world_size=2))
        )
        for r in range(2)
    ]
    # Rank 0 reads shards 0 and 2, rank 1 shards 1 and 3: each sample once in the world.
    assert parts[0] == [k for k in ALL_KEYS if k[1:3] in ("00", "02")]
    assert parts[1] == [k for k in ALL_KEYS if k[1:3] in ("01", "03")]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
async def test_known_sizes_give_every_rank_the_same_count(
    shards: list[str], drop_last: bool, shuffle: bool
) -> None:
    """26 samples in uneven shards over 3 ranks: 9 each (the last rank wraps around to
    pad), or 8 each with drop_last; each sample read by one rank; DDP never waits."""
    per_rank = 8 if drop_last else 9
    got: list[list[str]] = []
    for rank in range(3):
        loader = al.Loader(
            TarShardSource(shards, samples_per_shard=[5, 6, 7, 8]),
            batch_size=2,
            rank=rank,
            world_size=3,
            drop_last=drop_last,
            shuffle=shuffle,
            seed=4,
            shuffle_buffer=4,
        )
        batches = await collect(loader)
        assert len(batches) == len(loader)
        got.append([k for b in batches for k in b["__key__"]])
    assert [len(keys) for keys in got] == [per_rank] * 3
    everything = [k for keys in got for k in keys]
    if drop_last:
        assert len(set(everything)) == 24  # 2 samples left out, none twice
    else:
        assert set(everything) == set(ALL_KEYS)  # all read, 1 padded repeat
        assert len(everything) - len(set(everything)) == 1


async def test_more_ranks_than_shards_pad_by_wrapping_around(shards: list[str]) -> None:
    """Without known sizes, 2 shards over 3 ranks: every rank reads one shard, the third
    the first again (the shared contract: padded by wrapping around, as DistributedSampler
    pads; a rank reading nothing left the others waiting in DDP). With drop_last, the
    order is trimmed to a multiple of the ranks: here, nothing."""
    got = []
    for rank in range(3):
        loader = al.Loader(TarShardSource(shards[:2]), batch_size=None, rank=rank, world_size=3)
        got.append(keys(await collect(loader)))
    assert [len(k) for k in got] == [5, 6, 5]
    assert got[2] == got[0]
    assert sorted(set(k for keys_ in got for k in keys_)) == ALL_KEYS[:11]
    for rank in range(3):
        loader = al.Loader(
            TarShardSource(shards[:2]), batch_size=None, rank=rank, world_size=3, drop_last=True
        )
        assert keys(await collect(loader)) == []


async def test_uneven_shards_over_ranks_and_workers_in_one_process(shards: list[str]) -> None:
    """3 shards over 2 ranks of 2 workers (as their shares, in one process): each rank
    reads 2 shards (the first again on rank 1), split between its workers."""
    read: list[list[str]] = []
    for rank in range(2):
        rank_keys: list[str] = []
        for worker in range(2):
            loader = al.Loader(TarShardSource(shards[:3]), batch_size=None, rank=rank, world_size=2)
            rank_keys += keys(await collect(loader.for_worker(worker, 2)))
        read.append(rank_keys)
    shard_sizes = [5, 6, 7]
    assert [len(k) for k in read] == [5 + 7, 6 + 5]
    assert sorted(set(read[0]) | set(read[1])) == ALL_KEYS[: sum(shard_sizes)]


async def test_samples_per_shard_splits_a_shard_between_shares(shards: list[str]) -> None:
    """Shard 1 (6 samples) spans the boundary between rank 0 (samples 0-12) and rank 1."""
    parts = []
    for rank in range(2):
        loader = al.Loader(
            TarShardSource(shards, samples_per_shard=[5, 6, 7, 8]),
            batch_size=None,
            rank=rank,
            world_size=2,
        )
        parts.append(keys(await collect(loader)))
    assert parts[0] == ALL_KEYS[:13]
    assert parts[1] == ALL_KEYS[13:]


async def test_workers_split_shards_under_torch(shards: list[str]) -> None:
    torch = pytest.importorskip("torch")
    loader = al.Loader(TarShardSource(shards), batch_size=None)
    dl = torch.utils.data.DataLoader(loader.to_torch(), batch_size=None, num_workers=2)
    got = await anyio.to_thread.run_sync(lambda: [s["__key__"] for s in dl])
    assert sorted(got) == sorted(ALL_KEYS)


async def test_resume_mid_epoch_yields_exactly_the_rest(shards: list[str]) -> None:
    def build() -> al.Loader:
        return al.Loader(
            TarShardSource(shards), batch_size=3, shuffle=True, seed=5, shuffle_buffer=6
        )

    full = [k for b in await collect(build()) for k in b["__key__"]]
    first = build()
    seen: list[str] = []
    async with first:
        async for batch in first:
            seen += batch["__key__"]
            if len(seen) >= 9:
                break
        state = first.state_dict()
    second = build()
    second.load_state_dict(state)
    rest = [k for b in await collect(second) for k in b["__key__"]]
    assert seen + rest == full


# -- faults ---------------------------------------------------------------------------------


@pytest.fixture
def cut_shard(shards: list[str], tmp_path: Path) -> str:
    """Shard 1 cut off half-way."""
    data = Path(shards[1]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    return str(cut)


async def test_truncated_shard_is_a_sample_error(shards: list[str], cut_shard: str) -> None:
    cut = cut_shard
    source = TarShardSource([shards[0], str(cut), shards[2]])
    with pytest.raises(al.SampleError) as info:
        await collect(al.Loader(source, batch_size=None))
    assert isinstance(info.value.__cause__, al.TruncatedBodyError)
    assert str(cut) in str(info.value)

    skipping = al.Loader(source, batch_size=None, on_error="skip")
    got = keys(await collect(skipping))
    # Shard 0 whole, the samples of the cut shard before the cut, shard 2 whole.
    assert got[:5] == ALL_KEYS[:5]
    assert got[-7:] == [k for k in ALL_KEYS if k.startswith("s02")]
    assert 0 < len(got) - 12 < 6
    assert skipping.statistics()["skipped"] == 1


@pytest.mark.parametrize("stage", ["map", "filter"])
async def test_a_failing_map_or_filter_on_a_stream_fails_one_sample(
    shards: list[str], stage: str
) -> None:
    """Under on_error="skip" only that sample is skipped, named by its key; it used to end
    the whole epoch as a stream failure (distributed.md's example maps a tar source)."""

    def check(sample: dict[str, Any]) -> Any:
        if sample["__key__"] == "s00/0002":
            raise ValueError("bad label")
        return sample if stage == "map" else True

    source = TarShardSource(shards[:2])
    stream = source.map(check) if stage == "map" else source.filter(check)
    loader = al.Loader(stream, batch_size=None, on_error="skip")
    got = keys(await collect(loader))
    assert got == [k for k in ALL_KEYS[:11] if k != "s00/0002"]
    stats = loader.statistics()
    assert stats["skipped"] == 1
    assert "s00/0002" in repr(stats["error_log"])


async def test_unsafe_member_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        member(tar, "good/0.txt", b"a")
        member(tar, "../escape.txt", b"b")
        member(tar, "/etc/passwd.txt", b"c")
        member(tar, "good/1.txt", b"d")
    loader = al.Loader(TarShardSource([str(path)]), batch_size=None, on_error="skip")
    got = await collect(loader)
    assert [(s["__key__"], s["txt"]) for s in got] == [("good/0", b"a"), ("good/1", b"d")]
    stats = loader.statistics()
    assert stats["skipped"] == 2
    assert "unsafe" in repr(stats["error_log"])
    assert not (tmp_path.parent / "escape.txt").exists()


async def test_member_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        member(tar, "a.bin", b"x" * 2000)
        member(tar, "b.bin", b"y" * 10)
    loader = al.Loader(
        TarShardSource([str(path)], max_member_bytes=1000), batch_size=None, on_error="skip"
    )
    got = await collect(loader)
    assert [s["__key__"] for s in got] == ["b"]
    assert "max_member_bytes" in repr(loader.statistics()["error_log"])


async def test_a_refused_member_fails_its_whole_sample(tmp_path: Path) -> None:
    """Never a part of a sample: the members around the refused one are not given as two
    samples with the same key, and the shard still has one item per key."""
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        for key, size in (("k0", 10), ("k1", 2000), ("k2", 10)):
            member(tar, f"{key}.cls", key.encode())
            member(tar, f"{key}.jpg", b"J" * size)
            member(tar, f"{key}.txt", b"t")
        member(tar, "k3.txt", b"t")
        member(tar, "k3.txt", b"again")  # the same field twice: also the whole sample
        member(tar, "k3.cls", b"3")
        member(tar, "k4.txt", b"t")
    loader = al.Loader(
        TarShardSource([str(path)], max_member_bytes=1000, samples_per_shard=5),
        batch_size=None,
        on_error="skip",
    )
    got = await collect(loader)
    assert [(s["__key__"], sorted(s)) for s in got] == [
        ("k0", ["__key__", "cls", "jpg", "txt"]),
        ("k2", ["__key__", "cls", "jpg", "txt"]),
        ("k4", ["__key__", "txt"]),
    ]
    stats = loader.statistics()
    assert stats["skipped"] == 2
    assert [e["key"] for e in stats["error_log"]] == [f"{path}#k1.jpg", f"{path}#k3.txt"]


# -- over HTTP --------------------------------------------------------------------------------


ANYIO_BACKENDS = ASYNCIO_BACKENDS


class ShardServer:
    """Serves shard files; ``cut[name] = k`` cuts the next ``k`` responses for ``name``
    off half-way (Content-Length announces the whole)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.cut: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests[name] = self.requests.get(name, 0) + 1
        data = self.files[name]
        response = web.StreamResponse()
        response.content_length = len(data)
        await response.prepare(request)
        if self.cut.get(name, 0) > 0:
            self.cut[name] -= 1
            await response.write(data[: len(data) // 2])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(data)
        await response.write_eof()
        return response

    async def __aenter__(self) -> ShardServer:
        app = web.Application()
        app.router.add_get("/{name}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.fixture
def shard_files(shards: list[str]) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in shards}


@pytest.fixture
async def server(shard_files: dict[str, bytes]) -> AsyncIterator[ShardServer]:
    async with ShardServer(shard_files) as s:
        yield s


def urls(server: ShardServer) -> list[str]:
    return [f"{server.base}/shard-{i}.tar" for i in range(4)]


async def test_http_shards(server: ShardServer) -> None:
    loader = al.Loader(TarShardSource(urls(server)), batch_size=None)
    assert keys(await collect(loader)) == ALL_KEYS
    assert server.requests == {f"shard-{i}.tar": 1 for i in range(4)}


async def test_http_shard_cut_short_is_retried_without_loss_or_repeat(
    server: ShardServer,
) -> None:
    server.cut = {"shard-1.tar": 2, "shard-3.tar": 1}
    loader = al.Loader(
        TarShardSource(urls(server)),
        batch_size=None,
        retry=al.Retry(attempts=4, sleep=no_sleep),
    )
    got = await collect(loader)
    assert keys(got) == ALL_KEYS
    assert got[7]["bin"] == bytes([1, 2]) * 102
    assert server.requests["shard-1.tar"] == 3
    assert loader.statistics()["retries"] == 3


async def test_http_shard_that_keeps_failing(server: ShardServer) -> None:
    server.cut = {"shard-2.tar": 10}
    loader = al.Loader(
        TarShardSource(urls(server)),
        batch_size=None,
        retry=al.Retry(attempts=3, sleep=no_sleep),
        on_error="skip",
    )
    got = keys(await collect(loader))
    assert [k for k in got if not k.startswith("s02")] == [
        k for k in ALL_KEYS if not k.startswith("s02")
    ]
    assert server.requests["shard-2.tar"] == 3
    stats = loader.statistics()
    assert stats["skipped"] == 1
    assert "shard-2.tar" in repr(stats["error_log"])


async def test_http_prefetch_beyond_max_connections(shard_files: dict[str, bytes]) -> None:
    """More prefetched shards than connections: a reader ahead fills its buffer and holds
    the only connection while the shard being consumed is reopened after a cut (or waits
    for its first connection); that must not deadlock."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(100):  # more samples than a reader's buffer holds
            member(tar, f"big/{i:04d}.txt", b"x")
    files = {**shard_files, "big.tar": buffer.getvalue()}
    async with ShardServer(files) as server:
        server.cut = {"shard-0.tar": 1}
        source = TarShardSource(
            [f"{server.base}/shard-0.tar", f"{server.base}/big.tar"],
            prefetch_shards=2,
            http_options={"max_connections": 1},
        )
        loader = al.Loader(source, batch_size=None, retry=al.Retry(attempts=3, sleep=no_sleep))
        with anyio.fail_after(60):  # a guard: a deadlock fails here instead of hanging
            got = keys(await collect(loader))
    assert got == ALL_KEYS[:5] + [f"big/{i:04d}" for i in range(100)]
    assert server.requests == {"shard-0.tar": 2, "big.tar": 1}


async def test_a_stalled_http_shard_names_itself(http_server: HTTPServer) -> None:
    """The Loader's timeout on a shard that never answers (its gate is never opened)."""
    url = http_server.url("/gate/0") + "?sig=secret"
    loader = al.Loader(TarShardSource([url]), batch_size=None, timeout=0.05)
    with pytest.raises(al.SampleError) as info:
        await collect(loader)
    cause = info.value.__cause__
    assert isinstance(cause, TimeoutError)
    assert str(cause) == f"{http_server.url('/gate/0')}?...: no data for 0.05 s"


def test_bad_arguments(shards: list[str]) -> None:
    with pytest.raises(TypeError, match="shards"):
        TarShardSource(shards[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shards is empty"):
        TarShardSource([])
    with pytest.raises(ValueError, match="samples_per_shard"):
        TarShardSource(shards, samples_per_shard=[1, 2])
    for bad in (2.5, "5", True, [5, 6, 7.5, 8]):
        with pytest.raises(TypeError, match="samples_per_shard must be an int"):
            TarShardSource(shards, samples_per_shard=bad)  # type: ignore[arg-type]
    # numpy integers are counts like any other (np.int64 was taken for a sequence)
    assert TarShardSource(shards, samples_per_shard=np.int64(5)).num_samples() == 5 * len(shards)
    assert TarShardSource(shards, samples_per_shard=np.array([5, 6, 7, 8])).num_samples() == 26
    per_shard = {shard: n for shard, n in zip(shards, [5, 6, 7, 8], strict=True)}
    assert TarShardSource(shards, samples_per_shard=per_shard.values()).num_samples() == 26
    with pytest.raises(ValueError, match="prefetch_shards"):
        TarShardSource(shards, prefetch_shards=0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_resume_at_random_points_equals_the_uninterrupted_run(
    shards: list[str], anyio_backend: str
) -> None:
    """Streaming resume at many random cut points (seeded), shuffled, in two ranks with
    sizes known: the part before the cut plus the resumed rest is the uninterrupted epoch,
    batch for batch."""
    import random

    def build(rank: int) -> al.Loader:
        return al.Loader(
            TarShardSource(shards, samples_per_shard=[5, 6, 7, 8]),
            batch_size=2,
            shuffle=True,
            seed=8,
            shuffle_buffer=5,
            rank=rank,
            world_size=2,
        )

    cuts = random.Random(0)
    for rank in range(2):
        full = [b["__key__"] for b in await collect(build(rank))]
        for _ in range(5):
            cut = cuts.randrange(0, len(full) + 1)
            first = build(rank)
            seen = []
            async with first:
                if cut:
                    async for batch in first:  # a batch taken counts as delivered
                        seen.append(batch["__key__"])
                        if len(seen) == cut:
                            break
                state = first.state_dict()
            second = build(rank)
            second.load_state_dict(state)
            rest = [b["__key__"] for b in await collect(second)]
            if cut == len(full):
                assert seen == full  # the epoch had ended: the state resumes a new pass
                continue
            assert seen + rest == full, (rank, cut)


def test_bad_source_options_are_refused_at_construction() -> None:
    """A misspelled ``http_options`` keyword or a malformed ``s3_options`` endpoint was
    only found when the first shard of that kind opened, mid-run; now construction
    refuses it, naming the option."""
    from asyncload.sources import TarShardSource

    with pytest.raises(TypeError, match=r"http_options: .*max_conections"):
        TarShardSource(["http://127.0.0.1:1/a.tar"], http_options={"max_conections": 2})
    with pytest.raises(ValueError, match=r"s3_options: .*endpoint_url"):
        TarShardSource(["s3://bucket/a.tar"], s3_options={"endpoint_url": "http://:99"})
    # Options for a kind of shard that is not there are not used, so not checked.
    TarShardSource(["/data/a.tar"], s3_options={"endpoint_url": "http://:99"})
