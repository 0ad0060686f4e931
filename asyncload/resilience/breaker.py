"""A circuit breaker: stop calling a backend that keeps failing, probe it after a pause.

`BreakerState` is the state machine, plain code with no I/O, driven by a monotonic clock.
`CircuitBreaker` is the thin async wrapper that admits calls and reports their outcomes.
"""

from __future__ import annotations

import enum
import logging
import operator
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, TypeVar

import anyio

from asyncload.errors import CircuitOpenError
from asyncload.resilience.classify import ExceptionFilter, as_predicate, is_transient
from asyncload.resilience.retry import _check_number

__all__ = ["BreakerState", "BreakerStatistics", "CircuitBreaker", "Permit", "State"]

T = TypeVar("T")

_log = logging.getLogger("asyncload")
State = Literal["closed", "open", "half_open"]


class Outcome(enum.Enum):
    """How an admitted call ended, as far as the breaker is concerned."""

    SUCCESS = "success"
    FAILURE = "failure"  # a counted failure
    IGNORED = "ignored"  # not counted, cancelled, or the breaker moved on meanwhile


@dataclass(frozen=True)
class Permit:
    """An admitted call: which state generation let it in, and whether it is a probe."""

    generation: int
    probe: bool


class BreakerStatistics(TypedDict):
    state: State
    failures: int  # consecutive counted failures while closed
    opened: int  # times the breaker opened
    rejected: int  # calls refused with CircuitOpenError
    probes_in_flight: int


class BreakerState:
    """The breaker's state machine; no I/O, no locking, no event loop.

    Each call is `admit`-ted (which may raise `CircuitOpenError`) and its `Permit` later
    `settle`-d with an `Outcome`. Outcomes of calls admitted before the last state change
    are ignored: a slow call started while closed neither closes nor re-opens the breaker
    after it has moved on. State changes are queued for `pop_transitions`.
    """

    def __init__(
        self,
        *,
        failure_threshold: int,
        recovery_timeout: float,
        half_open_max_calls: int,
        clock: Callable[[], float],
    ) -> None:
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._state: State = "closed"
        self._generation = 0
        self._opened_at = 0.0
        self.failures = 0
        self.probes = 0
        self.opened = 0
        self.rejected = 0
        self._transitions: list[tuple[State, State]] = []

    def _move(self, new: State) -> None:
        self._transitions.append((self._state, new))
        self._state = new
        self._generation += 1
        self.failures = 0
        self.probes = 0
        if new == "open":
            self.opened += 1
            self._opened_at = self._clock()

    def _poll(self) -> None:
        # Time drives only one transition: open -> half_open once the pause has passed.
        if self._state == "open" and self._clock() - self._opened_at >= self.recovery_timeout:
            self._move("half_open")

    @property
    def state(self) -> State:
        self._poll()
        return self._state

    def admit(self) -> Permit:
        """Let a call through, or raise `CircuitOpenError` (counted in ``rejected``)."""
        self._poll()
        if self._state == "closed":
            return Permit(self._generation, probe=False)
        if self._state == "half_open" and self.probes < self.half_open_max_calls:
            self.probes += 1
            return Permit(self._generation, probe=True)
        self.rejected += 1
        if self._state == "open":
            wait = self._opened_at + self.recovery_timeout - self._clock()
            raise CircuitOpenError(
                f"circuit open after {self.failure_threshold} consecutive failures; "
                f"a probe call is let through in {max(wait, 0.0):.3g} s"
            )
        raise CircuitOpenError(
            f"circuit half-open: {self.probes} of {self.half_open_max_calls} probe calls "
            "already in flight"
        )

    def settle(self, permit: Permit, outcome: Outcome) -> None:
        """Record how an admitted call ended."""
        if permit.generation != self._generation:
            return
        if permit.probe:
            self.probes -= 1
            if outcome is Outcome.SUCCESS:
                self._move("closed")
            elif outcome is Outcome.FAILURE:
                self._move("open")
        elif outcome is Outcome.SUCCESS:
            self.failures = 0
        elif outcome is Outcome.FAILURE:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._move("open")

    def pop_transitions(self) -> list[tuple[State, State]]:
        """The ``(old, new)`` state changes since the last call, oldest first."""
        transitions, self._transitions = self._transitions, []
        return transitions


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    number = operator.index(value)  # (a numpy integer too)
    if number < 1:
        raise ValueError(f"{name} must be >= 1, got {number}")
    return number


