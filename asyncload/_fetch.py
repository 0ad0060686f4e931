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
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Final, final

import anyio

from ._callables import call_maybe_async
from ._redact import redact_key
from .cache import cache_key
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
        # A cache hands out the object it holds: a transform gets its own containers, so
        # that one which sets a dict's key in place cannot change what later epochs get.
        self._own_containers = cache is not None and transform is not None
        self._get = self._build_get(retry, breaker, cache, gate)
        # A chunk is one attempt; a failing chunk falls back to per-sample fetches, which
        # isolate the bad sample and retry. The breaker and the cache work per sample.
        self.batched = (
            isinstance(dataset, AsyncDataset)
            and dataset.batched
            and breaker is None
            and cache is None
        )

    def _build_get(
        self, retry: Any, breaker: Any, cache: Any, gate: ConcurrencyGate | None
    ) -> Callable[[int], Awaitable[Any]]:
        if not isinstance(self.dataset, AsyncDataset):
            return _no_index  # a stream: samples arrive from its iterator, not by index
        get: Callable[[int], Awaitable[Any]] = self.dataset.__getitem__
        if self.timeout is not None:
            get = with_timeout(get, self.timeout)
        if breaker is not None:
            get = _through_breaker(get, breaker)
        if gate is not None:
            get = _through_gate(get, gate)
        if retry is not None:
            get = _with_retry(get, retry, self.stats)
        if cache is not None:
            get = _with_cache(get, cache, self.dataset, self.stats)
        return get

    async def one(self, index: int) -> Any:
        """The outcome of sample ``index``; never raises but for cancellation."""
        stats = self.stats
        over = self.policy.count(1)
        if over is not None:
            return over
        stats.in_flight += 1
        started = time.perf_counter()
        try:
            sample = await self._get(index)
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
        """The outcomes of ``indices``, fetched with one ``getitems`` call when it succeeds."""
        stats, dataset = self.stats, self.dataset
        assert isinstance(dataset, AsyncDataset)
        stats.in_flight += len(indices)
        started = time.perf_counter()
        try:
            if self.timeout is None:
                samples = await dataset._getitems_partial(indices)
            else:
                with anyio.fail_after(self.timeout):
                    samples = await dataset._getitems_partial(indices)
        except Exception:
            samples = None
        finally:
            stats.in_flight -= len(indices)
            stats.latency.add(time.perf_counter() - started)
        if samples is None:
            return [await self.one(i) for i in indices]
        if len(samples) != len(indices):  # (a bug in the dataset: fails the epoch)
            raise TypeError(
                f"{type(dataset).__name__}.getitems returned {len(samples)} samples for "
                f"{len(indices)} indices"
            )
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
        out = []
        clean = True
        for index, sample in zip(indices, samples, strict=True):
            outcome: Any = sample
            if sample is DROPPED:
                stats.filtered += 1
            else:
                outcome = await self.finish(index, sample)
            if outcome is DROPPED or outcome is SKIPPED or type(outcome) is Failure:
                clean = False
            out.append(outcome)
        return Values(out) if clean else out

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


def _through_breaker(
    get: Callable[[int], Awaitable[Any]], breaker: Any
) -> Callable[[int], Awaitable[Any]]:
    """Each attempt through ``breaker``. An open breaker fails the attempt at once (into the
    error policy: no spinning against a store that is down); but while a half-open probe
    of this epoch is in flight, the other fetches wait for its outcome instead of being
    refused, so a store that has recovered loses no samples to its recovery."""
    in_flight = 0
    settled = anyio.Event()

    async def guarded(index: int) -> Any:
        nonlocal in_flight, settled
        in_flight += 1
        try:
            return await get(index)
        finally:
            in_flight -= 1
            settled.set()
            settled = anyio.Event()

    async def get_guarded(index: int) -> Any:
        while True:
            try:
                return await breaker.run(lambda: guarded(index))
            except CircuitOpenError:
                # A probe from elsewhere (another loop sharing the breaker) is not ours to
                # wait for; an open breaker is not worth waiting for.
                if in_flight == 0 or breaker.state != "half_open":
                    raise
                await settled.wait()

    return get_guarded


def _through_gate(
    get: Callable[[int], Awaitable[Any]], gate: ConcurrencyGate
) -> Callable[[int], Awaitable[Any]]:
    return gate.wrap(get)


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
