"""ThreadBatcher: calls made while a batch runs share the next thread call, in order;
results and errors reach their own callers; cancellation before a call is taken drops it,
after it is taken the caller still gets the result (no acquired resource lost).

Ordering is forced with threading events that the calls block on, never with sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import anyio
import pytest
from conftest import asyncio_only

import asyncload._batched as batched
from asyncload._batched import ThreadBatcher
from asyncload.disk_cache import DiskCache

pytestmark = pytest.mark.anyio


class Blocker:
    """A call that blocks its thread until released; ``entered`` says it is running."""

    def __init__(self, value: Any = None) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.value = value

    def __call__(self) -> Any:
        self.entered.set()
        assert self.go.wait(10), "the test never released the call"
        return self.value


async def entered(blocker: Blocker) -> None:
    # The thread sets it; polling with checkpoints keeps the loop free meanwhile.
    while not blocker.entered.is_set():
        await anyio.to_thread.run_sync(blocker.entered.wait, 0.01)


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many calls each thread hop carried."""
    sizes: list[int] = []
    run_all = batched._run_all

    def counted(calls: list[Any]) -> None:
        sizes.append(len(calls))
        run_all(calls)

    monkeypatch.setattr(batched, "_run_all", counted)
    return sizes


async def test_calls_made_during_a_batch_share_the_next_hop_in_order(
    thread_calls: list[int],
) -> None:
    batcher = ThreadBatcher()
    first = Blocker("first")
    order: list[int] = []
    made: list[int] = []  # trio starts tasks in its own order
    results: dict[Any, Any] = {}

    def later(i: int) -> int:
        order.append(i)
        return i * i

    async def one(i: int) -> None:
        made.append(i)
        results[i] = await batcher.run(later, i)

    async with anyio.create_task_group() as tg:

        async def run_first() -> None:
            results["first"] = await batcher.run(first)

        tg.start_soon(run_first)
        await entered(first)
        for i in range(5):
            tg.start_soon(one, i)
        await anyio.wait_all_tasks_blocked()
        first.go.set()
    assert thread_calls == [1, 5]
    assert order == made and sorted(made) == [0, 1, 2, 3, 4]
    assert results == {"first": "first", 0: 0, 1: 1, 2: 4, 3: 9, 4: 16}


async def test_each_caller_gets_its_own_error_and_the_batch_goes_on() -> None:
    batcher = ThreadBatcher()
    first = Blocker()
    outcomes: dict[str, Any] = {}

    def fail() -> None:
        raise ValueError("bad key 7")

    async def call(name: str, fn: Any) -> None:
        try:
            outcomes[name] = await batcher.run(fn)
        except ValueError as exc:
            outcomes[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first", first)
        await entered(first)
        tg.start_soon(call, "fails", fail)
        tg.start_soon(call, "after", lambda: threading.get_ident())
        await anyio.wait_all_tasks_blocked()
        first.go.set()
    assert isinstance(outcomes["fails"], ValueError) and "bad key 7" in str(outcomes["fails"])
    assert outcomes["first"] is None
    assert outcomes["after"] != threading.get_ident()  # ran in a worker thread


async def test_a_call_cancelled_before_its_batch_never_runs(thread_calls: list[int]) -> None:
    batcher = ThreadBatcher()
    first = Blocker()
    ran: list[str] = []
    with_scope = anyio.CancelScope()

    async def cancelled() -> None:
        with with_scope:
            await batcher.run(ran.append, "cancelled")
            ran.append("returned")  # never: the scope is cancelled before the call runs

    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.run, first)
        await entered(first)
        tg.start_soon(cancelled)
        tg.start_soon(batcher.run, ran.append, "kept")
        await anyio.wait_all_tasks_blocked()
        with_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        first.go.set()
    assert with_scope.cancelled_caught
    assert ran == ["kept"]
    assert thread_calls == [1, 1]


