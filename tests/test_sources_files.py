"""FileSource: bytes of local files, batched reads, and confinement to ``root``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import asyncload as al
from asyncload.sources import FileSource

pytestmark = pytest.mark.anyio


def content(i: int) -> bytes:
    return f"file {i}\n".encode() * (i + 1)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` with ``{i}.bin`` and ``sub/{i}.bin``; ``outside/secret.bin`` next to it, and
    ``root2/`` (a sibling whose name starts like root's)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        (root / f"{i}.bin").write_bytes(content(i))
    for i in range(3):
        (root / "sub" / f"{i}.bin").write_bytes(content(100 + i))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(b"secret")
    (tmp_path / "root2").mkdir()
    (tmp_path / "root2" / "x.bin").write_bytes(b"sibling")
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


async def test_reads_bytes(tree: Path) -> None:
    keys = [f"{i}.bin" for i in range(12)]
    src = FileSource(keys, root=tree)
    assert len(src) == 12
    assert await src[0] == content(0)
    assert await src[5] == content(5)
    assert await src[-1] == content(11)
    with pytest.raises(IndexError):
        await src[12]
    # Without root, paths are used as given.
    absolute = FileSource([str(tree / "3.bin"), tree / "sub" / "1.bin"])
    assert await absolute[0] == content(3)
    assert await absolute[1] == content(101)


async def test_getitems_is_one_thread_call(tree: Path, thread_calls: list[Any]) -> None:
    src = FileSource([f"{i}.bin" for i in range(12)], root=tree)
    order = [7, 2, 11, 0, 2, -1]
    assert await src.getitems(order) == [content(i % 12) for i in order]
    assert len(thread_calls) == 1


async def test_loader_reads_in_batches(tree: Path, thread_calls: list[Any]) -> None:
    src = FileSource([f"{i}.bin" for i in range(12)], root=tree)
    loader = al.Loader(src, batch_size=4)
    async with loader:
        batches = [batch async for batch in loader]
    assert batches == [[content(i) for i in range(j, j + 4)] for j in (0, 4, 8)]
    assert 1 <= len(thread_calls) < 12  # the Loader used getitems, not one call per file


def test_sync_loop_over_files(tree: Path) -> None:
    loader = al.Loader(FileSource([f"{i}.bin" for i in range(5)], root=tree), batch_size=2)
    assert [b for batch in loader for b in batch] == [content(i) for i in range(5)]


async def assert_refused(keys: list[Any], root: Path, bad: str) -> None:
    """``bad`` is refused with a ValueError naming it: at construction, or when read."""
    try:
        src = FileSource(keys, root=root)
    except ValueError as exc:
        assert bad in str(exc)
        return
    index = [os.fspath(k) for k in keys].index(bad)
    with pytest.raises(ValueError) as info:
        await src[index]
    assert bad in str(info.value)
    with pytest.raises(ValueError):
        await src.getitems([index])


@pytest.mark.parametrize(
    "bad",
    ["../outside/secret.bin", "sub/../../outside/secret.bin", "../root2/x.bin", ".."],
)
async def test_root_refuses_relative_escapes(tree: Path, bad: str) -> None:
    await assert_refused(["0.bin", bad], tree, bad)


async def test_root_refuses_absolute_paths_outside(tree: Path) -> None:
    for bad in (
        str(tree.parent / "outside" / "secret.bin"),
        str(tree.parent / "root2" / "x.bin"),
        "/etc/passwd",
    ):
        await assert_refused(["0.bin", bad], tree, bad)


async def test_root_refuses_symlinks_pointing_outside(tree: Path) -> None:
    (tree / "link.bin").symlink_to(tree.parent / "outside" / "secret.bin")
    (tree / "linkdir").symlink_to(tree.parent / "outside", target_is_directory=True)
    await assert_refused(["0.bin", "link.bin"], tree, "link.bin")
    await assert_refused(["0.bin", "linkdir/secret.bin"], tree, "linkdir/secret.bin")
    # Through the Loader: a sample error caused by the ValueError, naming the key.
    loader = al.Loader(FileSource(["0.bin", "link.bin"], root=tree), batch_size=2)
    with pytest.raises(al.SampleError) as info:
        async with loader:
            async for _batch in loader:
                pass
    assert info.value.key == "link.bin"
    assert isinstance(info.value.__cause__, ValueError)


async def test_follow_symlinks_reads_links_out_but_still_refuses_escaping_keys(
    tree: Path,
) -> None:
    (tree / "link.bin").symlink_to(tree.parent / "outside" / "secret.bin")
    src = FileSource(["0.bin", "link.bin"], root=tree, follow_symlinks=True)
    assert await src.getitems([0, 1]) == [content(0), b"secret"]
    with pytest.raises(ValueError, match="outside root"):
        FileSource(["../outside/secret.bin"], root=tree, follow_symlinks=True)
    (tree / "linkdir").symlink_to(tree.parent / "outside" / "deeper", target_is_directory=True)
    with pytest.raises(ValueError, match=r"'\.\.' part"):  # lexically x.bin; really outside
        FileSource(["linkdir/../x.bin"], root=tree, follow_symlinks=True)
    with pytest.raises(TypeError, match="follow_symlinks"):
        FileSource(["0.bin"], root=tree, follow_symlinks=1)  # type: ignore[arg-type]


async def test_from_directory_reads_the_symlinks_it_lists(tree: Path) -> None:
    """A directory of links into shared storage (as torchvision's ImageFolder reads it):
    every file listed can be read; refusing them is asked for explicitly."""
    (tree / "sub" / "link.bin").symlink_to(tree.parent / "outside" / "secret.bin")
    (tree / "dangling.bin").symlink_to(tree.parent / "nowhere.bin")  # not a file: unlisted
    src = FileSource.from_directory(tree, "sub/*")
    assert src.keys == ["sub/0.bin", "sub/1.bin", "sub/2.bin", "sub/link.bin"]
    assert await src.getitems([0, 3]) == [content(100), b"secret"]
    strict = FileSource.from_directory(tree, "sub/*", follow_symlinks=False)
    with pytest.raises(ValueError, match="outside root"):
        await strict[3]


async def test_root_allows_what_stays_inside(tree: Path) -> None:
    (tree / "inner_link.bin").symlink_to(tree / "sub" / "2.bin")
    keys = ["sub/../1.bin", str(tree / "4.bin"), "inner_link.bin", Path("sub") / "0.bin"]
    src = FileSource(keys, root=tree)
    assert await src.getitems([0, 1, 2, 3]) == [content(1), content(4), content(102), content(100)]


@pytest.mark.parametrize("follow_symlinks", [False, True])
async def test_absolute_keys_through_a_symlinked_root(tree: Path, follow_symlinks: bool) -> None:
    """root given through a symlink (/home -> /data/home, /tmp -> /private/tmp): an
    absolute key spelled with root as given, with its real path, or through another link
    to it is inside; one escaping it (lexically, or by a link out) is still refused. The
    first was refused: root was resolved, the key was not."""
    link = tree.parent / "link"
    link.symlink_to(tree, target_is_directory=True)
    (tree.parent / "other").symlink_to(tree, target_is_directory=True)
    (tree.parent / "out").symlink_to(tree.parent / "outside", target_is_directory=True)
    keys = [str(link / "1.bin"), str(tree / "sub" / "0.bin"), str(tree.parent / "other" / "2.bin")]
    src = FileSource(keys, root=link, follow_symlinks=follow_symlinks)
    assert await src.getitems([0, 1, 2]) == [content(1), content(100), content(2)]
    for bad in (
        str(link / ".." / "outside" / "secret.bin"),
        str(tree.parent / "out" / "secret.bin"),
    ):
        with pytest.raises(ValueError, match="outside root"):
            FileSource(["0.bin", bad], root=link, follow_symlinks=follow_symlinks)


def test_root_must_be_a_directory(tree: Path) -> None:
    with pytest.raises(ValueError, match="root"):
        FileSource(["0.bin"], root=tree / "0.bin")
    with pytest.raises(TypeError):
        FileSource("0.bin")  # type: ignore[arg-type]


async def test_missing_file(tree: Path) -> None:
    src = FileSource(["0.bin", "gone.bin", "2.bin"], root=tree)
    with pytest.raises(FileNotFoundError):
        await src[1]
    with pytest.raises(FileNotFoundError):
        await src.getitems([0, 1])
    # Through the Loader: the other files of the batch still come, with on_error="skip".
    loader = al.Loader(src, batch_size=3, on_error="skip")
    async with loader:
        batches = [batch async for batch in loader]
    assert batches == [[content(0), content(2)]]
    stats = loader.statistics()
    assert stats["skipped"] == stats["errors"] == 1
    loader = al.Loader(src, batch_size=3)
    with pytest.raises(al.SampleError) as info:
        async with loader:
            async for _batch in loader:
                pass
    assert info.value.index == 1
    assert info.value.key == "gone.bin"
    assert isinstance(info.value.__cause__, FileNotFoundError)


async def test_shuffled_files_through_the_loader(tree: Path) -> None:
    src = FileSource([f"{i}.bin" for i in range(12)], root=tree)
    loader = al.Loader(src, batch_size=5, shuffle=True, seed=3, concurrency=2)
    async with loader:
        got = [b async for batch in loader for b in batch]
    assert sorted(got) == sorted(content(i) for i in range(12))
    assert got != [content(i) for i in range(12)]
