"""``loader.to_torch()`` under ``torch.utils.data.DataLoader(..., batch_size=None)``:
every batch of this rank exactly once per epoch, spread over the workers; numpy batches
arrive as tensors. Fork for most cases; spawn for one small case (it is slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data

import asyncload as al


def numpy_loader(n: int = 23, **kwargs: Any) -> al.Loader:
    data = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
    kwargs.setdefault("batch_size", 4)
    return al.Loader(al.from_sequence(data), **kwargs)


def key(batch: Any) -> tuple[int, ...]:
    """A batch of rows ``[2i, 2i + 1]`` as the tuple of its sample indices."""
    array = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    return tuple(int(row[0]) // 2 for row in array)


def data_loader(loader: al.Loader, num_workers: int, context: str = "fork", **kwargs: Any) -> Any:
    if num_workers:
        kwargs["multiprocessing_context"] = context
    return torch.utils.data.DataLoader(
        loader.to_torch(), batch_size=None, num_workers=num_workers, **kwargs
    )


def test_to_torch_is_an_iterable_dataset() -> None:
    assert isinstance(numpy_loader().to_torch(), torch.utils.data.IterableDataset)


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_every_batch_once(num_workers: int) -> None:
    loader = numpy_loader(shuffle=True, seed=5)
    expected = [key(b) for b in loader]
    dl = data_loader(loader, num_workers)
    assert len(dl) == len(loader) == 6
    got = list(dl)
    assert all(isinstance(b, torch.Tensor) for b in got)
    assert all(b.dtype == torch.int64 and b.shape[1] == 2 for b in got)
    keys = [key(b) for b in got]
    assert sorted(keys) == sorted(expected)
    assert len(keys) == len(set(keys)) == len(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_set_epoch_reaches_the_workers(num_workers: int) -> None:
    loader = numpy_loader(n=40, shuffle=True, seed=5)
    dl = data_loader(loader, num_workers)
    epoch0 = sorted(key(b) for b in dl)
    loader.set_epoch(1)
    expected1 = sorted(key(b) for b in loader)
    epoch1 = sorted(key(b) for b in dl)
    assert epoch1 == expected1
    assert epoch1 != epoch0


def test_a_random_torch_sampler_gives_every_worker_the_same_order() -> None:
    """torch's RandomSampler draws from the global generator, which torch seeds apart in
    each worker: each worker drew its own order, and some samples came twice, others never.
    The sampler is now iterated with the global generators seeded from (seed, epoch)."""
    loader = numpy_loader(n=40, sampler=torch.utils.data.RandomSampler(range(40)), seed=3)
    state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    expected = list(loader.plan())
    assert torch.equal(torch.random.get_rng_state(), state[0])  # restored
    assert (np.random.get_state()[1] == state[1]).all()
    assert sorted(expected) == list(range(40)) and expected != list(range(40))
    got = [i for b in data_loader(loader, 2) for i in key(b)]
    assert sorted(got) == list(range(40))
    fresh = numpy_loader(n=40, sampler=torch.utils.data.RandomSampler(range(40)), seed=3)
    assert list(fresh.plan()) == expected  # the same in another process, or after a restart
    fresh.set_epoch(1)
    assert list(fresh.plan()) != expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_together_cover_the_dataset(num_workers: int) -> None:
    keys: list[tuple[int, ...]] = []
    per_rank = []
    for rank in range(2):
        loader = numpy_loader(n=21, batch_size=3, shuffle=True, seed=9, rank=rank, world_size=2)
        got = [key(b) for b in data_loader(loader, num_workers)]
        assert len(got) == len(loader)
        per_rank.append(sum(len(k) for k in got))
        keys.extend(got)
    samples = [i for k in keys for i in k]
    assert set(samples) == set(range(21))
    assert per_rank[0] == per_rank[1] == 11  # padded by wrapping: 22 samples for 21


def test_dict_samples_become_dicts_of_tensors() -> None:
    samples = [{"x": np.full(3, i, dtype=np.float32), "y": i, "name": f"s{i}"} for i in range(10)]
    loader = al.Loader(al.from_sequence(samples), batch_size=4)
    got = list(data_loader(loader, 2))
    assert len(got) == 3
    xs = torch.cat([b["x"] for b in got])
    assert isinstance(got[0]["x"], torch.Tensor) and got[0]["x"].dtype == torch.float32
    assert isinstance(got[0]["y"], torch.Tensor)
    assert sorted(int(v) for v in xs[:, 0]) == list(range(10))
    assert sorted(n for b in got for n in b["name"]) == sorted(f"s{i}" for i in range(10))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pin_memory(num_workers: int) -> None:
    loader = numpy_loader(n=12)
    got = list(data_loader(loader, num_workers, pin_memory=True))
    assert sorted(key(b) for b in got) == sorted(key(b) for b in loader)
    assert all(isinstance(b, torch.Tensor) for b in got)


def test_tensor_samples_are_stacked_with_torch() -> None:
    samples = [torch.full((2,), i) for i in range(6)]
    loader = al.Loader(al.from_sequence(samples), batch_size=3)
    got = list(data_loader(loader, 0))
    assert [b.tolist() for b in got] == [[[0, 0], [1, 1], [2, 2]], [[3, 3], [4, 4], [5, 5]]]


def test_small_batches_cross_by_value_large_ones_by_shared_memory() -> None:
    """torch's shared-memory hand-over costs about 1 ms a tensor; small ones are copied
    through the pipe instead, and arrive as ordinary tensors with the same values."""
    from multiprocessing.reduction import ForkingPickler

    from asyncload._torch import BY_VALUE_BYTES

    small = al.Loader(
        al.from_sequence(np.arange(64, dtype=np.float32).reshape(16, 4)), batch_size=4
    )
    rows = BY_VALUE_BYTES // 4 // 4 + 1  # a batch of 4 such samples is just over the limit
    large_data = np.arange(8 * rows, dtype=np.float32).reshape(8, rows)
    large = al.Loader(al.from_sequence(large_data), batch_size=4)

    got_small = list(data_loader(small, 2))
    got_large = list(data_loader(large, 2))

    assert not any(b.is_shared() for b in got_small)
    assert all(b.is_shared() for b in got_large)
    assert sorted(b[0, 0].item() for b in got_small) == [0, 16, 32, 48]
    assert torch.equal(
        torch.cat(sorted(got_large, key=lambda b: b[0, 0].item())), torch.from_numpy(large_data)
    )
    # The training loop's own process keeps torch's reduction.
    assert (
        ForkingPickler._extra_reducers[torch.Tensor].__module__
        == "torch.multiprocessing.reductions"
    )


ODD_TENSORS = {
    "bfloat16 (no numpy dtype)": torch.arange(3).to(torch.bfloat16),
    "sparse": torch.eye(3).to_sparse(),
    "conjugate view": (torch.arange(4.0) * (1 + 2j)).to(torch.complex64).conj(),
    "channels_last": torch.arange(120.0).reshape(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "0-d": torch.tensor(3.5),
    "empty": torch.empty(0, 7),
}


@pytest.mark.parametrize("name", list(ODD_TENSORS))
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # torch's rebuild
def test_any_tensor_crosses_from_a_worker(name: str) -> None:
    """Each one arrives equal, by value or torch's way. (A reduction that raised would
    make the worker's queue drop the batch: the timeout turns that hang into a failure.)"""
    sent = ODD_TENSORS[name]
    loader = al.Loader(al.from_sequence([sent, sent]), batch_size=None)
    got = list(data_loader(loader, 1, timeout=60))
    assert len(got) == 2
    for tensor in got:
        assert tensor.dtype == sent.dtype and tensor.shape == sent.shape
        if sent.is_sparse:
            assert torch.equal(tensor.to_dense(), sent.to_dense())
        else:
            assert torch.equal(tensor.resolve_conj(), sent.resolve_conj())


