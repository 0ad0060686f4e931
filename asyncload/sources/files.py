"""Local files as an :class:`~asyncload.AsyncDataset` of bytes."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Hashable, Iterable, Sequence

from .._threads import run_abandonable
from ..datasets import AsyncDataset, normalize_index

__all__ = ["FileSource"]

StrPath = str | os.PathLike[str]


class FileSource(AsyncDataset[bytes]):
    """The bytes of each file in ``paths``.

    With ``root``, each path is taken relative to it (an absolute one may spell ``root`` as
    given or resolved), and a key that resolves outside ``root`` (``..``, an absolute path
    elsewhere, a symlink pointing out) is refused with
    ``ValueError``: lexically at construction, and again after resolving symlinks at read
    time, unless ``follow_symlinks`` (then symlinks under ``root`` may point anywhere, and
    only the keys themselves must stay inside it). A batch of files is read in one thread call (a thread hop costs 100-250 us, so
    reading 64 small files per hop is ~20x faster than one hop per file).

    ``key_of(i)`` is the path as given (relative to ``root``, for messages and labels); a
    cache keys the sample by the file's absolute path, so sources over different roots
    with the same file names never share an entry.
    """

    def __init__(
        self,
        paths: Iterable[StrPath],
        *,
        root: StrPath | None = None,
        follow_symlinks: bool = False,
    ) -> None:
        if isinstance(paths, (str, bytes, os.PathLike)):
            raise TypeError("FileSource: paths must be a list of paths, not a single path")
        if not isinstance(follow_symlinks, bool):
            raise TypeError(
                f"FileSource: follow_symlinks must be True or False, got {follow_symlinks!r}"
            )
        self.keys = [os.fspath(p) for p in paths]
        for key in self.keys:
            if not isinstance(key, str):
                # A cache, a message or root's join would fail on it later, less clearly.
                raise TypeError(f"FileSource: paths must be str or os.PathLike[str], got {key!r}")
        self.root = os.path.realpath(root) if root is not None else None
        self.follow_symlinks = follow_symlinks
        if self.root is not None:
            if not os.path.isdir(self.root):
                raise ValueError(f"FileSource: root {os.fspath(root)!r} is not a directory")  # type: ignore[arg-type]
            given = os.path.abspath(root)  # type: ignore[arg-type]
            for key in self.keys:
                # Only keys that can escape lexically need the (slower) check here; symlinks
                # are checked at read time.
                if os.path.isabs(key):
                    self._check_absolute(key, given)
                elif ".." in key:
                    self._check_inside(key, os.path.normpath(os.path.join(self.root, key)))
                if follow_symlinks and ".." in key and ".." in pathlib.PurePath(key).parts:
                    # Read unresolved, "link/.." is the link's target's parent, not root.
                    raise ValueError(
                        f"FileSource: key {key!r} has a '..' part: refused with "
                        "follow_symlinks=True, where a link before it may lead anywhere"
                    )

    @classmethod
    def from_directory(
        cls, root: StrPath, pattern: str = "**/*", *, follow_symlinks: bool = True
    ) -> FileSource:
        """Every file under ``root`` matching the glob ``pattern``, sorted, keys relative to
        root. Symlinks to files are listed and, by default, read wherever they point (as
        torchvision's ``ImageFolder`` does): the directory is the user's own. ``pathlib``'s
        glob does not descend into symlinked directories."""
        base = pathlib.Path(root)
        paths = sorted(p.relative_to(base) for p in base.glob(pattern) if p.is_file())
        return cls(paths, root=root, follow_symlinks=follow_symlinks)

    def _check_inside(self, key: str, path: str) -> None:
        assert self.root is not None
        if not _inside(self.root, path):
            raise ValueError(f"FileSource: key {key!r} resolves outside root {self.root!r}")

    def _check_absolute(self, key: str, given: str) -> None:
        """An absolute key is inside root when it is by root's real path, by root as given
        (through a symlink: /home -> /data/home), or once its own symlinks are resolved."""
        assert self.root is not None
        path = os.path.normpath(key)
        if _inside(self.root, path) or _inside(given, path):
            return
        self._check_inside(key, os.path.realpath(path))

    def _path(self, key: str) -> str:
        if self.root is None:
            return key
        if self.follow_symlinks:  # (the key itself was checked at construction)
            return os.path.join(self.root, key)
        path = os.path.realpath(os.path.join(self.root, key))
        self._check_inside(key, path)
        return path

    def _read(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def _read_many(self, keys: Sequence[str]) -> list[bytes]:
        return [self._read(key) for key in keys]

    def __len__(self) -> int:
        return len(self.keys)

    async def __getitem__(self, index: int) -> bytes:
        key = self.keys[normalize_index(index, len(self.keys))]
        # Abandoned on a timeout (or close): a read that hangs (a stuck network mount) must
        # not hold them up; the thread finishes on its own, its result dropped.
        return await run_abandonable(self._read, key)

    async def getitems(self, indices: Sequence[int]) -> list[bytes]:
        n = len(self.keys)
        keys = [self.keys[normalize_index(i, n)] for i in indices]
        return await run_abandonable(self._read_many, keys)

    def key_of(self, index: int) -> Hashable:
        return self.keys[normalize_index(index, len(self.keys))]

    def _cache_key(self, index: int) -> Hashable:
        """The file's absolute path: the key joined to the resolved ``root`` (to the working
        directory when there is none, as a read resolves it). Two sources over different
        roots never share an entry, though their keys (relative paths) may be equal; the
        same key under the same root always does, in every process and run."""
        key = self.keys[normalize_index(index, len(self.keys))]
        # (join keeps an absolute key as it is; no realpath: a syscall per lookup)
        return os.path.join(self.root if self.root is not None else os.getcwd(), key)

    def __repr__(self) -> str:
        return f"<FileSource of {len(self.keys)} files" + (
            f" under {self.root!r}>" if self.root else ">"
        )


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root
