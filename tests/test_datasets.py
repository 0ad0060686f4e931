"""Datasets: indexing, views (map, filter, Subset, ConcatDataset), in-memory sequences and
wrapped torch datasets."""

from __future__ import annotations

import asyncio
import operator
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import numpy as np
import pytest
import torch
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al

pytestmark = pytest.mark.anyio


class Squares(al.AsyncDataset[int]):
    """A user dataset that relies on the default ``getitems``; counts its fetches."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[int] = []

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        self.calls.append(index)
        await anyio.lowlevel.checkpoint()
        return index * index


class Numbers(al.AsyncIterableDataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.n):
            await anyio.lowlevel.checkpoint()
            yield i


def make_views() -> dict[str, tuple[al.AsyncDataset[Any], list[Any]]]:
    """Datasets of every built-in kind, with the samples they should hold."""
    base = list(range(10, 20))
    seq = al.from_sequence(base)
    return {
        "sequence": (seq, base),
        "map": (seq.map(lambda x: x + 1), [x + 1 for x in base]),
        "subset": (al.Subset(seq, [3, 1, 4]), [13, 11, 14]),
        "concat": (seq + al.from_sequence([1, 2]), [*base, 1, 2]),
        "torch": (al.from_torch(TorchSquares(6)), [i * i for i in range(6)]),
    }


class TorchSquares(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.n = n
        self.threads: set[int] = set()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(index)
        with self.lock:
            self.threads.add(threading.get_ident())
        return index * index


@pytest.mark.parametrize("kind", ["sequence", "map", "subset", "concat", "torch"])
async def test_indexing(kind: str) -> None:
    ds, expected = make_views()[kind]
    n = len(expected)
    assert len(ds) == n
    for i in range(n):
        assert await ds[i] == expected[i]
        assert await ds[i - n] == expected[i]  # negative, as in Python
    assert await ds[np.int64(1)] == expected[1]
    with pytest.raises(IndexError):
        await ds[n]
    with pytest.raises(IndexError):
        await ds[-n - 1]
    for bad in (1.0, "1", None):
        with pytest.raises(TypeError):
            await ds[bad]  # type: ignore[index]


@pytest.mark.parametrize("kind", ["sequence", "map", "subset", "concat", "torch"])
async def test_getitems_returns_in_the_order_asked(kind: str) -> None:
    ds, expected = make_views()[kind]
    order = [2, 0, 1, 2, -1]
    assert await ds.getitems(order) == [expected[i] for i in order]
    assert await ds.getitems([]) == []


async def test_default_getitems_awaits_each_index_in_order() -> None:
    ds = Squares(10)
    assert await ds.getitems([7, 2, 5]) == [49, 4, 25]
    assert ds.calls == [7, 2, 5]


def test_getitem_is_a_coroutine() -> None:
    ds = al.from_sequence([5, 6, 7])
    assert asyncio.run(ds[0]) == 5
    assert asyncio.run(ds[-1]) == 7
    assert asyncio.run(ds.getitems([2, 1])) == [7, 6]
    assert asyncio.run((ds + ds)[4]) == 6
    assert asyncio.run(ds.map(str)[1]) == "6"


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 6), min_size=1, max_size=5), data=st.data())
def test_concat_maps_global_to_local_indices(lengths: list[int], data: st.DataObject) -> None:
    parts = [al.from_sequence([(d, j) for j in range(n)]) for d, n in enumerate(lengths)]
    concat: al.AsyncDataset[tuple[int, int]] = parts[0]
    for part in parts[1:]:
        concat = concat + part
    if len(parts) == 1:
        concat = al.ConcatDataset(parts)
    expected = [(d, j) for d, n in enumerate(lengths) for j in range(n)]
    order = data.draw(st.permutations(range(len(expected))))

    async def check() -> None:
        assert isinstance(concat, al.ConcatDataset)
        assert len(concat) == len(expected)
        for i, sample in enumerate(expected):
            assert await concat[i] == sample
            assert await concat[i - len(expected)] == sample
        with pytest.raises(IndexError):
            await concat[len(expected)]
        with pytest.raises(IndexError):
            await concat[-len(expected) - 1]
        assert await concat.getitems(order) == [expected[i] for i in order]

    anyio.run(check)


def test_concat_constructor_and_add() -> None:
    a, b = al.from_sequence([1]), al.from_sequence([2, 3])
    assert isinstance(a + b, al.ConcatDataset)
    assert len(al.ConcatDataset([a, b, a])) == 4
    with pytest.raises(TypeError):
        operator.add(a, [4])


async def test_subset() -> None:
    base = al.from_sequence(list("abcdef"))
    sub = al.Subset(base, [5, 0, 2])
    assert len(sub) == 3
    assert [await sub[i] for i in range(3)] == ["f", "a", "c"]
    assert await sub[-1] == "c"
    with pytest.raises(IndexError):
        await sub[3]
    # A subset of a subset.
    assert await al.Subset(sub, [2, 0]).getitems([0, 1]) == ["c", "f"]


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_map(is_async: bool) -> None:
    if is_async:

        async def fn(x: int) -> int:
            await anyio.lowlevel.checkpoint()
            return x * 10

    else:

        def fn(x: int) -> int:
            return x * 10

    ds = al.from_sequence([1, 2, 3]).map(fn)
    assert len(ds) == 3
    assert await ds[0] == 10
    assert await ds[-1] == 30
    assert await ds.getitems([2, 0]) == [30, 10]
    # Views compose.
    assert await ds.map(str)[1] == "20"


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_filter(is_async: bool) -> None:
    if is_async:

        async def pred(x: int) -> bool:
            await anyio.lowlevel.checkpoint()
            return x % 2 == 0

    else:

        def pred(x: int) -> bool:
            return x % 2 == 0

    ds = al.from_sequence(list(range(10))).filter(pred)
    assert await ds[4] == 4
    assert await ds[-2] == 8
    with pytest.raises(LookupError):
        await ds[3]
    with pytest.raises(al.SampleFiltered):
        await ds[5]
    assert await ds.getitems([0, 2, 8]) == [0, 2, 8]
    with pytest.raises(LookupError):
        await ds.getitems([0, 1])
    # map after filter keeps the drop; filter after map sees mapped values.
    with pytest.raises(LookupError):
        await ds.map(lambda x: x + 1)[1]
    assert await al.from_sequence([1, 2]).map(lambda x: x * 2).filter(pred)[0] == 2


async def test_filter_is_not_an_index_error() -> None:
    """A dropped sample is a LookupError, yet not IndexError: code that stops at IndexError
    (the old sequence protocol) must not mistake a dropped sample for the end."""
    ds = al.from_sequence([1, 2]).filter(lambda x: x > 1)
    with pytest.raises(LookupError) as info:
        await ds[0]
    assert not isinstance(info.value, IndexError)


async def test_from_sequence_kinds() -> None:
    array = np.arange(12).reshape(4, 3)
    ds = al.from_sequence(array)
    assert len(ds) == 4
    np.testing.assert_array_equal(await ds[1], array[1])
    np.testing.assert_array_equal(await ds[-1], array[3])
    tensor = torch.arange(6).reshape(3, 2)
    ts = al.from_sequence(tensor)
    assert len(ts) == 3
    assert torch.equal(await ts[2], tensor[2])
    assert torch.equal(await ts[-3], tensor[0])
    with pytest.raises(IndexError):
        await ts[3]
    assert await al.from_sequence(("a", "b")).getitems([1, 0]) == ["b", "a"]
    with pytest.raises(TypeError):
        al.from_sequence(5)  # type: ignore[arg-type]


async def test_from_torch_runs_in_threads() -> None:
    raw = TorchSquares(8)
    ds = al.from_torch(raw)
    assert len(ds) == 8
    loop_thread = threading.get_ident()
    results = {}

    async def fetch(i: int) -> None:
        results[i] = await ds[i]

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(fetch, i)
    assert results == {i: i * i for i in range(8)}
    assert raw.threads, "no call was recorded"
    assert loop_thread not in raw.threads
    with pytest.raises(IndexError):
        await ds[8]


class HoldingTorchDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Each call waits for ``release``; records the most calls ever running at once."""

    def __init__(self, n: int, full_at: int) -> None:
        self.n = n
        self.full_at = full_at
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.full = threading.Event()
        self.release = threading.Event()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.active >= self.full_at:
                self.full.set()
        try:
            # A safety bound against a hang, never reached in a passing run.
            assert self.release.wait(30), "never released"
            return index + 100
        finally:
            with self.lock:
                self.active -= 1