def test_by_value_keeps_a_views_values() -> None:
    """A transposed view is copied as its values; its storage's other bytes stay behind."""
    import pickle

    from asyncload._torch import reduce_small_tensor

    base = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    view = base.t()[1:4]
    rebuild, args = reduce_small_tensor(view)
    copy = rebuild(*pickle.loads(pickle.dumps(args)))
    assert torch.equal(copy, view) and copy.dtype == torch.int32
    assert copy.untyped_storage().nbytes() == view.numel() * 4
    copy[0, 0] = -1
    assert base[0, 1] == 1  # a copy, not the sender's memory


def test_sample_error_reaches_the_training_loop() -> None:
    class Broken(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 6

        async def __getitem__(self, index: int) -> int:
            if index == 3:
                raise OSError("unreadable")
            return index

    with pytest.raises(al.SampleError) as info:
        list(data_loader(al.Loader(Broken(), batch_size=2), 0))
    assert info.value.index == 3


def test_sample_error_from_a_worker_process() -> None:
    """torch re-raises a worker's exception in the main process; the sample's index and
    the error's type must survive the trip."""

    class Broken(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 6

        async def __getitem__(self, index: int) -> int:
            if index == 3:
                raise OSError("unreadable")
            return index

    # torch rebuilds the exception from its message in the main process: the type survives,
    # the index is in the message (with the worker's traceback).
    with pytest.raises(al.SampleError) as info:
        list(data_loader(al.Loader(Broken(), batch_size=2), 1))
    assert "sample 3" in str(info.value)
    assert "OSError: unreadable" in str(info.value)


def test_spawn_workers() -> None:
    loader = numpy_loader(n=14, batch_size=3, shuffle=True, seed=1)
    got = list(data_loader(loader, 2, context="spawn"))
    assert all(isinstance(b, torch.Tensor) for b in got)
    keys = [key(b) for b in got]
    assert sorted(keys) == sorted(key(b) for b in loader)
    assert len(keys) == len(set(keys)) == 5


DISTRIBUTED = """
import json, sys
import torch.distributed as dist
import asyncload as al

dist.init_process_group(
    "gloo", init_method="file://" + sys.argv[1], rank=int(sys.argv[2]), world_size=2
)
try:
    loader = al.Loader(al.from_sequence(list(range(11))), batch_size=2, shuffle=True, seed=4)
    print(json.dumps([int(x) for batch in loader for x in batch]))
finally:
    dist.destroy_process_group()
"""


def test_ranks_default_to_torch_distributed(tmp_path: Path) -> None:
    """Two real gloo processes: without rank/world_size keywords, each loader takes its
    share from torch.distributed."""
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DISTRIBUTED, str(store), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    shares = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        shares.append(json.loads(out.strip().splitlines()[-1]))
    assert [len(s) for s in shares] == [6, 6]  # 11 samples, padded to 12
    assert set(shares[0]) | set(shares[1]) == set(range(11))
    assert shares[0] != shares[1]


def test_an_in_memory_epoch_in_a_worker_makes_one_batch_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a DataLoader worker (here faked in this process: ``get_worker_info`` answers as
    a worker's does), each request makes one batch. Made a few at a go, as in a plain
    ``for``, they reached the DataLoader in bursts; it takes batches from its workers in
    turn, so the other worker idled through each burst (2 workers over CPU-bound samples:
    15-17k samples/s where a plain DataLoader made 18-19k)."""
    fetched: list[int] = []

    def note(x: int) -> int:
        fetched.append(x)
        return x

    loader = al.Loader(al.from_sequence(list(range(64))), batch_size=4, transform=note)
    info = torch.utils.data._utils.worker.WorkerInfo(id=0, num_workers=1, seed=0, dataset=None)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)
    batches = iter(loader.to_torch())
    assert list(next(batches)) == [0, 1, 2, 3]
    assert fetched == [0, 1, 2, 3]  # was all 64: a whole window at a go
    assert list(next(batches)) == [4, 5, 6, 7]
    assert fetched == list(range(8))
    batches.close()  # type: ignore[attr-defined]
