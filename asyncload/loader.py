"""The Loader: wires a dataset, a sampling plan, the fetch stage and the batch pipeline.

It holds configuration, statistics and progress; the work is done by the stages
(:mod:`asyncload.sampling`, :mod:`asyncload._fetch`, :mod:`asyncload._pipeline`) and the
synchronous bridges (:mod:`asyncload.bridge`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import os
import sys
import warnings
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import anyio
import numpy as np

from ._callables import is_async_callable
from ._fetch import ErrorPolicy, Fetcher
from ._pipeline import Epoch, EpochIterator, InlineEpoch, MapUnits, StreamUnits, _nothing
from .batching import BudgetBatcher, CountBatcher, SlotBatcher, plan_slots, sample_cost
from .bridge import InlineIterator, SyncIterator, fetches_inline, runs_inline
from .collate import default_collate
from .datasets import AsyncDataset, AsyncIterableDataset
from .drift import DriftMonitor
from .mixing import StratifiedSampler
from .progress import Reporter
from .resilience.breaker import CircuitBreaker
from .resilience.retry import Retry
from .resilience.throttle import ConcurrencyGate, Throttle
from .sampling import (
    Plan,
    Progress,
    WorkerProgress,
    delivered_positions,
    epoch_order,
    rank_position,
    rank_share,
    remaining_positions,
    to_intervals,
    worker_progress,
)
from .stats import LoaderStats
from .streaming import StreamEpoch, worker_run

__all__ = ["Loader"]

# 2: states record the plan (``state["plan"]``). Version 1 states, which do not, still load.
_STATE_VERSION = 2
_READABLE_VERSIONS = (1, 2)


class Loader:
    """Batches from an async dataset, fetched ``concurrency`` at a time, ``prefetch`` ahead.

    Iterate with ``async for`` in your event loop, with a plain ``for`` (a background event
    loop thread), or through ``torch.utils.data.DataLoader(loader.to_torch(), batch_size=None)``.
    Bad values raise ``ValueError``/``TypeError`` naming the argument. docs/api.md gives
    each keyword's full contract.

    :param dataset: an ``AsyncDataset`` (map-style) or ``AsyncIterableDataset`` (a stream).
    :param batch_size: samples per batch; ``None`` yields single samples, uncollated (a
        ``collate_fn`` given is applied to each, as torch's DataLoader does without
        batching). With ``batch_budget`` or ``bucket``, the most samples a batch may hold.
    :param shuffle: a permutation (streams: shard order and a shuffle buffer) that is a
        pure function of ``(seed, epoch)``, the same on every rank.
    :param seed: the shuffle seed.
    :param sampler: a re-iterable of dataset indices instead of ``shuffle`` (map-style).
    :param drop_last: drop the last incomplete batch, and trim rank shares instead of
        padding them by wrapping around.
    :param concurrency: samples being fetched at once, at most (map-style).
    :param prefetch: collated batches buffered ahead of the consumer, at most.
    :param ordered: batches in sampler order (``True``) or as fetches complete.
    :param transform: sync or async ``fn(sample)``, applied after the fetch and the cache.
    :param collate_fn: ``fn(samples)``; default :func:`asyncload.default_collate`.
    :param retry: an ``al.Retry`` around each fetch attempt.
    :param breaker: an ``al.CircuitBreaker`` around each attempt (map-style).
    :param cache: an ``al.LRUCache``, ``al.DiskCache`` or ``al.TieredCache`` (map-style).
    :param timeout: seconds for each fetch attempt.
    :param validate: sync or async ``fn(sample)`` (an ``al.Schema`` fits); raising or
        returning false fails the sample.
    :param on_error: ``"raise"``, ``"skip"`` or ``fn(index, exc) -> substitute``.
    :param max_errors: with ``"skip"`` or a callable: failed samples allowed per epoch, a
        count (int) or a fraction of those attempted (float in (0, 1)).
    :param rank: this process's rank; default from ``torch.distributed`` when initialised,
        else from the ``RANK`` environment variable (torchrun sets it), else 0.
    :param world_size: the number of ranks; default from ``torch.distributed``, else from
        ``WORLD_SIZE`` in the environment, else 1.
    :param throttle: lower the concurrency when the store says "slow down" (``True``, or an
        ``al.Throttle``); ``False`` turns it off.
    :param shuffle_buffer: samples held by a stream's shuffle buffer.
    :param drift: an ``al.DriftMonitor`` observing each sample, checked at the epoch's end.
    :param batch_budget: the most total cost a batch may hold.
    :param batch_cost: a sample's cost, ``fn(sample) -> int`` (default its bytes; a
        fraction is rounded up), or one cost per dataset index, which plans equal batch
        counts on every rank.
    :param bucket: a window of samples sorted by cost before batches are cut.
    :param progress: show a tqdm progress bar.
    :param on_statistics: ``fn(snapshot)``, called with :meth:`statistics` every
        ``statistics_every`` batches and when the epoch is left.
    :param statistics_every: batches between ``on_statistics`` calls.
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
        shuffle_buffer: int = 1000,
        drift: DriftMonitor | None = None,
        batch_budget: int | None = None,
        batch_cost: Callable[[Any], int] | Sequence[int] | None = None,
        bucket: int | None = None,
        progress: bool = False,
        on_statistics: Callable[[dict[str, Any]], object] | None = None,
        statistics_every: int = 100,
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
        _check_int("seed", seed, minimum=0)
        _check_int("shuffle_buffer", shuffle_buffer, minimum=1)
        for name, flag in (
            ("shuffle", shuffle),
            ("drop_last", drop_last),
            ("ordered", ordered),
            ("progress", progress),
        ):
            _check_bool(name, flag)
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
            if isinstance(max_errors, bool) or not isinstance(max_errors, numbers.Real):
                raise TypeError(f"max_errors must be an int, a float or None, got {max_errors!r}")
            # As Python numbers (numpy's pass the check): a count or a fraction.
            integral = isinstance(max_errors, numbers.Integral)
            max_errors = int(max_errors) if integral else float(max_errors)
            if isinstance(max_errors, int) and max_errors < 0:
                raise ValueError(f"max_errors must be >= 0, got {max_errors}")
            if isinstance(max_errors, float) and not 0.0 < max_errors < 1.0:
                raise ValueError(f"max_errors as a fraction must be in (0, 1), got {max_errors}")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
                raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
            if not 0 < timeout < math.inf:  # (NaN too)
                raise ValueError(f"timeout must be > 0 seconds and finite, got {timeout}")
        for name, obj, method, other in (
            # (other: what the keyword beside it takes; both have run(), so a swap of the
            # two would pass the method check)
            ("retry", retry, "run", (CircuitBreaker,)),
            ("breaker", breaker, "run", (Retry,)),
            ("cache", cache, "get_or_load", ()),
        ):
            if obj is not None and (
                isinstance(obj, (type, *other)) or not callable(getattr(obj, method, None))
            ):
                # (A class has the method too: Loader(cache=al.LRUCache) forgot the ().)
                what = f"the class {obj.__name__}" if isinstance(obj, type) else type(obj).__name__
                raise TypeError(f"{name} must be an asyncload {name} object, got {what}")
        if batch_budget is not None or bucket is not None:
            if batch_budget is not None:
                _check_int("batch_budget", batch_budget, minimum=1)
            if bucket is not None:
                _check_int("bucket", bucket, minimum=2)
            if batch_size is None or (batch_budget is not None and batch_size == 1):
                raise ValueError(
                    "with batch_budget or bucket, batch_size is the most samples one batch "
                    f"may hold: give it (e.g. batch_size=256), not {batch_size}"
                )
        if on_statistics is not None and not callable(on_statistics):
            raise TypeError(f"on_statistics must be callable(snapshot), got {on_statistics!r}")
        _check_int("statistics_every", statistics_every, minimum=1)
        costs = _planned_costs(batch_cost, dataset)
        if batch_cost is not None and batch_budget is None and bucket is None:
            raise ValueError("batch_cost needs a batch_budget or a bucket to cut batches by")
        if collate_fn is not None and is_async_callable(collate_fn):
            # (Called as batches are handed out, outside any await; a DataLoader's too.)
            raise TypeError("collate_fn must be a plain function: an async one cannot be used")
        if callable(batch_cost) and is_async_callable(batch_cost):
            # (Called for each sample as it is batched, outside any event loop's await.)
            raise TypeError("batch_cost must be a plain function: an async one cannot be used")
        if drift is not None and not callable(getattr(drift, "observe", None)):
            raise TypeError(f"drift must be an al.DriftMonitor, got {type(drift).__name__}")
        if not (throttle is None or isinstance(throttle, (bool, Throttle))):
            raise TypeError(
                f"throttle must be True, False or an al.Throttle, got {type(throttle).__name__}"
            )
        if sampler is not None:
            if shuffle:
                raise ValueError(
                    "sampler and shuffle=True are exclusive: shuffle inside the sampler"
                )
            # (Iterable, but of characters: it would fail only when the epoch starts.)
            if isinstance(sampler, (str, bytes, bytearray)) or not isinstance(sampler, Iterable):
                raise TypeError(
                    f"sampler must be an iterable of indices, got {type(sampler).__name__}"
                )
            if iter(sampler) is sampler:
                raise TypeError(
                    "sampler must be re-iterable (a list, a range or a torch Sampler), not a "
                    "one-shot iterator: every epoch iterates it again"
                )
            replicas = _distributed_replicas(sampler)
            if replicas is not None and replicas != 1:
                # It gives one rank's share, which the Loader would deal to ranks again:
                # each rank would see 1/world_size of its share, silently.
                raise TypeError(
                    "sampler must give the whole epoch's order, the same on every rank, not a "
                    f"torch DistributedSampler over {replicas} replicas: the Loader deals "
                    "samples to ranks itself (rank and world_size from torch.distributed). Use "
                    "shuffle=True (with seed=), or pass the sampler that orders the whole "
                    "dataset"
                )
        if isinstance(dataset, AsyncIterableDataset):
            if sampler is not None:
                raise ValueError(
                    "sampler is for map-style datasets; a streaming dataset has no indices"
                )
            # Refused, not ignored: a stream reads by shard or page, not by index, and
            # these act per index (retry= and timeout= do apply, to opening and reading).
            for name, value in (("cache", cache), ("breaker", breaker)):
                if value is not None:
                    raise ValueError(
                        f"{name}= is for map-style datasets; a stream's samples are not "
                        "fetched by index (retry= and timeout= apply to its reads)"
                    )
        if (
            isinstance(sampler, StratifiedSampler)
            and isinstance(dataset, AsyncDataset)
            and len(sampler) != len(dataset)
        ):
            # Its order holds one position per label: another count yields another epoch.
            raise ValueError(
                f"sampler: StratifiedSampler has {len(sampler)} labels for a dataset of "
                f"{len(dataset)} samples: labels must give one label per dataset index"
            )
        self.rank, self.world_size = _resolve_ranks(rank, world_size)
        if (
            costs is None
            and batch_budget is not None
            and isinstance(dataset, AsyncDataset)
            and self.world_size > 1
        ):
            warnings.warn(
                "with a batch_budget and a batch_cost computed from each fetched sample, "
                "ranks may yield different numbers of batches (DDP waits for the missing "
                "ones); give batch_cost as a sequence of each index's cost to plan equal "
                "batch counts on every rank",
                UserWarning,
                stacklevel=2,
            )

        self.dataset = dataset
        # int(): numpy integers pass the checks, but a state_dict holding one would not
        # survive json, nor torch.load's weights_only default.
        self.batch_size = None if batch_size is None else int(batch_size)
        self.shuffle = bool(shuffle)  # (bool(): numpy bools pass the check, not json)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.sampler = sampler
        self.drop_last = bool(drop_last)
        self.concurrency = int(concurrency)
        self.prefetch = int(prefetch)
        self.ordered = bool(ordered)
        self.transform = transform
        self.collate_fn = collate_fn
        self.retry = retry
        self.breaker = breaker
        self.cache = cache
        self.timeout = timeout
        self.validate = validate
        self.on_error = on_error
        self.max_errors = max_errors
        self.drift = drift
        self.batch_budget = batch_budget
        self.batch_cost = batch_cost
        # batch_cost as one cost per dataset index: batches are planned before fetching.
        self._costs = costs
        self._costs_digest: int | None = None  # (its crc32, for state["plan"])
        self._slots: tuple[tuple[int, str], Sequence[int]] | None = None  # (epoch, plan)
        self.bucket = bucket
        self.progress = bool(progress)
        self.on_statistics = on_statistics
        self.statistics_every = statistics_every
        # Shared by this loader's epochs: a store that throttled last epoch still does.
        self.throttle = Throttle() if throttle is True else (throttle or None)
        if self.throttle is not None:
            self.throttle.bind(concurrency)
        # Under to_torch(): this copy's DataLoader worker and the number of workers.
        self.worker, self.num_workers = 0, 1

        self._epoch = 0
        # What has been delivered of the current epoch: this rank's plan positions (map), or
        # this share's stream positions; under TorchLoader, a stream's per-worker progress.
        self._progress: Progress | WorkerProgress = Progress()
        self._finished = False  # the last pass ran to its end
        self._resume: Progress | WorkerProgress | None = None
        # Epoch-order positions delivered before an elastic resume (``merge_states``): this
        # epoch's plan is dealt from the rest. ``[start, end)`` runs.
        self._excluded: list[list[int]] = []
        self._stats = LoaderStats()
        self._current: Epoch | InlineEpoch | None = None
        # The epoch close() cancelled, until it has ended (aclose() waits for it).
        self._cancelled: weakref.ref[Epoch | InlineEpoch] | Callable[[], None] = _nothing
        # Sync iterators, so close() can stop their threads; weak, so that leaving a for
        # loop drops (and stops) its iterator.
        self._iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        # A DataLoader worker's copy (to_torch()): an in-memory epoch makes one batch per
        # request, as the DataLoader asks (see InlineEpoch).
        self._paced = False

    # -- configuration --------------------------------------------------------------------

    @property
    def is_streaming(self) -> bool:
        return isinstance(self.dataset, AsyncIterableDataset)

    def set_epoch(self, epoch: int) -> None:
        """Run ``epoch`` on the next iteration: its shuffle is a pure function of (seed, epoch)."""
        _check_int("epoch", epoch, minimum=0)
        if epoch != self._epoch:
            self._resume = None
            self._excluded = []
            # Nothing of the new epoch is delivered yet: a state_dict() taken now must not
            # carry what the last one delivered (a broken-off epoch's positions).
            self._progress, self._finished = Progress(), False
        self._epoch = int(epoch)

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
        if self._excluded:
            order = [int(order[q]) for q in remaining_positions(len(order), self._excluded)]
        drop_last, runs = self.drop_last, self._rank_runs()
        if self._costs is not None:
            # Planned batches: already dealt and padded to equal counts per rank.
            order = self._plan_slots(order)
            drop_last, runs = False, 1
        return Plan(
            order,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=drop_last,
            batch_size=self._worker_unit(),
            worker=self.worker,
            num_workers=self.num_workers,
            # Buckets and budgets cut their own batches: drop_last drops none of them.
            drop_tail=drop_last and self.bucket is None and self.batch_budget is None,
            runs=runs,
        )

    def _rank_runs(self) -> int:
        """How many consecutive positions of the epoch order go to one rank at a time: a
        StratifiedSampler's batches whole (each keeps the class proportions; dealt one
        position at a time, a 50/50 split would give each of 2 ranks one class)."""
        sampler = self.sampler
        return sampler.batch_size if isinstance(sampler, StratifiedSampler) else 1

    @property
    def _budget(self) -> int:
        """The cost a batch may hold (no limit: count batching within buckets)."""
        return self.batch_budget if self.batch_budget is not None else sys.maxsize

    def _plan_slots(self, order: Sequence[int]) -> Sequence[int]:
        assert self._costs is not None and self.batch_size is not None
        # len(loader) and the epoch both ask for the plan: cut it once per epoch (a
        # sampler may answer differently each time it is asked, so it is not cached).
        key = (self._epoch, repr(self._excluded))
        if self.sampler is None and self._slots is not None and self._slots[0] == key:
            return self._slots[1]
        slots: Sequence[int] = plan_slots(  # type: ignore[assignment]
            order,
            self._costs,
            budget=self._budget,
            max_count=self.batch_size,
            bucket=self.bucket,
            # The same on every rank and worker: they deal from one plan.
            rng=np.random.default_rng([self.seed, self._epoch]),
            world_size=self.world_size,
            drop_last=self.drop_last,
        )
        self._slots = (key, slots)
        return slots

    def _stream_epoch(self) -> StreamEpoch:
        """This share's part of the current epoch of a stream. When the stream knows its
        size, every rank yields the same number of samples: its own, repeated from the
        start when short (or cut short with ``drop_last``), so that ranks stay in step; a
        DataLoader worker takes its run of whole batches of its rank's share. Of unknown
        size, every rank and worker is a share of its own."""
        assert isinstance(self.dataset, AsyncIterableDataset)
        total = self.dataset.num_samples()
        workers, slot, shares = self.num_workers, self.rank, self.world_size
        length = run = None
        if total is None:
            # Unknown size: each DataLoader worker is a share of its own, as it comes.
            slot, shares = slot * workers + self.worker, shares * workers
        else:
            length = rank_share(total, shares, self.drop_last)
            if workers > 1:
                # The rank's share (padded for the rank, not per worker) split into runs
                # of whole batches: the workers yield the rank's batches, each sample once.
                batch = self._run_unit()
                if self.drop_last and self.bucket is None:
                    length -= length % batch  # (a partial last batch would be dropped)
                run = worker_run(length, workers, self.worker, batch)
        return StreamEpoch(
            slot=slot,
            shares=shares,
            ranks=self.world_size,
            drop_last=self.drop_last,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self._epoch,
            buffer_size=self.shuffle_buffer,
            length=length,
            retry=self.retry,
            timeout=self.timeout,
            in_flight=self.concurrency,
            run=run,
        )

    def _worker_unit(self) -> int:
        """How many consecutive positions of the rank's share go to one DataLoader worker
        at a time (map-style): whole buckets when bucketing, so that each worker cuts the
        rank's own windows and together they yield the rank's batches; else whole batches
        of ``batch_size`` (planned batches: whole slots)."""
        if self.bucket is not None and self._costs is None:
            return self.bucket
        return self.batch_size or 1

    def _run_unit(self) -> int:
        """The unit of a sized stream's worker runs: as `_worker_unit`, but 1 for batches
        cut by a budget alone (cut within each worker's run)."""
        if self.batch_budget is not None and self.bucket is None:
            return 1
        return self._worker_unit()

    def _check_run_unit(self, resume: WorkerProgress) -> None:
        """``ValueError`` when a sized stream's per-worker state was saved with runs of
        another batch unit: its positions would mean other samples."""
        if resume.unit is not None and resume.unit != self._run_unit():
            raise ValueError(
                f"this stream's state was saved by DataLoader workers reading runs of "
                f"batches of {resume.unit} samples; this loader's are of {self._run_unit()}: "
                "resume with the batch_size (and bucket, batch_budget) it was saved with"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (samples, with ``batch_size=None``).

        With a filter or ``on_error="skip"``, fewer may come: this counts indices, not survivors.
        A stream has a length when it knows its number of samples (``num_samples()``).
        """
        if isinstance(self.dataset, AsyncIterableDataset):
            spec = self._stream_epoch()
            if spec.length is None:
                raise TypeError(
                    "len() of a Loader over a stream that does not know its size is unknown"
                )
            # (A DataLoader worker's copy: its own run.)
            return self._batches(spec.length if spec.run is None else spec.run[1])
        if self._costs is not None:
            return len(self.plan()) // self.batch_size if self.batch_size else 0
        if self.num_workers > 1:  # a DataLoader worker's copy: its own share
            return self._batches(len(self.plan()))
        n = _sized(self.sampler) if self.sampler is not None else len(self.dataset)
        n -= sum(end - start for start, end in self._excluded)
        return self._batches(rank_share(n, self.world_size, self.drop_last) if n else 0)

    def _batches(self, samples: int) -> int:
        if self.batch_budget is not None:
            raise TypeError(
                "len() of a Loader with a batch_budget is unknown: it depends on the data"
            )
        if self.batch_size is None:
            return samples
        if self.bucket is not None:
            # Each bucket is cut into batches on its own (drop_last does not apply).
            full, rest = divmod(samples, self.bucket)
            return full * -(-self.bucket // self.batch_size) + -(-rest // self.batch_size)
        full, rest = divmod(samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    # -- iteration ------------------------------------------------------------------------

    def __aiter__(self) -> _EpochOnDemand:
        """One epoch in the running event loop (asyncio, uvloop or trio). It starts at the
        first ``__anext__``: an iterator never advanced starts nothing and changes no
        state; one made before :meth:`close` yields nothing. Background tasks fetch ahead
        while the loop body runs; a dataset with no I/O to overlap (``in_memory``, no
        cache, synchronous ``transform``/``validate``) is fetched in the consuming task
        instead, a few batches at a time as they are asked for, as a plain ``for`` does."""
        iterator = _EpochOnDemand(self)
        self._iterators.add(iterator)  # (so that close() reaches it)
        return iterator

    def _start_epoch(self, prefetch: int, *, inline: bool = False) -> EpochIterator:
        # The sync bridge buffers ready batches on its side of the thread hand-off instead.
        # inline: fetch in the consumer's task (InlineEpoch; an in-memory map dataset).
        return self._prepare_epoch(prefetch, inline=inline).start()

    def _prepare_epoch(self, prefetch: int, *, inline: bool = False) -> EpochStart:
        """Everything an epoch changes in this loader (the resume point taken, statistics
        reset, the progress report opened), and its errors raised, in the calling thread;
        what needs an event loop is left to :meth:`EpochStart.start`."""
        reporter = self._reporter()  # first: it may fail (no tqdm) before anything starts
        try:
            return self._new_epoch(prefetch, reporter, inline=inline)
        except BaseException:
            if reporter is not None:  # (a sampler that fails, say: no bar left open)
                reporter.end()
            raise

    def _new_epoch(self, prefetch: int, reporter: Reporter | None, *, inline: bool) -> EpochStart:
        resume = self._resume
        if isinstance(resume, WorkerProgress) and resume.workers == 1:
            resume = resume.slots.get(0, Progress())
        if isinstance(resume, WorkerProgress):  # (raised before the resume point is used)
            raise ValueError(
                f"this state was saved with {resume.workers} DataLoader workers: a stream "
                "resumes with the same number of workers, through Loader.to_torch_loader()"
            )
        self._resume = None
        progress = Progress() if resume is None else resume.copy()
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
            gate=self._gate(),
            drift=self.drift,
        )
        if self.drift is not None:
            self.drift.reset()  # drift is judged per epoch, like the rest of statistics()
        batch_size = self.batch_size or 1
        batcher = self._batcher()
        fetch_from = resume
        if (
            resume is not None
            and not resume.empty
            and isinstance(batcher, BudgetBatcher)
            and batcher.bucket is not None
            and self.ordered
        ):
            # Buckets are cut from whole runs of positions: every bucket in progress at the
            # save (one, or under DataLoader workers one a worker) is fetched again from
            # its start and cut the same way, and its batches sent before are left out, so
            # the batches are the uninterrupted epoch's.
            start = resume.watermark - resume.watermark % batcher.bucket
            fetch_from = Progress(start)
            batcher.resume(start, set(range(start, resume.watermark)) | set(resume.done))
        units: MapUnits | StreamUnits
        if isinstance(self.dataset, AsyncDataset):
            # A chunk is one getitems call. In memory nothing is in flight, so a whole batch
            # per call (one pass through the pipeline per batch, not one per concurrency).
            limit = batch_size if self.dataset.in_memory else self.concurrency
            chunk = min(batch_size, limit) if fetcher.batched else 1
            units = MapUnits(self.plan(), chunk, fetch_from, holes=self._costs is not None)
        else:
            spec = replace(self._stream_epoch(), on_retry=stats.count_retry)
            units = StreamUnits(self.dataset, spec, fetch_from)
        collate: Callable[[list[Any]], Any]
        if self.batch_size is not None:
            collate = self.collate_fn or default_collate
        elif self.collate_fn is not None:
            collate = functools.partial(_each, self.collate_fn)
        else:
            collate = _first
        # In memory under a plain for, the epoch's steps run on demand (see InlineEpoch).
        kind = InlineEpoch if inline and isinstance(units, MapUnits) else Epoch
        build = functools.partial(
            kind,
            units,
            fetcher,
            stats=stats,
            batcher=batcher,
            drop_last=self.drop_last,
            ordered=self.ordered,
            collate=collate,
            concurrency=self.concurrency,
            prefetch=prefetch,
            paced=self._paced,
        )
        return EpochStart(self, build, progress, stats, reporter)

    def _reporter(self) -> Reporter | None:
        if not self.progress and self.on_statistics is None:
            return None
        try:
            total: int | None = len(self)
        except (TypeError, NotImplementedError):
            total = None  # a stream of unknown size, a batch budget, an unsized sampler
        resume, initial = self._resume, 0
        if total is not None and isinstance(resume, Progress):
            # A resumed epoch's bar starts where the saved one stood (by positions, which
            # batches cover whole, dropped samples included; batch_size=None: one each).
            done = resume.watermark + len(resume.done)
            initial = min(total, done // (self.batch_size or 1))
        return Reporter(
            self.statistics,
            bar=self.progress,
            total=total,
            initial=initial,
            on_statistics=self.on_statistics,
            every=self.statistics_every,
        )

    def _batcher(self) -> CountBatcher | BudgetBatcher | SlotBatcher:
        size = self.batch_size or 1
        if self._costs is not None:
            return SlotBatcher(size)
        if self.batch_budget is None and self.bucket is None:
            return CountBatcher(size)
        return BudgetBatcher(
            budget=self._budget,
            max_count=size,
            cost=self.batch_cost if callable(self.batch_cost) else sample_cost,
            bucket=self.bucket,
            # The order of a bucket's batches: seeded, and different on every share.
            seed=(self.seed, self._epoch, self.rank, self.worker),
        )

    def _on_end(self, progress: Progress | WorkerProgress) -> None:
        if progress is not self._progress:
            # An older iterator's epoch, ended after a newer one began (two iter() of this
            # loader at once): this loader's state is the newer epoch's.
            return
        self._epoch_done()
        if self.drift is not None:
            # At the end of the epoch, before the consumer's loop ends: a DriftError (or
            # a DriftWarning made an error) reaches the training loop.
            self.drift.check()

    def _epoch_done(self) -> None:
        self._finished = True
        self._excluded = []  # the elastic epoch is over: the next pass is a full one

    def __iter__(self) -> Iterator[Any]:
        """One epoch from synchronous code, through a background event loop thread (or, for
        a dataset that awaits no I/O, ``dataset.in_memory``, in this thread)."""
        iterator = InlineIterator(self) if runs_inline(self) else SyncIterator(self)
        self._iterators.add(iterator)
        return iterator

    def to_torch(self) -> Any:
        """A ``torch.utils.data.IterableDataset`` for ``DataLoader(..., batch_size=None)``:
        each worker runs its own event loop on its share of this rank's batches."""
        from ._torch import LoaderIterableDataset

        return LoaderIterableDataset(self)

    def to_torch_loader(self, **dataloader_kwargs: Any) -> Any:
        """An iterable that runs a ``torch.utils.data.DataLoader`` over :meth:`to_torch`
        each time it is iterated (``batch_size=None``; other keywords as DataLoader's; it
        is not a DataLoader instance itself) and also keeps :meth:`state_dict` exact under
        DataLoader workers: each batch's positions come back with it from its worker, so
        this loader's state counts exactly the batches the training loop has taken."""
        from ._torch import TorchLoader

        return TorchLoader(self, **dataloader_kwargs)

    def _gate(self) -> ConcurrencyGate | None:
        """The epoch's throttle gate; none where fetches await no I/O (an in-memory
        dataset has no store to overload, and its chunks would pay for the count)."""
        if self.throttle is None:
            return None
        if isinstance(self.dataset, AsyncDataset) and self.dataset.in_memory:
            return None
        return ConcurrencyGate(self.throttle)

    def for_worker(self, worker: int, num_workers: int) -> Loader:
        """A copy of this loader that yields worker ``worker`` of ``num_workers``' share,
        resuming from its part of a saved state."""
        clone = self._detached()
        resume = self._resume
        if isinstance(resume, WorkerProgress):
            if resume.workers != num_workers:
                raise ValueError(
                    f"this stream's state was saved with {resume.workers} DataLoader workers; "
                    f"it resumes only with as many, not {num_workers}"
                )
            self._check_run_unit(resume)
            worker = (worker + resume.next_slot) % num_workers  # (see WorkerProgress)
            clone._resume = resume.slots.get(worker, Progress())
        elif resume is not None:
            if self.is_streaming and num_workers > 1:
                raise ValueError(
                    "this stream's state was saved without DataLoader workers; it resumes "
                    "only without them"
                )
            unit = self._worker_unit()
            # The DataLoader takes a batch from worker 0 first, then 1, ...: worker 0 gets
            # the share whose turn came next when the state was saved, so that the rest of
            # the epoch comes in the loader's order (each share as the workers that saved
            # the state had it, renumbered). Fixed counts: the batch holding the next
            # position, in this loader's batch_size (the state's may differ). Buckets
            # and budgets cut their own batches: those the state counts (states that
            # count none, from before it did: one per unit of positions).
            fixed = self.batch_budget is None and self.bucket is None
            taken = (
                resume.watermark // unit if fixed else resume.batches or resume.watermark // unit
            )
            worker = (worker + taken) % num_workers
            clone._resume = worker_progress(resume, unit, worker, num_workers)
        clone.worker, clone.num_workers = worker, num_workers
        return clone

    def _detached(self) -> Loader:
        """A copy with the same settings, epoch and resume point, and its own runtime state."""
        clone = copy.copy(self)
        clone._stats, clone._current, clone._iterators = LoaderStats(), None, weakref.WeakSet()
        clone._cancelled = _nothing
        return clone

    def _tag(self, positions: list[int]) -> tuple[int, list[int]]:
        """What a DataLoader worker sends back with a batch: its worker number and the
        positions, in rank-plan terms for a map-style dataset."""
        if self.is_streaming:
            return self.worker, positions
        unit, worker, k = self._worker_unit(), self.worker, self.num_workers
        return worker, [rank_position(p, unit, worker, k) for p in positions]

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A plain, picklable (and json-able) dict: the epoch, the positions already
        delivered in it, and the ``plan``, what decides which sample a position means
        (:meth:`load_state_dict` refuses a mid-epoch state of another plan)."""
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
            "excluded": [list(run) for run in self._excluded],
            "plan": self._plan_state(),
        }

    def _plan_state(self) -> dict[str, Any]:
        """What decides which sample a saved position means, besides the seed, epoch,
        rank and world size: the dataset's length (a stream's ``num_samples()``, and its
        own plan: a mix's weights, stop and parts' sizes), shuffle (and a stream's
        ``shuffle_buffer``), ``drop_last`` (padding or trimming), the
        sampler's type and length (its contents are not compared), and planned batches'
        settings and costs. Plain ints, bools, strings and None (json-able).

        Not in it, since a saved position means the same sample under any of them:
        ``batch_size`` (without planned batches), ``ordered``, ``concurrency``, the
        number of DataLoader workers (checked apart, for a stream), transforms. (A sized
        stream's state saved under workers records its runs' batch unit itself: see
        `WorkerProgress.unit`.)"""
        sampler, sampler_length = self.sampler, None
        if sampler is not None:
            # Unsized: left out, as counting it would mean drawing an epoch's order.
            with contextlib.suppress(TypeError, NotImplementedError):
                sampler_length = len(sampler)  # type: ignore[arg-type]
        if isinstance(self.dataset, AsyncDataset):
            length: int | None = len(self.dataset)
        else:
            total = self.dataset.num_samples()
            length = None if total is None else int(total)
        batch_plan = None
        if self._costs is not None:
            if self._costs_digest is None:  # (once: the costs are fixed)
                self._costs_digest = zlib.crc32(np.ascontiguousarray(self._costs).data)
            batch_plan = {
                "batch_size": self.batch_size,
                "batch_budget": None if self.batch_budget is None else int(self.batch_budget),
                "bucket": None if self.bucket is None else int(self.bucket),
                "costs_crc32": self._costs_digest,
            }
        return {
            "dataset_length": length,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer if self.is_streaming and self.shuffle else None,
            "drop_last": self.drop_last,
            "sampler": None if sampler is None else type(sampler).__qualname__,
            "sampler_length": sampler_length,
            "batch_plan": batch_plan,
            # A stream's own (a mix's weights and parts). Not in states saved before it
            # was kept: those are not checked for it.
            "dataset_plan": None
            if isinstance(self.dataset, AsyncDataset)
            else self.dataset._plan(),
        }

    def _check_plan(self, saved: object, what: str) -> None:
        """``ValueError`` naming the first setting where the ``saved`` plan differs from
        this loader's: its positions would mean other samples (some delivered twice,
        others never)."""
        if not isinstance(saved, dict):
            raise ValueError(f"{what}['plan'] is not from Loader.state_dict(): {saved!r}")
        for key, value in self._plan_state().items():
            if key == "dataset_plan" and key not in saved:
                continue  # (a state from before it was kept)
            if key not in saved:
                raise ValueError(f"{what}['plan'] lacks {key!r}: not from Loader.state_dict()")
            if saved[key] != value:
                raise ValueError(
                    f"{what} was saved by a loader with {key}={saved[key]!r}, this one has "
                    f"{key}={value!r}: the saved positions would mean other samples (resume "
                    "with the loader built as it was saved)"
                )

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state from every rank's :meth:`state_dict` (all ``world_size`` of them, a
        map-style loader built like this one), that :meth:`load_state_dict` accepts on any
        world size or number of workers (elastic resume): the rest of the epoch, each
        remaining sample once across the new world.

        Gather the states with ``torch.distributed.all_gather_object`` (or save one file
        per rank) before the restart, then on every new rank::

            loader.load_state_dict(loader.merge_states(states))

        The states must agree on their version and ``plan``, and when they hold positions
        the plan must be this loader's (``ValueError`` otherwise); the merged state
        records this loader's plan.
        """
        if not isinstance(self.dataset, AsyncDataset):
            raise TypeError("merge_states is for map-style loaders (a stream resumes per share)")
        if self._costs is not None:
            raise ValueError(
                "merge_states: a loader with planned batches (batch_cost per index) resumes "
                "on the world size that saved it; elastic resume would cut other batches"
            )
        if not states:
            raise ValueError("merge_states: no states")
        for state in states:
            if not isinstance(state, dict) or not isinstance(state.get("rank"), numbers.Integral):
                raise ValueError(
                    "merge_states: each state must be one rank's Loader.state_dict() (a "
                    "merged state has no rank: load it with load_state_dict)"
                )
            _check_version(state, "merge_states: a state")
        first = states[0]
        world = int(first["world_size"])
        # A rank that finished its share has dropped the epoch's exclusions: the others
        # still carry them.
        unfinished = [state for state in states if not state["finished"]]
        for name, group in (
            *((name, states) for name in ("version", "kind", "epoch", "seed", "world_size")),
            ("plan", states),
            ("excluded", unfinished),
        ):
            values = {repr(state.get(name)) for state in group}
            if len(values) > 1:
                raise ValueError(f"merge_states: the states disagree on {name!r}: {values}")
        ranks = sorted(int(state["rank"]) for state in states)
        if ranks != list(range(world)):
            raise ValueError(
                f"merge_states: need one state per rank 0..{world - 1}, got ranks {ranks}"
            )
        if first["kind"] != "map" or first["seed"] != self.seed:
            raise ValueError("merge_states: the states are not from a loader built like this one")
        # (Version 1 states lack a plan; states that hold no position fit any.)
        if "plan" in first and any(_holds_positions(state) for state in states):
            self._check_plan(first["plan"], "merge_states: the states")
        n = _sized(self.sampler) if self.sampler is not None else len(self.dataset)
        excluded = unfinished[0].get("excluded", []) if unfinished else []
        remaining = remaining_positions(n, excluded)
        delivered = [q for start, end in excluded for q in range(start, end)]
        for state in states:
            progress = state["progress"]
            delivered += delivered_positions(
                Progress.from_state(progress) if "workers" not in progress else Progress(),
                rank=int(state["rank"]),
                world_size=world,
                remaining=remaining,
                finished=bool(state["finished"]),
                length=rank_share(len(remaining), world, self.drop_last) if remaining else 0,
                runs=self._rank_runs(),
            )
        runs = to_intervals(delivered)
        # Every rank's loop ended: the epoch did (drop_last's trimmed samples included).
        # Every sample delivered while a loop still ran: nothing is left, but the epoch
        # is not over (its resume yields nothing, as each rank's own state would).
        finished = not unfinished or n == 0
        return {
            "version": _STATE_VERSION,
            "kind": "map",
            "epoch": first["epoch"],
            "seed": self.seed,
            "rank": None,
            "world_size": None,
            "finished": finished,
            "progress": Progress().state(),
            "excluded": [] if finished else runs,
            # The merge dealt the positions over this loader's plan (a version 1 state's
            # too): it is what they mean.
            "plan": self._plan_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields the rest of that epoch
        (or, if it had ended, that epoch again in full).

        Raises ``TypeError`` for a non-dict; ``ValueError`` (and changes nothing) for
        missing keys, a version other than 1 or 2, another kind, seed or rank, and for a
        state holding delivered positions whose ``plan`` differs from this loader's
        (naming the setting and both values). A state saved at an epoch's start holds no
        position: it fits any plan and any number of DataLoader workers; so does one
        saved after its end. Version 1 states (no plan) load unchecked."""
        if not isinstance(state, dict):
            raise TypeError(
                f"state must be a dict from Loader.state_dict(), got {type(state).__name__}"
            )
        missing = {"version", "kind", "epoch", "seed", "finished", "progress"} - state.keys()
        if missing:
            raise ValueError(f"state is missing keys {sorted(missing)}")
        _check_version(state, "state")
        if state["version"] >= 2 and "plan" not in state:
            raise ValueError("state is missing keys ['plan']")
        kind = "stream" if self.is_streaming else "map"
        if state["kind"] != kind:
            raise ValueError(f"state is for a {state['kind']} loader, this one is {kind}")
        if state["seed"] != self.seed:
            raise ValueError(
                f"state was saved with seed={state['seed']}, this loader has seed={self.seed}"
            )
        merged = state.get("world_size") is None
        if not merged and (state.get("world_size"), state.get("rank")) != (
            self.world_size,
            self.rank,
        ):
            raise ValueError(
                f"state is rank {state.get('rank')} of {state.get('world_size')}, this loader "
                f"is rank {self.rank} of {self.world_size}: load each rank's own state, or "
                "merge every rank's state with loader.merge_states(states) to resume on "
                "another world size"
            )
        epoch, saved = state["epoch"], state["progress"]
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"state['epoch'] must be an int >= 0, got {epoch!r}")
        epoch = int(epoch)
        try:
            resume: Progress | WorkerProgress | None = None
            if state["finished"]:
                pass
            elif "workers" in saved:
                resume = WorkerProgress.from_state(saved)
            else:
                resume = Progress.from_state(saved)
            excluded = [] if state["finished"] else [list(r) for r in state.get("excluded", [])]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"state['progress'] or state['excluded'] is not from Loader.state_dict(): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if resume is not None and resume.empty:
            # The epoch's start holds no position, so none per DataLoader worker either: it
            # resumes under any number of workers (a stream's progress otherwise binds it).
            resume = None
        # Only positions depend on the plan: a state at an epoch's start or end fits any
        # (a job that resumes after its dataset grew, at an epoch boundary, may). A version 1
        # state, saved before plans were recorded, has none to check.
        if "plan" in state and (resume is not None or excluded):
            self._check_plan(state["plan"], "state")
        # Nothing is changed until the whole state is read.
        self._epoch, self._finished, self._excluded = epoch, False, excluded
        self._resume, self._progress = resume, Progress()

    def statistics(self) -> dict[str, Any]:
        """Counters of the current (or last) epoch: samples, batches, in_flight, buffered,
        errors, skipped, substituted, filtered, retries, cache hits and misses,
        samples_per_second, fetch latency percentiles (seconds), a bounded log of failed
        samples (index, key, error, action); the throttle's ``concurrency_limit``,
        ``throttled`` and ``throttle_decreases`` (totals over the loader's life); and with a
        breaker, its ``breaker_state`` and ``breaker_opened`` count."""
        current = self._current
        buffered = current.buffered if current is not None else 0
        # Under a plain for loop, ready batches wait in the bridge's queue instead.
        buffered += sum(iterator.buffered for iterator in list(self._iterators))
        snapshot = self._stats.snapshot(buffered)
        if self.throttle is not None:
            snapshot.update(self.throttle.statistics())
        else:
            snapshot.update(concurrency_limit=self.concurrency, throttled=0, throttle_decreases=0)
        if self.drift is not None:
            snapshot["drift"] = self.drift.report()
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
        # Forgotten as well as cancelled: the loader lives on (for the next epoch), and
        # must not keep the closed epoch's batches alive. Weakly kept for aclose(), which
        # waits for it: its cancelled tasks keep it alive until they have ended.
        current, self._current = self._current, None
        if current is not None:
            self._cancelled = weakref.ref(current)
            current.cancel()

    async def aclose(self) -> None:
        """Cancel the running epochs (every ``async for`` begun, the newest one's too),
        wait for them, and release the dataset's connections in this event loop."""
        running = [it for it in list(self._iterators) if isinstance(it, _EpochOnDemand)]
        self.close()
        current = self._cancelled()
        # Shielded: left by a cancellation (`async with loader` in a cancelled scope), the
        # epochs must still be waited for and the connections released.
        with anyio.CancelScope(shield=True):
            try:
                for iterator in running:
                    await iterator.aclose()
                if current is not None:  # the newest epoch (again, if an async for began it)
                    await current.aclose()
            finally:  # a last on_statistics call that raises still leaves no connection open
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
        state.update(_stats=LoaderStats(), _current=None, _cancelled=_nothing)
        del state["_iterators"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_paced", False)  # (pickled before it existed)
        self._iterators = weakref.WeakSet()

    def __repr__(self) -> str:
        return (
            f"Loader({self.dataset!r}, batch_size={self.batch_size}, concurrency={self.concurrency}, "
            f"prefetch={self.prefetch}, ordered={self.ordered}, rank={self.rank}/{self.world_size})"
        )


class EpochStart:
    """An epoch prepared by :meth:`Loader._prepare_epoch`, to be started in an event loop.

    The sync bridge prepares in the consumer's thread and starts in its loop thread, so
    that ``iter(loader)`` changes the loader's state before it returns without waiting
    for the loop thread, which would be busy with the epoch's first fetches by then."""

    def __init__(
        self,
        loader: Loader,
        build: Callable[[], Epoch | InlineEpoch],
        progress: Progress,
        stats: LoaderStats,
        reporter: Reporter | None,
    ) -> None:
        self._loader = loader
        self._build = build
        self._progress = progress
        self._stats = stats
        self._reporter = reporter

    def start(self) -> EpochIterator:
        """Start the epoch's tasks in the running event loop."""
        loader, epoch, progress = self._loader, self._build(), self._progress
        if loader._progress is progress:  # (else a newer epoch began meanwhile: see _on_end)
            loader._current = epoch
        on_end = functools.partial(loader._on_end, progress)
        return EpochIterator(epoch, progress, on_end=on_end, reporter=self._reporter)

    def report_end(self) -> None:
        """What :meth:`EpochIterator.report_end` does, for an epoch that may not have
        started (closed first): the rates stop, the progress report closes (once)."""
        self._stats.stop()
        if self._reporter is not None:
            self._reporter.end()


class _EpochOnDemand(AsyncIterator[Any]):
    """``aiter(loader)``: starts the epoch (its background task) at the first
    ``__anext__``, then passes each call on to its :class:`EpochIterator`.

    Started in ``aiter()``, an epoch whose iterator was never advanced (an exception
    between ``aiter()`` and the first ``anext()``, outside ``async with loader``) had its
    tasks cancelled by ``asyncio.run`` before their first step, and anyio's task wrapper
    then never awaited their coroutines: a RuntimeWarning at exit."""

    buffered = 0  # (the running epoch's buffered batches are counted by the loader)

    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        self._iterator: EpochIterator | None = None
        self._closed = False

    def __aiter__(self) -> _EpochOnDemand:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:
            if self._closed:
                raise StopAsyncIteration
            loader = self._loader
            # No I/O to overlap (in memory): fetched in this task as batches are asked for,
            # without background tasks and a hand-off per batch (3x the samples/s here).
            self._iterator = loader._start_epoch(loader.prefetch, inline=fetches_inline(loader))
        return await self._iterator.__anext__()

    def close(self) -> None:
        """From :meth:`Loader.close`: an epoch not started will not start, a started one
        is cancelled (not waited for: see :meth:`aclose`)."""
        self._closed = True
        if self._iterator is not None:
            self._iterator.cancel()

    async def aclose(self) -> None:
        """Cancel the epoch, if it started, and wait for its end."""
        self._closed = True
        if self._iterator is not None:
            await self._iterator.aclose()


def _sized(sampler: Iterable[int]) -> int:
    try:
        return len(sampler)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in sampler)


def _first(values: list[Any]) -> Any:
    return values[0]


def _each(collate_fn: Callable[[Any], Any], values: list[Any]) -> Any:
    # batch_size=None: the single sample, converted as torch's DataLoader converts it.
    return collate_fn(values[0])


def _holds_positions(state: dict[str, Any]) -> bool:
    """Whether ``state`` records positions delivered in its epoch (which only its plan
    gives a meaning to): not at the epoch's start, nor after its end."""
    if state["finished"]:
        return False
    if state.get("excluded"):
        return True
    saved = state["progress"]
    progress = (
        WorkerProgress.from_state(saved) if "workers" in saved else Progress.from_state(saved)
    )
    return not progress.empty


def _check_version(state: dict[str, Any], what: str) -> None:
    version = state.get("version")
    if isinstance(version, bool) or version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{what} has version {version!r}: this asyncload reads state versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))} (Loader.state_dict() saves "
            f"{_STATE_VERSION})"
        )


