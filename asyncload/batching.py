"""How samples become batches: a fixed count, or a size budget with optional length
bucketing, and a padding collate for variable-length arrays.

A batcher takes released samples (with their plan positions) one at a time and gives back
the batches that are complete. Positions of dropped or skipped samples ride along with
the next batch, so that progress (``state_dict``) counts them as delivered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .collate import default_collate

__all__ = ["BudgetBatcher", "CountBatcher", "PadCollate", "plan_batches", "sample_cost"]

Batch = tuple[list[Any], list[int]]  # (values, positions)


def sample_cost(sample: Any) -> int:
    """The default cost of a sample: its bytes (arrays and tensors by their buffers, dicts,
    tuples and lists summed, strings by their UTF-8 length, numbers 8)."""
    nbytes = getattr(sample, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(sample, (bytes, bytearray, memoryview)):
        return len(sample)
    if isinstance(sample, str):
        return len(sample.encode())
    if isinstance(sample, Mapping):
        return sum(sample_cost(v) for v in sample.values())
    if isinstance(sample, (tuple, list)):
        return sum(sample_cost(v) for v in sample)
    element_size = getattr(sample, "element_size", None)  # a torch tensor
    if callable(element_size):
        return int(element_size() * sample.nelement())
    return 8


def plan_batches(
    costs: Sequence[int], *, budget: int, max_count: int, sort: bool
) -> list[list[int]]:
    """Offsets into ``costs`` grouped into batches of total cost <= ``budget`` and at most
    ``max_count`` samples, greedily in order (by increasing cost when ``sort``: similar
    sizes together, which is what cuts padding). A sample costlier than the budget alone
    is a batch by itself."""
    order = sorted(range(len(costs)), key=costs.__getitem__) if sort else range(len(costs))
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        cost = costs[i]
        if current and (total + cost > budget or len(current) >= max_count):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += cost
    if current:
        batches.append(current)
    return batches


class CountBatcher:
    """Batches of ``size`` samples, in the order they are released."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[Any] = []
        self.positions: list[int] = []

    def add(self, value: Any, position: int) -> Batch | None:
        self.values.append(value)
        self.positions.append(position)
        if len(self.values) == self.size:
            return self._take()
        return None

    def skip(self, position: int) -> None:
        self.positions.append(position)

    def flush(self) -> list[Batch]:
        return [self._take()] if self.values else []

    @property
    def pending(self) -> bool:
        return bool(self.values)

    def _take(self) -> Batch:
        batch = (self.values, self.positions)
        self.values, self.positions = [], []
        return batch


class BudgetBatcher:
    """Batches whose samples cost at most ``budget`` together (and number at most
    ``max_count``). With ``bucket``, samples are gathered ``bucket`` at a time, grouped by
    similar cost, and the window's batches are yielded in a seeded random order;
    without, batches close greedily in release order."""

    def __init__(
        self,
        *,
        budget: int,
        max_count: int,
        cost: Callable[[Any], int],
        bucket: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.budget, self.max_count, self.cost = budget, max_count, cost
        self.bucket = bucket
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.values: list[Any] = []
        self.costs: list[int] = []
        self.positions: list[int] = []
        self.loose: list[int] = []  # positions of dropped samples, sent with the next batch
        self.total = 0

    @property
    def pending(self) -> bool:
        return bool(self.values)

    def add(self, value: Any, position: int) -> Batch | list[Batch] | None:
        cost = int(self.cost(value))
        if self.bucket is None:
            ready = None
            if self.values and (
                self.total + cost > self.budget or len(self.values) >= self.max_count
            ):
                ready = self._take_all()
            self.values.append(value)
            self.positions.append(position)
            self.total += cost
            return ready
        self.values.append(value)
        self.costs.append(cost)
        self.positions.append(position)
        if len(self.values) >= self.bucket:
            return self._bucket()
        return None

    def skip(self, position: int) -> None:
        self.loose.append(position)

    def flush(self) -> list[Batch]:
        if self.bucket is not None:
            return self._bucket()
        return [self._take_all()] if self.values else []

    def _take_all(self) -> Batch:
        batch = (self.values, self.positions + self.loose)
        self.values, self.positions, self.loose, self.total = [], [], [], 0
        return batch

    def _bucket(self) -> list[Batch]:
        groups = plan_batches(self.costs, budget=self.budget, max_count=self.max_count, sort=True)
        batches = [
            ([self.values[i] for i in group], [self.positions[i] for i in group])
            for group in groups
        ]
        batches = [batches[i] for i in self.rng.permutation(len(batches)).tolist()]
        if batches and self.loose:
            batches[0][1].extend(self.loose)
        self.values, self.costs, self.positions, self.loose = [], [], [], []
        return batches


class PadCollate:
    """A ``collate_fn`` for variable-length arrays: pads along the first axis to the
    longest in the batch with ``pad_value``, and returns the lengths (or a boolean mask
    of real entries, with ``mask=True``).

    A batch of arrays gives ``(padded, lengths)``; a batch of dicts gives a dict where each
    array field whose lengths differ is padded and gets a ``"<field>_lengths"`` (or
    ``"<field>_mask"``) entry, and other fields are collated as by `default_collate`.
    """

    def __init__(self, pad_value: Any = 0, *, mask: bool = False) -> None:
        self.pad_value = pad_value
        self.mask = mask

    def __call__(self, samples: list[Any]) -> Any:
        first = samples[0]
        if isinstance(first, Mapping):
            out: dict[str, Any] = {}
            for key in first:
                column = [s[key] for s in samples]
                if _ragged(column):
                    out[key], extra = self._pad(column)
                    out[f"{key}_{'mask' if self.mask else 'lengths'}"] = extra
                else:
                    out[key] = default_collate(column)
            return out
        return self._pad(samples)

    def _pad(self, arrays: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        arrays = [np.asarray(a) for a in arrays]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        longest = int(lengths.max()) if len(lengths) else 0
        first = arrays[0]
        padded = np.full((len(arrays), longest, *first.shape[1:]), self.pad_value, first.dtype)
        for row, array in enumerate(arrays):
            padded[row, : len(array)] = array
        if self.mask:
            return padded, np.arange(longest)[None, :] < lengths[:, None]
        return padded, lengths


def _ragged(column: list[Any]) -> bool:
    shapes = {getattr(v, "shape", None) for v in column}
    return None not in shapes and len(shapes) > 1
