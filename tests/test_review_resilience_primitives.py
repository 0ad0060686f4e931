"""Review (helper-80) of the resilience primitives (Retry, CircuitBreaker, Throttle,
is_transient), alone and through a Loader. Each test here failed before its fix.

Deterministic: fake clocks and a no-op sleep; anyio.fail_after only guards against hangs.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import asyncload as al
from asyncload.resilience import CircuitBreaker, is_throttling, is_transient
from asyncload.sources import TarShardSource


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def no_sleep(seconds: float) -> None:
    await anyio.lowlevel.checkpoint()


async def _fail() -> None:
    raise ConnectionResetError("reset")


class _Store(al.AsyncDataset[int]):
    """A non-in-memory dataset (so the loader uses its throttle gate) whose fetch of the
    indices in ``errors`` raises the given error once."""

    def __init__(self, n: int, errors: dict[int, BaseException]) -> None:
        self.n = n
        self.errors = dict(errors)

    def __len__(self) -> int:
        return self.n

    async def __getitem__(self, index: int) -> int:
        await anyio.lowlevel.checkpoint()
        error = self.errors.pop(index, None)
        if error is not None:
            raise error
        return index


async def _drain(loader: al.Loader) -> list[Any]:
    with anyio.fail_after(30):  # a guard against hangs, not a timing assertion
        return [x async for x in loader]


# -- CircuitBreaker ---------------------------------------------------------------------------


def test_a_pickled_breaker_with_a_probe_in_flight_refuses_every_call_forever() -> None:
    """Pickle (or deepcopy, or hand to a spawned DataLoader worker) a breaker while a
    half-open probe is in flight. The copy carries ``probes_in_flight=1`` for a probe that
    lives in the original and never settles in the copy, so the copy stays half-open with
    its only probe slot taken and refuses every call with CircuitOpenError, forever (no
    amount of clock time helps). Expected: a copy starts with no probes in flight, as the
    lock is already re-created in __setstate__."""
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, recovery_timeout=1.0, clock=clock)

    async def main() -> None:
        with pytest.raises(ConnectionResetError):
            await breaker.call(_fail)
        clock.now += 5.0
        release = anyio.Event()

        async def probe() -> int:
            await release.wait()
            return 1

        async def ok() -> int:
            return 2

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(breaker.call, probe)
                while breaker.statistics()["probes_in_flight"] == 0:
                    await anyio.lowlevel.checkpoint()
                copy = pickle.loads(pickle.dumps(breaker))
                release.set()
        clock.now += 100.0
        assert copy.statistics()["probes_in_flight"] == 0
        assert await copy.call(ok) == 2  # actual: CircuitOpenError "1 of 1 probe calls"

    anyio.run(main)


def test_reading_loader_statistics_raises_the_breaker_hooks_error() -> None:
    """Reading ``breaker.state`` / ``breaker.statistics()`` after the recovery timeout makes
    the open -> half_open transition and runs ``on_state_change`` in the reader. A hook
    that raises (a metrics exporter that is down) then makes ``loader.statistics()``, a
    pure read, raise RuntimeError. Expected: observing the breaker never raises; the hook's
    error belongs to a call that made the transition, as the docstring says."""
    clock = FakeClock()

    def hook(old: str, new: str) -> None:
        if new == "half_open":
            raise RuntimeError("the metrics exporter is down")

    breaker = CircuitBreaker(
        failure_threshold=1, recovery_timeout=1.0, clock=clock, on_state_change=hook
    )
    loader = al.Loader(al.from_sequence([1, 2]), breaker=breaker)

    async def trip() -> None:
        with pytest.raises(ConnectionResetError):
            await breaker.call(_fail)

    anyio.run(trip)
    clock.now += 5.0
    stats = loader.statistics()  # actual: RuntimeError from the hook
    assert stats["breaker_state"] == "half_open"


# -- classification ---------------------------------------------------------------------------


def test_a_404_whose_url_says_slowdown_lowers_the_loaders_concurrency() -> None:
    """A 404 for a key with ``SlowDown`` as a path segment is a throttling answer to
    ``is_throttling``: it reads the status *and then the message*, which holds the URL. So
    a missing object halves the loader's concurrency. ``is_transient`` rightly goes by the
    HTTPStatusError's status and code only (and FileNotFoundError was already excluded for
    this very reason). Expected: a 404 is never "slow down": throttled == 0."""
    url = "https://data.example.com/cars/SlowDown/0001.jpg"
    assert not is_throttling(al.HTTPStatusError(404, url))
    loader = al.Loader(
        _Store(8, {0: al.HTTPStatusError(404, url)}),
        batch_size=None,
        concurrency=8,
        on_error="skip",
    )
    assert anyio.run(_drain, loader) == list(range(1, 8))
    stats = loader.statistics()
    assert (stats["throttled"], stats["throttle_decreases"], stats["concurrency_limit"]) == (
        0,
        0,
        8,
    )


def test_a_decode_error_naming_a_throttling_file_is_transient() -> None:
    """What PIL raises for a corrupt image (an OSError without errno) names the file.
    When the file is ``.../Throttling.png`` the message regex, which only refuses a code
    glued to other letters, calls it transient (retried, trips the breaker) and
    throttling (halves the concurrency). Expected: permanent; a local decode error is
    neither, whatever the file is called."""
    err = OSError("cannot identify image file '/data/valves/Throttling.png'")
    assert not is_transient(err)
    assert not is_throttling(err)


# -- Throttle ---------------------------------------------------------------------------------


def test_a_throttle_shared_by_two_loaders_goes_above_the_first_loaders_concurrency() -> None:
    """One al.Throttle given to two loaders (train and val on one store) was silently
    re-bound by the second Loader to its concurrency: ceiling and limit became 64. Loader
    A (concurrency=16) then got a 503, "halved" to 32, recovered towards 64, and reported
    ``concurrency_limit`` above its own concurrency. Now a Throttle serves loaders of one
    concurrency: another is refused, naming both."""
    throttle = al.Throttle()
    first = al.Loader(
        _Store(20, {0: al.HTTPStatusError(503, "http://h/0")}),
        batch_size=None,
        concurrency=16,
        throttle=throttle,
        retry=al.Retry(sleep=no_sleep),
    )
    with pytest.raises(ValueError, match="concurrency=16, not 64"):
        al.Loader(_Store(4, {}), concurrency=64, throttle=throttle)
    assert anyio.run(_drain, first) == list(range(20))
    stats = first.statistics()
    assert stats["throttle_decreases"] == 1
    assert stats["concurrency_limit"] <= 16  # actual: 32


def test_throttle_min_concurrency_refuses_a_numpy_integer() -> None:
    """Throttle(min_concurrency=np.int64(2)) raises TypeError, while Loader(concurrency=),
    Retry(attempts=) and CircuitBreaker(failure_threshold=) take numpy integers.
    Expected: accepted as 2."""
    assert al.Throttle(min_concurrency=np.int64(2)).min_concurrency == 2


def test_throttle_increase_accepts_a_bool() -> None:
    """Throttle(increase=True) is accepted as 1.0 (and decrease/increase of a wrong type
    raise ValueError, not TypeError). Retry and CircuitBreaker refuse bools. Expected:
    TypeError naming ``increase``."""
    with pytest.raises(TypeError, match="increase"):
        al.Throttle(increase=True)


# -- argument validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: al.Retry(initial_delay=np.float32(0.25)),
        lambda: al.Retry(max_delay=np.float32(2.0)),
        lambda: al.Retry(deadline=np.float32(10.0)),
        lambda: CircuitBreaker(recovery_timeout=np.float32(1.0)),
    ],
    ids=["initial_delay", "max_delay", "deadline", "recovery_timeout"],
)
def test_seconds_refuse_a_numpy_float32(make: Any) -> None:
    """Retry's delays/deadline and CircuitBreaker's recovery_timeout raise TypeError
    ("must be a number, not float32") for np.float32 (and Fraction), which are real
    numbers; the Loader's ``timeout`` takes any numbers.Real, and numpy integers are
    accepted for the int settings. Expected: accepted."""
    make()


def test_retry_sleep_that_is_not_callable_fails_only_at_the_first_retry() -> None:
    """Retry(sleep=0.5) (a number where a function belongs) is accepted; the mistake
    surfaces only after a transient failure, as "'float' object is not callable", which
    names nothing. Same for ``clock``, ``rng`` and CircuitBreaker(clock=). Expected:
    TypeError at construction naming ``sleep``, as the docstring promises for bad
    settings."""
    with pytest.raises(TypeError, match="sleep"):
        al.Retry(sleep=0.5)  # type: ignore[arg-type]


def test_breaker_clock_that_is_not_callable_is_accepted() -> None:
    """CircuitBreaker(clock=0.0) is accepted; the first call fails with "'float' object
    is not callable". Expected: TypeError at construction naming ``clock``."""
    with pytest.raises(TypeError, match="clock"):
        CircuitBreaker(clock=0.0)  # type: ignore[arg-type]


