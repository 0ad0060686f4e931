"""Back off when the store says "slow down": additive-increase, multiplicative-decrease of the
number of requests a loader keeps in flight.

A store that answers 429 or 503 SlowDown is asking for fewer requests at once. Retrying
each of them with backoff still keeps ``concurrency`` requests pressing on it; lowering the
concurrency itself is what lets it recover. `Throttle` is the policy and its state, plain
numbers with no I/O; `ConcurrencyGate` is the async side that makes attempts wait for a
slot under the current limit.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from asyncload.errors import HTTPStatusError
from asyncload.resilience.breaker import _check_int
from asyncload.resilience.classify import _PERMANENT, _code_text
from asyncload.resilience.retry import _check_number

__all__ = ["ConcurrencyGate", "Throttle", "is_throttling"]

T = TypeVar("T")

# S3 and compatible stores: "you are sending too much". 503 SlowDown is the common one.
# Whole codes, as for is_transient: "SlowDownsampled" in a path is no store's answer.
_S3_THROTTLING = re.compile(
    r"(?<![A-Za-z])(SlowDown|Throttling|TooManyRequests|RequestLimitExceeded)"
    r"(?:Exception)?(?![A-Za-z])"
)


def is_throttling(exc: BaseException) -> bool:
    """True when ``exc`` says the server wants fewer requests: HTTP 429 or 503 (as
    `HTTPStatusError` or an aiohttp ``ClientResponseError``), or an S3-style ``SlowDown``,
    ``Throttling``, ``TooManyRequests`` or ``RequestLimitExceeded`` error."""
    if isinstance(exc, HTTPStatusError):
        # By its status and code: its message holds the URL, whose path may say anything.
        code = exc.code
        return exc.status in (429, 503) or (
            code is not None and _S3_THROTTLING.fullmatch(code) is not None
        )
    if getattr(exc, "status", None) in (429, 503):
        return True
    if not isinstance(exc, Exception) or isinstance(exc, _PERMANENT):
        return False  # (a missing file is never "slow down", whatever its name says)
    return _S3_THROTTLING.search(_code_text(exc)) is not None


class Throttle:
    """How many requests a loader keeps in flight, lowered when the store throttles.

    Starts at the loader's ``concurrency`` (the ceiling). Each throttling answer (see
    ``signals``, default `is_throttling`) multiplies the limit by ``decrease``, but at most
    once per round of requests: answers to requests that were already in flight when the
    limit last dropped say nothing new, so a burst of 429s halves it once, not to the floor.
    Each success adds ``increase / limit``, about ``increase`` per round of requests, back
    up to the ceiling. The limit never goes below ``min_concurrency``.

    The state is plain numbers, shared by the loader's epochs; ``statistics()`` reports it.
    """

    def __init__(
        self,
        *,
        min_concurrency: int = 1,
        decrease: float = 0.5,
        increase: float = 1.0,
        signals: Callable[[BaseException], bool] = is_throttling,
    ) -> None:
        min_concurrency = _check_int("min_concurrency", min_concurrency)
        decrease = _check_number("decrease", decrease, minimum=0.0)
        if not 0.0 < decrease < 1.0:
            raise ValueError(f"decrease must be a factor in (0, 1), got {decrease!r}")
        increase = _check_number("increase", increase, minimum=0.0)
        if increase == 0:
            raise ValueError("increase must be a number > 0, got 0")
        if not callable(signals):
            raise TypeError("signals must be a predicate on exceptions")
        self.min_concurrency = min_concurrency
        self.decrease = float(decrease)
        self.increase = float(increase)
        self.signals = signals
        self.ceiling = 0  # set by the loader: its concurrency
        self.limit = 0.0
        self.started = 0  # attempts admitted so far; each gets this as its ticket
        self.throttled = 0  # throttling answers seen
        self.decreases = 0  # times the limit was lowered
        self._mark = 0  # the ticket of the first attempt admitted after the last decrease

    def __repr__(self) -> str:
        return (
            f"Throttle(min_concurrency={self.min_concurrency}, decrease={self.decrease}, "
            f"increase={self.increase}, limit={self.limit:g})"
        )

    def bind(self, ceiling: int) -> None:
        """Set the ceiling (the loader's concurrency); the limit starts there.
        ``ValueError`` when ``min_concurrency`` is above it: the floor could not hold."""
        if self.min_concurrency > ceiling:
            raise ValueError(
                f"Throttle: min_concurrency={self.min_concurrency} is above the loader's "
                f"concurrency={ceiling}"
            )
        if self.ceiling and self.ceiling != ceiling:
            # The limit is a number of requests out of one loader's concurrency.
            raise ValueError(
                f"this al.Throttle serves a loader of concurrency={self.ceiling}, not "
                f"{ceiling}: give each loader its own Throttle"
            )
        if self.ceiling != ceiling:
            self.ceiling = ceiling
            self.limit = float(ceiling)

    @property
    def slots(self) -> int:
        """Attempts allowed in flight now."""
        return max(self.min_concurrency, int(self.limit))

    def admit(self) -> int:
        """A ticket for an attempt about to start."""
        ticket = self.started
        self.started += 1
        return ticket

    def succeeded(self) -> None:
        if self.limit < self.ceiling:
            self.limit = min(float(self.ceiling), self.limit + self.increase / self.limit)

    def failed(self, ticket: int, exc: BaseException) -> None:
        """Record an attempt's failure; lowers the limit when it was a throttling answer to
        a request sent since the last decrease."""
        if not self.signals(exc):
            return
        self.throttled += 1
        if ticket < self._mark:
            return
        lowered = max(float(self.min_concurrency), self.limit * self.decrease)
        if lowered < self.limit:  # (at the floor already: nothing lowered to count)
            self.limit = lowered
            self.decreases += 1
            self._mark = self.started

    def statistics(self) -> dict[str, Any]:
        return {
            "concurrency_limit": self.slots,
            "throttled": self.throttled,
            "throttle_decreases": self.decreases,
        }


class ConcurrencyGate:
    """Admits attempts while fewer than ``throttle.slots`` are in flight; the rest wait.

    One gate per epoch: its events belong to the epoch's event loop, while the `Throttle`
    state carries over between epochs. At the ceiling nobody waits (the loader never runs
    more attempts than its concurrency), so the cost is a comparison and two counters.
    """

    def __init__(self, throttle: Throttle) -> None:
        self.throttle = throttle
        self.in_use = 0
        self._waiters: deque[anyio.Event] = deque()
        self._woken = 0  # waiters set and not yet running: slots promised to them

    def full(self) -> bool:
        """No slot is free now: the next attempt must :meth:`wait_turn` first."""
        return self.in_use + self._woken >= self.throttle.slots

    async def wait_turn(self) -> None:
        """Wait until a slot is free (only below the ceiling: see :meth:`full`)."""
        while self.full():
            event = anyio.Event()
            self._waiters.append(event)
            try:
                await event.wait()
            except BaseException:
                if event.is_set():
                    self._woken -= 1
                    self._wake()  # cancelled after being woken: pass the slot on
                else:
                    self._waiters.remove(event)
                raise
            self._woken -= 1

    def release(self) -> None:
        self.in_use -= 1
        if self._waiters:
            self._wake()

    def wrap(self, fetch: Callable[[Any], Awaitable[T]]) -> Callable[[Any], Awaitable[T]]:
        """``fetch`` run in a slot, its outcome fed to the throttle: the loader's fetch path
        (one coroutine per attempt, no closure per call)."""
        throttle = self.throttle

        async def admitted(arg: Any) -> T:
            # At the ceiling (not throttled) the loader's workers alone bound what is in
            # flight: the common case skips the count.
            if throttle.limit < throttle.ceiling and self.in_use + self._woken >= throttle.slots:
                await self.wait_turn()
            self.in_use += 1
            ticket = throttle.admit()
            try:
                result = await fetch(arg)
            except Exception as exc:
                throttle.failed(ticket, exc)
                raise
            finally:
                self.release()
            if throttle.limit < throttle.ceiling:
                throttle.succeeded()
            return result

        return admitted

    async def run(self, fn0: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn0()`` in a slot, and feed its outcome to the throttle."""

        async def call(_: Any) -> T:
            return await fn0()

        return await self.wrap(call)(None)

    def _wake(self) -> None:
        # Wake only as many waiters as there are free slots (the limit may also have grown).
        room = self.throttle.slots - self.in_use - self._woken
        while room > 0 and self._waiters:
            self._waiters.popleft().set()
            self._woken += 1
            room -= 1