class CircuitBreaker:
    """Refuse calls to a backend after ``failure_threshold`` consecutive failures.

    Closed: calls go through; a success resets the consecutive-failure count. After
    ``failure_threshold`` consecutive counted failures the breaker opens: calls raise
    `CircuitOpenError` at once, without calling ``fn``. Once ``recovery_timeout`` seconds
    (on ``clock``, default ``time.monotonic``) have passed it is half-open: up to
    ``half_open_max_calls`` concurrent probe calls go through and the rest are refused; a
    probe success closes it, a probe failure opens it again for a new recovery period.

    Only exceptions that ``counts`` accepts (an exception type, tuple of them, or predicate;
    default `is_transient`) are failures. Any other exception, such as a 404 or a
    ``ValueError``, passes through and is neutral: it neither counts as a failure nor resets
    the count, and a neutral or cancelled probe just frees its probe slot.

    ``on_state_change(old, new)`` is called after each transition, outside the breaker's
    lock; an exception from it reaches the call that made the transition, the transition
    made all the same (reading ``state`` or ``statistics()`` logs it instead). Nothing is bound to an event loop, and state changes are guarded by a thread lock,
    so one breaker can serve calls from several event loops.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        recovery_timeout: float = 1.0,
        half_open_max_calls: int = 1,
        counts: ExceptionFilter | None = None,
        clock: Callable[[], float] | None = None,
        on_state_change: Callable[[State, State], object] | None = None,
    ) -> None:
        recovery_timeout = _check_number("recovery_timeout", recovery_timeout, minimum=0.0)
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a function returning seconds, got {clock!r}")
        if on_state_change is not None and not callable(on_state_change):
            raise TypeError("on_state_change must be callable")
        self._counts = as_predicate(is_transient if counts is None else counts, name="counts")
        self._on_state_change = on_state_change
        self._machine = BreakerState(
            failure_threshold=_check_int("failure_threshold", failure_threshold),
            recovery_timeout=float(recovery_timeout),
            half_open_max_calls=_check_int("half_open_max_calls", half_open_max_calls),
            clock=clock or time.monotonic,
        )
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        m = self._machine
        return (
            f"CircuitBreaker(failure_threshold={m.failure_threshold}, "
            f"recovery_timeout={m.recovery_timeout}, "
            f"half_open_max_calls={m.half_open_max_calls}, state={self.state!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # A thread lock does not pickle; DataLoader workers each get their own breaker.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        # A copy made while probes were in flight never sees them end: it would refuse
        # every call for ever. The calls of the original are not the copy's to settle.
        self._machine.probes = 0
        self._machine._generation += 1

    def _locked(self, action: Callable[[BreakerState], T], *, reading: bool = False) -> T:
        transitions: list[tuple[State, State]] = []
        try:
            with self._lock:
                try:
                    return action(self._machine)
                finally:
                    transitions = self._machine.pop_transitions()
        finally:
            # Hooks run after the lock is released, so they may read the breaker.
            if self._on_state_change is not None:
                for old, new in transitions:
                    if not reading:
                        self._on_state_change(old, new)
                        continue
                    # A read (state, statistics(), from loader.statistics() say) that finds
                    # the pause over makes the move to half-open; it must not fail.
                    try:
                        self._on_state_change(old, new)
                    except Exception:
                        _log.exception("CircuitBreaker on_state_change(%r, %r) raised", old, new)

    @property
    def state(self) -> State:
        """``"closed"``, ``"open"`` or ``"half_open"``; an open breaker whose recovery
        timeout has passed reads ``"half_open"``, as the next call will find it."""
        return self._locked(lambda m: m.state, reading=True)

    def statistics(self) -> BreakerStatistics:
        """A snapshot of the state and counters."""

        def snapshot(m: BreakerState) -> BreakerStatistics:
            return {
                "state": m.state,
                "failures": m.failures,
                "opened": m.opened,
                "rejected": m.rejected,
                "probes_in_flight": m.probes,
            }

        return self._locked(snapshot, reading=True)

    async def run(self, fn0: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn0()`` through the breaker and return its result.

        Raises `CircuitOpenError` without calling ``fn0`` when the breaker refuses the call;
        otherwise whatever ``fn0`` raises, unchanged.
        """
        admitted: list[Permit] = []
        try:
            self._locked(lambda m: admitted.append(m.admit()))
        except BaseException:
            if admitted:  # admitted, then an on_state_change hook raised: free the slot
                self._locked(lambda m: m.settle(admitted[0], Outcome.IGNORED))
            raise
        permit = admitted[0]
        outcome = Outcome.IGNORED
        try:
            result = await fn0()
            outcome = Outcome.SUCCESS
            return result
        except Exception as exc:
            if not isinstance(exc, anyio.get_cancelled_exc_class()) and self._counts(exc):
                outcome = Outcome.FAILURE
            raise
        finally:
            # Runs on cancellation too, so a cancelled probe frees its slot.
            self._locked(lambda m: m.settle(permit, outcome))

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)`` through the breaker; see `run`."""
        return await self.run(lambda: fn(*args, **kwargs))
