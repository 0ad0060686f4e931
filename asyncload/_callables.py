"""Small helpers for user callables that may be sync or async, and for per-event-loop state."""

from __future__ import annotations

import asyncio
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

import anyio
import sniffio

from .errors import AsyncloadError

T = TypeVar("T")
U = TypeVar("U")


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True when calling ``fn`` returns an awaitable (async def, partials of it, async __call__)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - we want the class attribute
    return call is not None and inspect.iscoroutinefunction(call)


async def gather(fetch: Callable[[U], Awaitable[T]], args: Iterable[U]) -> list[T]:
    """``[await fetch(a) for a in args]``, all at once, in that order. The first failure is
    raised as itself (not in an exception group) and the other calls are cancelled."""
    args = list(args)
    out: list[Any] = [None] * len(args)
    errors: list[Exception] = []

    async def one(slot: int, arg: U) -> None:
        try:
            out[slot] = await fetch(arg)
        except Exception as exc:
            if not errors:
                errors.append(exc)
                tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        for slot, arg in enumerate(args):
            tg.start_soon(one, slot, arg)
    if errors:
        raise errors[0]
    return out


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` cancels the running task, rather than being a ``CancelledError``
    that user code let escape (from awaiting a future that something else cancelled), which
    a task group would otherwise take for a cancellation of its own."""
    if not isinstance(exc, asyncio.CancelledError):
        return isinstance(exc, anyio.get_cancelled_exc_class())  # trio's: only trio raises it
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return False  # asyncio's CancelledError, but no asyncio loop runs (trio)
    cancelling = getattr(task, "cancelling", None)  # (Python 3.11+; before, trust it)
    return cancelling is None or cancelling() > 0


def as_failure(exc: BaseException) -> BaseException:
    """What to raise to the consumer for ``exc``, which is not a cancellation: itself, or
    for a ``CancelledError`` that user code let escape, an error that says so."""
    if not isinstance(exc, asyncio.CancelledError):
        return exc
    error = AsyncloadError(
        "a fetch, transform or collate_fn raised CancelledError without being cancelled "
        "(did it await a future that something else cancelled?)"
    )
    error.__cause__ = exc
    return error


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` and await the result when it is awaitable."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def current_loop() -> object:
    """The running event loop (asyncio) or run (trio), usable as a weak dictionary key."""
    loop = asyncio._get_running_loop()  # a C call, cheap enough for every request
    if loop is not None:
        return loop
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    raise RuntimeError("no running event loop")


class PerLoop(Generic[T]):
    """One lazily created value per event loop, dropped when that loop is garbage collected.

    Resources such as HTTP sessions and capacity limiters are bound to the loop that created
    them; the sync bridge and DataLoader workers each run their own loop.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[object, T] = weakref.WeakKeyDictionary()
        # The last loop asked about, by weak reference: one identity check per call.
        self._last: tuple[weakref.ref[object], T] | None = None

    def get(self) -> T:
        loop = current_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        value = self._values.get(loop)
        if value is None:
            self._forget_closed_loops()
            value = self._values[loop] = self._factory()
        self._last = (weakref.ref(loop), value)
        return value

    def _forget_closed_loops(self) -> None:
        """Drop the values of closed loops. A value that holds its loop (an HTTP pool does,
        through its connections) keeps its weak key alive for good: with a new loop per
        call (``asyncio.run(ds[i])``) each call would leave a loop and its sockets behind."""
        for loop in list(self._values):
            is_closed = getattr(loop, "is_closed", None)  # (trio's tokens have none)
            if is_closed is not None and is_closed():
                del self._values[loop]

    def total(self, measure: Callable[[T], int]) -> int:
        """``measure`` summed over every loop's value (from any thread, loop or none)."""
        return sum(measure(value) for value in list(self._values.values()))

    def pop(self) -> T | None:
        """Forget (and return) the current loop's value, if it has one."""
        self._last = None
        return self._values.pop(current_loop(), None)

    def __getstate__(self) -> dict[str, Any]:
        # Loop-bound values never cross a pickle (DataLoader workers build their own).
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_factory"])  # type: ignore[misc]


AsyncFn = Callable[..., Awaitable[T]]
