"""Corners of the local sources and dataset views (found by helper-48): SampleFiltered
naming the index asked through getitems, iterators as indices, sync iteration refused,
URL roots, bytes paths, follow_symlinks and absolute keys, NpySource over more files
than file descriptors, recursive patterns."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncload as al
from asyncload.folders import ImageFolder
from asyncload.sources import FileSource, NpySource

pytestmark = pytest.mark.anyio

# Nothing here depends on the event loop: asyncio is enough.
ANYIO_BACKENDS = [pytest.param("asyncio", id="asyncio")]


class _Keyed(al.AsyncDataset[bytes]):
    """Bytes under string keys (URLs, paths): what ImageFolder.from_source labels."""

    def __init__(self, keys: list[str]) -> None:
        self.names = keys

    def __len__(self) -> int:
        return len(self.names)

    async def __getitem__(self, index: int) -> bytes:
        return self.names[index].encode()

    def key_of(self, index: int) -> Any:
        return self.names[index]


# -- SampleFiltered through views, by getitems ------------------------------------------


async def test_subset_getitems_sample_filtered_names_the_index_asked() -> None:
    """``await Subset(f, [7])[0]`` raises ``SampleFiltered(0)``, but the same fetch through
    ``getitems([0])`` raises ``SampleFiltered(7)``: an index of the parent, which the
    caller never asked for."""
    none = al.from_sequence(list(range(10))).filter(lambda x: False)
    view = al.Subset(none, [7])
    with pytest.raises(al.SampleFiltered) as info:
        await view.getitems([0])
    assert info.value.index == 0


async def test_concat_getitems_sample_filtered_names_the_global_index() -> None:
    """``await (seq + f)[5]`` raises ``SampleFiltered(5)``; ``getitems([5])`` raises
    ``SampleFiltered(2)``, the part's local index."""
    none = al.from_sequence(list(range(10))).filter(lambda x: False)
    both = al.from_sequence([1, 2, 3]) + none
    with pytest.raises(al.SampleFiltered) as info:
        await both.getitems([5])
    assert info.value.index == 5


# -- from_sequence: getitems over an iterator ---------------------------------------------


async def test_sequence_getitems_over_an_iterator_raises_for_a_bad_index() -> None:
    """The list fast path consumes the indices; on an IndexError it retries over what is
    left of them, so an iterator with an index out of range gives a short, wrong list
    (``[20]`` for ``[0, 5, 1]``) instead of the IndexError that ``__getitem__`` and the
    default ``getitems`` raise."""
    ds = al.from_sequence([10, 20, 30])
    with pytest.raises(IndexError):
        await ds.getitems(iter([0, 5, 1]))


# -- AsyncDataset: sync iteration ------------------------------------------------------


def test_sync_iteration_over_an_async_dataset_is_refused() -> None:
    """An AsyncDataset has ``__getitem__`` and no ``__iter__``: Python's legacy iteration
    calls ``ds[0], ds[1], ...``, which return coroutines and never raise IndexError, so
    ``list(ds)``, ``for x in ds`` and ``x in ds`` spin forever (creating un-awaited
    coroutines), and ``ConcatDataset(ds)`` (no list) says "got coroutine"."""
    ds = al.from_sequence([1, 2, 3])
    with pytest.raises(TypeError):
        iter(ds)


# -- from_torch: an AsyncDataset is not a torch dataset -----------------------------------


async def test_from_torch_refuses_an_async_dataset() -> None:
    """``from_torch(al.from_sequence(...))`` passes the ``hasattr`` checks, and every sample
    is then an un-awaited coroutine object, silently."""
    with pytest.raises(TypeError):
        al.from_torch(al.from_sequence([1, 2]))


# -- ImageFolder.from_source: a URL root without a path ----------------------------------


def test_from_source_url_root_without_a_path() -> None:
    """``root="https://h/"`` gives classes cat and dog; ``root="https://h"`` (the same
    place: an empty URL path is "/") finds no image at all, because the empty base is
    not given its "/" and every key's first folder comes out as ""."""
    keys = ["https://h/cat/1.jpg", "https://h/dog/2.jpg"]
    with_slash = ImageFolder.from_source(_Keyed(keys), root="https://h/", decoder=bytes)
    assert with_slash.classes == ["cat", "dog"]
    without = ImageFolder.from_source(_Keyed(keys), root="https://h", decoder=bytes)
    assert without.classes == ["cat", "dog"] and without.targets == [0, 1]


# -- FileSource: bytes paths ------------------------------------------------------------


