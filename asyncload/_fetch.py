"""The per-sample stage of a Loader: fetch, transform, validate, and apply the error policy.

Each sample ends as an *outcome*: its value, :data:`DROPPED` (a filter said no),
:data:`SKIPPED` (it failed and ``on_error="skip"``), or a :class:`Failure` to raise to the
consumer at the sample's place in the stream. The order per sample is the contract's:
cache lookup, then each attempt (admitted by the throttle's concurrency gate) through the
breaker under the per-attempt timeout, retried by the retry policy; then transform; then
validate.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, Final, TypeVar, cast, final

import anyio

from ._callables import call_maybe_async, is_async_callable, is_cancellation
from ._redact import redact_key
from .cache import LRUCache, cache_key
from .datasets import DROPPED, AsyncDataset, AsyncIterableDataset, _stream_key
from .errors import (
    CircuitOpenError,
    ErrorBudgetExceeded,
    SampleError,
    SampleFiltered,
    ValidationError,
)
from .resilience.throttle import ConcurrencyGate
from .stats import LoaderStats

__all__ = ["SKIPPED", "ErrorPolicy", "Failure", "Fetcher", "Values"]

A = TypeVar("A")
T = TypeVar("T")


@final
class _Skipped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED: Final = _Skipped()


@final
class Values(list[Any]):
    """Outcomes known to be all samples (none dropped, skipped or failed), so that the
    assembler need not look at each one: :meth:`Fetcher.chunk`'s common case."""

    __slots__ = ()


