"""The benchmarks' throughput measure (benchmarks/common.py): the rate of batch arrivals,
with waves of batches (DataLoader workers) counted as the time they took."""

from __future__ import annotations

import math

import pytest

from benchmarks.common import Tally


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Counts:
    """A checker that takes every batch as ``size`` samples."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, batch: object) -> int:
        return self.size

    def finish(self) -> None:
        pass


def tally_of(arrivals: list[float], batch: int = 32) -> Tally:
    clock = Clock()
    tally = Tally(batch * len(arrivals), Counts(batch), clock=clock)
    tally.start()
    for t in arrivals:
        clock.now = t
        tally.batch(None)
    tally.finish()
    return tally


def test_steady_batches_measure_their_rate() -> None:
    tally = tally_of([0.5 + 0.01 * i for i in range(100)])  # 32 samples every 10 ms
    assert tally.samples_per_s == pytest.approx(3200)
    assert tally.first_to_last_per_s == pytest.approx(3200)
    assert tally.first_batch_s == pytest.approx(0.5)


def test_waves_count_as_the_time_they_took() -> None:
    """16 workers, each a batch of 32 every 0.64 s, all in step: 800 samples/s. Timing from
    the first batch to the last credits the first wave's other 15 batches as free."""
    waves = 10
    arrivals = [1.0 + 0.64 * w + 0.0001 * k for w in range(waves) for k in range(16)]
    tally = tally_of(arrivals)
    assert tally.samples_per_s == pytest.approx(800, rel=0.01)
    assert tally.first_to_last_per_s > 800 * 1.1  # what the fit is for


def test_one_batch_has_no_rate() -> None:
    assert math.isnan(tally_of([0.2]).samples_per_s)
