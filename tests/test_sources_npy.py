"""NpySource: rows of memory-mapped .npy files, one thread call per batch, copies that own
their memory, validation naming the file, lazy maps that never cross a pickle."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest
import torch
import torch.utils.data

import asyncload as al
from asyncload.sources import NpySource

pytestmark = pytest.mark.anyio

ROW = (3, 2)


def part(start: int, rows: int) -> np.ndarray:
    """``rows`` rows of shape ROW whose values say which global row they are."""
    return np.arange(start * 6, (start + rows) * 6, dtype=np.float32).reshape(rows, *ROW)


ALL = part(0, 12)  # what data_dir holds, end to end


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """``data/part-0.npy`` (5 rows), ``part-1.npy`` (0 rows), ``part-2.npy`` (7 rows), and a
    file that the default pattern ignores."""
    root = tmp_path / "data"
    root.mkdir()
    np.save(root / "part-0.npy", part(0, 5))
    np.save(root / "part-1.npy", part(5, 0))
    np.save(root / "part-2.npy", part(5, 7))
    (root / "README.txt").write_text("not data")
    return root


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records each ``anyio.to_thread.run_sync`` call (the function it ran)."""
    calls: list[Any] = []
    original = anyio.to_thread.run_sync

    async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", run_sync)
    return calls


def assert_owned_copy(sample: np.ndarray) -> None:
    assert type(sample) is np.ndarray  # not a memmap: default_collate stacks it
    assert sample.flags.owndata and sample.flags.writeable and sample.flags.c_contiguous


async def test_single_file_equals_np_load(tmp_path: Path) -> None:
    path = tmp_path / "one.npy"
    np.save(path, part(0, 4))
    src = NpySource(path)
    expected = np.load(path)  # no mmap
    assert len(src) == 4 and src.shape == (4, *ROW) and src.dtype == np.float32
    for i in range(-4, 4):
        sample = await src[i]
        np.testing.assert_array_equal(sample, expected[i])
        assert_owned_copy(sample)
    with pytest.raises(IndexError):
        await src[4]
    with pytest.raises(TypeError):
        await src["0"]  # type: ignore[index]
    assert src.key_of(-1) == (str(path), 3)


async def test_one_dimensional_file_gives_0d_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "labels.npy", np.array([7, 8, 9], dtype=np.int64))
    src = NpySource(tmp_path / "labels.npy")
    sample = await src[1]
    assert sample.shape == () and sample == 8
    assert_owned_copy(sample)
    batch = await src.getitems([2, 0])
    assert [int(s) for s in batch] == [9, 7]
    loader = al.Loader(src, batch_size=3)
    async with loader:
        batches = [b async for b in loader]
    np.testing.assert_array_equal(batches[0], [7, 8, 9])


async def test_directory_is_its_files_sorted_end_to_end(data_dir: Path) -> None:
    src = NpySource(data_dir)
    assert src.paths == [str(data_dir / f"part-{k}.npy") for k in range(3)]
    assert src.lengths == [5, 0, 7] and len(src) == 12
    got = await src.getitems(range(12))  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.stack(got), ALL)
    # Row 5 is the first row of part-2: the empty part-1 is stepped over.
    assert src.key_of(5) == (str(data_dir / "part-2.npy"), 0)
    assert src.locate(4) == (0, 4) and src.locate(-1) == (2, 6)


