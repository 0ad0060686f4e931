"""Small helpers for user callables that may be sync or async, and for per-event-loop state."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import sniffio

T = TypeVar("T")


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """True when calling ``fn`` returns an awaitable (async def, partials of it, async __call__)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - we want the class attribute
    return call is not None and inspect.iscoroutinefunction(call)


async def call_maybe_async(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn(*args)`` and await the result when it is awaitable."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def current_loop() -> object:
    """The running event loop (asyncio) or run (trio), usable as a weak dictionary key."""
    library = sniffio.current_async_library()
    if library == "trio":
        import trio

        return trio.lowlevel.current_trio_token()
    import asyncio

    return asyncio.get_running_loop()


class PerLoop(Generic[T]):
    """One lazily created value per event loop, dropped when that loop is garbage collected.

    Resources such as HTTP sessions and capacity limiters are bound to the loop that created
    them; the sync bridge and DataLoader workers each run their own loop.
    """

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._values: weakref.WeakKeyDictionary[object, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = current_loop()
        try:
            return self._values[loop]
        except KeyError:
            value = self._values[loop] = self._factory()
            return value

    def pop(self) -> T | None:
        """Forget (and return) the current loop's value, if it has one."""
        return self._values.pop(current_loop(), None)

    def __getstate__(self) -> dict[str, Any]:
        # Loop-bound values never cross a pickle (DataLoader workers build their own).
        return {"_factory": self._factory}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_factory"])  # type: ignore[misc]


AsyncFn = Callable[..., Awaitable[T]]
