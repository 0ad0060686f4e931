"""Corners of the local formats (NpySource, FileSource, ImageFolder) and of default_collate
on what they return. Each test here is a bug found by review (helper-70) and fixed:
default_collate skipped its checks (and their messages) for ndarray subclasses (memmaps,
masked arrays), and NpySource killed the process with SIGBUS on a file rewritten smaller
after it was mapped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import asyncload as al


def _memmaps(tmp_path: Path, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    """One file per sample, memory-mapped read-only (``np.load(mmap_mode="r")``)."""
    out = []
    for i, shape in enumerate(shapes):
        path = tmp_path / f"sample-{i}.npy"
        np.save(path, np.full(shape, i, np.float32))
        out.append(np.load(path, mmap_mode="r"))
    return out


# -- default_collate on np.memmap samples (an ndarray subclass) ------------------------------
#
# default_collate documents: "ValueError naming the batch positions when arrays ... differ
# in shape; TypeError naming the positions and types when a sample is of another kind than
# the first (... None among numbers, arrays, ...)", and "Subclasses (np.memmap, ...) are
# stacked as their base class". For a batch whose first sample is a memmap, the subclass
# branch calls np.stack directly, so none of the diagnoses run.


def test_collate_memmaps_of_different_shapes_name_the_positions(tmp_path: Path) -> None:
    samples = _memmaps(tmp_path, (2, 3), (4, 3))
    assert all(type(s) is np.memmap for s in samples)
    with pytest.raises(ValueError) as info:
        al.default_collate(samples)
    # As for plain arrays: "samples differ in shape ((2, 3) at batch position 0; ...".
    assert "batch position 1" in str(info.value)
    assert "(4, 3)" in str(info.value)


def test_collate_none_among_memmaps_is_a_type_error_naming_it(tmp_path: Path) -> None:
    """An on_error substitute None among memmapped samples: the documented TypeError (with
    the on_error hint), not numpy's "all input arrays must have the same shape"."""
    (sample,) = _memmaps(tmp_path, (2, 3))
    with pytest.raises(TypeError) as info:
        al.default_collate([sample, None])
    assert "NoneType at batch position 1" in str(info.value)


def test_collate_none_among_0d_memmaps_is_refused_not_an_object_batch(tmp_path: Path) -> None:
    """Rows of a memmapped 1-D file (``mm[i, ...]``) are 0-d memmaps: a None among them is
    silently collated into an object array [0.0, None]; a plain 0-d array refuses it."""
    (mm,) = _memmaps(tmp_path, (3,))
    row = mm[0, ...]
    assert type(row) is np.memmap and row.shape == ()
    with pytest.raises(TypeError, match="NoneType at batch position 1"):
        al.default_collate([np.zeros((), np.float32), None])  # a plain array: refused
    with pytest.raises(TypeError, match="NoneType at batch position 1"):
        al.default_collate([row, None])  # the memmap: array([0.0, None], dtype=object)


def test_collate_string_among_0d_memmaps_is_refused(tmp_path: Path) -> None:
    (mm,) = _memmaps(tmp_path, (3,))
    with pytest.raises(TypeError, match="str at batch position 1"):
        al.default_collate([mm[0, ...], "x"])  # today: array(['0.0', 'x'], dtype='<U32')


def test_loader_over_memmapped_files_names_the_shapes(tmp_path: Path) -> None:
    """One memory-mapped file per sample, through a Loader: the collate error should be the
    documented one that names the shapes and batch positions."""
    ds = al.from_sequence(_memmaps(tmp_path, (2, 3), (2, 3), (5, 3)))
    with pytest.raises(ValueError, match=r"\(5, 3\) at batch position 2"):
        list(al.Loader(ds, batch_size=3))


# -- NpySource: a file rewritten after it was mapped ----------------------------------------


def test_npy_file_rewritten_smaller_after_mapping_raises_instead_of_crashing(
    tmp_path: Path,
) -> None:
    """np.save over a file NpySource already mapped truncates it in place: reading a row
    past the new end faults on a page beyond EOF and the process dies of SIGBUS. It should
    raise the ValueError that names the file ("changed since it was opened"), as it does
    when the change is seen before the map is opened. Run in a child process: the parent
    must survive the crash."""
    path = tmp_path / "rows.npy"
    script = textwrap.dedent(
        f"""
        import asyncio
        import numpy as np
        from asyncload.sources import NpySource

        path = {str(path)!r}
        np.save(path, np.arange(1024 * 64, dtype=np.float64).reshape(1024, 64))
        source = NpySource(path)
        assert asyncio.run(source[0])[1] == 1.0  # maps the file
        np.save(path, np.arange(10 * 64, dtype=np.float64).reshape(10, 64))  # in place
        try:
            asyncio.run(source[1000])
        except ValueError as exc:
            print("ValueError:", exc)
        else:
            print("no error")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"child died with {done.returncode} (-7 is SIGBUS): {done.stderr}"
    assert "ValueError" in done.stdout and str(path) in done.stdout


def test_collate_masked_arrays_of_different_shapes_name_the_positions() -> None:
    """The same subclass branch for masked arrays (masks kept): a shape mismatch gives
    numpy's bare "all input arrays must have the same shape", not the documented error."""
    samples = [np.ma.masked_array([1, 2], [0, 1]), np.ma.masked_array([1, 2, 3])]
    with pytest.raises(ValueError, match=r"\(3,\) at batch position 1"):
        al.default_collate(samples)
