"""The async dataset protocol and its views.

A map-style :class:`AsyncDataset` answers ``await ds[i]``; a streaming
:class:`AsyncIterableDataset` answers ``async for sample in ds``. Views (``map``, ``filter``,
:class:`Subset`, :class:`ConcatDataset`) compose without copying data.

The Loader reads datasets through two private hooks, so that a batch of cheap samples costs
one call and dropped samples are counted rather than raised:

- ``batched``: True when :meth:`AsyncDataset.getitems` is cheaper than one ``__getitem__``
  per index (the Loader then fetches whole chunks per call, instead of one task per sample);
- ``_getitems_partial`` / ``_aiter_partial``: like ``getitems`` / ``__aiter__``, but a
  sample dropped by a filter comes back as :data:`DROPPED` instead of raising or vanishing.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import operator
import os
import sys
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, NoReturn, TypeVar, final, overload

import anyio.to_thread

from ._callables import PerLoop, call_maybe_async, is_async_callable
from ._threads import run_abandonable
from .errors import SampleFiltered
from .streaming import (
    StreamEpoch,
    StreamError,
    aclosing,
    equal_length,
    shuffle_buffer,
    stride,
    take_run,
)

__all__ = [
    "DROPPED",
    "AsyncDataset",
    "AsyncIterableDataset",
    "ConcatDataset",
    "FilteredDataset",
    "FilteredIterableDataset",
    "MappedDataset",
    "MappedIterableDataset",
    "SequenceDataset",
    "Subset",
    "TorchDataset",
    "from_sequence",
    "from_torch",
    "normalize_index",
]

T = TypeVar("T")
U = TypeVar("U")


@final
class _Dropped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DROPPED"

    def __reduce__(self) -> str:
        return "DROPPED"


DROPPED: Final = _Dropped()
"""Marks a sample that a filter dropped, in ``_getitems_partial`` / ``_aiter_partial`` results."""


def function_tag(fn: Callable[..., Any]) -> str:
    """A name for ``fn`` in cache keys: ``module.qualname`` for a module-level function or a
    builtin (the same in every process and run, so a disk cache keeps its hits); for a
    lambda, a closure or a callable object (whose settings the name would not show), a
    random token of this view object, shared with its pickled copies (DataLoader workers)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if (
        isinstance(module, str)
        and isinstance(qualname, str)
        and "<" not in qualname  # <lambda>, <locals>
        # A function, or a module's builtin (not a method bound to an object's state).
        and (inspect.isfunction(fn) or inspect.ismodule(getattr(fn, "__self__", None)))
        # The name must lead back to fn itself: functools.wraps copies the name of the
        # function it wraps onto every closure made around it.
        and _named(module, qualname) is fn
    ):
        return f"{module}.{qualname}"
    return f"view-{uuid.uuid4().hex}"


def _named(module: str, qualname: str) -> object:
    """What ``module.qualname`` names now (None where nothing does)."""
    obj: object = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _new_token() -> str:
    # 128 random bits, as many as a uuid4 has, made in a quarter of the time.
    return f"dataset-{os.urandom(16).hex()}"


def _dataset_token(dataset: object) -> str:
    """The random token that names ``dataset``'s samples in caches where it has no keys:
    made with the object, kept by its copies (pickled into DataLoader workers, or
    ``copy.copy``), never the same for two datasets built apart."""
    token = getattr(dataset, "_cache_token", None)
    if not isinstance(token, str):
        # An object that never went through AsyncDataset.__new__ (a duck-typed dataset):
        # made now; setdefault keeps the first of two threads racing here.
        token = vars(dataset).setdefault("_cache_token", _new_token())
    return token


def normalize_index(index: int, length: int) -> int:
    """Map a Python-style index (negative counts from the end) into ``range(length)``.

    Raises ``TypeError`` for a non-integer and ``IndexError`` when out of range.
    """
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"dataset index must be an integer, not {type(index).__name__}") from None
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for a dataset of length {length}")
    return i


