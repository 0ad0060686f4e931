"""The Loader: wires a dataset, a sampling plan, the fetch stage and the batch pipeline.

It holds configuration, statistics and progress; the work is done by the stages
(:mod:`asyncload.sampling`, :mod:`asyncload._fetch`, :mod:`asyncload._pipeline`) and the
synchronous bridges (:mod:`asyncload.bridge`).
"""

from __future__ import annotations

import copy
import numbers
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._fetch import ErrorPolicy, Fetcher
from ._pipeline import Epoch, EpochIterator, MapUnits, StreamUnits
from .collate import default_collate
from .datasets import AsyncDataset, AsyncIterableDataset
from .resilience.throttle import ConcurrencyGate, Throttle
from .sampling import Plan, Progress, epoch_order, rank_share
from .stats import LoaderStats

__all__ = ["Loader"]

_STATE_VERSION = 1


class Loader:
    """Batches from an async dataset, fetched ``concurrency`` at a time, ``prefetch`` ahead.

    Iterate with ``async for`` in your event loop, with a plain ``for`` (a background event
    loop thread), or through ``torch.utils.data.DataLoader(loader.to_torch(), batch_size=None)``.
    See the class-level docs for the keywords; bad values raise ``ValueError``/``TypeError``
    naming the argument.
    """

    def __init__(
        self,
        dataset: AsyncDataset[Any] | AsyncIterableDataset[Any],
        *,
        batch_size: int | None = 1,
        shuffle: bool = False,
        seed: int = 0,
        sampler: Iterable[int] | None = None,
        drop_last: bool = False,
        concurrency: int = 16,
        prefetch: int = 2,
        ordered: bool = True,
        transform: Callable[[Any], Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        retry: Any = None,
        breaker: Any = None,
        cache: Any = None,
        timeout: float | None = None,
        validate: Callable[[Any], Any] | None = None,
        on_error: str | Callable[[int, BaseException], Any] = "raise",
        max_errors: int | float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        throttle: bool | Throttle | None = True,
    ) -> None:
        if not isinstance(dataset, (AsyncDataset, AsyncIterableDataset)):
            raise TypeError(
                "dataset must be an asyncload AsyncDataset or AsyncIterableDataset, got "
                f"{type(dataset).__name__} (wrap a list with al.from_sequence(...), a torch "
                "Dataset with al.from_torch(...))"
            )
        if batch_size is not None:
            _check_int("batch_size", batch_size, minimum=1)
        _check_int("concurrency", concurrency, minimum=1)
        _check_int("prefetch", prefetch, minimum=0)
        _check_int("seed", seed, minimum=None)
        for name, fn in (
            ("transform", transform),
            ("collate_fn", collate_fn),
            ("validate", validate),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        if not (
            on_error in ("raise", "skip") or (callable(on_error) and not isinstance(on_error, str))
        ):
            raise ValueError(
                f'on_error must be "raise", "skip" or a callable(index, exc), got {on_error!r}'
            )
        if max_errors is not None:
            if isinstance(max_errors, bool) or not isinstance(max_errors, (int, float)):
                raise TypeError(f"max_errors must be an int, a float or None, got {max_errors!r}")
            if isinstance(max_errors, int) and max_errors < 0:
                raise ValueError(f"max_errors must be >= 0, got {max_errors}")
            if isinstance(max_errors, float) and not 0.0 < max_errors < 1.0:
                raise ValueError(f"max_errors as a fraction must be in (0, 1), got {max_errors}")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
                raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
            if timeout <= 0:
                raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        for name, obj, method in (
            ("retry", retry, "run"),
            ("breaker", breaker, "run"),
            ("cache", cache, "get_or_load"),
        ):
            if obj is not None and not callable(getattr(obj, method, None)):
                raise TypeError(
                    f"{name} must be an asyncload {name} object, got {type(obj).__name__}"
                )
        if not (throttle is None or isinstance(throttle, (bool, Throttle))):
            raise TypeError(
                f"throttle must be True, False or an al.Throttle, got {type(throttle).__name__}"
            )
        if sampler is not None:
            if shuffle:
                raise ValueError(
                    "sampler and shuffle=True are exclusive: shuffle inside the sampler"
                )
            if not isinstance(sampler, Iterable):
                raise TypeError(
                    f"sampler must be an iterable of indices, got {type(sampler).__name__}"
                )
            if iter(sampler) is sampler:
                raise TypeError(
                    "sampler must be re-iterable (a list, a range or a torch Sampler), not a "
                    "one-shot iterator: every epoch iterates it again"
                )
        if isinstance(dataset, AsyncIterableDataset) and sampler is not None:
            raise ValueError(
                "sampler is for map-style datasets; a streaming dataset has no indices"
            )
        self.rank, self.world_size = _resolve_ranks(rank, world_size)

        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.sampler = sampler
        self.drop_last = drop_last
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.ordered = ordered
        self.transform = transform
        self.collate_fn = collate_fn
        self.retry = retry
        self.breaker = breaker
        self.cache = cache
        self.timeout = timeout
        self.validate = validate
        self.on_error = on_error
        self.max_errors = max_errors
        # Shared by this loader's epochs: a store that throttled last epoch still does.
        self.throttle = Throttle() if throttle is True else (throttle or None)
        if self.throttle is not None:
            self.throttle.bind(concurrency)
        # Under to_torch(): this copy's DataLoader worker and the number of workers.
        self.worker, self.num_workers = 0, 1

        self._epoch = 0
        self._progress = Progress()
        self._finished = False  # the last pass ran to its end
        self._resume: Progress | None = None
        self._stats = LoaderStats()
        self._current: Epoch | None = None
        # Sync iterators, so close() can stop their threads; weak, so that leaving a for
        # loop drops (and stops) its iterator.
        self._iterators: weakref.WeakSet[Any] = weakref.WeakSet()

    # -- configuration --------------------------------------------------------------------

    @property
    def is_streaming(self) -> bool:
        return isinstance(self.dataset, AsyncIterableDataset)

    def set_epoch(self, epoch: int) -> None:
        """Run ``epoch`` on the next iteration: its shuffle is a pure function of (seed, epoch)."""
        _check_int("epoch", epoch, minimum=0)
        if epoch != self._epoch:
            self._resume = None
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    def plan(self) -> Plan:
        """This rank's (and worker's) dataset indices for the current epoch, in order."""
        if not isinstance(self.dataset, AsyncDataset):
            raise TypeError("a streaming dataset has no index plan")
        order = epoch_order(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self._epoch,
            sampler=self.sampler,
        )
        return Plan(
            order,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
            batch_size=self.batch_size or 1,
            worker=self.worker,
            num_workers=self.num_workers,
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank (samples, with ``batch_size=None``).

        With a filter or ``on_error="skip"``, fewer may come: this counts indices, not survivors.
        """
        if not isinstance(self.dataset, AsyncDataset):
            raise TypeError("len() of a Loader over a streaming dataset is unknown")
        n = _sized(self.sampler) if self.sampler is not None else len(self.dataset)
        samples = rank_share(n, self.world_size, self.drop_last) if n else 0
        if self.batch_size is None:
            return samples
        full, rest = divmod(samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    # -- iteration ------------------------------------------------------------------------

    def __aiter__(self) -> EpochIterator:
        """One epoch in the running event loop (asyncio, uvloop or trio)."""
        return self._start_epoch(self.prefetch)

    def _start_epoch(self, prefetch: int) -> EpochIterator:
        # The sync bridge buffers ready batches on its side of the thread hand-off instead.
        resume = self._resume
        self._resume = None
        progress = Progress() if resume is None else Progress(resume.watermark, resume.done)
        self._progress, self._finished = progress, False
        self._stats = stats = LoaderStats()
        stats.start()
        fetcher = Fetcher(
            self.dataset,
            stats=stats,
            policy=ErrorPolicy(self.on_error, self.max_errors, stats),
            transform=self.transform,
            validate=self.validate,
            timeout=self.timeout,
            retry=self.retry,
            breaker=self.breaker,
            cache=self.cache,
            gate=ConcurrencyGate(self.throttle) if self.throttle is not None else None,
        )
        batch_size = self.batch_size or 1
        units: MapUnits | StreamUnits
        if isinstance(self.dataset, AsyncDataset):
            chunk = min(batch_size, self.concurrency) if fetcher.batched else 1
            units = MapUnits(self.plan(), chunk, resume)
        else:
            shares = self.world_size * self.num_workers
            slot = self.rank * self.num_workers + self.worker
            units = StreamUnits(self.dataset, slot, shares, resume)
        epoch = Epoch(
            units,
            fetcher,
            stats=stats,
            batch_size=batch_size,
            drop_last=self.drop_last,
            ordered=self.ordered,
            collate=_first if self.batch_size is None else (self.collate_fn or default_collate),
            concurrency=self.concurrency,
            prefetch=prefetch,
        )
        self._current = epoch
        return EpochIterator(epoch, progress, on_end=self._on_end)

    def _on_end(self) -> None:
        self._finished = True

    def __iter__(self) -> Iterator[Any]:
        """One epoch from synchronous code, through a background event loop thread."""
        from .bridge import SyncIterator

        iterator = SyncIterator(self)
        self._iterators.add(iterator)
        return iterator

    def to_torch(self) -> Any:
        """A ``torch.utils.data.IterableDataset`` for ``DataLoader(..., batch_size=None)``:
        each worker runs its own event loop on its share of this rank's batches."""
        from ._torch import LoaderIterableDataset

        return LoaderIterableDataset(self)

    def for_worker(self, worker: int, num_workers: int) -> Loader:
        """A copy of this loader that yields worker ``worker`` of ``num_workers``' share."""
        clone = copy.copy(self)
        clone.worker, clone.num_workers = worker, num_workers
        clone._stats, clone._current, clone._iterators = LoaderStats(), None, weakref.WeakSet()
        return clone

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A plain, picklable dict: the epoch and the positions already delivered in it."""
        progress = self._resume if self._resume is not None else self._progress
        return {
            "version": _STATE_VERSION,
            "kind": "stream" if self.is_streaming else "map",
            "epoch": self._epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "finished": self._finished and self._resume is None,
            "progress": progress.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields the rest of that epoch
        (or, if it had ended, that epoch again in full)."""
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from Loader.state_dict(), got {type(state).__name__}"
            )
        missing = {"version", "kind", "epoch", "seed", "finished", "progress"} - state.keys()
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state version {state['version']} is not supported")
        kind = "stream" if self.is_streaming else "map"
        if state["kind"] != kind:
            raise ValueError(f"state is for a {state['kind']} loader, this one is {kind}")
        if state["seed"] != self.seed:
            raise ValueError(
                f"state was saved with seed={state['seed']}, this loader has seed={self.seed}"
            )
        self._epoch = int(state["epoch"])
        self._finished = False
        self._resume = None if state["finished"] else Progress.from_state(state["progress"])
        self._progress = Progress()

    def statistics(self) -> dict[str, Any]:
        """Counters of the current (or last) epoch: samples, batches, in_flight, buffered,
        errors, skipped, substituted, filtered, retries, cache hits and misses,
        samples_per_second, fetch latency percentiles (seconds), a bounded log of failed
        samples (index, key, error, action); the throttle's ``concurrency_limit``,
        ``throttled`` and ``throttle_decreases`` (totals over the loader's life); and with a
        breaker, its ``breaker_state`` and ``breaker_opened`` count."""
        current = self._current
        buffered = current.receive.statistics().current_buffer_used if current is not None else 0
        snapshot = self._stats.snapshot(buffered)
        if self.throttle is not None:
            snapshot.update(self.throttle.statistics())
        else:
            snapshot.update(concurrency_limit=self.concurrency, throttled=0, throttle_decreases=0)
        statistics = getattr(self.breaker, "statistics", None)
        if callable(statistics):
            breaker = statistics()
            snapshot.update(breaker_state=breaker["state"], breaker_opened=breaker["opened"])
        return snapshot

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop background threads and release what the dataset holds in them."""
        for iterator in list(self._iterators):
            iterator.close()
        if self._current is not None:
            self._current.cancel()

    async def aclose(self) -> None:
        """Cancel the running epoch, wait for it, and release the dataset's connections in
        this event loop."""
        self.close()
        current, self._current = self._current, None
        if current is not None:
            await current.aclose()
        await self.dataset.aclose()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Loader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for DataLoader workers: runtime state stays behind.
        state = self.__dict__.copy()
        state.update(_stats=LoaderStats(), _current=None)
        del state["_iterators"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._iterators = weakref.WeakSet()

    def __repr__(self) -> str:
        return (
            f"Loader({self.dataset!r}, batch_size={self.batch_size}, concurrency={self.concurrency}, "
            f"prefetch={self.prefetch}, ordered={self.ordered}, rank={self.rank}/{self.world_size})"
        )


def _sized(sampler: Iterable[int]) -> int:
    try:
        return len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in sampler)


def _first(values: list[Any]) -> Any:
    return values[0]


def _check_int(name: str, value: object, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit keywords, else torch.distributed when it is initialised, else (0, 1).

    Read here, in the constructing process: DataLoader workers cannot query it.
    """
    if rank is None or world_size is None:
        dist = sys.modules.get("torch.distributed")  # never import torch ourselves
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    if world_size is None:
        world_size = 1
    if rank is None:
        rank = 0
    _check_int("world_size", world_size, minimum=1)
    _check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)
