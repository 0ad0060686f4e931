"""One epoch of a Loader: fetch workers, the reorder window, batching and the ready buffer.

Workers take *units* (a chunk of plan positions, or one sample of a stream), fetch their
outcomes with the :class:`~asyncload._fetch.Fetcher`, and hand them to the assembler, which
releases them in plan order (``ordered=True``) or as they complete, groups values into
batches, and queues full batches for the sender. The sender collates and puts batches into
a memory object stream of ``prefetch`` slots, which the consumer reads. That is
:class:`Epoch`; :class:`InlineEpoch` does the same steps one after the other in the
consumer's task, for in-memory data under a synchronous ``for``.

Backpressure: at most ``window`` samples are held between being taken and leaving in a
batch, so a slow consumer fills the ready buffer, then the window, then stalls the workers.
Nothing here sleeps or polls: every wait is on an event.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import anyio
import sniffio
from anyio.streams.memory import (
    MemoryObjectReceiveStream,
    MemoryObjectSendStream,
    MemoryObjectStreamStatistics,
)

from ._background import BackgroundTask
from ._callables import as_failure, is_cancellation
from ._fetch import SKIPPED, Failure, Fetcher, Values
from .batching import HOLE, Batch, BudgetBatcher, CountBatcher, SlotBatcher
from .collate import add_note
from .datasets import DROPPED, AsyncIterableDataset
from .errors import SampleError
from .progress import Reporter
from .sampling import Plan, Progress
from .stats import LoaderStats
from .streaming import StreamEpoch, StreamError, close_stream

__all__ = ["Epoch", "EpochIterator", "InlineEpoch", "MapUnits", "StreamUnits"]

# What the consumer receives: (collated batch, plan positions it covers, number of samples).
Item = tuple[Any, list[int], int]


class Signal(Protocol):
    """A one-shot wake-up: ``set()`` from the loop's thread, ``await wait()``."""

    def set(self) -> None: ...
    def wait(self) -> Awaitable[Any]: ...


