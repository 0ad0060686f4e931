"""Review of the session's changes (3d665bc..HEAD): bucketed epochs under DataLoader
workers, the statistics fixes, the sync bridge's fork safety, by helper-87. Each test
failed before its fix; its docstring says what is expected and what happened."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncload as al

ROOT = Path(__file__).resolve().parents[1]


def _cost(x: Any) -> int:
    return int(x) % 5 + 1


def _sets(batches: list[Any]) -> list[tuple[int, ...]]:
    return sorted(tuple(sorted(int(v) for v in batch)) for batch in batches)


# -- bucketed map-style epochs: a state saved under workers, resumed with fewer --------------


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_bucketed_state_saved_under_two_workers_resumes_in_a_plain_for_with_the_same_batches() -> (
    None
):
    """docs/batching.md: with fixed counts and ``bucket=`` every rank yields ``len(loader)``
    batches (what keeps DDP in step), and resume "is exact whatever the batching: a bucket
    in progress is fetched again from its start and cut the same way"; dataloader.md: a
    map-style loader resumes with any number of workers (its state is in rank positions).

    16 samples, ``bucket=6``, ``batch_size=4``: ``len(loader) == 5``. Two batches are taken
    through ``to_torch_loader(num_workers=2)``: now that each worker takes whole buckets,
    that is one batch of bucket 0 (worker 0) and one of bucket 1 (worker 1), so the state
    holds two part-delivered buckets. Resumed by a plain ``for``, only the first is fetched
    again from its start (Loader._new_epoch); the rest of bucket 1 is fetched without its
    delivered positions, so its window takes in positions of bucket 2 and every later
    bucket boundary shifts. Expected: 3 more batches (5 in all), the uninterrupted
    epoch's; got 4 (6 in all, ``[12, 13]`` and ``[15, 14]`` split from ``[15, 12, 13, 14]``)."""
    torch = pytest.importorskip("torch")
    del torch

    def build() -> al.Loader:
        return al.Loader(al.from_sequence(np.arange(16)), batch_size=4, bucket=6, batch_cost=_cost)

    workers = {"num_workers": 2, "multiprocessing_context": "fork"}
    whole = list(build().to_torch_loader(**workers))
    assert len(whole) == len(build()) == 5
    loader = build()
    taken: list[Any] = []
    for batch in loader.to_torch_loader(**workers):
        taken.append(batch)
        if len(taken) == 2:
            break
    state = loader.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    rest = list(resumed)
    flat = sorted(int(v) for batch in taken + rest for v in batch)
    assert flat == list(range(16))  # (holds: none twice, none lost)
    assert len(taken) + len(rest) == len(build()), (
        f"resumed epoch yields {len(rest)} batches after {len(taken)}; len(loader) is "
        f"{len(build())}: {[b.tolist() for b in rest]}"
    )
    assert _sets(taken + rest) == _sets(whole)


# -- on_statistics: the last snapshot ----------------------------------------------------------


def _check(x: Any) -> Any:
    if int(x) == 3:
        raise ValueError("bad record")
    return x


def test_last_snapshot_not_sent_twice_when_the_callback_drains_error_log() -> None:
    """Reporter.end sends the last snapshot "unless the one sent at the last batch already
    says it all". 10 batches, ``statistics_every=5``: snapshots at batches 5 and 10, and
    nothing changes after batch 10. An exporter that drains the snapshot's ``error_log``
    after shipping it (``snapshot["error_log"].clear()``; stats.py now gives the caller its
    own copies, so the snapshot is the caller's to change) empties the very list that
    Reporter kept in ``_sent`` (``_counts`` is a shallow copy), so end() finds the counts
    "changed". Expected calls at batches ``[5, 10]``; got ``[5, 10, 10]``."""
    calls: list[int] = []

    def export(snapshot: dict[str, Any]) -> None:
        calls.append(snapshot["batches"])
        snapshot["error_log"].clear()

    loader = al.Loader(
        al.from_sequence(np.arange(40)).map(_check),
        batch_size=4,
        on_error="skip",
        on_statistics=export,
        statistics_every=5,
    )
    assert len(list(loader)) == 10
    assert calls == [5, 10]


# -- the sync bridge and fork --------------------------------------------------------------------

_FORK_SCRIPT = """
import os, sys
import numpy as np
import asyncload as al

PARENT = os.getpid()


def report(snapshot):
    role = "parent" if os.getpid() == PARENT else "child"
    print(f"STATISTICS {role} {snapshot['batches']}", flush=True)


loader = al.Loader(al.from_sequence(np.arange(40)), batch_size=4,
                   on_statistics=report, statistics_every=100)
with loader:
    batches = iter(loader)
    print("ITERATOR", type(batches).__name__, flush=True)
    for step, batch in enumerate(batches):
        if step == 1:
            pid = os.fork()
            if pid == 0:
                # a forked helper (a checkpoint writer, say) that is done: it leaves
                sys.exit(0)
            os.waitpid(pid, 0)
    del batches
"""


def test_forked_child_leaving_an_in_memory_for_loop_sends_no_statistics() -> None:
    """A process forks while a plain ``for`` over an in-memory loader is mid-epoch; the
    child leaves at once (``sys.exit(0)`` inside the loop). The SyncIterator got a pid
    check today: its copy in a forked child closes without touching the parent's epoch
    and reports nothing. The InlineIterator (the in-memory ``for``) has none: leaving the
    loop in the child closes the copy, which runs ``report_end()`` and sends the parent's
    epoch's last ``on_statistics`` snapshot from the child (a second export of the same
    epoch; with ``progress=True`` it draws the bar again). Expected: only the parent's
    end-of-epoch snapshot (``STATISTICS parent 10``); got ``STATISTICS child 2`` too."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FORK_SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "ITERATOR InlineIterator" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATISTICS")]
    assert lines == ["STATISTICS parent 10"], lines
