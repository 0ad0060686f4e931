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
from .datasets import DROPPED, AsyncDataset, AsyncIterableDataset
from .errors import ErrorBudgetExceeded, SampleError, SampleFiltered, ValidationError
from .resilience.throttle import ConcurrencyGate
from .stats import LoaderStats

__all__ = ["SKIPPED", "ErrorPolicy", "Failure", "Fetcher"]


@final
class _Skipped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


SKIPPED: Final = _Skipped()


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
        self._causes: list[BaseException] = []

    async def failed(self, index: int, key: Hashable | None, exc: Exception) -> Any:
        """The outcome for sample ``index`` that failed with ``exc``."""
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
            return Failure(budget)
        if self.on_error == "skip":
            stats.skipped += 1
            stats.log_error(index, key, exc, "skipped")
            return SKIPPED
        try:
            substitute = await call_maybe_async(self.on_error, index, exc)  # type: ignore[arg-type]
        except Exception as handler_exc:
            handler_error = _sample_error(index, key, handler_exc)
            handler_error.__context__ = error
            return Failure(handler_error)
        stats.substituted += 1
        stats.log_error(index, key, exc, "substituted")
        return substitute

    def _over_budget(self) -> ErrorBudgetExceeded | None:
        limit, errors = self.max_errors, self.stats.errors
        if limit is None:
            return None
        if isinstance(limit, float):
            if self.attempted < 100 or errors <= limit * self.attempted:
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
    ) -> None:
        self.dataset = dataset
        self.stats = stats
        self.policy = policy
        self.transform = transform
        self.validate = validate
        self.timeout = timeout
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
            get = _with_timeout(get, self.timeout)
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
        self.policy.attempted += 1
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
        if self.transform is None and self.validate is None:
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
        self.policy.attempted += len(indices)
        if self.transform is None and self.validate is None:
            # Identity, not ==: samples may be numpy arrays.
            stats.filtered += sum(1 for s in samples if s is DROPPED)
            return samples
        out = []
        for index, sample in zip(indices, samples, strict=True):
            if sample is DROPPED:
                stats.filtered += 1
                out.append(sample)
            else:
                out.append(await self.finish(index, sample))
        return out

    async def finish(self, index: int, sample: Any) -> Any:
        try:
            if self.transform is not None:
                sample = await call_maybe_async(self.transform, sample)
            if self.validate is not None:
                verdict = await call_maybe_async(self.validate, sample)
                if verdict is False:
                    raise ValidationError(f"validate rejected sample {index}")
        except SampleFiltered:
            self.stats.filtered += 1
            return DROPPED
        except Exception as exc:
            return await self.policy.failed(index, self._key(index), exc)
        return sample

    def _key(self, index: int) -> Hashable | None:
        key_of = getattr(self.dataset, "key_of", None)
        try:
            return key_of(index) if key_of is not None else None
        except Exception:
            return None


async def _no_index(index: int) -> Any:
    raise TypeError("a streaming dataset has no indices")


def _with_timeout(
    get: Callable[[int], Awaitable[Any]], seconds: float
) -> Callable[[int], Awaitable[Any]]:
    async def get_within(index: int) -> Any:
        with anyio.fail_after(seconds):
            return await get(index)

    return get_within


def _through_breaker(
    get: Callable[[int], Awaitable[Any]], breaker: Any
) -> Callable[[int], Awaitable[Any]]:
    async def get_guarded(index: int) -> Any:
        return await breaker.run(lambda: get(index))

    return get_guarded


def _through_gate(
    get: Callable[[int], Awaitable[Any]], gate: ConcurrencyGate
) -> Callable[[int], Awaitable[Any]]:
    async def get_admitted(index: int) -> Any:
        return await gate.run(lambda: get(index))

    return get_admitted


def _with_retry(
    get: Callable[[int], Awaitable[Any]], retry: Any, stats: LoaderStats
) -> Callable[[int], Awaitable[Any]]:
    def count(attempt: int, exc: BaseException, delay: float) -> None:
        stats.retries += 1

    async def get_retried(index: int) -> Any:
        return await retry.run(lambda: get(index), on_retry=count)

    return get_retried


def _with_cache(
    get: Callable[[int], Awaitable[Any]], cache: Any, dataset: AsyncDataset[Any], stats: LoaderStats
) -> Callable[[int], Awaitable[Any]]:
    async def get_cached(index: int) -> Any:
        key = dataset.key_of(index)
        if key is None:
            key = index
        loaded = False

        async def load() -> Any:
            nonlocal loaded
            loaded = True
            return await get(index)

        sample = await cache.get_or_load(key, load)
        if loaded:
            stats.cache_misses += 1
        else:
            stats.cache_hits += 1
        return sample

    return get_cached