async def test_list_keeps_its_order_and_expands_directories(data_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "extra.npy"
    np.save(extra, part(100, 2))
    src = NpySource([data_dir / "part-2.npy", str(data_dir / "part-0.npy")])
    got = np.stack(await src.getitems(list(range(len(src)))))
    np.testing.assert_array_equal(got, np.concatenate([part(5, 7), part(0, 5)]))
    mixed = NpySource([extra, data_dir])
    got = np.stack(await mixed.getitems(list(range(len(mixed)))))
    np.testing.assert_array_equal(got, np.concatenate([part(100, 2), ALL]))
    # A pattern picks other files of a directory.
    np.save(data_dir / "other.npy", part(0, 1))
    assert len(NpySource(data_dir, pattern="part-*.npy")) == 12
    assert len(NpySource(data_dir)) == 13


async def test_getitems_is_one_thread_call(data_dir: Path, thread_calls: list[Any]) -> None:
    src = NpySource(data_dir)
    order = [11, 0, 7, 7, -12, 4, 5]  # across both files, repeats, negatives
    got = await src.getitems(order)
    assert len(thread_calls) == 1
    np.testing.assert_array_equal(np.stack(got), ALL[order])
    for sample in got:
        assert_owned_copy(sample)
    await src[3]
    assert len(thread_calls) == 2  # one sample: one thread call too (faults happen there)
    assert await src.getitems([]) == []
    assert len(thread_calls) == 2
    with pytest.raises(IndexError):
        await src.getitems([0, 12])
    assert len(thread_calls) == 2  # indices are checked before the thread call


async def test_shuffled_loader_equals_the_in_memory_result(data_dir: Path) -> None:
    def loader(ds: al.AsyncDataset[Any]) -> al.Loader:
        return al.Loader(ds, batch_size=5, shuffle=True, seed=11, concurrency=2)

    async def epoch(ds: al.AsyncDataset[Any]) -> list[np.ndarray]:
        async with loader(ds) as running:
            return [batch async for batch in running]

    got = await epoch(NpySource(data_dir))
    expected = await epoch(al.from_sequence(ALL))
    assert [b.shape for b in got] == [(5, *ROW), (5, *ROW), (2, *ROW)]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.concatenate(got), ALL)  # it did shuffle


async def test_mutating_a_sample_changes_nothing_else(data_dir: Path) -> None:
    src = NpySource(data_dir)
    sample = await src[6]
    sample[...] = -1
    batch = await src.getitems([6, 7])
    batch[0][...] = -2
    np.testing.assert_array_equal(batch[1], ALL[7])
    np.testing.assert_array_equal(await src[6], ALL[6])
    np.testing.assert_array_equal(np.load(data_dir / "part-2.npy"), part(5, 7))


