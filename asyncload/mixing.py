"""Mixing several datasets by weight, and batches that keep class proportions.

- `mix(datasets, weights)`: one stream drawing each next sample from a dataset chosen at
  random by weight, seeded by ``(seed, epoch)`` so that runs repeat and resume exactly.
- `StratifiedSampler(labels, batch_size)`: an order of indices in which every run of
  ``batch_size`` keeps the dataset's class proportions (to within two samples per class).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import anyio
import numpy as np

from ._fetch import with_timeout
from .datasets import DROPPED, AsyncDataset, AsyncIterableDataset
from .errors import SampleFiltered
from .streaming import (
    StreamEpoch,
    StreamError,
    aclosing,
    close_stream,
    equal_length,
    take_run,
)

__all__ = ["MixedDataset", "StratifiedSampler", "mix"]


def mix(
    datasets: Sequence[AsyncDataset[Any] | AsyncIterableDataset[Any]],
    weights: Sequence[float] | None = None,
    *,
    stop: str = "first",
) -> MixedDataset:
    """A stream mixing ``datasets`` (map-style ones are read in their own order, streaming
    ones as they stream) by ``weights`` (default: equal). ``stop="first"`` ends the mix when
    any dataset runs out (the proportions hold to the end); ``"all"`` goes on with the
    others, re-weighted, until every dataset is exhausted (every sample once)."""
    return MixedDataset(datasets, weights, stop=stop)


class MixedDataset(AsyncIterableDataset[Any]):
    """See :func:`mix`. Under a Loader each share (rank x worker) mixes its own share of
    every dataset, with its own seeded choices; shuffling is each dataset's own (a stream
    shuffles itself; a map-style dataset is read in a seeded permutation when the loader
    shuffles)."""

    def __init__(
        self,
        datasets: Sequence[AsyncDataset[Any] | AsyncIterableDataset[Any]],
        weights: Sequence[float] | None = None,
        *,
        stop: str = "first",
    ) -> None:
        if isinstance(datasets, (AsyncDataset, AsyncIterableDataset)):
            raise TypeError("mix: datasets must be a list of datasets, got one dataset")
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("mix: datasets is empty")
        for d in self.datasets:
            if not isinstance(d, (AsyncDataset, AsyncIterableDataset)):
                raise TypeError(f"mix: not an asyncload dataset: {type(d).__name__}")
        try:
            w = np.ones(len(self.datasets)) if weights is None else np.asarray(weights, float)
        except (TypeError, ValueError):
            raise TypeError(f"mix: weights must be numbers, got {weights!r}") from None
        if w.shape != (len(self.datasets),):
            raise ValueError(
                f"mix: {len(w)} weights for {len(self.datasets)} datasets"
                if w.ndim == 1
                else "mix: weights must be a flat sequence"
            )
        if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
            raise ValueError(f"mix: weights must be >= 0 and not all 0, got {list(w)}")
        if stop not in ("first", "all"):
            raise ValueError(f'mix: stop must be "first" or "all", got {stop!r}')
        w = w / w.max()  # (first: weights near the float maximum would sum to inf)
        self.weights = w / w.sum()
        self.stop = stop

    def __repr__(self) -> str:
        return f"<MixedDataset of {len(self.datasets)} datasets, weights {self.weights.round(3)}>"

    def num_samples(self) -> int | None:
        if self.stop == "first":
            return None  # where the first dataset runs out depends on the draws
        # A dataset of weight 0 is never drawn from, so never read.
        sizes = [_size(d) for d, w in zip(self.datasets, self.weights, strict=True) if w > 0]
        return None if None in sizes else sum(s for s in sizes if s is not None)

    def _plan(self) -> Any:
        # The draws depend on the weights and where each part runs out.
        parts = [
            len(d) if isinstance(d, AsyncDataset) else [d.num_samples(), d._plan()]
            for d in self.datasets
        ]
        return {"weights": [float(w) for w in self.weights], "stop": self.stop, "parts": parts}

    def _parts(self, spec: StreamEpoch) -> list[AsyncIterator[Any]]:
        # Each part streams its own share, whole: the mix's length (if any) is the mix's.
        part_spec = dataclasses.replace(spec, length=None, run=None)
        parts = []
        # Of this part in the drawn parts, end to end: each part's shares start where the
        # previous part's left off, so that the shares differ by at most one sample (a
        # stream of unknown size counts 0: its shares may differ by more).
        offset = 0
        # The map-style parts share the Loader's concurrency, each reading ahead its part.
        by_index = sum(isinstance(d, AsyncDataset) for d in self.datasets)
        ahead = max(1, spec.in_flight // max(1, by_index))
        for k, (dataset, weight) in enumerate(zip(self.datasets, self.weights, strict=True)):
            if isinstance(dataset, AsyncIterableDataset):
                # Its share k of its own samples is share (k + offset) of the mix's. Its
                # shuffle is seeded apart (salted by k, as a map-style part's order is):
                # mix([s, s.map(augment)]) must not deliver x and augment(x) in step.
                slot = (spec.slot - offset) % spec.shares
                seed = int(np.random.SeedSequence([spec.seed, k]).generate_state(1)[0])
                parts.append(
                    dataset.epoch_stream(dataclasses.replace(part_spec, slot=slot, seed=seed))
                )
            else:
                parts.append(_map_share(dataset, part_spec, salt=k, offset=offset, ahead=ahead))
            offset += (_size(dataset) or 0) if weight > 0 else 0
        return parts

    def epoch_stream(self, spec: StreamEpoch) -> AsyncIterator[Any]:
        def open_stream() -> AsyncIterator[Any]:
            return self._mixed(spec)

        if spec.length is None:
            return open_stream()

        def open_whole() -> AsyncIterator[Any]:  # (for a share with nothing of its own)
            return self._mixed(dataclasses.replace(spec, slot=0, shares=1, ranks=1))

        stream = equal_length(open_stream, spec.length, repr(self), open_whole)
        return stream if spec.run is None else take_run(stream, spec.run)

    async def _mixed(self, spec: StreamEpoch) -> AsyncIterator[Any]:
        parts = self._parts(spec)
        live = list(range(len(parts)))
        weights = self.weights.copy()
        rng = spec.rng(spec.slot, 7)
        try:
            while live:
                p = weights[live] / weights[live].sum()
                k = live[int(rng.choice(len(live), p=p))]
                try:
                    item = await parts[k].__anext__()
                except StopAsyncIteration:
                    if self.stop == "first":
                        return
                    live.remove(k)
                    if not weights[live].sum() > 0:
                        return  # only zero-weight datasets are left
                    continue
                yield item
        finally:
            # Shielded, and every part whatever the others do: leaving the loader cancels
            # this, and a part left open keeps its shards or connections.
            with anyio.CancelScope(shield=True):
                errors = []
                for part in parts:
                    try:
                        await close_stream(part)
                    except Exception as exc:
                        errors.append(exc)
                if errors:
                    raise errors[0]

    async def __aiter__(self) -> AsyncIterator[Any]:
        async with aclosing(self.epoch_stream(StreamEpoch())) as stream:
            async for item in stream:
                if type(item) is StreamError:
                    raise item.exc
                if item is not DROPPED:
                    yield item

    async def aclose(self) -> None:
        for dataset in self.datasets:
            await dataset.aclose()


def _size(dataset: AsyncDataset[Any] | AsyncIterableDataset[Any]) -> int | None:
    return len(dataset) if isinstance(dataset, AsyncDataset) else dataset.num_samples()


async def _map_share(
    dataset: AsyncDataset[Any], spec: StreamEpoch, salt: int, offset: int, ahead: int = 1
) -> AsyncIterator[Any]:
    """A map-style dataset as a stream: this share's part of its (seeded) order, the
    parts' orders striped over the shares end to end (``offset``: the samples of the parts
    before it), so that the shares differ by at most one sample, as DistributedSampler's.

    Up to ``ahead`` fetches run at once, in the epoch's task group (``spec.start_soon``),
    and their outcomes come in order: a sample, ``DROPPED`` or a `StreamError`."""
    n = len(dataset)
    order = spec.rng(salt).permutation(n).tolist() if spec.shuffle else range(n)
    indices = order[(spec.slot - offset) % spec.shares :: spec.shares]
    # Each fetch under the Loader's timeout (per attempt) and retry, as map-style datasets
    # are fetched outside a mix.
    get: Callable[[int], Awaitable[Any]] = dataset.__getitem__
    if spec.timeout is not None:
        get = with_timeout(get, spec.timeout)

    async def outcome(i: int) -> Any:
        fetch = functools.partial(get, i)
        try:
            if spec.retry is None:
                return await fetch()
            return await spec.retry.run(fetch, on_retry=spec.on_retry)
        except SampleFiltered:
            return DROPPED  # counted as filtered, and its position kept (exact resume)
        except Exception as exc:
            return StreamError(exc, key=dataset.key_of(i))

    start_soon = spec.start_soon
    if ahead <= 1 or start_soon is None:
        for i in indices:
            yield await outcome(i)
        return

    async def fill(slot: _Slot, i: int) -> None:
        with slot.scope:
            slot.value = await outcome(i)
            slot.done.set()

    window: deque[_Slot] = deque()
    try:
        for i in indices:
            slot = _Slot()
            start_soon(fill, slot, i)
            window.append(slot)
            if len(window) >= ahead:
                head = window.popleft()
                await head.done.wait()
                yield head.value
        while window:
            head = window.popleft()
            await head.done.wait()
            yield head.value
    finally:
        # Left early (the mix stopped, a worker's run or the share ended): the fetches
        # read ahead are not wanted, and the epoch's task group would wait for them.
        for slot in window:
            slot.scope.cancel()


class _Slot:
    """One fetch read ahead: its outcome, once ``done``."""

    __slots__ = ("done", "scope", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.scope = anyio.CancelScope()  # (cancelled before its task starts: it never runs)
        self.value: Any = None


class StratifiedSampler:
    """An epoch order (a ``sampler=`` for the Loader) in which each run of ``batch_size``
    indices keeps the class proportions of ``labels``: position by position, the next
    index comes from the class whose share is most urgent (Tijdeman's chairman assignment;
    each class's indices in a seeded random order), so every prefix of the epoch holds each
    class's share to within one sample, and every batch to within two (most often one).

    Implements ``set_epoch`` (the Loader calls it), so each epoch is a new arrangement,
    a pure function of ``(seed, epoch)``. Under several ranks the Loader deals the order
    by whole runs of ``batch_size``, so that each rank's batches keep the proportions.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, *, seed: int = 0) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"StratifiedSampler: batch_size must be an int >= 1, got {batch_size!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            # (numpy would refuse it at the first epoch, naming neither the sampler nor seed)
            raise ValueError(f"StratifiedSampler: seed must be an int >= 0, got {seed!r}")
        self.labels = np.asarray(labels)
        if self.labels.ndim != 1:
            raise ValueError("StratifiedSampler: labels must be a flat sequence")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self.labels)
        classes = rng.permutation(np.unique(self.labels))  # a random order breaks ties
        members = []
        for label in classes:
            group = np.flatnonzero(self.labels == label)
            rng.shuffle(group)
            members.append(group.tolist())
        shares = np.array([len(m) for m in members], dtype=float) / max(n, 1)
        taken = np.zeros(len(members))
        # Tijdeman's chairman assignment: of the classes at least 1/(2m - 2) behind their
        # quota, the one whose deadline (when it would fall a whole `slack` behind) comes
        # first. Every prefix then holds each class's share to within slack < 1 sample, so
        # every batch to within two. (Plain "furthest behind first" can fall a whole sample
        # behind.)
        m = len(members)
        slack = 1.0 - 1.0 / (2 * m - 2) if m > 1 else 0.0
        order: list[int] = []
        for k in range(1, n + 1):
            deficit = k * shares - taken
            eligible = deficit >= (1.0 - slack) - 1e-9
            if m == 1 or not eligible.any():
                c = int(np.argmax(deficit))
            else:
                deadlines = np.where(eligible, (taken + slack) / shares, np.inf)
                c = int(np.argmin(deadlines))
            order.append(members[c][int(taken[c])])
            taken[c] += 1
        return iter(order)