@final
class Failure:
    """An error to raise to the consumer when the stream reaches this sample."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


OnError = str | Callable[[int, BaseException], Any]


class ErrorPolicy:
    """``on_error`` and ``max_errors``: what a failed sample becomes, and when to give up."""

    def __init__(self, on_error: OnError, max_errors: int | float | None, stats: LoaderStats):
        self.on_error = on_error
        self.max_errors = max_errors
        self.stats = stats
        self.attempted = 0
        # A fraction is checked once after the first 100 attempts (other budgets at each
        # failure): True once there is nothing left to check there.
        self._checked = not isinstance(max_errors, float)
        self._causes: list[BaseException] = []

    async def failed(self, index: int, key: Hashable | None, exc: Exception) -> Any:
        """The outcome for sample ``index`` that failed with ``exc``."""
        # A failure can come without suspending (an open breaker refuses at once): yield
        # here, or a worker could refuse the rest of the epoch in one step of the loop.
        await anyio.lowlevel.checkpoint()
        stats = self.stats
        stats.errors += 1
        error = _sample_error(index, key, exc)
        if len(self._causes) < 5:
            self._causes.append(exc)
        if self.on_error == "raise":
            stats.log_error(index, key, exc, "raised")
            return Failure(error)
        budget = self._over_budget()
        if budget is not None:
            stats.log_error(index, key, exc, "raised")
            return Failure(budget)
        if self.on_error == "skip":
            stats.skipped += 1
            stats.log_error(index, key, exc, "skipped")
            return SKIPPED
        try:
            substitute = await call_maybe_async(self.on_error, index, exc)  # type: ignore[arg-type]
        except Exception as handler_exc:
            stats.log_error(index, key, exc, "raised")
            handler_error = _sample_error(index, key, handler_exc)
            handler_error.__context__ = error
            return Failure(handler_error)
        stats.substituted += 1
        stats.log_error(index, key, exc, "substituted")
        return substitute

    def count(self, n: int) -> Failure | None:
        """Count ``n`` more samples as attempted; a `Failure` when the epoch is past its
        budget. A fraction is checked at each failure once 100 samples were attempted,
        and once as the next sample starts after the first 100, so that failures from
        before then count too (:meth:`settle` checks an epoch that ends right there)."""
        before = self.attempted
        self.attempted = before + n
        if before >= 100 and not self._checked:
            return self.settle()
        return None

    def settle(self, *, final: bool = False) -> Failure | None:
        """Check the budget once 100 samples were attempted, if no failure has since;
        ``final`` (every sample of the epoch attempted): whatever the count, since the
        fraction can no longer change, and an epoch of 50 samples that all failed must not
        pass as an empty one."""
        if self._checked or not isinstance(self.max_errors, float):
            return None
        if self.attempted < 100 and not final:
            return None
        self._checked = True
        budget = self._over_budget(final=final) if self.on_error != "raise" else None
        return None if budget is None else Failure(budget)

    def _over_budget(self, *, final: bool = False) -> ErrorBudgetExceeded | None:
        limit, errors = self.max_errors, self.stats.errors
        if limit is None:
            return None
        if isinstance(limit, float):
            if (self.attempted < 100 and not final) or errors <= limit * self.attempted:
                return None
            what = f"{errors} of {self.attempted} samples failed, more than max_errors={limit}"
        elif errors <= limit:
            return None
        else:
            what = f"{errors} samples failed this epoch, more than max_errors={limit}"
        causes = "; ".join(repr(c) for c in self._causes)
        return ErrorBudgetExceeded(
            f"{what}; first causes: {causes}", errors=errors, causes=list(self._causes)
        )


def _sample_error(index: int, key: Hashable | None, exc: BaseException) -> SampleError:
    where = f"sample {index}" + (f" (key {redact_key(key)!r})" if key is not None else "")
    error = SampleError(f"{where} failed: {type(exc).__name__}: {exc}", index=index, key=key)
    error.__cause__ = exc
    return error


def map_leaves(sample: Any, leaf: Callable[[Any], Any]) -> Any:
    """``sample`` with its dicts, lists and tuples made anew (at every depth) and ``leaf``
    applied to what they hold (arrays, bytes, numbers)."""
    kind = type(sample)
    if kind is dict:
        return {key: map_leaves(value, leaf) for key, value in sample.items()}
    if kind is list or kind is tuple:
        return kind(map_leaves(value, leaf) for value in sample)
    return leaf(sample)


def _same(value: Any) -> Any:
    return value


class Fetcher:
    """Produces the outcomes of samples, one at a time (:meth:`one`) or a chunk per call
    (:meth:`chunk`, for datasets whose ``getitems`` is cheaper than per-index fetches)."""

    def __init__(
        self,
        dataset: AsyncDataset[Any] | AsyncIterableDataset[Any],
        *,
        stats: LoaderStats,
        policy: ErrorPolicy,
        transform: Callable[[Any], Any] | None = None,
        validate: Callable[[Any], Any] | None = None,
        timeout: float | None = None,
        retry: Any = None,
        breaker: Any = None,
        cache: Any = None,
        gate: ConcurrencyGate | None = None,
        drift: Any = None,
    ) -> None:
        self.dataset = dataset
        self.stats = stats
        self.policy = policy
        self.transform = transform
        self.validate = validate
        self.timeout = timeout
        self.drift = drift
        # Nothing to do after the fetch: the sample is the outcome.
        self._plain = transform is None and validate is None and drift is None
        self._async_finish = any(
            fn is not None and is_async_callable(fn) for fn in (transform, validate)
        )
        # A cache hands out the object it holds: a transform gets its own containers, so
        # that one which sets a dict's key in place cannot change what later epochs get.
        self._own_containers = cache is not None and transform is not None
        self._breaker = None if breaker is None else _BreakerGuard(breaker)
        self._cache = cache
        # Each attempt for one sample, without the cache: what a cached miss runs.
        self._direct = self._build_get(retry, gate)
        # One attempt for a chunk: within the timeout, through the breaker and the gate.
        self._get_many = self._build_get_many(gate)
        self._get = self._direct
        if cache is not None and isinstance(dataset, AsyncDataset):
            self._get = _with_cache(self._direct, cache, dataset, stats)
        # A chunk is one attempt (through the breaker); a failing chunk falls back to
        # per-sample fetches, which isolate the bad sample and retry. With a cache, each
        # sample is looked up alone and the misses gather into getitems calls.
        self.batched = isinstance(dataset, AsyncDataset) and dataset.batched

    def _build_get(
        self, retry: Any, gate: ConcurrencyGate | None
    ) -> Callable[[int], Awaitable[Any]]:
        if not isinstance(self.dataset, AsyncDataset):
            return _no_index  # a stream: samples arrive from its iterator, not by index
        get: Callable[[int], Awaitable[Any]] = self.dataset.__getitem__
        if self.timeout is not None:
            get = with_timeout(get, self.timeout)
        if self._breaker is not None:
            get = self._breaker.wrap(get)
        if gate is not None:
            get = gate.wrap(get)
        if retry is not None:
            get = _with_retry(get, retry, self.stats)
        return get

    def _build_get_many(
        self, gate: ConcurrencyGate | None
    ) -> Callable[[Sequence[int]], Awaitable[list[Any]]]:
        get: Callable[[Sequence[int]], Awaitable[list[Any]]] = self._getitems_within
        if self.timeout is None and isinstance(self.dataset, AsyncDataset):
            get = self.dataset._getitems_partial  # (one coroutine less per chunk)
        if self._breaker is not None:
            get = self._breaker.wrap(get)
        if gate is not None:
            get = gate.wrap(get)
        return get

    async def _getitems_within(self, indices: Sequence[int]) -> list[Any]:
        dataset = self.dataset
        assert isinstance(dataset, AsyncDataset)
        if self.timeout is None:
            return await dataset._getitems_partial(indices)
        with anyio.fail_after(self.timeout):
            return await dataset._getitems_partial(indices)

    async def one(self, index: int, get: Callable[[int], Awaitable[Any]] | None = None) -> Any:
        """The outcome of sample ``index`` (fetched by ``get``, else by this fetcher's
        whole chain); never raises but for cancellation."""
        stats = self.stats
        over = self.policy.count(1)
        if over is not None:
            return over
        stats.in_flight += 1
        started = time.perf_counter()
        try:
            sample = await (self._get if get is None else get)(index)
        except SampleFiltered:
            stats.filtered += 1
            return DROPPED
        except Exception as exc:
            return await self.policy.failed(index, self._key(index), exc)
        finally:
            stats.in_flight -= 1
            stats.latency.add(time.perf_counter() - started)
        if self._plain:
            return sample
        return await self.finish(index, sample)

    async def chunk(self, indices: Sequence[int]) -> list[Any]:
        """The outcomes of ``indices``, fetched with one ``getitems`` call when it succeeds
        (with a cache: the misses' outcomes, with as few calls as the cache allows)."""
        if self._cache is not None:
            return await self._chunk_cached(indices)
        stats = self.stats
        stats.in_flight += len(indices)
        started = time.perf_counter()
        try:
            # (_attempt_many's work, in line: in memory, a coroutine a chunk is a few %.)
            samples: list[Any] | None = await self._get_many(indices)
        except Exception:
            samples = None
        finally:
            stats.in_flight -= len(indices)
            stats.latency.add(time.perf_counter() - started)
        if samples is None:
            return [await self.one(i) for i in indices]
        self._check_count(samples, indices)
        over = self.policy.count(len(indices))
        if over is not None:
            return [over] * len(indices)
        if self._plain:
            # Identity, not ==: samples may be numpy arrays.
            dropped = sum(1 for s in samples if s is DROPPED)
            if not dropped:
                return Values(samples)
            stats.filtered += dropped
            return samples
        out: list[Any] = list(samples)
        fetched = [slot for slot, sample in enumerate(samples) if sample is not DROPPED]
        stats.filtered += len(samples) - len(fetched)

        async def finish(slot: int) -> None:
            out[slot] = await self.finish(indices[slot], samples[slot])

        if self._async_finish:
            # A chunk is up to a whole batch: one at a time, an async transform would
            # have one call in flight where a dataset without getitems has `concurrency`.
            await _each_at_once(finish, fetched)
        else:
            for slot in fetched:
                await finish(slot)
        for outcome in out:
            if outcome is DROPPED or outcome is SKIPPED or type(outcome) is Failure:
                return out
        return Values(out)

    async def _attempt_many(self, indices: Sequence[int]) -> list[Any] | None:
        """One ``getitems`` attempt for ``indices`` (within the timeout, through the
        breaker and the throttle's gate); None when it failed, for the caller to fetch
        them one by one."""
        try:
            samples = await self._get_many(indices)
        except Exception:
            return None
        self._check_count(samples, indices)
        return samples

    def _check_count(self, samples: list[Any], indices: Sequence[int]) -> None:
        if len(samples) != len(indices):  # (a bug in the dataset: fails the epoch)
            raise TypeError(
                f"{type(self.dataset).__name__}.getitems returned {len(samples)} samples "
                f"for {len(indices)} indices"
            )

    async def _chunk_cached(self, indices: Sequence[int]) -> list[Any]:
        """Each index asks the cache on its own (hits, and loads already in flight, are
        shared as for single samples); the loads of the misses wait for a `_Gather` to
        fetch them together."""
        dataset, cache = self.dataset, self._cache
        assert isinstance(dataset, AsyncDataset)
        outcomes: list[Any] = [None] * len(indices)
        misses: Sequence[int] = range(len(indices))
        if isinstance(cache, LRUCache):
            # An in-memory cache tells what it holds at no cost: its hits are taken in
            # line (none suspends), and only the misses pay for a task each.
            misses = []
            for slot, index in enumerate(indices):
                try:
                    cached = cache_key(dataset, index) in cache
                except Exception:  # (a key_of that raises: again in one(), into the policy)
                    cached = False
                if cached:
                    outcomes[slot] = await self.one(index)
                else:
                    misses.append(slot)
        if misses:
            await self._gather_misses(indices, misses, outcomes)
        for outcome in outcomes:
            if outcome is DROPPED or outcome is SKIPPED or type(outcome) is Failure:
                return outcomes
        return Values(outcomes)

    async def _gather_misses(
        self, indices: Sequence[int], slots: Sequence[int], outcomes: list[Any]
    ) -> None:
        assert isinstance(self.dataset, AsyncDataset)
        gather = _Gather(self._attempt_many, self._direct, len(slots))
        get = _with_cache(gather.load, self._cache, self.dataset, self.stats)

        async def settle(slot: int) -> None:
            try:
                outcomes[slot] = await self.one(indices[slot], get)
            finally:
                gather.settled()

        try:
            await _each_at_once(settle, slots, alongside=gather.serve)
        finally:
            gather.close()
        if gather.error is not None:
            raise gather.error

    async def finish(self, index: int, sample: Any) -> Any:
        fetched = sample
        try:
            if self.transform is not None:
                if self._own_containers:
                    sample = map_leaves(sample, _same)
                sample = await call_maybe_async(self.transform, sample)
            if self.validate is not None:
                verdict = await call_maybe_async(self.validate, sample)
                # False, numpy's False_, 0: a verdict; None (a check that raises instead)
                # and anything truthy pass.
                if verdict is not None and verdict is not True and not verdict:
                    raise ValidationError(f"validate rejected sample {index}")
            if self.drift is not None:
                self.drift.observe(sample)
        except SampleFiltered:
            self.stats.filtered += 1
            return DROPPED
        except Exception as exc:
            key = self._key(index)
            if key is None:  # a stream's sample names itself (a tar sample's __key__)
                key = _stream_key(fetched)
            return await self.policy.failed(index, key, exc)
        return sample

    def _key(self, index: int) -> Hashable | None:
        key_of = getattr(self.dataset, "key_of", None)
        try:
            return key_of(index) if key_of is not None else None
        except Exception:
            return None


async def _no_index(index: int) -> Any:
    raise TypeError("a streaming dataset has no indices")


def with_timeout(
    get: Callable[[int], Awaitable[Any]], seconds: float
) -> Callable[[int], Awaitable[Any]]:
    async def get_within(index: int) -> Any:
        with anyio.move_on_after(seconds):
            return await get(index)
        # Here only when our deadline cancelled it: a TimeoutError the dataset raised
        # itself went up as it is, its cause kept.
        raise TimeoutError(f"no answer within timeout={seconds} s")

    return get_within


async def _each_at_once(
    work: Callable[[int], Awaitable[None]],
    slots: Iterable[int],
    alongside: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """``await work(slot)`` for every slot, each in a task of its own, while
    ``alongside()`` runs in this one; all have ended when this returns. ``work`` turns
    failures into outcomes; what escapes it all the same (SystemExit, KeyboardInterrupt, a
    stray CancelledError from user code) cancels the rest and is raised as itself, for
    the epoch's guard: a task group would wrap it in a group, or take the CancelledError
    for its own cancellation and leave the slot empty."""
    escaped: list[BaseException] = []

    async def run(slot: int) -> None:
        try:
            await work(slot)
        except BaseException as exc:
            if is_cancellation(exc):
                raise
            escaped.append(exc)
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for slot in slots:
            tg.start_soon(run, slot)
        if alongside is not None:
            await alongside()
    if escaped:
        raise escaped[0]


class _BreakerGuard:
    """Attempts (one sample's, or a chunk's) through ``breaker``. An open breaker fails
    the attempt at once (into the error policy: no spinning against a store that is
    down); but while a half-open probe of this epoch is in flight, the other attempts wait
    for its outcome instead of being refused, so a store that has recovered loses no
    samples to its recovery."""

    def __init__(self, breaker: Any) -> None:
        self.breaker = breaker
        self._in_flight = 0
        self._settled = anyio.Event()

    async def _tracked(self, attempt: Callable[[], Awaitable[T]]) -> T:
        self._in_flight += 1
        try:
            return await attempt()
        finally:
            self._in_flight -= 1
            self._settled.set()
            self._settled = anyio.Event()

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        breaker = self.breaker
        while True:
            try:
                return cast(T, await breaker.run(lambda: self._tracked(attempt)))
            except CircuitOpenError:
                # A probe from elsewhere (another loop sharing the breaker) is not ours to
                # wait for; an open breaker is not worth waiting for.
                if self._in_flight == 0 or breaker.state != "half_open":
                    raise
                await self._settled.wait()

    def wrap(self, get: Callable[[A], Awaitable[T]]) -> Callable[[A], Awaitable[T]]:
        async def get_guarded(arg: A) -> T:
            return await self.run(lambda: get(arg))

        return get_guarded


@final
class _Load:
    """A cache miss waiting for its sample from a `_Gather`."""

    __slots__ = ("done", "index", "sample")

    def __init__(self, index: int) -> None:
        self.index = index
        self.sample: Any = None
        self.done = anyio.Event()


_ALONE: Final = object()  # a load whose chunk attempt failed: it fetches its sample alone


class _Gather:
    """The cache misses of one chunk, fetched with one ``getitems`` call per round.

    A round is what has asked by the time :meth:`serve` runs again: with an in-memory
    cache every miss asks before its first suspension, so a chunk's misses are one call;
    a cache that looks up in a thread sends its misses over several rounds. A round never
    waits for lookups still running, nor for loads another chunk has in flight (which may
    be waiting on this one's)."""

    def __init__(
        self,
        attempt_many: Callable[[Sequence[int]], Awaitable[list[Any] | None]],
        alone: Callable[[int], Awaitable[Any]],
        lookups: int,
    ) -> None:
        self._attempt_many = attempt_many
        self._alone = alone
        self._open = lookups
        self._asked: list[_Load] = []
        self._round: list[_Load] = []
        self._closed = False
        self._wake = anyio.Event()
        self.error: BaseException | None = None

    async def load(self, index: int) -> Any:
        """The sample at ``index``, fetched in this chunk's next round (the cache's load);
        fetched alone once the chunk is over (a cache may run a load on its own task, which
        outlives the chunk that asked)."""
        if self._closed:
            return await self._alone(index)
        asked = _Load(index)
        self._asked.append(asked)
        self._wake.set()
        await asked.done.wait()
        sample = asked.sample
        if sample is _ALONE:
            return await self._alone(index)
        if sample is DROPPED:
            raise SampleFiltered(index)
        return sample

    def settled(self) -> None:
        """One lookup has its outcome."""
        self._open -= 1
        self._wake.set()

    async def serve(self) -> None:
        """Fetch each round's misses until every lookup has its outcome."""
        while self._open:
            await self._wake.wait()
            self._wake = anyio.Event()
            asked = self._round = self._asked
            self._asked = []
            if not asked:
                continue
            try:
                samples = await self._attempt_many([load.index for load in asked])
            except Exception as exc:  # a broken getitems: fails the epoch after this chunk
                self.error = exc
                samples = None
            for i, load in enumerate(asked):
                load.sample = _ALONE if samples is None else samples[i]
                load.done.set()
            self._round = []

    def close(self) -> None:
        """The chunk is over (done, failed or cancelled): loads still waiting, or asked
        later, fetch their samples alone."""
        self._closed = True
        for load in (*self._round, *self._asked):
            if not load.done.is_set():
                load.sample = _ALONE
                load.done.set()
        self._round, self._asked = [], []


def _with_retry(
    get: Callable[[int], Awaitable[Any]], retry: Any, stats: LoaderStats
) -> Callable[[int], Awaitable[Any]]:
    async def get_retried(index: int) -> Any:
        return await retry.run(lambda: get(index), on_retry=stats.count_retry)

    return get_retried


def _with_cache(
    get: Callable[[int], Awaitable[Any]], cache: Any, dataset: AsyncDataset[Any], stats: LoaderStats
) -> Callable[[int], Awaitable[Any]]:
    async def get_cached(index: int) -> Any:
        key = cache_key(dataset, index)
        loaded = False

        async def load() -> Any:
            nonlocal loaded
            loaded = True
            return await get(index)

        try:
            sample = await cache.get_or_load(key, load)
        finally:
            if loaded:  # a load that raised (or was filtered out) still called the source
                stats.cache_misses += 1
        if not loaded:
            stats.cache_hits += 1
        return sample

    return get_cached
