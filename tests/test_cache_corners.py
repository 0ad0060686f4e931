"""Corners of the caches and of how the Loader uses them (found by helper-51): tensor
subclasses sized by their buffers, a cache/retry/breaker class refused, a transform that
updates a cached dict in place, single cached samples under to_torch(), one DiskCache
shared by two sync loaders (two event loops)."""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np
import pytest

import asyncload as al
from asyncload.cache import LRUCache
from asyncload.datasets import normalize_index

ANYIO_BACKENDS = ["asyncio"]


def value_of(value: Any) -> Callable[[], Awaitable[Any]]:
    async def load() -> Any:
        return value

    return load


class Fresh(al.AsyncDataset[Any]):
    """A stand-in for remote storage: every fetch builds a new sample (as a decode of
    downloaded bytes would), so nothing is shared between fetches but what a cache shares."""

    def __init__(self, n: int, make: Callable[[int], Any]) -> None:
        self.n = n
        self.make = make
        self.fetches = 0

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> Any:
        self.fetches += 1
        return self.make(normalize_index(index, self.n))

    def key_of(self, index: int) -> Hashable:
        return f"obj/{normalize_index(index, self.n)}"


# -- sizing ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_tensor_subclass_is_sized_by_its_buffer_and_kept_within_max_bytes() -> None:
    # torch.Tensor subclasses are tensors (torchvision's tv_tensors.Image/Mask, a user's own
    # subclass): the budget must count their buffers, not sys.getsizeof's ~80 bytes.
    torch = pytest.importorskip("torch")

    class Image(torch.Tensor):  # defined outside the torch package
        pass

    cache = LRUCache(max_bytes=10_000)
    for key in ("a", "b"):
        value = torch.zeros(1000, dtype=torch.float32).as_subclass(Image)  # 4000 bytes
        await cache.get_or_load(key, value_of(value))
    assert cache.statistics()["bytes"] == 2 * 4000
    # A third one must evict: 12,000 bytes do not fit in 10,000.
    await cache.get_or_load("c", value_of(torch.zeros(1000).as_subclass(Image)))
    stats = cache.statistics()
    assert stats["bytes"] <= 10_000, stats
    assert (stats["items"], stats["evictions"]) == (2, 1)


# -- Loader(cache=...) -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [al.LRUCache, al.TieredCache])
def test_loader_refuses_a_cache_class_instead_of_a_cache(cls: type) -> None:
    # cache=al.LRUCache (the parentheses forgotten) passes the "has get_or_load" check (a
    # class has the function) and then fails every sample with "get_or_load() missing 1
    # required positional argument: 'load'" (or skips the whole epoch with on_error="skip").
    ds = al.from_sequence([b"a", b"b"])
    with pytest.raises(TypeError, match="cache"):
        al.Loader(ds, batch_size=None, cache=cls)


@pytest.mark.parametrize(("name", "cls"), [("retry", al.Retry), ("breaker", al.CircuitBreaker)])
def test_loader_refuses_a_retry_or_breaker_class(name: str, cls: type) -> None:
    # retry=al.Retry (no parentheses) ran the epoch with no retries at all; a breaker class
    # failed every sample.
    with pytest.raises(TypeError, match=f"{name} must be .* got the class {cls.__name__}"):
        al.Loader(al.from_sequence([1]), **{name: cls})


@pytest.mark.anyio
async def test_a_transform_that_updates_a_cached_dict_in_place_never_changes_later_epochs() -> None:
    # docs/caching.md: the cache holds what the dataset returns, "before the Loader's
    # transform, so the transform runs on every epoch and can never corrupt what is cached".
    # A dict sample updated in place by the transform (sample["x"] = decode(sample["x"]), the
    # common idiom) is the cached dict itself: epoch 2 transforms the transformed value.
    ds = Fresh(3, lambda i: {"raw": b"abc", "label": i})

    def transform(sample: dict[str, Any]) -> dict[str, Any]:
        sample["raw"] = sample["raw"] + b"!"
        return sample

    loader = al.Loader(ds, batch_size=None, cache=al.LRUCache(), transform=transform)
    epochs = []
    for _ in range(3):
        epochs.append([s["raw"] async for s in loader])
    assert ds.fetches == 3  # epochs 2 and 3 were served by the cache
    assert epochs == [[b"abc!"] * 3] * 3


