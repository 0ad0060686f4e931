"""Rows of memory-mapped ``.npy`` files as an :class:`~asyncload.AsyncDataset` of arrays."""

from __future__ import annotations

import bisect
import glob
import math
import mmap
import os
import threading
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from .._threads import run_abandonable
from ..datasets import AsyncDataset, normalize_index

__all__ = ["NpySource"]

StrPath = str | os.PathLike[str]

MAX_OPEN_MAPS = 256
"""Files kept mapped at once per source; the oldest map is dropped to open another."""

_MAGIC = b"\x93NUMPY"  # every .npy file starts with it (numpy.lib.format.MAGIC_PREFIX)


class NpySource(AsyncDataset[np.ndarray]):
    """Sample ``i`` is row ``i`` (along axis 0) of a ``.npy`` file, or of several files end to
    end.

    ``path_or_paths`` is a ``.npy`` file, a directory (its files matching the glob
    ``pattern``, in which ``**`` spans folders, sorted by path: zero-pad numbered names),
    or a list of files and directories, concatenated in that order. Every file must hold an array of at least one dimension with the same dtype
    and trailing shape (``shape[1:]``) as the first; files with zero rows are allowed.

    Files are memory-mapped read-only (``np.load(mmap_mode="r")``), so a dataset larger than
    memory is served by OS paging: only the pages of the rows asked for are read. Maps are
    opened lazily, once per process (never pickled: DataLoader workers each open their own),
    at most ``MAX_OPEN_MAPS`` (256) at once, the oldest dropped first (each map holds a file
    descriptor); :meth:`aclose` drops them all (the next fetch maps again).

    A sample is a fresh, writable, C-contiguous ``np.ndarray`` that owns its memory: the row
    is copied out of the map (0-d for a 1-D file). Copying, rather than serving a view into
    the map, keeps the page faults of a cold read in a worker thread instead of the event
    loop (a view would fault wherever it is first touched: in collation, on the loop), lets
    the consumer mutate a sample without touching the file or other samples, and lets a
    cache size a sample by its own bytes. :meth:`getitems` copies all the rows of a chunk
    in one thread call (a thread hop costs 100-250 us; a row copy of a warm page, about a
    microsecond); ``await ds[i]`` costs one thread call per sample, so go through the
    Loader (or ``getitems``) for throughput.

    ``readahead`` (off by default): before copying a batch's rows, ask the kernel to read
    all their pages at once (``madvise(MADV_WILLNEED)``, pages merged into runs), so that a
    cold batch of scattered rows waits about one disk round trip rather than one page fault
    after another. Measured on a 2-core VM, one ``getitems`` of 64 scattered cold rows is
    2.5-5x faster with it; but a Loader epoch, whose concurrent chunk reads already overlap
    the faults, was 30-40 % slower cold (the exact-row advice replaces the kernel's wider
    read-around) and it adds 1-3 us per row when the pages are in memory. Turn it on for
    random access to cold data with little concurrency. It does nothing without
    ``madvise`` (other platforms) or for a Fortran-order file; single samples never advise.

    ``key_of(i)`` is ``(absolute path of the file, row in that file)``.

    Raises ``FileNotFoundError`` (naming it) for a missing path or a directory without
    matching files, ``ValueError`` (naming the file) for a file that is not a ``.npy`` array,
    a 0-d array, an object dtype (those hold pickles, which are never loaded), or a dtype or
    trailing shape unlike the first file's; ``TypeError`` for a path that is not one.
    """

    def __init__(
        self,
        path_or_paths: StrPath | Iterable[StrPath],
        *,
        pattern: str = "*.npy",
        readahead: bool = False,
    ) -> None:
        if isinstance(path_or_paths, (str, os.PathLike)):
            entries: list[StrPath] = [path_or_paths]
        elif isinstance(path_or_paths, bytes):
            raise TypeError("NpySource: pass paths as str or os.PathLike, not bytes")
        else:
            entries = list(path_or_paths)
            if not entries:
                raise ValueError("NpySource: path_or_paths is an empty list")
        paths: list[str] = []
        for entry in entries:
            if not isinstance(entry, (str, os.PathLike)):
                raise TypeError(
                    f"NpySource: paths must be str or os.PathLike, got {type(entry).__name__}"
                )
            paths.extend(_expand(os.fspath(entry), pattern))

        self.paths: list[str] = paths
        """Absolute path of each file, in concatenation order."""
        self.lengths: list[int] = []
        self.cumulative_sizes: list[int] = []
        first_dtype: np.dtype[Any] | None = None
        first_shape: tuple[int, ...] = ()
        total = 0
        for path in paths:
            shape, dtype = _inspect(path)
            if first_dtype is None:
                first_dtype, first_shape = dtype, shape[1:]
            elif dtype != first_dtype or shape[1:] != first_shape:
                raise ValueError(
                    f"NpySource: {path!r} holds {_describe(dtype, shape[1:])} rows, but "
                    f"{paths[0]!r} holds {_describe(first_dtype, first_shape)} rows"
                )
            self.lengths.append(shape[0])
            total += shape[0]
            self.cumulative_sizes.append(total)
        assert first_dtype is not None
        self.dtype: np.dtype[Any] = first_dtype
        self.row_shape: tuple[int, ...] = first_shape
        """Shape of one sample (the files' trailing shape)."""
        self.readahead = bool(readahead)
        self._maps: list[_Mapped | None] = [None] * len(paths)
        self._opened: deque[int] = deque()  # the files in _maps, oldest first
        self._lock = threading.Lock()

    # -- maps (used in worker threads) ------------------------------------------------------

    def _mapped(self, file: int) -> _Mapped:
        """File ``file``, mapped in this process (on first use)."""
        # aclose() swaps the list: a map opened during it lands in the old list, not the new.
        maps = self._maps
        mapped = maps[file]
        if mapped is not None:
            return mapped
        with self._lock:  # several threads may ask for the same file at once
            mapped = maps[file]
            if mapped is None:
                path = self.paths[file]
                memmap = _map(path)
                expected = (self.lengths[file], *self.row_shape)
                if memmap.shape != expected or memmap.dtype != self.dtype:
                    raise ValueError(
                        f"NpySource: {path!r} changed since it was opened: now "
                        f"{_describe(memmap.dtype, memmap.shape)}, was "
                        f"{_describe(self.dtype, expected)}"
                    )
                if len(self._opened) >= MAX_OPEN_MAPS:
                    # Every map holds a file descriptor (mmap keeps its own): with more
                    # files than `ulimit -n`, keeping them all would fail the epoch. A
                    # thread still reading the dropped map keeps it until it is done.
                    maps[self._opened.popleft()] = None
                mapped = maps[file] = _Mapped(memmap)
                self._opened.append(file)
        return mapped

    def _read_one(self, file: int, row: int) -> np.ndarray:
        mapped = self._mapped(file)
        mapped.check(self.paths[file])
        # [row, ...] gives an array even for a 1-D file (plain [row] gives a numpy scalar).
        sample: np.ndarray = mapped.array[row, ...].copy()
        return sample

    def _read_many(self, locations: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        # File order, then row order: neighbouring rows share pages, whatever order was asked.
        order = sorted(range(len(locations)), key=locations.__getitem__)
        if self.readahead and len(order) > 1:
            self._will_need([locations[pos] for pos in order])
        out: list[Any] = [None] * len(locations)
        checked = -1
        for pos in order:
            file, row = locations[pos]
            mapped = self._mapped(file)
            if file != checked:  # (once per file: the rows come in file order)
                mapped.check(self.paths[file])
                checked = file
            out[pos] = mapped.array[row, ...].copy()
        return out

    def _will_need(self, locations: Sequence[tuple[int, int]]) -> None:
        """Ask the kernel to read the pages of these (sorted) rows now, all at once: a cold
        batch then waits about one disk round trip, not one page fault after another."""
        rows: dict[int, list[int]] = {}
        for file, row in locations:
            rows.setdefault(file, []).append(row)
        for file, file_rows in rows.items():
            mapped = self._mapped(file)
            mapped.will_need([mapped.span(row) for row in file_rows])

    # -- the dataset ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.cumulative_sizes[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the whole dataset, as if the files were one array."""
        return (len(self), *self.row_shape)

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, row in that file) of sample ``index``; ``IndexError`` out of range."""
        i = normalize_index(index, len(self))
        file = bisect.bisect_right(self.cumulative_sizes, i)
        return file, i - (self.cumulative_sizes[file - 1] if file else 0)

    async def __getitem__(self, index: int) -> np.ndarray:
        file, row = self.locate(index)
        # Abandoned on a timeout (or close): a page fault that hangs (a stuck network
        # mount) must not hold them up; the thread finishes on its own, its result dropped.
        return await run_abandonable(self._read_one, file, row)

    async def getitems(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Rows ``indices`` in the order asked, copied out in one thread call."""
        locations = [self.locate(i) for i in indices]
        if not locations:
            return []
        return await run_abandonable(self._read_many, locations)

    def key_of(self, index: int) -> Hashable:
        file, row = self.locate(index)
        return (self.paths[file], row)

    async def aclose(self) -> None:
        """Drop the maps; a thread reading now keeps its map until it is done."""
        with self._lock:
            self._maps = [None] * len(self.paths)
            self._opened = deque()

    def __getstate__(self) -> dict[str, Any]:
        # A memmap pickles by copying its data: send the paths, and map again on arrival.
        state = self.__dict__.copy()
        del state["_maps"], state["_opened"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps = [None] * len(self.paths)
        self._opened = deque()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        files = self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} files"
        return f"<NpySource of {len(self)} rows of {_describe(self.dtype, self.row_shape)} from {files}>"