async def test_file_source_bytes_keys_under_root(tmp_path: Path) -> None:
    """A list of bytes paths passes the single-path check; with ``root`` it fails with
    ``TypeError: a bytes-like object is required, not 'str'`` (from ``".." in key``), which
    names neither FileSource nor paths; without root it reads, but a cache then fails every
    sample ("Can't mix strings and bytes"). NpySource refuses bytes with a clear error."""
    (tmp_path / "a.txt").write_bytes(b"A")
    try:
        source = FileSource([b"a.txt"], root=tmp_path)  # type: ignore[list-item]
    except TypeError as exc:
        assert "FileSource" in str(exc)
    else:
        assert await source[0] == b"A"


# -- NpySource: one descriptor per file, for good -----------------------------------------


@pytest.fixture
def low_fd_limit() -> Any:
    """The soft limit on open descriptors lowered to what is open now plus 400."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    headroom = len(os.listdir("/proc/self/fd")) + 400
    if soft != resource.RLIM_INFINITY and soft < headroom:
        pytest.skip("the descriptor limit is already low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (headroom, hard))
    try:
        yield headroom
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_npy_source_over_more_files_than_descriptors(
    tmp_path: Path, low_fd_limit: Any
) -> None:
    """Every map NpySource opens keeps a descriptor (``mmap`` dups the file's), and maps are
    kept until ``aclose()``: a directory of one-sample ``.npy`` files (a common layout)
    larger than ``ulimit -n`` (1024 by default on most Linux systems) fails part way
    through the first epoch with ``OSError: [Errno 24] Too many open files``."""
    files = 1000
    for i in range(files):
        np.save(tmp_path / f"{i:05d}.npy", np.full((1, 2), i, np.int32))
    ds = NpySource(tmp_path)
    try:
        rows = []
        for start in range(0, files, 100):
            rows += await ds.getitems(range(start, start + 100))
        assert [int(r[0]) for r in rows] == list(range(files))
    finally:
        await ds.aclose()


# -- FileSource: follow_symlinks=True and an absolute key with a '..' part -----------------


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
async def test_follow_symlinks_refuses_an_absolute_key_with_a_dotdot_part(tmp_path: Path) -> None:
    """With ``follow_symlinks=True`` the relative key ``link/../secret`` is refused (a link
    before the ``..`` may lead anywhere), but the same key spelled absolute,
    ``<root>/link/../secret``, passes: it is checked only lexically (normpath: inside root)
    and then opened unresolved, so the kernel follows ``link`` out of root and ``..`` lands
    outside it: the source reads ``outside/secret``."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "secret").write_bytes(b"inside")
    (tmp_path / "outside" / "dir").mkdir(parents=True)
    (tmp_path / "outside" / "secret").write_bytes(b"outside")
    os.symlink(tmp_path / "outside" / "dir", root / "link")
    key = os.path.join(root, "link", "..", "secret")
    try:
        source = FileSource([key], root=root, follow_symlinks=True)
    except ValueError:
        return  # refused at construction, as the relative spelling is
    with pytest.raises(ValueError):
        await source[0]  # or at read time; never the bytes from outside root


async def test_filter_getitems_over_an_iterator() -> None:
    """``FilteredDataset.getitems`` walks ``indices`` twice (fetch, then ``zip(strict=True)``):
    over an iterator the second walk is empty and it raises ``ValueError: zip() argument 2
    is longer than argument 1``, where ``map(...).getitems`` and the default accept one."""
    kept = al.from_sequence([1, 2, 3]).filter(lambda x: True)
    assert await kept.getitems(iter([0, 2])) == [1, 3]


async def test_npy_pattern_double_star_spans_folders(tmp_path: Path) -> None:
    """``pattern="**/*.npy"`` reads files at every depth, as FileSource.from_directory's
    ``**`` does (glob without ``recursive=True`` took ``**`` for ``*``: one level only)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    np.save(tmp_path / "0.npy", np.zeros((1, 2), np.int32))
    np.save(tmp_path / "a" / "1.npy", np.ones((1, 2), np.int32))
    np.save(tmp_path / "a" / "b" / "2.npy", np.full((1, 2), 2, np.int32))
    ds = NpySource(tmp_path, pattern="**/*.npy")
    try:
        assert sorted(int(row[0]) for row in await ds.getitems(range(len(ds)))) == [0, 1, 2]
    finally:
        await ds.aclose()


def test_from_source_url_root_refuses_keys_on_another_host() -> None:
    keys = ["https://h/cat/1.jpg", "https://other/dog/2.jpg"]
    with pytest.raises(ValueError, match="not under root"):
        ImageFolder.from_source(_Keyed(keys), root="https://h/", decoder=bytes)


def test_concat_of_one_dataset_not_in_a_list_names_the_argument() -> None:
    with pytest.raises(TypeError, match="list of datasets"):
        al.ConcatDataset(al.from_sequence([1, 2]))  # type: ignore[arg-type]
