"""Review of the synchronous bridge: fork, Ctrl-C, threads and nested use of ``for``.
Each test failed before its fix (helper-86, review); the docstrings tell how ("Actual:"
is what happened then).

Everything that forks, signals or exits runs in a fresh interpreter (a script written to
``tmp_path``); the subprocess timeouts are hang guards only.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HANG_GUARD = 120  # seconds: only ever reached by a hang

# A forked child's exit status as the parent sees it, or "hung": the parent waits for the
# child with a generous deadline, then kills it (a deadlock in the child never ends).
FORK_PRELUDE = """
import os, signal, sys, time
import anyio
import asyncload as al


class Fetched(al.AsyncDataset):
    # awaits I/O: a plain `for` runs its epoch in the bridge's background thread
    def __len__(self):
        return 400

    async def __getitem__(self, index):
        await anyio.lowlevel.checkpoint()
        return index


def wait_for(pid, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"
"""


def run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(FORK_PRELUDE) + textwrap.dedent(body))
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
        check=False,
    )


FORK_CHILD_ENDS = """
loader = al.Loader(Fetched(), batch_size=4)
iterator = iter(loader)  # the bridge's loop thread runs in the parent
assert next(iterator).tolist() == [0, 1, 2, 3]
pid = os.fork()
if pid == 0:  # the child: it has the iterator, but not the thread behind it
    mode = {mode!r}
    if mode == "close":
        loader.close()  # e.g. a `with loader:` block ending in the child
        os._exit(0)
    if mode == "del":
        del iterator  # e.g. the child's copy of the loop's frame going away
        os._exit(0)
    sys.exit(0)  # "exit": a normal exit (atexit hooks run)
print("child", wait_for(pid), flush=True)
print("parent", sum(len(batch) for batch in iterator), flush=True)
"""


@pytest.mark.parametrize("mode", ["exit", "close", "del"])
def test_a_forked_child_does_not_deadlock_on_the_parents_open_iterator(
    tmp_path: Path, mode: str
) -> None:
    """A process forks while a plain `for` over a loader is open (its background loop
    thread running). The child inherits the SyncIterator but not its loop thread. Closing
    that copy in the child (the child simply exiting normally, through the atexit hook;
    `loader.close()`; the iterator being dropped) must not wait for the thread that does
    not exist in the child. Expected: the child ends (status 0) and the parent's epoch
    goes on. Actual: the child deadlocks in SyncIterator._stop joining the missing loop
    thread (the parent has to kill it)."""
    result = run_script(tmp_path, FORK_CHILD_ENDS.format(mode=mode))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["child", "0", "parent", "396"], result.stderr


FORK_CHILD_NEXT = """
loader = al.Loader(Fetched(), batch_size=4, prefetch=0)
iterator = iter(loader)
assert next(iterator).tolist() == [0, 1, 2, 3]
pid = os.fork()
if pid == 0:
    try:
        batch = next(iterator)  # the parent's epoch, continued in the child
    except Exception as error:  # a clear error is fine too
        print("child error", type(error).__name__, flush=True)
    else:
        print("child batch", batch.tolist(), flush=True)
    os._exit(0)
print("child", wait_for(pid), flush=True)
print("parent", sum(len(batch) for batch in iterator), flush=True)
"""


def test_next_on_a_parents_iterator_in_a_forked_child_does_not_hang(tmp_path: Path) -> None:
    """next() in a forked child on an iterator begun in the parent (the bridge's loop
    thread left behind in the parent) must either work or raise a clear error. Expected:
    the child prints a batch or an error and exits with 0. Actual: it waits forever in
    SyncIterator.__next__ on a queue that no thread will ever fill (made deterministic
    with prefetch=0: nothing is queued ahead; with the default prefetch it hangs as soon
    as the inherited queue runs dry)."""
    result = run_script(tmp_path, FORK_CHILD_NEXT)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[-2:] == ["child 0", "parent 396"], (lines, result.stderr)


def test_an_in_memory_iterator_made_outside_a_loop_can_be_used_inside_one() -> None:
    """An iterator of an in-memory loader (an InlineIterator: "the same interface as
    SyncIterator", bridge.py) made in plain code, then consumed in an async function
    (a training step that became async, a notebook cell). The same code over a dataset
    that awaits I/O (a SyncIterator) works there. Expected: the batches. Actual:
    RuntimeError "Cannot run the event loop while another loop is running" from the
    private loop's run_forever(), and the epoch is closed."""
    import asyncio

    import numpy as np

    import asyncload as al

    loader = al.Loader(al.from_sequence(np.arange(40)), batch_size=4)
    iterator = iter(loader)  # e.g. `batches = iter(loader)` at setup

    async def train() -> list[int]:
        return [int(batch[0]) for batch in iterator]

    assert asyncio.run(train()) == list(range(0, 40, 4))


CTRL_C_WHILE_A_TRANSFORM_IS_STUCK = """
import threading

stuck = threading.Event()


def decode(x):  # a synchronous transform: it runs in the bridge's loop thread
    if x == 8:
        stuck.set()
        threading.Event().wait(20)  # a read from a hung network mount, a wedged decoder
        print("transform returned", flush=True)
    return x


def on_sigint(signum, frame):
    handled.set()
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler


handled = threading.Event()
signal.signal(signal.SIGINT, on_sigint)


def press_ctrl_c():
    stuck.wait()
    # Ctrl-C: SIGINT to the main thread (where a terminal's SIGINT lands). Pressed again
    # only if the first was not handled: a signal that lands just before the main thread
    # blocks in its wait is seen only at its next wake-up (a CPython race, not the point).
    for _ in range(5):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        if handled.wait(2):
            return


threading.Thread(target=press_ctrl_c, daemon=True).start()
print("training", flush=True)
for batch in al.Loader(Fetched(), batch_size=4, transform=decode):
    pass
print("not reached", flush=True)
"""


def test_ctrl_c_stops_a_program_whose_transform_is_stuck(tmp_path: Path) -> None:
    """Ctrl-C while a plain `for` waits for a batch that a synchronous transform (run in
    the bridge's loop thread) is stuck making. The KeyboardInterrupt is raised in the
    `for` at once, but then the interpreter's exit closes the open iterator (atexit hook,
    bridge.py _close_open_iterators -> SyncIterator.close -> _stop), which joins the loop
    thread: the program stays up until the transform returns (forever, for a truly stuck
    call; a second Ctrl-C is needed, and prints "Exception ignored in atexit callback").
    Expected: the process ends with the KeyboardInterrupt (exit status 130 on POSIX)
    without waiting for the transform, as it does for a stuck `from_torch` __getitem__
    (abandoned worker thread) or for torch's DataLoader. Actual: "transform returned" is
    printed 20 s later, then the process exits."""
    result = run_script(tmp_path, CTRL_C_WHILE_A_TRANSFORM_IS_STUCK)
    assert "KeyboardInterrupt" in result.stderr
    assert result.stdout.split() == ["training"], (result.stdout, result.stderr)