class _Mapped:
    """One file's map: the rows as a plain ndarray, and what ``madvise`` needs."""

    __slots__ = ("array", "data", "file", "mm", "needed", "row_bytes")

    def __init__(self, memmap: np.ndarray) -> None:
        # The memmap subclass's Python-level __getitem__/__array_finalize__ cost more than
        # the copy of a small row; a base-class view (which keeps the map alive) skips them.
        self.array: np.ndarray = memmap.view(np.ndarray)
        mm = getattr(memmap, "_mmap", None)  # numpy's mmap object, where it has one
        # The file's size (mmap.size() is an fstat) against what the rows need: see check().
        self.file = mm if isinstance(mm, mmap.mmap) else None
        self.needed = int(getattr(memmap, "offset", 0)) + memmap.nbytes
        self.row_bytes = memmap.itemsize * math.prod(memmap.shape[1:])
        self.mm: mmap.mmap | None = None
        self.data = 0
        if (
            isinstance(mm, mmap.mmap)
            and hasattr(mmap, "MADV_WILLNEED")
            and memmap.flags.c_contiguous  # a Fortran-order row is spread over the file
            and self.row_bytes > 0
        ):
            # Where the rows start inside the mmap (after the .npy header), by address.
            self.data = memmap.ctypes.data - np.frombuffer(mm, np.uint8).ctypes.data
            self.mm = mm

    def check(self, path: str) -> None:
        """``ValueError`` naming ``path`` unless the file still holds every row. A file
        rewritten smaller in place after it was mapped (``np.save`` over it) has pages
        past its end, and touching one kills the process (SIGBUS), not just the sample.
        (A file cut short during the copy itself still can.)"""
        if self.file is not None and (size := self.file.size()) < self.needed:
            raise ValueError(
                f"NpySource: {path!r} changed since it was opened: it is now {size} bytes, "
                f"its rows need {self.needed}"
            )

    def span(self, row: int) -> tuple[int, int]:
        """Byte range of ``row`` inside the mmap."""
        start = self.data + row * self.row_bytes
        return start, start + self.row_bytes

    def will_need(self, spans: Sequence[tuple[int, int]]) -> None:
        """``madvise(MADV_WILLNEED)`` over sorted ``spans``, merged into page runs."""
        if self.mm is None:
            return
        try:
            for start, end in _page_runs(spans, mmap.PAGESIZE):
                self.mm.madvise(mmap.MADV_WILLNEED, start, end - start)
        except (OSError, ValueError):
            pass  # advice only: the copy faults the pages in anyway