# -- Retry through a streaming Loader ---------------------------------------------------------


def _shard(path: Path, n: int) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            data = f"sample {i}".encode() * 50
            info = tarfile.TarInfo(f"{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_long_shard_cut_once_after_the_deadline_is_not_retried(tmp_path: Path) -> None:
    """Retry(deadline=60) on a tar shard: the deadline is measured from the first open of
    the shard, not from the failure episode, so a shard that has been streaming for more
    than 60 s (here 4 chunks of 30 s each on the fake clock) is not re-opened after a
    single connection reset: the rest of the shard becomes one SampleError (or is skipped
    with on_error="skip"). The docs say deadline is "set it to bound the time one sample may
    take", and a reset is "transient, retried". With deadline=None the same test passes.
    Expected: all 8 samples, the shard re-opened once."""
    path = tmp_path / "long.tar"
    _shard(path, 8)
    clock = FakeClock()
    opens = {"n": 0}

    class Cut(TarShardSource):
        def _open(self, shard: str) -> AsyncIterator[bytes]:
            inner = super()._open(shard)
            opens["n"] += 1
            first = opens["n"] == 1

            async def chunks() -> AsyncIterator[bytes]:
                read = 0
                async for chunk in inner:
                    clock.now += 30.0  # each chunk of a long shard takes 30 s to arrive
                    read += 1
                    if first and read == 4:
                        raise ConnectionResetError("connection reset by peer")
                    yield chunk

            return chunks()

    loader = al.Loader(
        Cut([str(path)], chunk_size=1024),
        batch_size=None,
        retry=al.Retry(attempts=5, deadline=60.0, sleep=no_sleep, clock=clock),
    )
    got = anyio.run(_drain, loader)  # actual: SampleError (ConnectionResetError)
    assert [s["__key__"] for s in got] == [f"{i:04d}" for i in range(8)]
    assert opens["n"] == 2