class _FutureSignal:
    """:class:`Signal` on asyncio: a bare future. An ``anyio.Event`` costs a backend lookup
    and two objects per wait, and a worker waits once per sample while the consumer is the
    bottleneck."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self._future = future

    def set(self) -> None:
        if not self._future.done():  # cancelled with its waiter
            self._future.set_result(None)

    def wait(self) -> asyncio.Future[None]:
        return self._future


def signal_factory() -> Callable[[], Signal]:
    """How this event loop makes a :class:`Signal` (call in the loop)."""
    if sniffio.current_async_library() == "asyncio":
        create_future = asyncio.get_running_loop().create_future
        return lambda: _FutureSignal(create_future())
    return anyio.Event


class MapUnits:
    """Hands out chunks of a map-style plan, skipping positions already delivered (resume).

    Dataset indices are looked up a block of chunks at a time: one plan lookup per block,
    not per chunk (with chunks of one sample, it was a visible part of the per-sample cost).
    """

    def __init__(
        self, plan: Plan, chunk: int, progress: Progress | None, *, holes: bool = False
    ) -> None:
        self.plan = plan
        self.chunk = chunk
        self.holes = holes  # a planned epoch: some indices are HOLE, not to be fetched
        self.done = progress.done if progress is not None else set()
        self.next = progress.watermark if progress is not None else 0
        self.end = len(plan)
        self._block: list[int] = []  # dataset indices of positions [_block_start, ...)
        self._block_start = self._block_stop = self.next
        self._block_size = chunk * -(-256 // chunk)  # whole chunks

    def take(self) -> tuple[list[int], list[int]] | None:
        """(positions, dataset indices) of the next chunk, or None at the end of the plan."""
        start, end = self.next, self.end
        if start >= end:
            return None
        stop = min(start + self.chunk, end)
        self.next = stop
        if not self.done:
            if stop > self._block_stop:
                self._block_start, self._block_stop = start, min(start + self._block_size, end)
                self._block = self.plan.indices(start, self._block_stop)
            offset = start - self._block_start
            if stop - start == 1:
                return [start], [self._block[offset]]
            return list(range(start, stop)), self._block[offset : offset + stop - start]
        # A loop, not a recursion: an unordered epoch may have delivered any number of
        # whole chunks past its watermark.
        while True:
            positions = [p for p in range(start, stop) if p not in self.done]
            if positions:
                return positions, [self.plan[p] for p in positions]
            if stop >= end:
                return None
            start, stop = stop, min(stop + self.chunk, end)
            self.next = stop


class StreamUnits:
    """Positions of this share's stream (see :class:`~asyncload.streaming.StreamEpoch`),
    skipping those already delivered (resume)."""

    def __init__(
        self, dataset: AsyncIterableDataset[Any], spec: StreamEpoch, progress: Progress | None
    ) -> None:
        self.dataset = dataset
        self.spec = spec
        self.progress = progress


def holds_back(batcher: CountBatcher | BudgetBatcher | SlotBatcher) -> int:
    """The most samples ``batcher`` may hold before it gives out a batch."""
    if isinstance(batcher, (CountBatcher, SlotBatcher)):
        return batcher.size
    return batcher.max_count + (batcher.bucket or 0)


def window(
    concurrency: int, batcher: CountBatcher | BudgetBatcher | SlotBatcher, *, ordered: bool
) -> int:
    """How many samples an epoch holds at most between taking them and sending them on."""
    # Room for every worker's unit plus what the batcher may hold back (a whole batch, or a
    # bucket), so a batch can always complete, and slack for out-of-order completions: in
    # order, a slow sample holds back all that completes after it, and with only twice the
    # concurrency a store with uneven latencies stalled the fetchers (HTTP at 256 in
    # flight: about 10 % slower than four times).
    return max((4 if ordered else 2) * concurrency, concurrency + holds_back(batcher))


class _Assembly:
    """What both ways of running an epoch share: fetching a unit, releasing outcomes in
    plan order (or as they complete) into the batcher, and the end of the fetches."""

    def __init__(
        self,
        units: MapUnits | StreamUnits,
        fetcher: Fetcher,
        *,
        stats: LoaderStats,
        batcher: CountBatcher | BudgetBatcher | SlotBatcher,
        drop_last: bool,
        ordered: bool,
        collate: Callable[[list[Any]], Any],
        concurrency: int,
        prefetch: int,
        paced: bool = False,
    ) -> None:
        self.units = units
        self.fetcher = fetcher
        # An inline epoch in a DataLoader worker: one batch per request (see InlineEpoch).
        self.paced = paced
        self.stats = stats
        self.batcher = batcher
        self.ordered = ordered
        # Each batch's positions increasing (what Progress.mark's fast path needs): not
        # with buckets, whose batches are in cost order ([0, 5, 1, 3] spans 0-3 from its
        # ends, yet is not 0-3).
        self.increasing = ordered and not (
            isinstance(batcher, BudgetBatcher) and batcher.bucket is not None
        )
        self.collate = collate
        self.failure: BaseException | None = None
        self.completed = False  # ran to the end of its plan or stream (not cancelled)
        self._held = 0  # samples taken and not yet sent on (or dropped)
        self._next_seq = 0  # ordered: sequence number of the next unit to release
        self._taken_seq = 0
        self._parked: dict[int, tuple[list[int], list[Any]]] = {}
        self._ready: deque[Batch] = deque()
        self._fetch_done = False
        self._holes = isinstance(units, MapUnits) and units.holes
        # drop_last drops the last incomplete batch of fixed counts, but not one left by a
        # resume that stopped mid-batch or past holes: the plan was trimmed to whole
        # batches, and the positions delivered before the save (or in another batch_size)
        # leave this share uneven; dropping would lose samples.
        self._drops_tail = (
            drop_last
            and isinstance(batcher, CountBatcher)
            and not (isinstance(units, MapUnits) and (units.done or units.next % batcher.size))
        )
        self.window = window(concurrency, batcher, ordered=ordered)
        self._begin(concurrency, prefetch)

    def _drop_held(self) -> None:
        """A cancelled epoch lets go of its samples at once: the loader keeps its last
        epoch (for its state) until the next begins, and a loop left by ``break`` would
        keep what was fetched ahead alive till then."""
        self._ready.clear()
        self._parked.clear()
        self.batcher.drop()

    def _begin(self, concurrency: int, prefetch: int) -> None:
        """Set up this way of running the epoch (the last step of ``__init__``)."""

    def _collated(self, values: list[Any], positions: list[int]) -> Item | None:
        """The item for a batch's samples, or None when ``collate_fn`` failed (the epoch
        has then failed with its error)."""
        try:
            return self.collate(values), positions, len(values)
        except Exception as exc:
            add_note(
                exc, f"asyncload: collate_fn failed on the batch of {self._batch_of(positions)}"
            )
            self._fail(exc)
            return None

    def _batch_of(self, positions: list[int]) -> str:
        """The samples at ``positions``, in the user's terms (for an error message)."""
        units, shown = self.units, positions[:8]
        if isinstance(units, MapUnits):
            what = f"dataset indices {[units.plan[p] for p in shown]}"
        else:
            what = f"stream positions {shown}"
        return what[:-1] + f", ... {len(positions) - 8} more]" if len(positions) > 8 else what

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, (StopIteration, StopAsyncIteration)):
            # Raised as itself to the consumer, it would read as the end of the epoch.
            error = RuntimeError(f"{type(exc).__name__} raised inside the epoch: {exc!r}")
            error.__cause__ = exc
            exc = error
        if self.failure is None:
            self.failure = exc
        self._fetch_done = True
        self._notify_sender()

    async def _fetch_unit(self, indices: list[int]) -> list[Any]:
        """The outcomes of a map-style unit's dataset indices."""
        fetcher = self.fetcher
        if self._holes and HOLE in indices:
            return await self._fetch_around_holes(indices)
        if fetcher.batched:
            return await fetcher.chunk(indices)
        return [await fetcher.one(indices[0])]

    async def _fetch_around_holes(self, indices: list[int]) -> list[Any]:
        """Outcomes of a planned epoch's unit: its holes are dropped, never fetched."""
        real = [i for i in indices if i != HOLE]
        fetcher = self.fetcher
        if fetcher.batched:
            fetched = await fetcher.chunk(real) if real else []
        else:
            fetched = [await fetcher.one(i) for i in real]
        got = iter(fetched)
        return [DROPPED if i == HOLE else next(got) for i in indices]

    def _end_fetching(self) -> None:
        """Every unit is fetched: settle the error budget, flush the last partial batch."""
        settled = self.fetcher.policy.settle(final=True)
        if settled is not None:
            self._fail(settled.exc)
        if self.failure is None and not self._drops_tail:
            self._ready.extend(self.batcher.flush())
        self._fetch_done = True
        self._notify_sender()

    def _complete(self, seq: int, positions: list[int], outcomes: list[Any]) -> None:
        if not self.ordered:
            self._release(positions, outcomes)
            return
        if seq != self._next_seq:
            self._parked[seq] = (positions, outcomes)
            return
        self._release(positions, outcomes)
        self._next_seq += 1
        parked = self._parked
        while parked:
            unit = parked.pop(self._next_seq, None)
            if unit is None:
                break
            self._release(*unit)
            self._next_seq += 1

    def _release(self, positions: list[int], outcomes: list[Any]) -> None:
        if self.failure is not None:
            return  # nothing after a failure may reach the consumer
        batcher = self.batcher
        if len(outcomes) == 1:
            outcome = outcomes[0]
            if not (outcome is DROPPED or outcome is SKIPPED or type(outcome) is Failure):
                batch = batcher.add(outcome, positions[0])
                if batch is not None:
                    self._queue(batch)
                return
        elif type(outcomes) is Values and type(batcher) is CountBatcher:
            # All samples, the common case: batched in slices, not one by one.
            batches = batcher.extend(outcomes, positions)
            if batches:
                self._queue(batches)
            return
        dropped = 0
        for position, outcome in zip(positions, outcomes, strict=True):
            if outcome is DROPPED or outcome is SKIPPED:
                dropped += 1
                closed = batcher.skip(position)  # a planned batch may end on a hole
                if closed is not None:
                    self._queue(closed)
                continue
            if type(outcome) is Failure:
                self._fail(outcome.exc)
                return
            batch = batcher.add(outcome, position)
            if batch is not None:
                self._queue(batch)
        if dropped:
            self._held -= dropped
            self._notify_space()

    def _queue(self, batch: Batch | list[Batch]) -> None:
        """Queue a complete batch (or a bucket's batches) for the sender."""
        if isinstance(batch, tuple):
            self._ready.append(batch)
        else:
            self._ready.extend(batch)
            batcher = self.batcher
            if type(batcher) is BudgetBatcher and batcher.discarded:
                # A resumed bucket's batches sent before the save: their samples leave
                # the window here, as a sent batch's do.
                self._held -= batcher.discarded
                batcher.discarded = 0
                self._notify_space()
        self._notify_sender()

    def _notify_space(self) -> None:
        """Room was freed in the window (a hook: nobody waits for it here)."""

    def _notify_sender(self) -> None:
        """A batch is ready, or fetching ended (a hook: nobody waits for it here)."""