def _check_bool(name: str, value: object) -> None:
    # Not truthiness: shuffle="no" would shuffle.
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _distributed_replicas(sampler: object) -> Any:
    """``sampler.num_replicas`` when it is a torch ``DistributedSampler`` (over one
    replica it gives the whole order), else None. torch is not imported: if it is not
    loaded, the sampler cannot be one."""
    module = sys.modules.get("torch.utils.data.distributed")
    cls = getattr(module, "DistributedSampler", None)
    if isinstance(cls, type) and isinstance(sampler, cls):
        return getattr(sampler, "num_replicas", None)
    return None


def _check_int(name: str, value: object, *, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit keywords, else torch.distributed when it is initialised, else the
    ``RANK`` and ``WORLD_SIZE`` environment variables (torchrun sets them in every
    process it starts), else (0, 1).

    Read here, in the constructing process: DataLoader workers cannot query it. The
    environment is read because a loader built before ``init_process_group`` under
    torchrun would otherwise be rank 0 of 1 on every rank: each would train on the whole
    dataset, the same batches, silently.
    """
    where = ""  # where the values came from, for the errors below
    if rank is None or world_size is None:
        dist = sys.modules.get("torch.distributed")  # never import torch ourselves
        if dist is not None and dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            read = []
            if rank is None and (rank := _environment_int("RANK")) is not None:
                read.append("RANK")
            if world_size is None and (world_size := _environment_int("WORLD_SIZE")) is not None:
                read.append("WORLD_SIZE")
            where = f" ({' and '.join(read)} from the environment)" if read else ""
    if world_size is None:
        world_size = 1
    _check_int("world_size", world_size, minimum=1)
    if rank is None:
        if world_size != 1:
            # Rank 0 on every process would give each the same share, silently.
            raise ValueError(
                f"world_size={world_size}{where} needs rank= too (torch.distributed is not "
                "initialised, and RANK is not set, to say which rank this process is)"
            )
        rank = 0
    _check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(
            f"rank must be < world_size, got rank={rank}, world_size={world_size}{where}"
        )
    return int(rank), int(world_size)


def _environment_int(name: str) -> int | None:
    """The environment variable ``name`` as an int, None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"the environment variable {name}={value!r} is not an int (torchrun sets it to "
            f"this process's {name.lower()}); pass rank= and world_size= to the Loader to "
            "override it"
        ) from None