async def test_files_are_only_ever_memory_mapped(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No read of a whole file: every np.load maps it read-only and refuses pickles."""
    calls: list[dict[str, Any]] = []
    original = np.load

    def load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "load", load)
    src = NpySource(data_dir)
    loader = al.Loader(src, batch_size=4, shuffle=True)
    async with loader:
        assert sum([len(b) async for b in loader]) == 12
    assert calls, "np.load was not used"
    assert all(c.get("mmap_mode") == "r" and c.get("allow_pickle") is False for c in calls)
    # Construction only reads headers; each file is mapped once per process.
    assert len(calls) <= 2 * len(src.paths)


def test_bad_inputs_name_the_file(tmp_path: Path, data_dir: Path) -> None:
    missing = tmp_path / "missing.npy"
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        NpySource(missing)
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        NpySource([data_dir / "part-0.npy", missing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        NpySource(tmp_path / "empty")

    def refused(name: str, array: Any, match: str, **save: Any) -> None:
        path = data_dir / name
        np.save(path, array, **save)
        with pytest.raises(ValueError, match=match) as info:
            NpySource(data_dir)
        assert name in str(info.value)
        path.unlink()

    refused("part-3.npy", np.zeros((2, 3, 3), np.float32), r"float32\[3, 3\]")  # trailing shape
    refused("part-3.npy", np.zeros((2, *ROW), np.float64), "float64")  # dtype
    refused("part-3.npy", np.zeros((2, *ROW), ">f4"), "part-0.npy")  # byte order
    refused("part-3.npy", np.float32(1.0), "0-d")
    refused(
        "part-3.npy", np.array([{"x": 1}, None], dtype=object), "Python objects", allow_pickle=True
    )
    (data_dir / "part-3.npy").write_bytes(b"PK\x03\x04 a zip, say")
    with pytest.raises(ValueError, match=r"part-3\.npy.*not a \.npy"):
        NpySource(data_dir)

    with pytest.raises(ValueError, match="empty"):
        NpySource([])
    with pytest.raises(TypeError):
        NpySource(b"x.npy")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        NpySource([data_dir / "part-0.npy", 3])  # type: ignore[list-item]


def test_pickles_without_its_maps(tmp_path: Path) -> None:
    """A pickle carries paths, never mapped data (a memmap pickles by copying it all)."""
    path = tmp_path / "big.npy"
    np.save(path, np.ones((1024, 256), np.float32))  # 1 MiB
    src = NpySource(path)
    anyio.run(src.getitems, [0, 1023])  # maps the file in this process
    payload = pickle.dumps(src)
    assert len(payload) < 4096
    clone = pickle.loads(payload)
    np.testing.assert_array_equal(anyio.run(clone.__getitem__, 5), np.ones(256, np.float32))


def test_torch_dataloader_workers(data_dir: Path) -> None:
    src = NpySource(data_dir)
    loader = al.Loader(src, batch_size=2, shuffle=True, seed=3)
    anyio.run(src.__getitem__, 0)  # maps open in the parent before the workers start
    dl = torch.utils.data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    batches = list(dl)
    assert len(batches) == 6 and all(isinstance(b, torch.Tensor) for b in batches)
    rows = torch.cat(batches).numpy()
    np.testing.assert_array_equal(rows[np.argsort(rows[:, 0, 0])], ALL)


async def test_aclose_drops_the_maps(tmp_path: Path) -> None:
    """After aclose the next read maps the file again: a replaced file is seen (and checked
    against the shape and dtype it had when the source was built)."""
    path = tmp_path / "a.npy"
    np.save(path, part(0, 3))
    src = NpySource(path)
    np.testing.assert_array_equal(await src[0], ALL[0])
    replacement = tmp_path / "b.npy"
    np.save(replacement, part(50, 3))
    os.replace(replacement, path)  # a new file (inode): the old map still shows the old one
    np.testing.assert_array_equal(await src[0], ALL[0])
    await src.aclose()
    np.testing.assert_array_equal(await src[0], part(50, 1)[0])
    np.save(replacement, part(0, 2))
    os.replace(replacement, path)
    await src.aclose()
    with pytest.raises(ValueError, match="changed"):
        await src[0]


async def test_repr_and_shape(data_dir: Path) -> None:
    src = NpySource(data_dir)
    assert repr(src) == "<NpySource of 12 rows of float32[3, 2] from 3 files>"
    assert src.row_shape == ROW


@pytest.mark.parametrize("readahead", [True, False])
async def test_readahead_changes_no_value(data_dir: Path, readahead: bool) -> None:
    src = NpySource(data_dir, readahead=readahead)
    order = [11, 0, 7, 6, 1, 4, 5, 10]
    np.testing.assert_array_equal(np.stack(await src.getitems(order)), ALL[order])


def test_readahead_advises_the_rows_own_bytes(tmp_path: Path) -> None:
    """The byte ranges given to madvise are exactly each row's bytes in the map."""
    from asyncload.sources.npy import _page_runs

    data = np.arange(3000 * 5, dtype=np.int32).reshape(3000, 5)
    np.save(tmp_path / "c.npy", data)
    mapped = NpySource(tmp_path / "c.npy")._mapped(0)
    assert mapped.mm is not None
    for row in (0, 1, 1234, 2999):
        start, end = mapped.span(row)
        assert mapped.mm[start:end] == data[row].tobytes()
    # Sorted spans: widened to page starts, merged where they touch or overlap.
    spans = [(10, 20), (4000, 4100), (4100, 4200), (9000, 9010)]
    assert _page_runs(spans, 4096) == [(0, 4200), (8192, 9010)]


async def test_fortran_order_file(tmp_path: Path) -> None:
    data = np.asfortranarray(part(0, 6))
    np.save(tmp_path / "f.npy", data)
    src = NpySource(tmp_path / "f.npy")
    got = await src.getitems([5, 0, 3])
    np.testing.assert_array_equal(np.stack(got), data[[5, 0, 3]])
    assert all(s.flags.c_contiguous and s.flags.owndata for s in got)


def _rss_anon_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@pytest.mark.skipif(_rss_anon_bytes() is None, reason="needs Linux /proc/self/status")
def test_an_epoch_over_a_big_file_keeps_private_memory_small(tmp_path: Path) -> None:
    """Mapped pages are page cache (file-backed), not this process's private memory: a
    full epoch over 128 MiB grows anonymous RSS by about the batches in flight (~20 MiB
    at most here), never by the file. The bound is 4x below the file size: not a timing."""
    path = tmp_path / "big.npy"
    rows = 8192
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 4096))
    big[:, 0] = np.arange(rows)  # 16 KiB rows, 128 MiB
    big.flush()
    del big
    loader = al.Loader(NpySource(path), batch_size=64, shuffle=True)

    async def epoch() -> tuple[int, int]:
        before = _rss_anon_bytes()
        assert before is not None
        growth, seen = 0, 0
        async with loader:
            async for batch in loader:
                seen += len(batch)
                growth = max(growth, (_rss_anon_bytes() or 0) - before)
        return growth, seen

    growth, seen = anyio.run(epoch)
    assert seen == rows
    assert growth < 32 * 2**20, f"anonymous RSS grew by {growth / 2**20:.0f} MiB"
