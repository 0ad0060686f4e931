"""Caches under asyncio's own task.cancel() (which anyio's shields do not stop) and in
forked children: no call of a batch fails for another's cancellation, no key lock leaks,
and a forked copy does not wait on its parent's loads in flight.

Ordering is forced with threading events and event-loop steps, never with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from conftest import asyncio_only
from test_disk_cache import locks_held

from asyncload._batched import ThreadBatcher
from asyncload.disk_cache import DiskCache

REPO = Path(__file__).resolve().parent.parent


class Blocker:
    """A call that blocks its thread until released; ``entered`` says it is running."""

    def __init__(self, value: Any = None) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.value = value

    def __call__(self, *args: Any) -> Any:
        self.entered.set()
        assert self.go.wait(10), "the test never released the call"
        return self.value


async def wait_entered(event: threading.Event) -> None:
    # The thread sets it; each wait is a checkpoint that keeps the loop free meanwhile.
    while not event.is_set():
        await anyio.to_thread.run_sync(event.wait, 0.01)


async def loop_steps(n: int = 5) -> None:
    """Let the event loop run ``n`` rounds (delivering a ``task.cancel()``): steps, not time."""
    for _ in range(n):
        await asyncio.sleep(0)


def close_leaked_fds(path: Path) -> None:
    """Close this process's descriptors on files under ``path`` (locks a bug leaked), so
    the leak does not outlive the test."""
    for fd_name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd_name}")
        except OSError:
            continue
        if target.startswith(str(path) + os.sep):
            os.close(int(fd_name))


# -- ThreadBatcher and asyncio's own cancellation ---------------------------------------------


@asyncio_only
@pytest.mark.anyio
async def test_task_cancel_of_a_batch_runner_fails_no_other_call() -> None:
    """``task.cancel()`` (asyncio.timeout, wait_for, TaskGroup, the bridge's close) goes
    through anyio's shield: the task running a batch leaves ``_run_batch`` while the thread
    still runs the batch, and every call in it is marked failed with CancelledError. A task
    that was never cancelled gets CancelledError for a call that then runs anyway (its
    result, a lock a probe took, is lost), and the next batch starts beside the running one.
    """
    batcher = ThreadBatcher()
    first = Blocker("first")
    in_a = Blocker("a")
    ran: list[str] = []

    def b() -> str:
        ran.append("b")
        return "b"

    def c() -> str:
        ran.append("c")
        return "c"

    x = asyncio.ensure_future(batcher.run(first))
    await wait_entered(first.entered)
    a = asyncio.ensure_future(batcher.run(in_a))  # waits first: wakes first, runs [a, b]
    not_cancelled = asyncio.ensure_future(batcher.run(b))
    await loop_steps()
    assert len(batcher._queue) == 2  # both wait behind the first batch
    first.go.set()
    await wait_entered(in_a.entered)  # the batch [a, b] runs in a's task
    a.cancel()
    await loop_steps()
    later = asyncio.ensure_future(batcher.run(c))  # made while [a, b] still runs
    await loop_steps()
    in_a.go.set()
    outcomes = await asyncio.gather(x, not_cancelled, later, return_exceptions=True)
    await asyncio.gather(a, return_exceptions=True)
    assert outcomes == ["first", "b", "c"]  # b was never cancelled
    assert ran == ["b", "c"]  # one batch at a time: c after the batch that carries b


@asyncio_only
@pytest.mark.anyio
async def test_task_cancel_during_a_lookup_does_not_leak_the_key_lock(tmp_path: Path) -> None:
    """A ``get_or_load`` cancelled with ``task.cancel()`` while its lookup runs: the lookup
    takes the key's lock in the thread, its caller has already gone with CancelledError, and
    nobody ever releases the lock; every later lookup of the key, here or in another
    process, waits for it forever."""
    cache = DiskCache(tmp_path, max_bytes=10_000)
    took_lock = threading.Event()
    go = threading.Event()
    real_probe = cache._probe

    def probe(*args: Any) -> Any:
        found = real_probe(*args)  # a miss: the key's lock is now held
        took_lock.set()
        assert go.wait(10)
        return found

    cache._probe = probe  # type: ignore[method-assign]

    async def load() -> bytes:
        await anyio.lowlevel.checkpoint()
        return b"v"

    task = asyncio.ensure_future(cache.get_or_load("k", load))
    try:
        await wait_entered(took_lock)
        task.cancel()
        await loop_steps()
        go.set()
        await asyncio.gather(task, return_exceptions=True)
        # Let the lookup's thread finish whatever it does with the result (a fixed version
        # may hand the lock back through the stores batch).
        await cache._lookups.get().run(lambda: None)
        await cache._stores.get().run(lambda: None)
        assert not locks_held(tmp_path), "the key's lock outlived the cancelled lookup"
    finally:
        go.set()
        close_leaked_fds(tmp_path)


# -- a DataLoader worker forked while the cache is in use -------------------------------------

_FORKED = """
import os, sys, threading
import anyio
from asyncload import DiskCache, LRUCache

if sys.argv[1] == "memory":
    cache = LRUCache(max_items=10)
else:
    cache = DiskCache(sys.argv[2], max_bytes=1 << 20)
started, release = threading.Event(), threading.Event()

async def parent_load():
    started.set()
    await anyio.to_thread.run_sync(release.wait)
    return b"parent"

# The parent's event loop (a sync iterator's thread, say) is loading "k" when it forks.
loop_thread = threading.Thread(target=anyio.run, args=(cache.get_or_load, "k", parent_load))
loop_thread.start()
assert started.wait(10)
pid = os.fork()
if pid == 0:  # a forked worker: its copy of the cache, its own event loop
    async def child_load():
        return b"child"

    async def child():
        with anyio.fail_after(5):
            return await cache.get_or_load("k", child_load)

    try:
        got = anyio.run(child)
    except BaseException as exc:
        print("child:", type(exc).__name__, flush=True)
        os._exit(1)
    print("child got", got, flush=True)
    os._exit(0)
release.set()
loop_thread.join()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_copy_does_not_wait_on_the_parents_loads_in_flight(tmp_path: Path) -> None:
    """A forked process (DataLoader's default start method on Linux) gets the parent's
    DiskCache object as it was: with the parent's flights. A lookup in the child of a key
    the parent was loading joins a flight that no task in the child will ever finish, and
    hangs (a pickled copy is given none: ``__getstate__``). Were the flight dropped, the
    child would wait on the key's lock for the parent's load and read its entry."""
    done = subprocess.run(
        [sys.executable, "-c", _FORKED, "disk", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"child got b'" in done.stdout


def test_a_forked_memory_cache_loads_for_itself() -> None:
    """The same for LRUCache: a forked child's copy of a load in flight in the parent is
    forgotten, and the child loads the key itself."""
    done = subprocess.run(
        [sys.executable, "-c", _FORKED, "memory"], cwd=REPO, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"child got b'child'" in done.stdout
