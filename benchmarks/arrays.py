"""In-memory samples for the benchmarks that need no server: 1 KiB numpy arrays whose
content names their index, made up front (a list) or on access (a lazy sequence, a
stream), the checker of their batches, and a fixed amount of pure-Python CPU work.

Sample ``i`` is ``numpy.full(256, i, float32)``: 1 KiB, exact for ``i < 2**24``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np

ELEMENTS = 256  # float32: 1 KiB per sample
SAMPLE_BYTES = ELEMENTS * 4


def make_sample(i: int) -> np.ndarray[Any, Any]:
    """Sample ``i``: 256 float32 values, all ``i``."""
    return np.full(ELEMENTS, i, np.float32)


def make_list(n: int) -> list[np.ndarray[Any, Any]]:
    """Samples ``0 .. n-1``, made now and held in a list."""
    return [make_sample(i) for i in range(n)]


class LazyArrays:
    """A sequence of ``n`` samples made on access: holds nothing per sample, so that the
    memory a loader holds is all that grows with ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray[Any, Any]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        return make_sample(i)


def lazy_stream(n: int, *, sized: bool) -> Any:
    """An ``al.AsyncIterableDataset`` that yields samples ``0 .. n-1`` made on the fly
    (``num_samples()`` is ``n`` when ``sized``, else unknown)."""
    import asyncload as al

    class LazyStream(al.AsyncIterableDataset[Any]):
        async def _samples(self) -> AsyncIterator[Any]:
            for i in range(n):
                yield make_sample(i)

        def __aiter__(self) -> AsyncIterator[Any]:
            return self._samples()

        def num_samples(self) -> int | None:
            return n if sized else None

    return LazyStream()


def burn(sample: np.ndarray[Any, Any], rounds: int) -> np.ndarray[Any, Any]:
    """``rounds`` steps of a pure-Python LCG seeded by the sample (it holds the GIL
    throughout, like most per-sample Python code); returns the sample unchanged."""
    x = int(sample[0])
    for _ in range(rounds):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    if x < 0:  # never: keeps the loop's result alive
        raise AssertionError
    return sample


class Burn:
    """``burn`` with its rounds bound, picklable (DataLoader workers)."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds

    def __call__(self, sample: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return burn(sample, self.rounds)


class ArrayChecker:
    """Checks batches of these samples (numpy arrays or torch tensors, ``k x 256``): each
    row is all one index; in order (epoch after epoch over ``n`` samples) when ``ordered``,
    else each index once per epoch. One vectorised check per batch."""

    def __init__(self, n: int, epochs: int = 1, *, ordered: bool = True) -> None:
        self.n = n
        self.epochs = epochs
        self.ordered = ordered
        self.count = 0
        self.seen: np.ndarray[Any, Any] | None = None
        if not ordered:
            # Touched now, so that the pages count before a run starts, not during it.
            self.seen = np.empty(n, np.uint8)
            self.seen.fill(0)

    def __call__(self, batch: Any) -> int:
        arr = np.asarray(batch)
        if arr.ndim != 2 or arr.shape[1] != ELEMENTS or arr.dtype != np.float32:
            raise ValueError(f"batch has shape {arr.shape} and dtype {arr.dtype}")
        first = arr[:, 0]
        if not (np.array_equal(first, arr[:, -1]) and np.array_equal(first, arr[:, 1])):
            raise ValueError("a sample's values differ")
        k = len(arr)
        if self.ordered:
            start = self.count % self.n
            want = np.arange(start, start + k, dtype=np.float32) % self.n
            if not np.array_equal(first, want):
                raise ValueError(f"samples {first[:4]}... at position {self.count}, out of order")
        else:
            assert self.seen is not None
            np.add.at(self.seen, first.astype(np.int64), 1)
        self.count += k
        return k

    def finish(self) -> None:
        if self.count != self.n * self.epochs:
            raise ValueError(f"got {self.count} samples, expected {self.n * self.epochs}")
        if self.seen is not None and not np.all(self.seen == self.epochs):
            raise ValueError("some samples missing or repeated")
