"""A plain ``for`` over an epoch that makes no batch at all (every sample filtered or
skipped, a ``drop_last`` tail, a resume with nothing left, a DataLoader worker whose share
is all filtered) ends, as ``async for`` does.

The sync bridge holds the workers beyond the first batch's until the consumer has taken
its first batch; with no batch ever made, that hold kept the epoch, and the consumer,
waiting for ever (found in review). Each loop runs in a thread joined with a timeout, so
that a hang fails the test.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch.utils.data

import asyncload as al


class Plain(al.AsyncDataset[int]):
    """Not in memory: a plain ``for`` runs through the SyncIterator (the pump thread)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        return index


class Failing(Plain):
    async def __getitem__(self, index: int) -> int:
        raise ValueError(f"bad {index}")


def drop_all(x: int) -> bool:
    return False


def keep_low(x: int) -> bool:
    return x < 3


def keep_worker0(x: int) -> bool:
    return x % 8 < 4  # batches of 4, two DataLoader workers: worker 1's share all dropped


def run_for(loader: al.Loader, timeout: float = 30.0) -> list[Any]:
    """A plain ``for`` over ``loader`` in a thread; fails instead of hanging."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["batches"] = [b for b in loader]
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        loader.close()  # (unblocks the consumer, so the thread ends)
        thread.join(5)
        pytest.fail("the epoch hung: no batch ever came, and the end never came either")
    if "error" in out:
        raise out["error"]
    return out["batches"]


def test_for_loop_every_sample_filtered_ends() -> None:
    loader = al.Loader(Plain(64).filter(drop_all), batch_size=4, concurrency=16)
    assert run_for(loader) == []
    assert loader.statistics()["filtered"] == 64


def test_for_loop_every_sample_skipped_ends() -> None:
    loader = al.Loader(Failing(64), batch_size=4, concurrency=16, on_error="skip")
    assert run_for(loader) == []
    assert loader.statistics()["skipped"] == 64


def test_for_loop_drop_last_leaves_no_batch_ends() -> None:
    # 3 samples survive the filter; drop_last drops their partial batch.
    loader = al.Loader(Plain(64).filter(keep_low), batch_size=4, concurrency=16, drop_last=True)
    assert run_for(loader) == []


def test_for_loop_single_samples_all_filtered_ends() -> None:
    loader = al.Loader(Plain(64).filter(drop_all), batch_size=None, concurrency=8)
    assert run_for(loader) == []


def keep_first8(x: int) -> bool:
    return x < 8


def test_for_loop_resume_with_nothing_left_to_deliver_ends() -> None:
    # Both surviving batches taken, then saved before the end was seen: what is left of
    # the epoch is all filtered, and the resumed pass has no batch to give.
    loader = al.Loader(Plain(40).filter(keep_first8), batch_size=4, concurrency=16)
    iterator = iter(loader)
    assert [list(map(int, next(iterator))) for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    state = loader.state_dict()
    iterator.close()
    resumed = al.Loader(Plain(40).filter(keep_first8), batch_size=4, concurrency=16)
    resumed.load_state_dict(state)
    assert run_for(resumed) == []


def test_dataloader_worker_with_empty_share_ends() -> None:
    loader = al.Loader(Plain(32).filter(keep_worker0), batch_size=4, concurrency=16)
    # timeout: a worker that sends nothing for that long fails the DataLoader, not the test run.
    data = torch.utils.data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=2, timeout=30
    )
    got = sorted(int(x) for batch in data for x in batch)
    assert got == [x for x in range(32) if keep_worker0(x)]