class AsyncDataset(ABC, Generic[T]):
    """Abstract map-style dataset: ``len(ds)`` samples, fetched with ``await ds[i]``."""

    if not TYPE_CHECKING:  # (hidden from type checkers: constructors keep their signatures)

        def __new__(cls, *args, **kwargs):
            if (args or kwargs) and cls.__init__ is object.__init__:
                # object.__init__ stops checking once __new__ is overridden: check here.
                raise TypeError(f"{cls.__name__}() takes no arguments")
            self = super().__new__(cls)
            # In __new__, not __init__, which subclasses need not call; and with the object,
            # so that DataLoader workers, forked or sent a pickled copy, share it.
            self._cache_token = _new_token()
            return self

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    async def __getitem__(self, index: int) -> T:
        """Fetch sample ``index``; negative indices count from the end; ``IndexError`` past it."""

    async def getitems(self, indices: Sequence[int]) -> list[T]:
        """Fetch several samples, returned in the order asked.

        The default awaits ``__getitem__`` once per index. Override it where many samples
        are cheaper to fetch at once (the Loader then calls it once per chunk).
        """
        return [await self[i] for i in indices]

    def __iter__(self) -> NoReturn:
        # Without it, Python iterates by index: ds[0], ds[1], ... are coroutines, never an
        # IndexError, and list(ds) or `x in ds` would spin for ever.
        raise TypeError(
            f"{type(self).__name__} is an async dataset: iterate a Loader over it, or "
            "await ds[i] / ds.getitems(indices)"
        )

    def key_of(self, index: int) -> Hashable | None:
        """The storage key of sample ``index`` (a path, a URL), or None for datasets without keys."""
        return None

    def _cache_key(self, index: int) -> Hashable:
        """What names sample ``index``'s value in a cache (``index`` in ``range(len(self))``):
        ``key_of(index)`` for a source with keys, else ``(token, index)`` where ``token`` is
        this object's own (kept by its pickled copies, new for every dataset built); a
        view that keeps the values (``Subset``) passes its parent's key on, one that
        changes or drops them (``map``, ``filter``) adds its own part, so that a cache
        shared by datasets and their views never hands one's value to another.

        A key from ``key_of`` means the same bytes in every process and run; a token only
        this object and its copies, so a persistent cache never serves a dataset without
        keys what another run (or a dataset built elsewhere) stored."""
        key = self.key_of(index)
        return (_dataset_token(self), index) if key is None else key

    async def aclose(self) -> None:
        """Release what this dataset holds in the running event loop (connections, sessions)."""

    @property
    def batched(self) -> bool:
        """True when :meth:`getitems` is overridden, i.e. cheaper than per-index fetches."""
        return type(self).getitems is not AsyncDataset.getitems

    @property
    def in_memory(self) -> bool:
        """True when fetching awaits no I/O (an in-memory sequence, and views of one with
        synchronous functions). A plain ``for`` over a Loader then runs the epoch in the
        calling thread: with nothing to overlap, a background loop thread would only add
        a thread hand-off per batch. False unless a dataset says otherwise."""
        return False

    async def _getitems_partial(self, indices: Sequence[int]) -> list[T | _Dropped]:
        return list(await self.getitems(indices))

    def __add__(self, other: AsyncDataset[T]) -> ConcatDataset[T]:
        if not isinstance(other, AsyncDataset):
            return NotImplemented
        return ConcatDataset([self, other])

    def map(self, fn: Callable[[T], U]) -> MappedDataset[T, U]:
        """A view with ``fn`` (sync, or async returning an awaitable) applied to each sample."""
        return MappedDataset(self, fn)

    def filter(self, pred: Callable[[T], Any]) -> FilteredDataset[T]:
        """A view without the samples where ``pred`` (sync or async) is false.

        Indices keep their meaning; awaiting a dropped index raises :class:`SampleFiltered`
        (a ``LookupError``), and the Loader skips it and counts it as ``filtered``.
        """
        return FilteredDataset(self, pred)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self)} samples>"


