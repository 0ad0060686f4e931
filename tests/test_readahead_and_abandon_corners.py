"""Corners of a mix's read-ahead, failed shards and abandoned reads (found by helper-59
in this session's own changes): read-ahead cancelled when a mix is left, a failed shard
substituted once per sample it stood for, a sized stream's worker state refused under
another batch size, local tar shards whose open or read hangs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import BACKENDS
from stuck_files import HANG_GUARD_S, stuck_fifo
from test_mixing_tiered_corners import collect
from test_stream_split_corners import SizedStream
from test_tar_and_mix_edges import write_shard

import asyncload as al
from asyncload.sources import TarShardSource

pytestmark = pytest.mark.anyio

ANYIO_BACKENDS = [BACKENDS[0], BACKENDS[2]]  # asyncio and trio

# -- a mix's map-style parts reading ahead --------------------------------------------------


class _HangsFrom(al.AsyncDataset[int]):
    """Indices below ``ready`` answer at once; the others never do (a read that hangs, or
    one so slow that nobody should wait for it when its sample is not wanted)."""

    def __init__(self, n: int, ready: int) -> None:
        self.n, self.ready = n, ready
        self.asked: list[int] = []

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        self.asked.append(index)
        if index >= self.ready:
            await anyio.sleep_forever()
        return index


async def test_a_mix_left_early_does_not_wait_for_its_read_ahead() -> None:
    """mix(stop="first"): the first part runs out after its 2 samples and the mix ends,
    having taken only b0-b4 from the map-style part. That part's read-ahead (_map_share:
    concurrency // 2 = 8 fetches kept going in the epoch's task group) is never cancelled
    when the part is closed, so the epoch's task group waits for the fetches nobody will
    take (b8-b12 here): the epoch ends only when they do, and one that hangs hangs the
    epoch (with timeout=, it waits out the timeouts and retries). The same happens to each
    DataLoader worker whose run ends (take_run), and to equal_length cutting a share short.
    Closing the part must cancel the fetches it started."""
    part = _HangsFrom(100, ready=8)
    mixed = al.mix([al.from_sequence(["a0", "a1"]), part], stop="first")
    loader = al.Loader(mixed, batch_size=None, concurrency=16)
    with anyio.fail_after(HANG_GUARD_S):
        got = await collect(loader)
    assert sorted(x for x in got if isinstance(x, str)) == ["a0", "a1"]
    assert all(x < part.ready for x in got if isinstance(x, int))  # none it waits for


# -- StreamError.count ------------------------------------------------------------------------


def _substitute(index: int, exc: Exception) -> str:
    return f"substitute for {index}"


async def test_a_failed_shard_under_a_substituting_on_error_keeps_the_ranks_in_step(
    tmp_path: Path,
) -> None:
    """Four shards of 4 (samples_per_shard=4) over 2 ranks; rank 0's second shard is
    missing. With on_error=callable every failed sample gets a substitute, so that each
    rank yields len(loader) samples and DDP ranks stay in step (as a map-style dataset
    does). The failed shard is one StreamError(count=4): equal_length counts it as 4
    positions, the loader as 1, and on_error is called once: rank 0 yields 5 samples
    where len(loader) and rank 1 say 8 (rank 1 then waits for rank 0's missing steps in
    its all-reduce). Before StreamError.count the share was padded back to 8."""
    shards = [
        str(tmp_path / "missing.tar") if s == 1 else write_shard(tmp_path / f"s{s}.tar", s, 4)
        for s in range(4)
    ]
    counts = []
    for rank in range(2):
        source = TarShardSource(shards, samples_per_shard=4)
        loader = al.Loader(source, batch_size=None, rank=rank, world_size=2, on_error=_substitute)
        got = await collect(loader)
        counts.append((len(got), len(loader)))
    assert counts == [(8, 8), (8, 8)]


# -- a stream's rank share split into DataLoader worker runs --------------------------------


def test_a_stream_state_under_workers_resumed_with_another_batch_size_loses_nothing() -> None:
    """Loader._plan_state: batch_size is not part of a state's plan "since a saved position
    means the same sample under any of them" (a map-style state resumes under another
    batch_size exactly). Under DataLoader workers a sized stream's positions are now
    positions in the worker's run, and the runs are cut in whole batches: 20 samples in
    batches of 4 over 2 workers are runs 0-11 and 12-19, in batches of 5 runs 0-9 and
    10-19. Saved after one batch from each worker (0-3, 12-15) and resumed with
    batch_size=5, worker 1 skips the first 4 positions of its new run (10-13): samples 10
    and 11 are lost, 14 and 15 come twice, silently. Either resume exactly or refuse the
    state, naming batch_size."""
    torch = pytest.importorskip("torch")

    def data_loader(loader: al.Loader) -> Any:
        return loader.to_torch_loader(num_workers=2, multiprocessing_context="fork")

    saved = al.Loader(SizedStream(20), batch_size=4)
    first = []
    for batch in data_loader(saved):
        first.append(batch)
        if len(first) == 2:
            break
    state = saved.state_dict()
    resumed = al.Loader(SizedStream(20), batch_size=5)
    try:
        resumed.load_state_dict(state)
        second = list(data_loader(resumed))
    except ValueError as exc:
        assert "batch_size" in str(exc)
        return
    got = [int(x) for batch in first + second for x in torch.as_tensor(batch)]
    assert sorted(got) == list(range(20))


# -- thread-backed reads abandoned on a timeout -----------------------------------------------


async def test_a_local_tar_shard_that_hangs_obeys_the_loaders_timeout(tmp_path: Path) -> None:
    """A local shard whose read hangs (a stuck network mount; here a FIFO nobody writes).
    run_abandonable made FileSource, NpySource, from_torch and ImageFolder's local
    reads give up at the Loader's timeout, but TarShardSource still opens and reads a
    local shard with plain anyio.to_thread.run_sync (sources/tar.py _file_chunks), which
    cannot be abandoned: _with_timeout's move_on_after waits for the thread, so
    timeout=0.2 never fires, and the epoch (or a break, or aclose()) waits for the mount
    for ever. Expected: the shard times out, is skipped, and the good shard is read (and
    a file that an abandoned open() opens late is closed, not left to the GC)."""
    good = write_shard(tmp_path / "s0.tar", 0, 3)
    stuck = tmp_path / "stuck.tar"
    with stuck_fifo(stuck) as fifo:
        loader = al.Loader(
            TarShardSource([str(stuck), good]), batch_size=None, timeout=0.2, on_error="skip"
        )
        got = [sample["__key__"] for sample in await collect(loader)]
    assert not fifo.fired, "the read was never timed out: only the hang guard ended it"
    assert got == ["s0/000", "s0/001", "s0/002"]
    assert loader.statistics()["skipped"] == 1


async def test_a_tar_read_that_hangs_mid_shard_is_left_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    """A shard whose data stops coming after its first block (a FIFO whose writer stalls):
    the read is abandoned at the timeout, and the file is closed by a thread of its own
    once the read returns. Closed in the event loop, close() would wait for the stuck
    read's lock, and the epoch would hang with it."""
    good = write_shard(tmp_path / "s0.tar", 0, 3)
    stuck = tmp_path / "stuck.tar"
    os.mkfifo(stuck)
    release = threading.Event()

    def writer() -> None:
        fd = os.open(stuck, os.O_WRONLY)  # (waits for the reader)
        try:
            os.write(fd, Path(good).read_bytes()[:512])  # a header, then nothing
            release.wait(HANG_GUARD_S)
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        loader = al.Loader(
            TarShardSource([str(stuck), good]), batch_size=None, timeout=0.2, on_error="skip"
        )
        with anyio.fail_after(HANG_GUARD_S - 1):
            got = [sample["__key__"] for sample in await collect(loader)]
    finally:
        release.set()
        thread.join(HANG_GUARD_S)
    assert got == ["s0/000", "s0/001", "s0/002"]
    assert loader.statistics()["skipped"] == 1