class Epoch(_Assembly):
    """One pass over a plan or a stream, running as a background task: fetch workers keep
    ``concurrency`` samples in flight (after a slow start: see :meth:`_run`) and a sender
    collates ready batches into a stream of ``prefetch`` slots, while the consumer does
    its own work."""

    def _begin(self, concurrency: int, prefetch: int) -> None:
        units = self.units
        self._unit = units.chunk if isinstance(units, MapUnits) else 1
        self.workers = max(1, concurrency // self._unit)
        if isinstance(units, MapUnits):
            # No more workers than units to fetch: concurrency=100_000 over 10 samples
            # started 100,000 tasks (seconds and hundreds of MB for nothing).
            self.workers = min(self.workers, max(1, -(-(units.end - units.next) // self._unit)))
        self._send: MemoryObjectSendStream[Item]
        self.receive: MemoryObjectReceiveStream[Item]
        self._send, self.receive = anyio.create_memory_object_stream[Item](prefetch)
        # prefetch=0: a batch is collated only once the consumer asks for it (the sender
        # would otherwise hold one, collated, blocked in send()): next_item() counts a
        # demand, and the sender or a worker handing over a batch meets it.
        self._on_demand = prefetch == 0
        self._demand = 0
        self._space_waiters: deque[Signal] = deque()  # workers waiting for room
        self._wake_sender: Signal | None = None
        # Units left to complete before the workers beyond the first batch's start.
        self._starting = 0
        self._started: anyio.Event | None = None
        self._taken: anyio.Event | None = None  # see hold_ramp()
        self._workers_scope: anyio.CancelScope | None = None
        self.task = BackgroundTask(self._run)

    # -- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        self._signal = signal_factory()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._guarded, self._sender)
                async with anyio.create_task_group() as workers:
                    self._workers_scope = workers.cancel_scope
                    if isinstance(self.units, MapUnits):
                        # Slow start: the first batch's units go out alone, and the other
                        # workers join once as many units have completed. Started all at
                        # once, every fetch's connection setup ran in lock step, so no
                        # response came back before all the requests were out (at 256 in
                        # flight and 20 ms, the first batch in about 85 ms against 35). A
                        # straggler among them holds nothing up: the others go on to
                        # later units, which count too. At least two: a lone first unit
                        # that hangs (one-sample batches) would hold every other back.
                        first = -(-holds_back(self.batcher) // self._unit)
                        first = min(self.workers, max(2, first))
                        for _ in range(first):
                            workers.start_soon(self._guarded, self._map_worker)
                        if first < self.workers:
                            self._starting, self._started = first, anyio.Event()
                            await self._started.wait()
                            if self._taken is not None:
                                await self._taken.wait()
                            for _ in range(self.workers - first):
                                workers.start_soon(self._guarded, self._map_worker)
                    else:
                        # (The stream's own tasks, which read shards ahead, are guarded too.)
                        start_soon = lambda fn, *args: workers.start_soon(self._guarded, fn, *args)  # noqa: E731
                        workers.start_soon(self._guarded, self._stream_worker, start_soon)
                self._end_fetching()
            self.completed = True
        except Exception as exc:  # a bug of ours: report it rather than hang the consumer
            self._fail(exc)
        finally:
            if not self.completed and self.failure is None:  # cancelled
                self._drop_held()
            self._send.close()

    def _fail(self, exc: BaseException) -> None:
        super()._fail(exc)
        if self._workers_scope is not None:
            self._workers_scope.cancel()

    async def _guarded(self, body: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one of the epoch's tasks; whatever it raises, but a cancellation, fails the
        epoch (raised to the consumer after the batches before it), as itself.

        Caught here, in its own task: a ``KeyboardInterrupt`` or ``SystemExit`` from user
        code would otherwise escape into the event loop and stop it (with a plain ``for``,
        in a thread the consumer then waits on forever); a ``CancelledError`` that user code
        let escape would end the task group as though cancelled, and the epoch would look
        complete with samples missing."""
        try:
            await body(*args)
        except BaseException as exc:
            if is_cancellation(exc):
                raise
            self._fail(as_failure(exc))

    def hold_ramp(self) -> Callable[[], None]:
        """Hold the workers beyond the first batch's (see :meth:`_run`) until the consumer
        has taken its first batch, which it says by calling the function returned (in
        this event loop). Called before the epoch's task has begun.

        For a consumer in another thread (the sync bridge): it needs the GIL to take the
        batch, and this thread, opening the other workers' connections, held it for a
        switch interval or more (measured: the first batch reached the consumer 7-8 ms
        after it was queued, at 64 in flight)."""
        taken = self._taken = anyio.Event()
        return taken.set

    def _ramped(self) -> None:
        self._starting = 0
        assert self._started is not None
        self._started.set()

    async def _map_worker(self) -> None:
        units = self.units
        assert isinstance(units, MapUnits)
        batched, holes, one = self.fetcher.batched, self._holes, self.fetcher.one
        while True:
            while self._held >= self.window:
                await self._wait_space()
            unit = units.take()
            if unit is None:
                if self._starting:  # fewer units than the first batch: start no more
                    self._ramped()
                if self._taken is not None:
                    # No unit is left for the held workers either, and the consumer may
                    # never take a batch (all filtered, skipped or dropped): they must
                    # not keep the epoch from ending.
                    self._taken.set()
                return
            positions, indices = unit
            seq = self._taken_seq
            self._taken_seq += 1
            if not seq & 63:
                # Units that finish without suspending (in-memory samples, fetches refused
                # by an open breaker, filtered or skipped samples that free their room at
                # once) must not hold the event loop for a whole epoch.
                await anyio.lowlevel.checkpoint()
            self._held += len(positions)
            if batched or holes:
                outcomes = await self._fetch_unit(indices)
            else:  # one sample: one coroutine less on every resumption of the fetch
                outcomes = [await one(indices[0])]
            self._complete(seq, positions, outcomes)
            # Delivered samples must not live on in this frame while it waits for the
            # next unit (a stalled fetch could keep them for ever).
            del outcomes
            if self._starting:
                self._starting -= 1
                if not self._starting:
                    self._ramped()

    async def _stream_worker(self, start_soon: Callable[..., Any]) -> None:
        units = self.units
        assert isinstance(units, StreamUnits)
        progress = units.progress
        stats, fetcher = self.stats, self.fetcher
        position = -1  # position in this share's stream
        stream = units.dataset.epoch_stream(replace(units.spec, start_soon=start_soon))
        try:
            while True:
                try:
                    sample = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    # A stream that raised cannot be resumed: the epoch fails here. str(),
                    # not repr(): an OSError's repr leaves out the file it names.
                    where = (
                        f"after sample {position}" if position >= 0 else "before its first sample"
                    )
                    error = SampleError(
                        f"stream failed {where}: {type(exc).__name__}: {exc}", index=position + 1
                    )
                    error.__cause__ = exc
                    self._fail(error)
                    return
                # A failed shard's error stands for as many samples as it had left (as the
                # stream counted them): one failed sample per position, so that on_error
                # substitutes each and the share keeps its length.
                for _ in range(sample.count if type(sample) is StreamError else 1):
                    position += 1
                    if progress is not None and position in progress:
                        continue
                    while self._held >= self.window:
                        await self._wait_space()
                    self._held += 1
                    # Every sample counts as attempted, a filtered one too (as Fetcher.one
                    # counts a map dataset's): the same data gives the same error fraction.
                    over = fetcher.policy.count(1)
                    if sample is DROPPED:
                        stats.filtered += 1
                        outcome: Any = DROPPED if over is None else over
                    elif over is not None:
                        outcome = over  # past the error budget: the epoch fails here
                    elif type(sample) is StreamError:
                        outcome = await fetcher.policy.failed(position, sample.key, sample.exc)
                    else:
                        outcome = await fetcher.finish(position, sample)
                    self._complete(self._taken_seq, [position], [outcome])
                    self._taken_seq += 1
                    outcome = None  # (not kept alive here: see _map_worker)
                sample = None
        finally:
            with anyio.CancelScope(shield=True):
                await close_stream(stream)

    # -- events (the consumer, the sender and the workers wait on each other) ----------

    def _queue(self, batch: Batch | list[Batch]) -> None:
        # With the sender idle and room in the stream (or the consumer waiting on it), the
        # worker that completed the batch hands it over itself: waking the sender first
        # queued it behind every other ready callback (the first batch at 64 in flight
        # came ~4 ms after its last sample), and costs a task switch per batch.
        if (
            self._wake_sender is not None
            and type(batch) is tuple
            and not self._ready
            and self.failure is None
        ):
            room = self._send.statistics()
            if room.open_receive_streams and not _full(room):
                if self._on_demand:
                    self._demand -= 1  # (a consumer waits in receive(): it asked)
                item = self._collated(*batch)
                if item is not None:
                    self._send.send_nowait(item)
                    self._sent(item)
                return
        super()._queue(batch)

    async def _sender(self) -> None:
        ready = self._ready
        while True:
            if not ready or (not self._demand if self._on_demand else self._stream_full()):
                if not ready and self._fetch_done:
                    return
                event = self._wake_sender = self._signal()
                await event.wait()
                continue
            if self._on_demand:
                self._demand -= 1
            item = self._collated(*ready.popleft())
            if item is None:
                return
            await self._send.send(item)
            self._sent(item)
            item = None  # (taken by the consumer, it must not live on here)

    def _stream_full(self) -> bool:
        """``prefetch`` collated batches wait already: the next is collated only when the
        consumer takes one (not held collated, ready to go, as one more). (On demand,
        ``prefetch=0``, the consumer's demand says when instead.) A consumer gone: not
        full, so that the send finds it gone."""
        room = self._send.statistics()
        return bool(room.open_receive_streams) and _full(room)

    def _sent(self, item: Item) -> None:
        """``item`` is in the stream: its samples leave the window."""
        self._held -= item[2]
        self._notify_space()

    async def _wait_space(self) -> None:
        event = self._signal()
        self._space_waiters.append(event)
        await event.wait()

    def _notify_space(self) -> None:
        # Wake only as many workers as there is room for: waking all of them on every
        # batch costs several useless wake-ups per sample at high concurrency.
        waiters = self._space_waiters
        room = self.window - self._held
        while waiters and room > 0:
            waiters.popleft().set()
            room -= self._unit

    def _notify_sender(self) -> None:
        if self._wake_sender is not None:
            self._wake_sender.set()
            self._wake_sender = None

    # -- the consumer's side -----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Collated batches waiting for the consumer (none once it has gone: a closed
        stream still counts the batches it dropped)."""
        room = self.receive.statistics()
        return room.current_buffer_used if room.open_receive_streams else 0

    async def next_item(self) -> Item | None:
        """The next batch, or None at the end of the epoch (then see :meth:`finish`)."""
        if self._on_demand:
            self._demand += 1
            self._notify_sender()
        try:
            item = await self.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return None
        except BaseException:
            self.cancel()  # the consumer was cancelled: stop fetching for it
            raise
        self._notify_sender()  # (room for the next collated batch)
        return item

    def take_ready(self, limit: int) -> list[Item]:
        """Up to ``limit`` more batches that are ready now, without waiting."""
        items = self._received(limit)
        if items:
            self._notify_sender()
        return items

    def _received(self, limit: int) -> list[Item]:
        items: list[Item] = []
        receive = self.receive
        while len(items) < limit:
            try:
                items.append(receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        return items

    async def finish(self) -> None:
        """After the last batch: wait for the task's end and raise the epoch's failure."""
        self.receive.close()
        await self.task.wait()
        self.stats.stop()
        if self.failure is not None:
            raise self.failure

    def cancel(self) -> None:
        self.task.cancel()

    def discard(self) -> None:
        """Cancel, from a finalizer: nothing more may be received."""
        self.task.cancel()
        self._drop_buffered()

    async def aclose(self) -> None:
        self.task.cancel()
        await self.task.wait()
        self._drop_buffered()

    def _drop_buffered(self) -> None:
        """Close the consumer's end, and let go of the batches waiting in it (not waking
        the sender: this may run in a finalizer, in any thread)."""
        self._received(sys.maxsize)
        self.receive.close()


class InlineEpoch(_Assembly):
    """One pass over an in-memory map-style plan, fetched when the consumer asks: a
    :meth:`next_item` fetches and batches the next few batches (as many as an
    :class:`Epoch`'s window holds) in the consumer's own task, with no worker tasks, no
    sender and no stream between them, and each batch is collated as it is taken.

    For the synchronous ``for`` over a dataset that awaits no I/O (see
    :class:`~asyncload.bridge.InlineIterator`): there the event loop runs only inside
    ``next()``, so background tasks could not overlap anything with the training step,
    and handing each batch from task to task was most of the cost."""

    def _begin(self, concurrency: int, prefetch: int) -> None:
        # Batches fetched ahead in one go, uncollated: as many as an Epoch holds at most
        # (its window, and its prefetch). Each go is one run of the consumer's event loop,
        # which costs about as much as a batch of 32 small arrays; collating waits for
        # take_ready(), so that no more than prefetch collated batches are buffered, as
        # with an Epoch (uncollated, an in-memory batch holds references to its samples).
        self._ahead = max(1, self.window // holds_back(self.batcher)) + prefetch
        if self.paced:
            # In a DataLoader worker, batches made a few at a go reached the DataLoader in
            # bursts, and it takes them from its workers in turn: the other worker idled
            # while this one made its burst (2 workers over CPU-bound samples: 15-17k
            # samples/s, and 17-19k one batch a go, as a plain DataLoader's 18-19k). Its
            # prefetch_factor keeps the worker ahead instead.
            self._ahead = 1
        self._cancelled = False

    @property
    def buffered(self) -> int:
        return 0  # collated batches are made as the consumer takes them

    async def next_item(self) -> Item | None:
        """The next batch, or None at the end of the epoch (then see :meth:`finish`)."""
        try:
            await self._fetch_ahead()
        except BaseException:
            self.cancel()  # interrupted mid-unit: the epoch cannot go on
            raise
        items = self.take_ready(1)
        return items[0] if items else None

    def take_ready(self, limit: int) -> list[Item]:
        """Up to ``limit`` more batches, collated now from those fetched (no I/O: a
        synchronous ``for`` takes them without running the event loop)."""
        ready = self._ready
        items: list[Item] = []
        if self._cancelled:
            ready.clear()  # (here, in the consumer's thread: see cancel)
        while ready and len(items) < limit:
            item = self._collated(*ready.popleft())
            if item is None:
                ready.clear()  # nothing after a failure may reach the consumer
                break
            items.append(item)
            self._held -= item[2]
        return items

    async def _fetch_ahead(self) -> None:
        """Fetch units until ``_ahead`` batches are ready, or the plan ends."""
        ready, units = self._ready, self.units
        assert isinstance(units, MapUnits)
        while len(ready) < self._ahead and not self._fetch_done:
            unit = units.take()
            if unit is None:
                self._end_fetching()
                self.completed = True
                return
            positions, indices = unit
            seq = self._taken_seq
            self._taken_seq += 1
            if not seq & 63:
                await anyio.lowlevel.checkpoint()  # let the loop's other tasks run
            self._held += len(positions)
            self._complete(seq, positions, await self._fetch_unit(indices))

    async def finish(self) -> None:
        """After the last batch: raise the epoch's failure."""
        self.stats.stop()
        if self.failure is not None:
            raise self.failure

    def cancel(self) -> None:
        # Flags only: Loader.close() may call this from another thread while the consumer
        # takes batches; the batches fetched go at its next take.
        self._fetch_done = self._cancelled = True

    def discard(self) -> None:
        """Cancel, from a finalizer (in the consumer's thread: a break dropped the
        iterator), and let go of the batches fetched ahead."""
        self.cancel()
        self._drop_held()

    async def aclose(self) -> None:
        self.discard()


def _full(room: MemoryObjectStreamStatistics) -> bool:
    """No room in the consumer's stream: its buffer is full and nobody waits to receive."""
    return not room.tasks_waiting_receive and room.current_buffer_used >= room.max_buffer_size


def _nothing() -> None:
    pass


class EpochIterator(AsyncIterator[Any]):
    """What ``async for`` iterates: batches from an :class:`Epoch`, recorded in ``progress``.

    Dropping it (``break``, an exception out of the loop body) cancels the epoch at once;
    ``aclose()`` also waits for its end.
    """

    def __init__(
        self,
        epoch: Epoch | InlineEpoch,
        progress: Progress,
        *,
        on_end: Callable[[], None],
        reporter: Reporter | None = None,
    ) -> None:
        self._epoch = epoch
        self._progress = progress
        self._on_end = on_end
        self._reporter = reporter
        self._ended = False
        self._inline = isinstance(epoch, InlineEpoch)
        self._handed = 0

    def __aiter__(self) -> EpochIterator:
        return self

    async def __anext__(self) -> Any:
        if self._inline:
            # An in-memory epoch hands out the batches it fetched ahead without suspending,
            # so nothing else runs meanwhile: the one cancellation that can come is the
            # consumer's own (it cancelled its scope, then never awaited). Looked for every
            # 8 batches: anyio's check costs 1-3 us, a few % of an in-memory batch.
            self._handed += 1
            if not self._handed & 7:
                await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            item = await self.next_item()
        except StopAsyncIteration:
            self.end()
            raise
        except BaseException:
            self._report_end()
            raise
        self.commit(item)
        return item[0]

    async def next_item(self) -> Item:
        """The next (batch, positions, count), not yet counted as delivered: the sync
        bridge hands it to another thread and commits it when that thread takes it."""
        if self._ended:
            raise StopAsyncIteration
        item = await self._epoch.next_item()
        if item is not None:
            return item
        self._ended = True
        await self._epoch.finish()
        raise StopAsyncIteration

    def hold_ramp(self) -> Callable[[], None]:
        """See :meth:`Epoch.hold_ramp` (an inline epoch has no ramp to hold)."""
        epoch = self._epoch
        return epoch.hold_ramp() if isinstance(epoch, Epoch) else _nothing

    def take_ready(self, limit: int) -> list[Item]:
        """Up to ``limit`` more items that are ready now, without waiting (the end of the
        epoch and its errors are left to :meth:`next_item`)."""
        return [] if self._ended else self._epoch.take_ready(limit)

    def end(self) -> None:
        """The consumer has seen the end of the epoch: record it, if the epoch completed
        (also when the last ``on_statistics`` call raises: the epoch is over all the same,
        and a resume must not deliver an empty pass of it)."""
        try:
            self._report_end()
        finally:
            if self._epoch.completed and self._epoch.failure is None:
                self._on_end()

    def report_end(self) -> None:
        """Close the progress bar and send the last statistics (once)."""
        self._report_end()

    def _report_end(self) -> None:
        # However the epoch ends (its end, a break, an error, close()): rates stop here.
        self._epoch.stats.stop()
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter.end()

    def commit(self, item: Item) -> None:
        """Count ``item`` as delivered to the consumer (progress and statistics). When the
        progress report (an ``on_statistics`` callback) raises, the batch is not counted,
        and a resumed epoch delivers it."""
        _, positions, count = item
        epoch = self._epoch
        stats = epoch.stats
        stats.batches += 1
        stats.samples += count
        if stats.first_batch_seconds is None:
            stats.first_batch_seconds = stats.elapsed()
        if self._reporter is not None:
            try:
                self._reporter.batch()
            except BaseException:
                stats.batches -= 1
                stats.samples -= count
                raise
        self._progress.mark(positions, contiguous=epoch.increasing)

    def cancel(self) -> None:
        """Cancel the epoch without waiting for it (its tasks end in their event loop)."""
        self._epoch.cancel()

    async def aclose(self, *, report: bool = True) -> None:
        """Cancel the epoch and wait for it. ``report=False`` leaves the progress report
        to the consumer (the sync bridge closes from its loop thread, ahead of it)."""
        self._ended = True
        await self._epoch.aclose()
        if report:
            self._report_end()

    def __del__(self) -> None:
        # Dropped (a break or an error out of ``async for``): the last report too.
        self._epoch.discard()
        self._report_end()