class MappedDataset(AsyncDataset[U], Generic[T, U]):
    """``dataset.map(fn)``: each sample passed through ``fn``."""

    def __init__(self, dataset: AsyncDataset[T], fn: Callable[[T], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"map: fn must be callable, got {type(fn).__name__}")
        self.dataset = dataset
        self.fn = fn
        self._async = is_async_callable(fn)
        self._cache_tag = ("map", function_tag(fn))

    def __len__(self) -> int:
        return len(self.dataset)

    async def __getitem__(self, index: int) -> U:
        sample = await self.dataset[index]
        if self._async:
            return await self.fn(sample)  # type: ignore[no-any-return]
        return await call_maybe_async(self.fn, sample)  # type: ignore[no-any-return]

    async def getitems(self, indices: Sequence[int]) -> list[U]:
        return await self._apply(list(await self.dataset.getitems(indices)))  # type: ignore[return-value]

    async def _getitems_partial(self, indices: Sequence[int]) -> list[U | _Dropped]:
        return await self._apply(await self.dataset._getitems_partial(indices))

    async def _apply(self, samples: list[T | _Dropped]) -> list[U | _Dropped]:
        fn = self.fn
        if not self._async:
            out = [s if s is DROPPED else fn(s) for s in samples]  # type: ignore[arg-type]
            if out and any(_is_awaitable(o) for o in out):
                out = [await o if _is_awaitable(o) else o for o in out]  # type: ignore[misc]
            return out
        return [s if s is DROPPED else await fn(s) for s in samples]  # type: ignore[arg-type]

    @property
    def batched(self) -> bool:
        # An async fn may do I/O: fetch per sample so the Loader overlaps the calls.
        return self.dataset.batched and not self._async

    @property
    def in_memory(self) -> bool:
        return self.dataset.in_memory and not self._async

    def key_of(self, index: int) -> Hashable | None:
        return self.dataset.key_of(index)

    def _cache_key(self, index: int) -> Hashable:
        return (*self._cache_tag, self.dataset._cache_key(index))

    async def aclose(self) -> None:
        await self.dataset.aclose()


class FilteredDataset(AsyncDataset[T]):
    """``dataset.filter(pred)``: the samples where ``pred`` is false are dropped."""

    def __init__(self, dataset: AsyncDataset[T], pred: Callable[[T], Any]) -> None:
        if not callable(pred):
            raise TypeError(f"filter: pred must be callable, got {type(pred).__name__}")
        self.dataset = dataset
        self.pred = pred
        # Entries of its own: the source's (cached whole) would skip the predicate.
        self._cache_tag = ("filter", function_tag(pred))

    def __len__(self) -> int:
        return len(self.dataset)

    async def __getitem__(self, index: int) -> T:
        sample = await self.dataset[index]
        if not await call_maybe_async(self.pred, sample):
            raise SampleFiltered(index)
        return sample

    async def getitems(self, indices: Sequence[int]) -> list[T]:
        indices = list(indices)  # (read twice)
        samples = await self._getitems_partial(indices)
        for index, sample in zip(indices, samples, strict=True):
            if sample is DROPPED:
                raise SampleFiltered(index)
        return samples  # type: ignore[return-value]

    async def _getitems_partial(self, indices: Sequence[int]) -> list[T | _Dropped]:
        samples = await self.dataset._getitems_partial(indices)
        return [
            s if s is DROPPED or await call_maybe_async(self.pred, s) else DROPPED for s in samples
        ]

    @property
    def batched(self) -> bool:
        return self.dataset.batched

    @property
    def in_memory(self) -> bool:
        return self.dataset.in_memory and not is_async_callable(self.pred)

    def key_of(self, index: int) -> Hashable | None:
        return self.dataset.key_of(index)

    def _cache_key(self, index: int) -> Hashable:
        return (*self._cache_tag, self.dataset._cache_key(index))

    async def aclose(self) -> None:
        await self.dataset.aclose()


_WRAP_HINT: Final = (
    " (wrap a torch Dataset with al.from_torch(...), a list or an array with al.from_sequence(...))"
)


class Subset(AsyncDataset[T]):
    """A view on ``dataset`` at the given ``indices`` (in that order).

    Raises ``TypeError`` when ``dataset`` is not an :class:`AsyncDataset` (wrap a torch
    dataset with :func:`from_torch`, a list or an array with :func:`from_sequence`), and
    ``IndexError``/``TypeError`` for an index out of range or not an integer.
    """

    def __init__(self, dataset: AsyncDataset[T], indices: Sequence[int]) -> None:
        if not isinstance(dataset, AsyncDataset):
            raise TypeError(
                f"Subset: dataset must be an AsyncDataset, got {type(dataset).__name__}"
                + _WRAP_HINT
            )
        n = len(dataset)
        self.dataset = dataset
        self.indices = [normalize_index(i, n) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    async def __getitem__(self, index: int) -> T:
        try:
            return await self.dataset[self.indices[normalize_index(index, len(self.indices))]]
        except SampleFiltered:
            raise SampleFiltered(index) from None  # the index asked for, not the part's

    async def getitems(self, indices: Sequence[int]) -> list[T]:
        indices = list(indices)
        mapped = self._map(indices)
        try:
            return await self.dataset.getitems(mapped)
        except SampleFiltered as exc:
            raise _asked(exc, indices, mapped) from None

    async def _getitems_partial(self, indices: Sequence[int]) -> list[T | _Dropped]:
        return await self.dataset._getitems_partial(self._map(indices))

    def _map(self, indices: Sequence[int]) -> list[int]:
        n = len(self.indices)
        return [self.indices[normalize_index(i, n)] for i in indices]

    @property
    def batched(self) -> bool:
        return self.dataset.batched

    @property
    def in_memory(self) -> bool:
        return self.dataset.in_memory

    def key_of(self, index: int) -> Hashable | None:
        return self.dataset.key_of(self.indices[normalize_index(index, len(self.indices))])

    def _cache_key(self, index: int) -> Hashable:
        # The parent's key: Subset(ds, [4])[0] and ds[4] are one sample, one entry.
        return self.dataset._cache_key(self.indices[normalize_index(index, len(self.indices))])

    async def aclose(self) -> None:
        await self.dataset.aclose()


class ConcatDataset(AsyncDataset[T]):
    """Several datasets end to end: a global index is mapped to (dataset, local index) by a
    binary search over the cumulative lengths."""

    def __init__(self, datasets: Sequence[AsyncDataset[T]]) -> None:
        if isinstance(datasets, AsyncDataset):
            raise TypeError("ConcatDataset: datasets must be a list of datasets, got one")
        flat: list[AsyncDataset[T]] = []
        for d in datasets:
            if not isinstance(d, AsyncDataset):
                raise TypeError(
                    f"ConcatDataset: datasets must be AsyncDataset instances, got {type(d).__name__}"
                    + _WRAP_HINT
                )
            # ds1 + ds2 + ds3 gives one flat concatenation, not a nested one.
            flat.extend(d.datasets if type(d) is ConcatDataset else [d])
        if not flat:
            raise ValueError("ConcatDataset: datasets must not be empty")
        self.datasets: list[AsyncDataset[T]] = flat
        self.cumulative_sizes: list[int] = []
        total = 0
        for d in flat:
            total += len(d)
            self.cumulative_sizes.append(total)

    def __len__(self) -> int:
        return self.cumulative_sizes[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, local index) of global ``index``."""
        i = normalize_index(index, len(self))
        d = bisect.bisect_right(self.cumulative_sizes, i)
        return d, i - (self.cumulative_sizes[d - 1] if d else 0)

    async def __getitem__(self, index: int) -> T:
        d, local = self.locate(index)
        try:
            return await self.datasets[d][local]
        except SampleFiltered:
            raise SampleFiltered(index) from None  # the index asked for, not the part's

    async def getitems(self, indices: Sequence[int]) -> list[T]:
        return await self._gather(indices, partial=False)  # type: ignore[return-value]

    async def _getitems_partial(self, indices: Sequence[int]) -> list[T | _Dropped]:
        return await self._gather(indices, partial=True)

    async def _gather(self, indices: Sequence[int], *, partial: bool) -> list[T | _Dropped]:
        # One getitems call per member dataset, results put back in the order asked.
        indices = list(indices)
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for pos, index in enumerate(indices):
            d, local = self.locate(index)
            positions, locals_ = groups.setdefault(d, ([], []))
            positions.append(pos)
            locals_.append(local)
        out: list[Any] = [None] * len(indices)
        for d, (positions, locals_) in groups.items():
            ds = self.datasets[d]
            try:
                got = await (ds._getitems_partial(locals_) if partial else ds.getitems(locals_))
            except SampleFiltered as exc:
                asked = [indices[pos] for pos in positions]
                raise _asked(exc, asked, locals_) from None
            for pos, sample in zip(positions, got, strict=True):
                out[pos] = sample
        return out

    @property
    def batched(self) -> bool:
        return all(d.batched for d in self.datasets)

    @property
    def in_memory(self) -> bool:
        return all(d.in_memory for d in self.datasets)

    def key_of(self, index: int) -> Hashable | None:
        d, local = self.locate(index)
        key = self.datasets[d].key_of(local)
        # Parts may share keys (the same file name in two folders, the same object key in
        # two buckets): the part's number keeps them apart, in caches above all.
        return None if key is None else (d, key)

    def _cache_key(self, index: int) -> Hashable:
        d, local = self.locate(index)
        return (d, self.datasets[d]._cache_key(local))

    async def aclose(self) -> None:
        for d in self.datasets:
            await d.aclose()


class SequenceDataset(AsyncDataset[T]):
    """An in-memory sequence (list, numpy array, tensor) as an :class:`AsyncDataset`."""

    def __init__(self, sequence: Sequence[T]) -> None:
        if not hasattr(sequence, "__len__") or not hasattr(sequence, "__getitem__"):
            raise TypeError(
                f"from_sequence: seq must support len() and indexing, got {type(sequence).__name__}"
            )
        self.sequence = sequence

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def in_memory(self) -> bool:
        return True

    async def __getitem__(self, index: int) -> T:
        return self.sequence[normalize_index(index, len(self.sequence))]

    async def getitems(self, indices: Sequence[int]) -> list[T]:
        seq, n = self.sequence, len(self.sequence)
        if type(indices) is not list:
            indices = list(indices)  # (an iterator: the fallback below reads it again)
        if type(seq) is list or type(seq) is tuple:
            # Python's own indexing has normalize_index's meaning; only its errors are
            # less clear, so they are raised again below. (The loader's hot path.)
            try:
                return [seq[i] for i in indices]
            except (IndexError, TypeError):
                pass
        return [seq[normalize_index(i, n)] for i in indices]


@overload
def from_sequence(seq: Sequence[T]) -> SequenceDataset[T]: ...
@overload
def from_sequence(seq: Any) -> SequenceDataset[Any]: ...  # numpy arrays, tensors
def from_sequence(seq: Any) -> SequenceDataset[Any]:
    """An :class:`AsyncDataset` over an in-memory sequence (list, numpy array, tensor)."""
    return SequenceDataset(seq)


class TorchDataset(AsyncDataset[Any]):
    """A synchronous map-style ``torch.utils.data.Dataset`` whose ``__getitem__`` runs in
    worker threads, at most ``max_threads`` at once per event loop."""

    def __init__(self, dataset: Any, *, max_threads: int = 32) -> None:
        if isinstance(dataset, (AsyncDataset, AsyncIterableDataset)):
            # Its __getitem__ would give coroutines, never awaited, as samples.
            raise TypeError(
                f"from_torch: {type(dataset).__name__} is already an asyncload dataset: "
                "use it as it is"
            )
        torch_data = sys.modules.get("torch.utils.data")  # (imported by the caller, if at all)
        iterable = torch_data is not None and isinstance(dataset, torch_data.IterableDataset)
        if iterable or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            # (torch's Dataset base class has a __getitem__ that raises: an IterableDataset
            # with a __len__ would pass for map-style)
            raise TypeError("from_torch: dataset must be a map-style dataset with __len__")
        # (__index__: a numpy integer too)
        if (
            isinstance(max_threads, bool)
            or not hasattr(max_threads, "__index__")
            or operator.index(max_threads) < 1
        ):
            raise ValueError(f"from_torch: max_threads must be a positive int, got {max_threads!r}")
        self.dataset = dataset
        self.max_threads = operator.index(max_threads)
        # A partial, not a lambda: the dataset pickles into DataLoader workers.
        self._limiters: PerLoop[anyio.CapacityLimiter] = PerLoop(
            functools.partial(anyio.CapacityLimiter, self.max_threads)
        )

    def __len__(self) -> int:
        return len(self.dataset)

    async def __getitem__(self, index: int) -> Any:
        i = normalize_index(index, len(self.dataset))
        # Abandoned on a timeout (or close): a read that hangs must not hold them up; the
        # thread keeps its place among max_threads until it returns.
        return await run_abandonable(self.dataset.__getitem__, i, limiter=self._limiters.get())


def from_torch(dataset: Any, *, max_threads: int = 32) -> TorchDataset:
    """Wrap a synchronous map-style torch ``Dataset``; each ``__getitem__`` runs in a thread."""
    return TorchDataset(dataset, max_threads=max_threads)


class AsyncIterableDataset(ABC, Generic[T]):
    """Abstract streaming dataset: ``async for sample in ds``."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[T]: ...

    def _aiter_partial(self) -> AsyncIterator[T | _Dropped]:
        return self.__aiter__()

    def num_samples(self) -> int | None:
        """Samples in one pass, when the dataset knows it without reading (else ``None``).
        A Loader uses it to give every rank the same number of samples."""
        return None

    def _plan(self) -> Any:
        """What else decides which sample a position of the stream means (a mix's
        weights and parts), as plain json-able values, or None: a Loader's state records
        it, and a mid-epoch state of another plan is refused."""
        return None

    def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[T | _Dropped | StreamError]:
        """This share's part of one epoch, as the Loader iterates it.

        The default reads the whole stream and keeps every ``spec.shares``-th sample from
        ``spec.slot``, through a seeded shuffle buffer when ``spec.shuffle``, cut or padded
        to ``spec.length``, of which a DataLoader worker keeps its ``spec.run``. Datasets
        that can split themselves (shards) override it so that each share reads only its
        own part.
        """

        def open_stream() -> AsyncIterator[Any]:
            stream = stride(self._aiter_partial(), spec.slot, spec.shares)
            if spec.shuffle:
                stream = shuffle_buffer(stream, spec.buffer_size, spec.rng(spec.slot))
            return stream

        if spec.length is None:
            return open_stream()
        stream = equal_length(open_stream, spec.length, repr(self), self._aiter_partial)
        return stream if spec.run is None else take_run(stream, spec.run)

    async def aclose(self) -> None:
        """Release what this dataset holds in the running event loop."""

    def map(self, fn: Callable[[T], U]) -> MappedIterableDataset[T, U]:
        """A view with ``fn`` (sync or async) applied to each sample."""
        return MappedIterableDataset(self, fn)

    def filter(self, pred: Callable[[T], Any]) -> FilteredIterableDataset[T]:
        """A view without the samples where ``pred`` (sync or async) is false."""
        return FilteredIterableDataset(self, pred)


class MappedIterableDataset(AsyncIterableDataset[U], Generic[T, U]):
    def __init__(self, dataset: AsyncIterableDataset[T], fn: Callable[[T], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"map: fn must be callable, got {type(fn).__name__}")
        self.dataset = dataset
        self.fn = fn

    # Each view closes what it iterates when it is closed itself (left early): a tar
    # source's open shard file, say, is not left for the garbage collector.
    async def __aiter__(self) -> AsyncIterator[U]:
        async with aclosing(aiter(self.dataset)) as stream:
            async for sample in stream:
                yield await call_maybe_async(self.fn, sample)

    async def _aiter_partial(self) -> AsyncIterator[U | _Dropped]:
        async with aclosing(self.dataset._aiter_partial()) as stream:
            async for sample in stream:
                yield sample if sample is DROPPED else await call_maybe_async(self.fn, sample)

    def num_samples(self) -> int | None:
        return self.dataset.num_samples()

    def _plan(self) -> Any:
        return self.dataset._plan()

    async def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[Any]:
        async with aclosing(self.dataset.epoch_stream(spec)) as stream:
            async for sample in stream:
                if sample is DROPPED or type(sample) is StreamError:
                    yield sample
                    continue
                try:
                    mapped = await call_maybe_async(self.fn, sample)
                except Exception as exc:  # one sample's failure: on_error decides
                    yield StreamError(exc, _stream_key(sample))
                    continue
                yield mapped

    async def aclose(self) -> None:
        await self.dataset.aclose()


class FilteredIterableDataset(AsyncIterableDataset[T]):
    def __init__(self, dataset: AsyncIterableDataset[T], pred: Callable[[T], Any]) -> None:
        if not callable(pred):
            raise TypeError(f"filter: pred must be callable, got {type(pred).__name__}")
        self.dataset = dataset
        self.pred = pred

    async def __aiter__(self) -> AsyncIterator[T]:
        async with aclosing(self._aiter_partial()) as stream:
            async for sample in stream:
                if sample is not DROPPED:
                    yield sample

    async def _aiter_partial(self) -> AsyncIterator[T | _Dropped]:
        async with aclosing(self.dataset._aiter_partial()) as stream:
            async for sample in stream:
                if sample is DROPPED or await call_maybe_async(self.pred, sample):
                    yield sample
                else:
                    yield DROPPED

    def num_samples(self) -> int | None:
        return self.dataset.num_samples()  # dropped samples keep their positions

    def _plan(self) -> Any:
        return self.dataset._plan()

    async def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[Any]:
        async with aclosing(self.dataset.epoch_stream(spec)) as stream:
            async for sample in stream:
                if sample is DROPPED or type(sample) is StreamError:
                    yield sample
                    continue
                try:
                    keep = await call_maybe_async(self.pred, sample)
                except Exception as exc:  # one sample's failure: on_error decides
                    yield StreamError(exc, _stream_key(sample))
                    continue
                yield sample if keep else DROPPED

    async def aclose(self) -> None:
        await self.dataset.aclose()


def _stream_key(sample: Any) -> Hashable | None:
    """A stream sample's key for messages: a tar sample's ``__key__``, where it has one."""
    return sample.get("__key__") if isinstance(sample, dict) else None


def _is_awaitable(obj: object) -> bool:
    # Not hasattr(obj, "__await__"): a sample whose __getattr__ answers every name (an
    # attribute dict) has one too.
    return inspect.isawaitable(obj)


def _asked(exc: SampleFiltered, asked: Sequence[int], passed: Sequence[int]) -> SampleFiltered:
    """``exc``, raised by a part for index ``passed[k]``, as naming ``asked[k]``: the index
    the caller asked for (as ``await view[i]`` does), not the part's."""
    try:
        return SampleFiltered(asked[list(passed).index(exc.index)])
    except ValueError:  # not one of ours: as it is
        return exc