def _page_runs(spans: Iterable[tuple[int, int]], page: int) -> list[tuple[int, int]]:
    """Sorted byte ``spans`` widened to page starts and merged where they touch or overlap."""
    runs: list[tuple[int, int]] = []
    for start, end in spans:
        start -= start % page
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return runs


def _expand(path: str, pattern: str) -> list[str]:
    """``path`` as a list of absolute file paths (a directory's matches, sorted)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        found = sorted(
            p
            for p in glob.glob(os.path.join(glob.escape(path), pattern), recursive=True)
            if os.path.isfile(p)
        )
        if not found:
            raise FileNotFoundError(f"NpySource: no files matching {pattern!r} in {path!r}")
        return found
    if not os.path.exists(path):
        raise FileNotFoundError(f"NpySource: no such file: {path!r}")
    return [path]


def _map(path: str) -> np.ndarray:
    # allow_pickle=False: an object array would unpickle arbitrary code; numpy also refuses
    # to map one ("Python objects in dtype"), which we report naming the file.
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)  # type: ignore[no-any-return]
    except ValueError as exc:
        raise ValueError(f"NpySource: {path!r} cannot be memory-mapped: {exc}") from exc


def _inspect(path: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype of the array in ``path``, checked to be a mappable, non-0-d .npy."""
    with open(path, "rb") as f:
        magic = f.read(len(_MAGIC))
    # Checked first: np.load takes anything else for a pickle and says so, which misleads.
    if magic != _MAGIC:
        raise ValueError(f"NpySource: {path!r} is not a .npy file")
    mapped = _map(path)  # maps, reading only the header; dropped on return
    if mapped.ndim == 0:
        raise ValueError(f"NpySource: {path!r} holds a 0-d array, which has no rows")
    return mapped.shape, mapped.dtype


def _describe(dtype: np.dtype[Any], row_shape: tuple[int, ...]) -> str:
    return f"{dtype}{list(row_shape)}"
