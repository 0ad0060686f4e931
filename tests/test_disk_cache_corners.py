"""DiskCache corners, each a bug found by review (helper-68) and fixed: a forked child that
kept the directory-wide lock, a process that could not exit after it stopped waiting on
another's load, a directory deleted while in use that made every miss raise. (The test
docstrings tell what used to happen.)

Ordering is forced with threading events and pipes, never with sleeps.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

import asyncload as al
import asyncload.disk_cache as disk_cache
from asyncload.disk_cache import DiskCache

REPO = Path(__file__).resolve().parent.parent


def ledger_is_locked(path: Path) -> bool:
    """Whether some open file holds the ``flock`` of the directory's ledger (``usage``)."""
    fd = os.open(path / "usage", os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


# -- a DataLoader worker forked while a store holds the ledger --------------------------------


def test_a_child_forked_during_a_store_does_not_keep_the_ledger_locked(tmp_path: Path) -> None:
    """A process forks (DataLoader workers under ``to_torch()``, fork being Linux's default)
    while one of its threads stores an entry (a sync loader's loop thread, say, holding the
    directory-wide ``flock`` of ``usage``). The child inherits the descriptor: ``flock``
    belongs to the open file, so ``os.close`` in the parent no longer unlocks it, and the
    ledger stays locked for as long as the child lives. Every later store, eviction,
    ``clear()`` or damaged entry, in every process sharing the directory (the child's own
    too), then blocks for ever. Key locks unlock explicitly for this reason; the ledger
    does not."""
    cache = DiskCache(tmp_path, max_bytes=10_000)
    inside, go = threading.Event(), threading.Event()
    real_make_room = cache._make_room

    def make_room(*args: object) -> int:  # runs under the ledger's flock
        inside.set()
        assert go.wait(10)
        return real_make_room(*args)  # type: ignore[arg-type]

    cache._make_room = make_room  # type: ignore[method-assign]

    async def load() -> bytes:
        return b"value"

    storing = threading.Thread(target=anyio.run, args=(cache.get_or_load, "k", load))
    storing.start()
    child = None
    read_end, write_end = os.pipe()
    try:
        assert inside.wait(10)
        child = os.fork()
        if child == 0:  # a long-lived worker: it never touches the cache here
            os.close(write_end)
            os.read(read_end, 1)
            os._exit(0)
        go.set()
        storing.join(10)
        assert not storing.is_alive()
        assert "k" in cache
        assert not ledger_is_locked(tmp_path), "the forked child keeps the ledger locked"
    finally:
        go.set()
        os.close(read_end)
        os.close(write_end)  # the child reads EOF and exits
        if child:
            os.waitpid(child, 0)
        storing.join(10)


# -- a process that stops waiting for another process's load ---------------------------------

_GIVES_UP = """
import sys
import threading
import anyio
import asyncload as al
import asyncload.disk_cache as disk_cache
from asyncload import DiskCache

cache = DiskCache(sys.argv[1], max_bytes=1 << 20)
waiting = threading.Event()
real_run = disk_cache._Waiter.run


def run(self):  # in the worker thread; once here, it blocks on the lock whatever happens
    waiting.set()
    real_run(self)


disk_cache._Waiter.run = run


async def never():
    raise AssertionError("the key is being loaded by another process")


async def main():
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.get_or_load, "k", never)
        while not waiting.is_set():  # a thread waits for the other's lock
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()  # a timeout, Ctrl-C, a loader closed mid-epoch
    print("gave up", flush=True)


anyio.run(main)
"""


def test_a_process_that_stops_waiting_for_another_ones_load_can_exit(tmp_path: Path) -> None:
    """A lookup that finds another process loading the key waits for its lock in a worker
    thread, abandoned when the lookup is cancelled (the docstring's promise: a waiter can
    be cancelled while the other's load goes on). But the abandoned thread is one of
    anyio's worker threads, which are not daemon threads: it stays blocked in
    ``F_OFD_SETLKW``, and the interpreter, at exit, joins it. A process that gave up on a
    key (a rank whose loader was closed, a DataLoader worker being shut down, a script
    interrupted) cannot exit until the other process finishes its load: if that one hangs,
    this one hangs with it."""
    cache_dir = tmp_path / "cache"
    DiskCache(cache_dir, max_bytes=1 << 20)  # makes the directory
    name = DiskCache(cache_dir, max_bytes=1 << 20).path_of("k").rsplit(os.sep, 1)[1]
    # "Another process" loading "k" (and stuck there): the key's lock, held here.
    held = disk_cache._key_lock.acquire(str(cache_dir), name, blocking=False)
    assert held is not None
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _GIVES_UP, str(cache_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert child.stdout is not None
        # The lookup was cancelled and anyio.run returned: all that is left is to exit
        # (milliseconds); a generous bound, that a hang alone exceeds.
        assert child.stdout.readline() == b"gave up\n"
        try:
            _, err = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            pytest.fail("the process could not exit while another held the key's lock")
        assert child.returncode == 0, err.decode()
    finally:
        held.release()


# -- a directory that goes away -----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_directory_deleted_while_in_use_does_not_fail_lookups(tmp_path: Path) -> None:
    """The cache directory is removed while a run uses it (``rm -rf`` of a scratch
    directory, a tmp cleaner). The docs promise failures that do not stop training: a value
    that cannot be written is still returned, counted as ``write_errors``. But the lookup
    opens the ``locks`` file with ``O_CREAT`` in the missing directory, and its
    ``FileNotFoundError`` is not one of the errors the lookup tolerates: every miss raises,
    and under a Loader every sample fails (``on_error="raise"`` stops training,
    ``"skip"`` drops them all)."""
    directory = tmp_path / "cache"
    cache = DiskCache(directory, max_bytes=1 << 20)

    async def load() -> bytes:
        return b"fresh"

    assert await cache.get_or_load("a", load) == b"fresh"
    shutil.rmtree(directory)
    # Served from the source (and stored again, or counted as write_errors): never raised.
    assert await cache.get_or_load("b", load) == b"fresh"
    stats = cache.statistics()
    assert stats["misses"] == 2
    assert stats["write_errors"] == 1  # and the run goes on, uncached


def test_two_disk_caches_on_one_directory_are_refused_as_tiers(tmp_path: Path) -> None:
    """Stacked in one TieredCache, the second tier's lookup waited on the key lock the
    first tier held while loading through it: a hang (helper-68). Now refused; another
    namespace in the same directory is a store of its own and stacks."""
    first = al.DiskCache(tmp_path, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="tier 2 is a DiskCache on the same directory"):
        al.TieredCache(al.LRUCache(), first, al.DiskCache(f"{tmp_path}/", max_bytes=1 << 20))
    other = al.DiskCache(tmp_path, max_bytes=1 << 20, namespace="other")
    tiers = al.TieredCache(first, other)

    async def load() -> bytes:
        return b"value"

    assert anyio.run(tiers.get_or_load, "key", load) == b"value"
    assert anyio.run(tiers.get_or_load, "key", load) == b"value"