async def test_from_torch_max_threads_bound() -> None:
    raw = HoldingTorchDataset(8, full_at=2)
    ds = al.from_torch(raw, max_threads=2)
    results: dict[int, int] = {}

    async def fetch(i: int) -> None:
        results[i] = await ds[i]

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(fetch, i)
        # Two calls are running (and holding); the other six must be waiting for a thread.
        assert await anyio.to_thread.run_sync(raw.full.wait, 30)
        await anyio.wait_all_tasks_blocked()
        assert raw.active == 2
        raw.release.set()
    assert results == {i: i + 100 for i in range(8)}
    assert raw.max_active == 2


def test_from_torch_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_threads"):
        al.from_torch(TorchSquares(2), max_threads=0)
    with pytest.raises(TypeError):
        al.from_torch(object())


async def test_iterable_dataset_map_and_filter() -> None:
    stream = Numbers(10)
    assert [x async for x in stream] == list(range(10))

    async def double(x: int) -> int:
        await anyio.lowlevel.checkpoint()
        return 2 * x

    assert [x async for x in stream.map(double)] == [2 * x for x in range(10)]
    assert [x async for x in stream.map(lambda x: x + 1)] == list(range(1, 11))
    assert [x async for x in stream.filter(lambda x: x % 3 == 0)] == [0, 3, 6, 9]

    async def odd(x: int) -> bool:
        return x % 2 == 1

    assert [x async for x in stream.filter(odd).map(str)] == ["1", "3", "5", "7", "9"]


