"""Resources released on every way out of an epoch.

Each test here is a bug found by review (helper-69) and fixed: after ``close()``, the
closed epoch's samples stayed alive (the docstrings tell how). Many other exit paths were
checked and found clean (threads, fds, HTTP connections, tasks); they are not kept here.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import asyncload as al

# -- helpers --------------------------------------------------------------------------------


class Big:
    """A large sample, so that a weak reference tells whether something still holds it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.payload = bytearray(1 << 16)


class Tracked(al.AsyncDataset[Big]):
    """Awaits (so not ``in_memory``: the sync bridge runs a loop thread); keeps a weak
    reference to every sample it hands out."""

    def __init__(self, n: int = 200) -> None:
        self.n = n
        self.refs: list[weakref.ref[Big]] = []

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> Big:
        await anyio.lowlevel.checkpoint()
        sample = Big(index)
        self.refs.append(weakref.ref(sample))
        return sample


def alive(dataset: Tracked) -> int:
    gc.collect()
    return sum(1 for ref in dataset.refs if ref() is not None)


def as_list(samples: list[Any]) -> list[Any]:
    return list(samples)


def new_loader(dataset: Tracked) -> al.Loader:
    return al.Loader(dataset, batch_size=4, concurrency=8, collate_fn=as_list)


# -- memory held after close() ---------------------------------------------------------------


def test_close_after_a_break_keeps_no_sample_of_the_closed_epoch_alive() -> None:
    """``with loader:`` / ``loader.close()`` after leaving a ``for`` early: the loader lives
    on (for the next epoch), but the closed epoch's samples must not. They are: the
    ``Epoch`` stays referenced by ``loader._current`` and its ``_ready`` deque (uncollated
    batches fetched ahead, up to the window of 4 x concurrency samples) is never cleared
    on cancel. ``aclose()`` drops ``_current`` and does release them (checked: that variant passes)."""
    dataset = Tracked()
    loader = new_loader(dataset)
    with loader:
        for step, _batch in enumerate(loader):
            if step == 2:
                break
    del _batch
    assert alive(dataset) == 0  # was 28 (7 fetched-ahead batches of 4)


def test_close_inside_the_loop_after_a_cancelled_epoch_keeps_no_sample_alive() -> None:
    """``loader.close()`` (sync) from async code after the task running ``async for`` was
    cancelled: ``loader._current`` keeps the cancelled Epoch, which still holds the
    batcher's partial batch (``batcher.values``) and the collated batches in its memory
    stream's buffer (``current_buffer_used`` stays 2 after the receive side is closed)."""
    dataset = Tracked()
    loader = new_loader(dataset)

    async def consume(taken: asyncio.Event) -> None:
        async for batch in loader:
            del batch
            taken.set()
            await anyio.sleep_forever()

    async def main() -> None:
        taken = asyncio.Event()
        task = asyncio.create_task(consume(taken))
        await taken.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        loader.close()

    asyncio.run(main())
    assert alive(dataset) == 0  # was 10-11


def test_an_iterator_kept_after_close_holds_no_batch() -> None:
    """docs/sync-bridge.md's close() example keeps the iterator after ``loader.close()``
    ("the iterator is exhausted from now on"). An exhausted iterator should hold no data,
    yet its pump's queue keeps the batches the loop thread had put there, and the pump
    keeps the loader (hence the epoch and its ``_ready`` batches)."""
    dataset = Tracked()
    loader = new_loader(dataset)
    batches = iter(loader)
    first = next(batches)
    loader.close()
    assert list(batches) == []
    del first
    del loader
    assert alive(dataset) == 0  # was 32
    del batches


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_close_stops_a_torch_loaders_worker_processes() -> None:
    """``loader.close()`` with a ``to_torch_loader()`` epoch left open (its iterator kept,
    not exhausted): was, the DataLoader's worker processes ran on until that iterator was
    dropped; now close() ends the epoch and its workers, and the state keeps what the
    training loop took."""
    pytest.importorskip("torch")
    import multiprocessing

    import numpy as np

    before = set(multiprocessing.active_children())
    loader = al.Loader(al.from_sequence(np.arange(1000)), batch_size=4)
    batches = iter(loader.to_torch_loader(num_workers=2))
    assert next(batches).tolist() == [0, 1, 2, 3]
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.close()
    assert set(multiprocessing.active_children()) - before == set()
    assert list(batches) == []
    assert loader.state_dict()["progress"]["watermark"] == 4


class _FailsAt(al.AsyncDataset[int]):
    """Sample ``i`` is ``i``, but sample ``bad`` raises."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if index == self.bad:
            raise KeyError(f"boom-{index}")
        return index


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_a_workers_error_stops_the_torch_loaders_worker_processes() -> None:
    """A ``to_torch_loader()`` epoch that ends in a worker's error: was, its worker
    processes ran on until the collector took the error's reference cycle, whose
    finalizers then stalled whatever code was running for 5 s per worker (the index
    queues' feeder threads were stopped before the DataLoader iterator asked its workers
    to exit; this hung an unrelated test later in the suite). Now the epoch stops them on
    its way out."""
    pytest.importorskip("torch")
    import multiprocessing

    before = set(multiprocessing.active_children())
    loader = al.Loader(_FailsAt(16, bad=5), batch_size=2)
    with pytest.raises(al.SampleError) as caught:
        list(loader.to_torch_loader(num_workers=2))
    assert set(multiprocessing.active_children()) - before == set()
    del caught
