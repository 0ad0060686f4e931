"""What a Loader asks of a streaming dataset for one epoch, and the pieces every stream
shares: striding a stream across shares, a seeded shuffle buffer, equal lengths per share.

A *share* is one rank (times one DataLoader worker under ``to_torch()``). A stream's epoch
is a pure function of :class:`StreamEpoch`, which is what makes exact resume possible: the
loader re-creates the same stream and passes over the positions already delivered.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, final

import numpy as np

__all__ = [
    "StreamEpoch",
    "StreamError",
    "aclosing",
    "close_stream",
    "equal_length",
    "shuffle_buffer",
    "stride",
    "take_run",
    "worker_run",
]


@dataclass(frozen=True)
class StreamEpoch:
    """One share of one epoch of a stream.

    ``slot`` of ``shares`` (rank x worker); ``shuffle`` and ``seed``/``epoch`` seed the shard
    order and the shuffle buffer of ``buffer_size`` samples; ``length`` is the number of
    samples every share yields (padding by repeating its stream, or stopping early), or
    ``None`` to yield what the share has. ``retry`` and ``timeout`` are the loader's, for
    opening and reading shards; ``on_retry(attempt, exc, delay)`` counts retries.
    ``start_soon`` starts a background task in the epoch's task group (for shard
    prefetching, a mix's read-ahead); those tasks are cancelled with the epoch.
    ``in_flight``: the fetches a stream may keep going at once where it fetches by index
    (a mix's map-style parts): the Loader's ``concurrency``. ``run``: ``(offset, count)``,
    a DataLoader worker's part of its rank's share, items ``offset`` to ``offset + count``
    of the ``length`` the share yields (`worker_run`); ``None``: all of them. A stream that
    splits itself reads only that part; others read up to it and drop the rest
    (`take_run`). ``ranks``: how many of the ``shares`` are ranks (each rank's DataLoader
    workers are the rest: rank ``slot // (shares // ranks)``); ``drop_last``: the Loader's,
    for a stream that deals whole pieces (shards) to ranks and evens their counts.
    """

    slot: int = 0
    shares: int = 1
    ranks: int = 1
    drop_last: bool = False
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    buffer_size: int = 1000
    length: int | None = None
    retry: Any = None
    timeout: float | None = None
    on_retry: Callable[[int, Exception, float], object] | None = field(default=None, compare=False)
    start_soon: Callable[..., Any] | None = field(default=None, compare=False)
    in_flight: int = field(default=1, compare=False)
    run: tuple[int, int] | None = None

    def rng(self, *salt: int) -> np.random.Generator:
        """A generator seeded by ``(seed, epoch, *salt)``: the same on every rank."""
        return np.random.default_rng([self.seed, self.epoch, *salt])


@final
class StreamError:
    """Yielded by a stream in place of a sample that failed (a corrupt tar member, a shard
    that could not be read after retries): the loader applies ``on_error`` to it, with
    ``key`` (a shard URL, a member name) in the messages."""

    __slots__ = ("count", "exc", "key")

    def __init__(self, exc: Exception, key: Hashable | None = None, *, count: int = 1) -> None:
        self.exc = exc
        self.key = key
        # The samples it stands for (a shard that failed with samples_per_shard known):
        # equal_length counts them all, rather than pad the share with repeats.
        self.count = count

    def __repr__(self) -> str:
        return f"StreamError({self.exc!r}, key={self.key!r})"


class aclosing(contextlib.AbstractAsyncContextManager[Any]):
    """``contextlib.aclosing`` for any async iterator: closes it if it can be closed.

    Closing a generator does not close the generators it was iterating; each stage closes
    its source, so files and connections are released when a consumer stops early.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    async def __aenter__(self) -> Any:
        return self.stream

    async def __aexit__(self, *exc_info: object) -> None:
        await close_stream(self.stream)


async def close_stream(stream: Any) -> None:
    """Close an async iterator if it can be closed (generators can; plain iterators not)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _is_sample(item: object) -> bool:
    from .datasets import DROPPED  # datasets imports this module

    return item is not DROPPED and type(item) is not StreamError


async def stride(stream: AsyncIterator[Any], slot: int, shares: int) -> AsyncIterator[Any]:
    """Every ``shares``-th item of ``stream``, from the ``slot``-th: a stream that cannot
    split itself is read whole by every share, which keeps its part."""
    async with aclosing(stream):
        count = 0
        async for item in stream:
            if count % shares == slot:
                yield item
            count += 1
            item = None  # (not kept alive while the next is awaited)


async def shuffle_buffer(
    stream: AsyncIterator[Any], size: int, rng: np.random.Generator
) -> AsyncIterator[Any]:
    """Samples of ``stream`` in a seeded random order, holding at most ``size`` of them.

    Once the buffer is full, each new sample takes the place of a random one, which is
    yielded. Markers (dropped samples, errors) pass straight through: they are not samples.
    """
    buffer: list[Any] = []
    # Draw random numbers in blocks: one generator call per sample costs more than the rest.
    draws: Iterator[int] = iter(())
    async with aclosing(stream):
        async for item in stream:
            if not _is_sample(item):
                yield item
                continue
            if len(buffer) < size:
                buffer.append(item)
                continue
            j: int | None = next(draws, None)
            if j is None:
                draws = iter(rng.integers(0, size, 1024).tolist())
                j = next(draws)
            buffer[j], item = item, buffer[j]
            yield item
    for j in rng.permutation(len(buffer)).tolist():
        yield buffer[j]


async def equal_length(
    open_stream: Callable[[], AsyncIterator[Any]],
    length: int,
    what: str,
    open_whole: Callable[[], AsyncIterator[Any]] | None = None,
) -> AsyncIterator[Any]:
    """Exactly ``length`` items: the stream, stopped early, or repeated from its start when
    it is shorter (so every share yields the same count and DDP ranks stay in step). A
    share with nothing of its own (fewer samples than shares) repeats ``open_whole()``,
    the whole stream, instead: as DistributedSampler pads from the start of the order."""
    if length <= 0:
        return
    produced = 0
    while True:
        before = produced
        async with aclosing(open_stream()) as stream:
            async for item in stream:
                if type(item) is StreamError and produced + item.count > length:
                    # (A failed shard's error, repeated to pad: only the positions left.)
                    item = StreamError(item.exc, item.key, count=length - produced)
                yield item
                produced += item.count if type(item) is StreamError else 1
                if produced >= length:
                    return
        if produced == before:
            if produced == 0 and open_whole is not None:
                open_stream, open_whole = open_whole, None
                continue
            raise ValueError(f"{what}: this share's stream is empty; it cannot be padded")


def worker_run(length: int, workers: int, worker: int, batch: int) -> tuple[int, int]:
    """``(offset, count)`` of ``worker``'s part of a share of ``length`` items split over
    ``workers``: consecutive runs of whole batches of ``batch`` (the first ``B % workers``
    workers one batch more), the last partial batch in the last run. So the workers
    together yield the share's batches, each sample once, with no padding of their own."""
    batches = -(-length // batch)
    each, extra = divmod(batches, workers)
    start = worker * each + min(worker, extra)
    stop = start + each + (worker < extra)
    offset = min(start * batch, length)
    return offset, min(stop * batch, length) - offset


async def take_run(stream: AsyncIterator[Any], run: tuple[int, int]) -> AsyncIterator[Any]:
    """Items ``offset`` to ``offset + count`` of ``stream`` (a `StreamError` filling as
    many positions as it stands for), the ones before read and dropped."""
    offset, count = run
    end = offset + count
    position = 0
    async with aclosing(stream):
        if count <= 0:
            return
        async for item in stream:
            if type(item) is StreamError and item.count > 1:
                # A failed shard's error across the run's edges: the positions inside.
                inside = min(position + item.count, end) - max(position, offset)
                if inside > 0:
                    yield StreamError(item.exc, item.key, count=inside)
                position += item.count
            else:
                if position >= offset:
                    yield item
                position += 1
            if position >= end:
                return
