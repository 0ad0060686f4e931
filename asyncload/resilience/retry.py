"""Retrying async calls with jittered exponential backoff.

The delay is a pure function (`backoff_delay`); `Retry.run` is a short loop around it.
Sleep, clock and randomness are injectable so tests record delays instead of waiting.
"""

from __future__ import annotations

import math
import numbers
import operator
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, TypeVar

import anyio

from asyncload.resilience.classify import ExceptionFilter, as_predicate, is_transient, retry_after

__all__ = ["Jitter", "Retry", "backoff_delay"]

T = TypeVar("T")
Jitter = Literal["full", "equal", "none"]
_JITTERS = ("full", "equal", "none")


class _Random(Protocol):
    def random(self) -> float: ...


def backoff_delay(
    n: int,
    *,
    initial_delay: float,
    max_delay: float,
    multiplier: float,
    jitter: Jitter,
    rand: float,
) -> float:
    """Seconds to wait before retry number ``n`` (0 for the first retry).

    The cap is ``min(max_delay, initial_delay * multiplier**n)``. ``"full"`` jitter gives
    ``rand * cap``, ``"equal"`` gives ``cap/2 + rand * cap/2``, ``"none"`` gives ``cap``.
    ``rand`` is a number in ``[0, 1]``, supplied by the caller so the result is
    deterministic. Huge ``n`` is fine: a power that overflows a float is capped.

    Raises ``ValueError`` for a negative ``n``, ``rand`` outside ``[0, 1]`` or an unknown
    ``jitter``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= rand <= 1.0:
        raise ValueError(f"rand must be in [0, 1], got {rand}")
    if initial_delay == 0:
        cap = 0.0
    else:
        try:
            cap = min(max_delay, initial_delay * float(multiplier) ** n)
        except OverflowError:
            cap = max_delay
    if jitter == "full":
        return rand * cap
    if jitter == "equal":
        return cap / 2 + rand * cap / 2
    if jitter == "none":
        return cap
    raise ValueError(f"jitter must be one of {_JITTERS}, got {jitter!r}")


def _check_number(name: str, value: object, *, minimum: float, finite: bool = True) -> float:
    """``value`` as a float: any real number (a numpy float32, a Fraction) but a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or number < minimum or (finite and math.isinf(number)):
        bound = f">= {minimum}" + (" and finite" if finite else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return number


def _check_callable(name: str, value: object, what: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")


def _describe(spec: ExceptionFilter) -> str:
    if isinstance(spec, tuple):
        return "(" + ", ".join(t.__name__ for t in spec) + ")"
    return getattr(spec, "__qualname__", None) or repr(spec)


class Retry:
    """Call an async function again after transient failures.

    ``attempts`` bounds the calls (1 means no retry). Between calls it sleeps
    `backoff_delay` seconds, or the server's ``Retry-After`` (see `retry_after`) capped at
    ``max_delay`` when the error carries one. ``retry_on`` picks what is retried: an
    exception type, a tuple of them, or a predicate ``exc -> bool``; the default is
    `is_transient`. ``deadline`` (seconds from the start of the call, on ``clock``) bounds the
    total time: a sleep that would end past it is not taken and the last error is raised
    instead; it does not interrupt an attempt in flight (that is what a per-attempt timeout
    is for).

    ``sleep`` (default ``anyio.sleep``), ``clock`` (a monotonic clock in seconds, default
    ``time.monotonic``) and ``rng`` (anything with ``random() -> float`` in ``[0, 1)``,
    default the ``random`` module) are for tests. A `Retry` holds only its settings: one
    instance can serve many concurrent calls, on any event loop.

    Raises ``ValueError`` or ``TypeError``, naming the argument, for bad settings.
    """

    def __init__(
        self,
        *,
        attempts: int = 5,
        initial_delay: float = 0.05,
        max_delay: float = 5.0,
        multiplier: float = 2.0,
        jitter: Jitter = "full",
        retry_on: ExceptionFilter = is_transient,
        deadline: float | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        clock: Callable[[], float] | None = None,
        rng: _Random | None = None,
    ) -> None:
        if isinstance(attempts, bool) or not hasattr(attempts, "__index__"):
            raise TypeError(f"attempts must be an int, not {type(attempts).__name__}")
        attempts = operator.index(attempts)  # (a numpy integer too)
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        if jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of {_JITTERS}, got {jitter!r}")
        self.attempts = attempts
        self.initial_delay = _check_number("initial_delay", initial_delay, minimum=0.0)
        self.max_delay = _check_number("max_delay", max_delay, minimum=0.0, finite=False)
        self.multiplier = _check_number("multiplier", multiplier, minimum=1.0)
        self.jitter: Jitter = jitter
        self.retry_on = retry_on
        self._should_retry = as_predicate(retry_on, name="retry_on")
        self.deadline = (
            None
            if deadline is None
            else _check_number("deadline", deadline, minimum=0.0, finite=False)
        )
        _check_callable("sleep", sleep, "an async function of the delay in seconds")
        _check_callable("clock", clock, "a function returning seconds")
        if rng is not None and not callable(getattr(rng, "random", None)):
            raise TypeError(f"rng must have a random() method, got {type(rng).__name__}")
        self._sleep = sleep
        self._clock = clock
        # Resolved per call, not stored: the `random` module reseeds itself in forked
        # workers, so DataLoader workers do not all back off in step.
        self._rng = rng

    def __repr__(self) -> str:
        return (
            f"Retry(attempts={self.attempts}, initial_delay={self.initial_delay}, "
            f"max_delay={self.max_delay}, multiplier={self.multiplier}, "
            f"jitter={self.jitter!r}, retry_on={_describe(self.retry_on)}, "
            f"deadline={self.deadline})"
        )

    def delay_for(self, retry_number: int, exc: BaseException) -> float:
        """Seconds to sleep before retry ``retry_number`` (0-based) after ``exc``."""
        requested = retry_after(exc)
        if requested is not None:
            return min(requested, self.max_delay)
        return backoff_delay(
            retry_number,
            initial_delay=self.initial_delay,
            max_delay=self.max_delay,
            multiplier=self.multiplier,
            jitter=self.jitter,
            rand=(self._rng or random).random(),
        )

    async def run(
        self,
        fn0: Callable[[], Awaitable[T]],
        *,
        on_retry: Callable[[int, Exception, float], object] | None = None,
    ) -> T:
        """Await ``fn0()`` until it succeeds, at most ``attempts`` times; return its result.

        ``on_retry(attempt, exc, delay)`` is called before each sleep, with the 1-based
        number of the attempt that just failed, its error and the delay in seconds.

        Raises the last error itself (not wrapped) when attempts run out, when the next
        sleep would cross ``deadline``, or at once when ``retry_on`` rejects it.
        Cancellation and other ``BaseException``s that are not ``Exception`` are never
        caught.
        """
        start = self.now()
        attempt = 1
        while True:
            try:
                return await fn0()
            except Exception as exc:
                delay = self.next_delay(attempt, exc, self.now() - start)
                if delay is None:
                    raise
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
            # Sleep outside the except block so the next error is not chained to this one.
            await self.sleep(delay)
            attempt += 1

    def next_delay(self, attempt: int, exc: BaseException, elapsed: float) -> float | None:
        """Seconds to wait after attempt ``attempt`` (1-based) failed with ``exc``,
        ``elapsed`` seconds into the call; ``None`` when the policy gives up: attempts
        spent, ``retry_on`` rejects ``exc`` (cancellation always is), or the sleep would
        end past ``deadline``. For callers that drive attempts themselves (a generator
        that re-opens a stream cannot hand `run` a function)."""
        if (
            attempt >= self.attempts
            or not isinstance(exc, Exception)  # cancellation (asyncio's, trio's) too
            or not self._should_retry(exc)
        ):
            return None
        delay = self.delay_for(attempt - 1, exc)
        if self.deadline is not None and elapsed + delay > self.deadline:
            return None
        return delay

    async def sleep(self, seconds: float) -> None:
        """Sleep with this policy's ``sleep`` (``anyio.sleep`` unless a test gave one)."""
        await (self._sleep or anyio.sleep)(seconds)

    def now(self) -> float:
        """The time on the clock ``deadline`` is measured on."""
        return (self._clock or time.monotonic)()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` under this policy; see `run`."""
        return await self.run(lambda: fn(*args, **kwargs))