def _planned_costs(batch_cost: Any, dataset: Any) -> np.ndarray | None:
    """``batch_cost`` given as one cost per dataset index, as an array (None when it is
    a callable, or absent); checked against the dataset."""
    if batch_cost is None or callable(batch_cost):
        return None
    if isinstance(batch_cost, (str, bytes)) or not isinstance(batch_cost, (Sequence, np.ndarray)):
        raise TypeError(
            "batch_cost must be callable(sample) -> int or a sequence of each index's cost, "
            f"got {type(batch_cost).__name__}"
        )
    if not isinstance(dataset, AsyncDataset):
        raise TypeError(
            "batch_cost as a sequence of costs is for map-style datasets (a stream has no "
            "indices); give a callable(sample) -> int"
        )
    costs = np.asarray(batch_cost) if len(batch_cost) else np.zeros(0, np.int64)
    if costs.ndim != 1 or not np.issubdtype(costs.dtype, np.integer):
        raise TypeError("batch_cost as a sequence must hold one integer cost per index")
    if len(costs) != len(dataset):
        raise ValueError(
            f"batch_cost has {len(costs)} costs for a dataset of {len(dataset)} samples"
        )
    if len(costs) and costs.min() < 0:
        raise ValueError(f"batch_cost has a negative cost at index {int(costs.argmin())}")
    return costs.astype(np.int64, copy=False)
