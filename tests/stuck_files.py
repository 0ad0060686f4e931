"""A local file whose open() hangs, as on a stuck network mount: a FIFO nobody writes."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

HANG_GUARD_S = 5.0


class StuckFile:
    """``path`` is a FIFO: opening it for reading blocks until a writer comes. ``fired``
    says whether the hang guard had to release the readers (a read that was never timed
    out)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fired = False


@contextlib.contextmanager
def stuck_fifo(path: Path) -> Iterator[StuckFile]:
    """Make the FIFO ``path`` for a test's duration. A guard thread releases its readers
    after ``HANG_GUARD_S`` seconds (what a test of a bug-free timeout never needs), and on
    the way out every reader still waiting in open() (abandoned ones) is released."""
    os.mkfifo(path)
    stuck, done = StuckFile(path), threading.Event()

    def release_all() -> None:
        # ENXIO: no reader waits now.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    def guard() -> None:
        if not done.wait(HANG_GUARD_S):
            stuck.fired = True
            while not done.is_set():
                release_all()
                done.wait(0.01)

    thread = threading.Thread(target=guard, daemon=True)
    thread.start()
    try:
        yield stuck
    finally:
        done.set()
        thread.join()
        for _ in range(1000):  # (bounded: an abandoned open() may not be waiting yet)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
            time.sleep(0.001)