def test_map_and_filter_need_callables() -> None:
    ds = al.from_sequence([1])
    with pytest.raises(TypeError):
        ds.map(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ds.filter("x")  # type: ignore[arg-type]


def test_from_torch_pickles_after_use() -> None:
    """DataLoader workers get a pickled copy: a dataset already used in a loop must pickle."""
    import pickle

    ds = al.from_torch(torch.utils.data.TensorDataset(torch.arange(4)))

    async def fetch() -> Any:
        return await ds[2]

    assert int(anyio.run(fetch)[0]) == 2
    copy = pickle.loads(pickle.dumps(ds))
    assert int(anyio.run(copy.__getitem__, 3)[0]) == 3


async def test_concat_keys_keep_parts_apart(tmp_path: Any) -> None:
    """Two folders with the same file name: one cache must not serve one for the other."""
    for name, body in (("a", b"A"), ("b", b"B")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.bin").write_bytes(body)
    a = al.sources.FileSource.from_directory(tmp_path / "a")
    b = al.sources.FileSource.from_directory(tmp_path / "b")
    ds = a + b
    assert ds.key_of(0) != ds.key_of(1)
    loader = al.Loader(ds, batch_size=None, cache=al.LRUCache())
    assert [x async for x in loader] == [b"A", b"B"]


@pytest.mark.parametrize("wrong", [list(range(10)), "torch"])
def test_subset_refuses_what_is_not_an_async_dataset(wrong: Any) -> None:
    class TD(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> int:
            return index

    dataset: Any = TD() if wrong == "torch" else wrong
    name = type(dataset).__name__
    with pytest.raises(TypeError, match=rf"^Subset: dataset must be an AsyncDataset, got {name}"):
        al.Subset(dataset, [1, 2])
    with pytest.raises(TypeError, match=r"al\.from_torch\(.*al\.from_sequence\("):
        al.Subset(dataset, [1, 2])
    with pytest.raises(TypeError, match=r"^ConcatDataset: .*al\.from_torch\("):
        al.ConcatDataset([dataset])


def test_a_dataset_class_without_init_refuses_arguments() -> None:
    class Fixed(al.AsyncDataset[int]):
        def __len__(self) -> int:
            return 1

        async def __getitem__(self, index: int) -> int:
            return index

    assert len(Fixed()) == 1
    with pytest.raises(TypeError, match=r"Fixed\(\) takes no arguments"):
        Fixed(5)  # type: ignore[call-arg]