async def test_a_call_cancelled_while_it_runs_loses_nothing() -> None:
    """Both the task running the batch and a task whose call it carries are cancelled
    while the batch runs: both calls run to their end, and each caller either gets its
    result (the cancellation then comes at its next checkpoint) or the cancellation, with
    ``release`` given the result (the lock a lookup took, say): never neither."""
    batcher = ThreadBatcher()
    first = Blocker()
    second = Blocker("second's lock")
    third = Blocker("third's lock")
    scopes = {name: anyio.CancelScope() for name in ("second", "third")}
    got: dict[str, Any] = {}
    released: list[str] = []

    async def call(name: str, fn: Blocker) -> None:
        with scopes[name]:
            got[name] = await batcher.run(fn, release=released.append)
            await anyio.lowlevel.checkpoint()
            got[name + " went on"] = True  # never: the cancellation comes here

    async with anyio.create_task_group() as tg:
        tg.start_soon(batcher.run, first)
        await entered(first)
        tg.start_soon(call, "second", second)
        tg.start_soon(call, "third", third)
        await anyio.wait_all_tasks_blocked()
        first.go.set()
        # The second batch (second and third, in the order their tasks started) is running.
        while not (second.entered.is_set() or third.entered.is_set()):
            await anyio.to_thread.run_sync(second.entered.wait, 0.01)
        for scope in scopes.values():
            scope.cancel()
        await anyio.wait_all_tasks_blocked()
        second.go.set()
        third.go.set()
    assert sorted([*got.values(), *released]) == ["second's lock", "third's lock"]
    assert released  # the waiter's, at least (the batch's runner may get its result)
    assert all(scope.cancelled_caught for scope in scopes.values())


@asyncio_only
async def test_an_asyncio_task_cancel_of_the_runner_loses_no_call() -> None:
    """``task.cancel()`` (asyncio's own, which anyio's shields do not stop) on the task
    running a batch: the batch runs to its end in its thread, the other callers get their
    results, and no second batch starts before it has ended."""
    batcher = ThreadBatcher()
    first = Blocker("first's lock")
    running = 0
    most = 0

    def counted(value: str) -> str:
        nonlocal running, most
        running += 1
        most = max(most, running)
        running -= 1
        return value

    async def runner() -> str:
        return await batcher.run(first)

    runner_task = asyncio.ensure_future(runner())
    await entered(first)
    others = [asyncio.ensure_future(batcher.run(counted, f"v{i}")) for i in range(3)]
    await anyio.wait_all_tasks_blocked()
    runner_task.cancel()
    await anyio.wait_all_tasks_blocked()
    later = asyncio.ensure_future(batcher.run(counted, "later"))
    await anyio.wait_all_tasks_blocked()
    assert not later.done()  # no batch runs beside the one the cancelled runner started
    first.go.set()
    assert await asyncio.gather(*others, later) == ["v0", "v1", "v2", "later"]
    with pytest.raises(asyncio.CancelledError):
        await runner_task
    assert most == 1


def test_usable_from_one_event_loop_after_another() -> None:
    batcher = ThreadBatcher()

    async def main(value: int) -> int:
        return await batcher.run(lambda: value + 1)

    assert anyio.run(main, 1) == 2
    assert anyio.run(main, 41, backend="trio") == 42


async def test_disk_cache_misses_in_flight_share_thread_hops(
    tmp_path: Any, thread_calls: list[int]
) -> None:
    """32 concurrent misses: 32 lookups and 32 stores in a handful of thread calls, not 64
    (each ``get_or_load`` used to be two hops of its own)."""
    cache = DiskCache(tmp_path, max_bytes=1 << 20)

    async def miss(i: int) -> None:
        async def load() -> bytes:
            await anyio.lowlevel.checkpoint()
            return b"%d" % i

        assert await cache.get_or_load(i, load) == b"%d" % i

    async with anyio.create_task_group() as tg:
        for i in range(32):
            tg.start_soon(miss, i)
    assert sum(thread_calls) == 64  # every lookup and store went through a batch
    assert len(thread_calls) <= 8
    assert cache.statistics()["misses"] == 32


async def test_batches_run_side_by_side_up_to_the_limit() -> None:
    """``ThreadBatcher(2)``: while a batch blocks (an fsync, say), a second one runs."""
    batcher = ThreadBatcher(2)
    first = Blocker("first")
    got: dict[str, Any] = {}

    async def call(name: str, fn: Any) -> None:
        got[name] = await batcher.run(fn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first", first)
        await entered(first)
        await call("second", lambda: "second")  # while the first batch still blocks
        assert got == {"second": "second"}
        first.go.set()
    assert got == {"first": "first", "second": "second"}


async def test_a_batch_no_thread_could_run_fails_its_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every call a batch took finishes: run, or failed with what kept it from running (a
    thread pool that is shut down), so that none of its callers waits for ever."""
    batcher = ThreadBatcher()

    async def no_thread(calls: list[Any]) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(batched, "_in_thread", no_thread)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="after shutdown"):
        await batcher.run(lambda: "never")
    monkeypatch.undo()
    assert await batcher.run(lambda: "later") == "later"
