"""One epoch of a Loader: fetch workers, the reorder window, batching and the ready buffer.

Workers take *units* (a chunk of plan positions, or one sample of a stream), fetch their
outcomes with the :class:`~asyncload._fetch.Fetcher`, and hand them to the assembler, which
releases them in plan order (``ordered=True``) or as they complete, groups values into
batches, and queues full batches for the sender. The sender collates and puts batches into
a memory object stream of ``prefetch`` slots, which the consumer reads.

Backpressure: at most ``window`` samples are held between being taken and leaving in a
batch, so a slow consumer fills the ready buffer, then the window, then stalls the workers.
Nothing here sleeps or polls: every wait is on an event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import anyio
import sniffio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._background import BackgroundTask
from ._fetch import SKIPPED, Failure, Fetcher
from .batching import HOLE, Batch, BudgetBatcher, CountBatcher, SlotBatcher
from .datasets import DROPPED, AsyncIterableDataset
from .errors import SampleError
from .progress import Reporter
from .sampling import Plan, Progress
from .stats import LoaderStats
from .streaming import StreamEpoch, StreamError, close_stream

__all__ = ["Epoch", "MapUnits", "StreamUnits"]

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
        positions = [p for p in range(start, stop) if p not in self.done]
        if not positions:
            return self.take()
        return positions, [self.plan[p] for p in positions]


class StreamUnits:
    """Positions of this share's stream (see :class:`~asyncload.streaming.StreamEpoch`),
    skipping those already delivered (resume)."""

    def __init__(
        self, dataset: AsyncIterableDataset[Any], spec: StreamEpoch, progress: Progress | None
    ) -> None:
        self.dataset = dataset
        self.spec = spec
        self.progress = progress


class Epoch:
    """One pass over a plan or a stream, running as a background task."""

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
    ) -> None:
        self.units = units
        self.fetcher = fetcher
        self.stats = stats
        self.batcher = batcher
        self.drop_last = drop_last
        self.ordered = ordered
        self.collate = collate
        self._unit = units.chunk if isinstance(units, MapUnits) else 1
        self.workers = max(1, concurrency // self._unit)
        # Room for every worker's unit plus what the batcher may hold back (a whole batch, or
        # a bucket), so a batch can always complete, and slack for out-of-order completions:
        # in order, a slow sample holds back all that completes after it, and with only
        # twice the concurrency a store with uneven latencies stalled the fetchers (HTTP at
        # 256 in flight: about 10 % slower than four times).
        if isinstance(batcher, (CountBatcher, SlotBatcher)):
            holds = batcher.size
        else:
            holds = batcher.max_count + (batcher.bucket or 0)
        self.window = max((4 if ordered else 2) * concurrency, concurrency + holds)
        self.failure: BaseException | None = None
        self.completed = False  # ran to the end of its plan or stream (not cancelled)

        self._send: MemoryObjectSendStream[Item]
        self.receive: MemoryObjectReceiveStream[Item]
        self._send, self.receive = anyio.create_memory_object_stream[Item](prefetch)
        self._held = 0  # samples taken and not yet sent on (or dropped)
        self._next_seq = 0  # ordered: sequence number of the next unit to release
        self._taken_seq = 0
        self._parked: dict[int, tuple[list[int], list[Any]]] = {}
        self._ready: deque[Batch] = deque()
        self._fetch_done = False
        self._space_waiters: deque[Signal] = deque()  # workers waiting for room
        self._wake_sender: Signal | None = None
        self._workers_scope: anyio.CancelScope | None = None
        self.task = BackgroundTask(self._run)

    # -- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        self._signal = signal_factory()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sender)
                async with anyio.create_task_group() as workers:
                    self._workers_scope = workers.cancel_scope
                    if isinstance(self.units, MapUnits):
                        for _ in range(self.workers):
                            workers.start_soon(self._map_worker)
                    else:
                        workers.start_soon(self._stream_worker, workers.start_soon)
                settled = self.fetcher.policy.settle()
                if settled is not None:
                    self._fail(settled.exc)
                if self.failure is None and not (
                    self.drop_last and isinstance(self.batcher, CountBatcher)
                ):
                    self._ready.extend(self.batcher.flush())
                self._fetch_done = True
                self._notify_sender()
            self.completed = True
        except Exception as exc:  # a bug of ours: report it rather than hang the consumer
            self._fail(exc)
        finally:
            self._send.close()

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._fetch_done = True
        if self._workers_scope is not None:
            self._workers_scope.cancel()
        self._notify_sender()

    async def _map_worker(self) -> None:
        units = self.units
        assert isinstance(units, MapUnits)
        fetcher = self.fetcher
        batched = fetcher.batched
        while True:
            while self._held >= self.window:
                await self._wait_space()
            unit = units.take()
            if unit is None:
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
            if units.holes and HOLE in indices:
                outcomes = await self._fetch_around_holes(indices)
            elif batched:
                outcomes = await fetcher.chunk(indices)
            else:
                outcomes = [await fetcher.one(indices[0])]
            self._complete(seq, positions, outcomes)

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
                    # A stream that raised cannot be resumed: the epoch fails here.
                    error = SampleError(
                        f"stream failed after sample {position}: {exc!r}", index=position + 1
                    )
                    error.__cause__ = exc
                    self._fail(error)
                    return
                position += 1
                if progress is not None and position in progress:
                    continue
                while self._held >= self.window:
                    await self._wait_space()
                self._held += 1
                if sample is DROPPED:
                    stats.filtered += 1
                    outcome: Any = DROPPED
                else:
                    over = fetcher.policy.count(1)
                    if over is not None:
                        outcome = over  # past the error budget: the epoch fails here
                    elif type(sample) is StreamError:
                        outcome = await fetcher.policy.failed(position, sample.key, sample.exc)
                    else:
                        outcome = await fetcher.finish(position, sample)
                self._complete(self._taken_seq, [position], [outcome])
                self._taken_seq += 1
        finally:
            with anyio.CancelScope(shield=True):
                await close_stream(stream)

    # -- assembly ----------------------------------------------------------------------------

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
        elif type(batcher) is CountBatcher:
            for outcome in outcomes:
                if outcome is DROPPED or outcome is SKIPPED or type(outcome) is Failure:
                    break
            else:  # all values, the common case: batched in slices, not one by one
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
        self._notify_sender()

    async def _sender(self) -> None:
        ready, collate = self._ready, self.collate
        while True:
            if not ready:
                if self._fetch_done:
                    return
                event = self._wake_sender = self._signal()
                await event.wait()
                continue
            values, positions = ready.popleft()
            try:
                batch = collate(values)
            except Exception as exc:
                self._fail(exc)
                return
            await self._send.send((batch, positions, len(values)))
            self._held -= len(values)
            self._notify_space()

    # -- events ------------------------------------------------------------------------------

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

    def cancel(self) -> None:
        self.task.cancel()

    async def aclose(self) -> None:
        self.task.cancel()
        await self.task.wait()
        self.receive.close()


class EpochIterator(AsyncIterator[Any]):
    """What ``async for`` iterates: batches from an :class:`Epoch`, recorded in ``progress``.

    Dropping it (``break``, an exception out of the loop body) cancels the epoch at once;
    ``aclose()`` also waits for its end.
    """

    def __init__(
        self,
        epoch: Epoch,
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

    def __aiter__(self) -> EpochIterator:
        return self

    async def __anext__(self) -> Any:
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
        epoch = self._epoch
        if self._ended:
            raise StopAsyncIteration
        try:
            return await epoch.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._ended = True
        except BaseException:
            epoch.cancel()  # the consumer was cancelled: stop fetching for it
            raise
        epoch.receive.close()
        await epoch.task.wait()
        epoch.stats.stop()
        if epoch.failure is not None:
            raise epoch.failure
        raise StopAsyncIteration

    def take_ready(self, limit: int) -> list[Item]:
        """Up to ``limit`` more items that are ready now, without waiting (the end of the
        epoch and its errors are left to :meth:`next_item`)."""
        items: list[Item] = []
        receive = self._epoch.receive
        while len(items) < limit and not self._ended:
            try:
                items.append(receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        return items

    def end(self) -> None:
        """The consumer has seen the end of the epoch: record it, if the epoch completed."""
        self._report_end()
        if self._epoch.completed and self._epoch.failure is None:
            self._on_end()

    def report_end(self) -> None:
        """Close the progress bar and send the last statistics (once)."""
        self._report_end()

    def _report_end(self) -> None:
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter.end()

    def commit(self, item: Item) -> None:
        """Count ``item`` as delivered to the consumer (progress and statistics)."""
        _, positions, count = item
        epoch = self._epoch
        self._progress.mark(positions, contiguous=epoch.ordered)
        stats = epoch.stats
        stats.batches += 1
        stats.samples += count
        if stats.first_batch_seconds is None:
            stats.first_batch_seconds = stats.elapsed()
        if self._reporter is not None:
            self._reporter.batch()

    async def aclose(self, *, report: bool = True) -> None:
        """Cancel the epoch and wait for it. ``report=False`` leaves the progress report
        to the consumer (the sync bridge closes from its loop thread, ahead of it)."""
        self._ended = True
        await self._epoch.aclose()
        if report:
            self._report_end()

    def __del__(self) -> None:
        self._epoch.cancel()
        self._epoch.receive.close()