def test_to_torch_single_samples_from_a_cache_do_not_write_through_to_it() -> None:
    # The cache serves numpy arrays read-only so that an in-place op in the training loop
    # cannot corrupt later epochs. Through to_torch() with batch_size=None, DataLoader's
    # default_convert turns each cached array into a tensor with torch.from_numpy: a
    # UserWarning ("The given NumPy array is not writable"), then a *writable* tensor over
    # the cache's own memory, so x.add_(1) changes what every later epoch gets.
    torch = pytest.importorskip("torch")
    ds = Fresh(4, lambda i: np.zeros(3, np.float32))
    loader = al.Loader(ds, batch_size=None, cache=al.LRUCache())
    dl = torch.utils.data.DataLoader(loader.to_torch(), batch_size=None, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in dl:
            x.add_(1.0)  # a training loop normalising its input in place
        second = [x.clone() for x in dl]
    assert ds.fetches == 4  # epoch 2 came from the cache
    for x in second:
        assert torch.equal(x, torch.zeros(3)), x
    assert not [w for w in caught if "not writable" in str(w.message)]


def test_two_sync_loaders_sharing_a_disk_cache_each_get_their_samples(tmp_path: Any) -> None:
    # The common loop: `for batch in train_loader:` with `for vb in val_loader:` inside it,
    # both plain (sync) iterations over one DiskCache object. Each sync Loader runs its own
    # event loop in its own thread, and the train loader keeps fetching (prefetch) while the
    # val loop runs: the DiskCache's lookup batcher (one per object) then hands one loop's
    # anyio.Event to the other, and val's samples fail with "RuntimeError: <asyncio Event>
    # is bound to a different event loop" (seen with two real sync loaders; made
    # deterministic here: the train side is an event loop in a thread whose lookup batch
    # is still running, held on the directory's ledger lock while it deletes a damaged
    # entry).
    import fcntl
    import os
    import threading
    import time

    import anyio

    disk = al.DiskCache(tmp_path, max_bytes=1 << 20)
    with open(disk.path_of("train/0"), "wb") as f:
        f.write(b"not an entry")
    ledger = os.open(os.path.join(tmp_path, "usage"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(ledger, fcntl.LOCK_EX)
    train_blocked = threading.Event()
    train_result: list[Any] = []

    async def train_side() -> None:
        async def ask(key: str) -> None:
            train_result.append(await disk.get_or_load(key, value_of(key.encode())))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, "train/0")
            tg.start_soon(ask, "train/1")
            await anyio.wait_all_tasks_blocked()
            train_blocked.set()

    val = Fresh(4, lambda i: b"val %d" % i)
    val_result: dict[str, Any] = {}

    def val_side() -> None:
        try:
            with al.Loader(val, batch_size=None, cache=disk) as val_loader:
                val_result["got"] = list(val_loader)  # the sync bridge: its own loop
        except BaseException as exc:
            val_result["error"] = exc

    train = threading.Thread(target=anyio.run, args=(train_side,))
    train.start()
    released = False
    try:
        assert train_blocked.wait(30)
        val_thread = threading.Thread(target=val_side)
        val_thread.start()
        # Until val's first lookup is in flight (or val is over): thread progress only.
        deadline = time.monotonic() + 30
        while val_thread.is_alive() and disk.statistics()["in_flight"] <= 2:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        fcntl.flock(ledger, fcntl.LOCK_UN)
        released = True
        val_thread.join(30)
        assert not val_thread.is_alive()
    finally:
        if not released:
            fcntl.flock(ledger, fcntl.LOCK_UN)
        os.close(ledger)
        train.join(30)
    assert "error" not in val_result, val_result["error"]
    assert val_result["got"] == [b"val %d" % i for i in range(4)]
    assert sorted(train_result) == [b"train/0", b"train/1"]
