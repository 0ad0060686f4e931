"""Dataset corners: map over attribute-dict samples, cache keys of wrapped closures, PadCollate
dtypes, SampleFiltered through views, from_torch and iterable datasets."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch.utils.data

import asyncload as al
from asyncload.cache import cache_key

# -- map over a batched source: samples that answer any attribute ------------------------


class DotDict(dict):  # type: ignore[type-arg]
    """The common "dict with attribute access" idiom: a missing attribute is None."""

    __getattr__ = dict.get


@pytest.mark.anyio
async def test_map_getitems_with_attribute_dict_samples() -> None:
    """``MappedDataset._apply`` takes any sample with an ``__await__`` attribute for an
    awaitable (``hasattr``), so a sample whose ``__getattr__`` answers every name is awaited
    and ``getitems`` raises, while ``ds[i]`` (``inspect.isawaitable``) works."""
    ds = al.from_sequence([1, 2, 3]).map(lambda x: DotDict(value=x))
    assert ds.batched
    assert await ds[0] == {"value": 1}
    assert await ds.getitems([0, 2]) == [{"value": 1}, {"value": 3}]


# -- map cache keys: a closure that borrowed a module-level name ------------------------


def _scaled(k: int) -> Callable[[Callable[[int], int]], Callable[[int], int]]:
    def decorate(fn: Callable[[int], int]) -> Callable[[int], int]:
        @functools.wraps(fn)
        def wrapper(x: int) -> int:
            return fn(x) * k

        return wrapper

    return decorate


def _identity(x: int) -> int:
    return x


_double = _scaled(2)(_identity)
_triple = _scaled(3)(_identity)


def test_map_cache_keys_of_wrapped_closures_differ() -> None:
    """``function_tag`` names any function whose ``__qualname__`` has no ``<`` by
    ``module.qualname``; ``functools.wraps`` copies the wrapped function's name onto a
    closure, so two closures with different settings get one tag, one cache entry."""
    base = al.from_sequence([1, 2, 3])
    assert cache_key(base.map(_double), 0) != cache_key(base.map(_triple), 0)


@pytest.mark.anyio
async def test_shared_cache_serves_each_wrapped_closure_its_own_values() -> None:
    base = al.from_sequence([1, 2, 3])
    cache = al.LRUCache()
    doubled = [x async for x in al.Loader(base.map(_double), batch_size=None, cache=cache)]
    tripled = [x async for x in al.Loader(base.map(_triple), batch_size=None, cache=cache)]
    assert doubled == [2, 4, 6]
    assert tripled == [3, 6, 9]  # got [2, 4, 6]: _double's entries


# -- PadCollate: the dtype of the first array --------------------------------------------


def test_pad_collate_keeps_floats_after_an_int_array() -> None:
    """``PadCollate._pad`` allocates the padded batch with the first array's dtype, so a
    float array after an int one is silently truncated (0.5 -> 0)."""
    padded, lengths = al.PadCollate()([np.array([1, 2]), np.array([0.5])])
    assert lengths.tolist() == [2, 1]
    assert padded[1, 0] == 0.5


def test_pad_collate_dict_field_keeps_floats_after_an_int_array() -> None:
    batch = al.PadCollate()([{"x": np.array([1, 2])}, {"x": np.array([0.5, 0.25, 0.75])}])
    assert batch["x"][1].tolist() == [0.5, 0.25, 0.75]


# -- SampleFiltered through Subset / ConcatDataset: the wrong index -----------------------


@pytest.mark.anyio
async def test_sample_filtered_names_the_index_awaited_through_views() -> None:
    """``SampleFiltered.index`` is the filter view's own index: awaiting ``Subset(f,
    [7])[0]`` or ``(seq + f)[12]`` raises ``SampleFiltered(7)`` / ``SampleFiltered(2)``,
    an index the caller never asked for (and the message says "sample 7")."""
    none = al.from_sequence(list(range(10))).filter(lambda x: False)
    with pytest.raises(al.SampleFiltered) as info:
        await al.Subset(none, [7])[0]
    assert info.value.index == 0
    with pytest.raises(al.SampleFiltered) as info:
        await (al.from_sequence(list(range(10))) + none)[12]
    assert info.value.index == 12


# -- from_torch: a torch IterableDataset with __len__ is not map-style --------------------


class _Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[int]:
        return iter(range(3))

    def __len__(self) -> int:
        return 3


def test_from_torch_refuses_an_iterable_dataset() -> None:
    """torch's ``Dataset`` base defines ``__getitem__`` (raising NotImplementedError), so
    ``from_torch``'s ``hasattr`` check passes any ``IterableDataset`` with a ``__len__``:
    every fetch then fails with "Subclasses of Dataset should implement __getitem__"."""
    with pytest.raises(TypeError, match="map-style"):
        al.from_torch(_Stream())
