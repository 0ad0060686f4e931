"""How samples become batches: a fixed count, or a size budget with optional length
bucketing, and a padding collate for variable-length arrays.

A batcher takes released samples (with their plan positions) one at a time and gives back
the batches that are complete. Positions of dropped or skipped samples ride along with
the next batch, so that progress (``state_dict``) counts them as delivered.

When the costs are known before fetching (``batch_cost`` given as one cost per dataset
index), batches are planned instead: :func:`plan_slots` cuts the whole epoch into budget
batches that every rank computes alike, deals them to the ranks in equal numbers, and
lays each out in ``batch_size`` plan slots (unused slots are holes, never fetched), so
that sharding, DataLoader workers and resume work on them as on fixed-count batches;
:class:`SlotBatcher` closes each batch at its slot boundary.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .collate import _dicts_error, _positions, _raise, add_note, default_collate

__all__ = [
    "HOLE",
    "BudgetBatcher",
    "CountBatcher",
    "PadCollate",
    "SlotBatcher",
    "plan_batches",
    "plan_slots",
    "sample_cost",
]

Batch = tuple[list[Any], list[int]]  # (values, positions)

HOLE = -1  # the dataset index of an unused slot in a planned epoch: nothing to fetch


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


def plan_slots(
    order: Sequence[int],
    costs: np.ndarray,
    *,
    budget: int,
    max_count: int,
    bucket: int | None,
    rng: np.random.Generator,
    world_size: int,
    drop_last: bool,
) -> np.ndarray:
    """An epoch's order of dataset indices cut into budget batches ahead of fetching.

    The batches are cut from ``order`` as :func:`plan_batches` does (within windows of
    ``bucket`` samples sorted by cost, each window's batches in an ``rng`` order; or
    greedily in order), then dealt to ``world_size`` ranks in equal numbers: batch ``i``
    goes to rank ``i % world_size``, and the last round is completed with batches from the
    start (as torch's DistributedSampler pads), or dropped with ``drop_last``. Each batch
    takes ``max_count`` slots, its unused ones :data:`HOLE`, laid out so that
    :class:`~asyncload.sampling.Plan` (batch size ``max_count``) gives rank ``r`` its
    batches ``r, r + world_size, ...`` whole.
    """
    indices = np.asarray(order, dtype=np.int64)
    window = bucket or max(len(indices), 1)
    batches: list[np.ndarray] = []
    for start in range(0, len(indices), window):
        part = indices[start : start + window]
        groups = plan_batches(
            costs[part].tolist(), budget=budget, max_count=max_count, sort=bucket is not None
        )
        if bucket is not None:
            groups = [groups[i] for i in rng.permutation(len(groups)).tolist()]
        batches.extend(part[group] for group in groups)
    per_rank = len(batches) // world_size if drop_last else -(-len(batches) // world_size)
    slots = np.full((per_rank * world_size, max_count), HOLE, dtype=np.int64)
    for i in range(len(slots)):
        batch = batches[i % len(batches)]
        slots[i, : len(batch)] = batch
    # Row i is rank (i % w)'s batch i // w; Plan reads rank r's position p at p * w + r.
    laid_out: np.ndarray = slots.reshape(per_rank, world_size, max_count).transpose(0, 2, 1)
    return laid_out.reshape(-1)


class CountBatcher:
    """Batches of ``size`` samples, in the order they are released."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: list[Any] = []
        self.positions: list[int] = []

    def drop(self) -> None:
        """Let go of the samples held (the epoch was cancelled)."""
        self.values, self.positions = [], []

    def add(self, value: Any, position: int) -> Batch | None:
        self.values.append(value)
        self.positions.append(position)
        if len(self.values) == self.size:
            return self._take()
        return None

    def extend(self, values: list[Any], positions: list[int]) -> list[Batch]:
        """:meth:`add` for several samples at once (a chunk with nothing dropped)."""
        done = []
        i, n = 0, len(values)
        while i < n:
            room = self.size - len(self.values)
            self.values += values[i : i + room]
            self.positions += positions[i : i + room]
            i += room
            if len(self.values) == self.size:
                done.append(self._take())
        return done

    def skip(self, position: int) -> Batch | None:
        self.positions.append(position)
        return None

    def flush(self) -> list[Batch]:
        return [self._take()] if self.values else []

    @property
    def pending(self) -> bool:
        return bool(self.values)

    def _take(self) -> Batch:
        batch = (self.values, self.positions)
        self.values, self.positions = [], []
        return batch


class SlotBatcher:
    """Planned batches (see :func:`plan_slots`): plan positions ``[k * size, (k + 1) *
    size)`` are batch ``k``, holes included. A batch is complete once each of its slots was
    released, in any order, so ordered and unordered output yield the same batches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.open: dict[int, tuple[list[Any], list[int]]] = {}
        self.loose: list[int] = []  # positions of batches that ended empty: sent with the next

    def drop(self) -> None:
        """Let go of the samples held (the epoch was cancelled)."""
        self.open, self.loose = {}, []

    @property
    def pending(self) -> bool:
        return bool(self.open)

    def add(self, value: Any, position: int) -> Batch | None:
        self.open.setdefault(position // self.size, ([], []))[0].append(value)
        return self.skip(position)

    def skip(self, position: int) -> Batch | None:
        k = position // self.size
        positions = self.open.setdefault(k, ([], []))[1]
        positions.append(position)
        return self._close(k) if len(positions) == self.size else None

    def flush(self) -> list[Batch]:
        # Only after a resume that left a batch in part (positions delivered before it).
        return [b for k in sorted(self.open) if (b := self._close(k)) is not None]

    def _close(self, k: int) -> Batch | None:
        values, positions = self.open.pop(k)
        if not values:
            self.loose.extend(positions)
            return None
        if self.loose:
            positions, self.loose = positions + self.loose, []
        return values, positions


class BudgetBatcher:
    """Batches whose samples cost at most ``budget`` together (and number at most
    ``max_count``). With ``bucket``, samples are gathered ``bucket`` positions at a time
    (dropped ones included: in order, bucket ``k`` is positions ``k * bucket`` up to the
    next), grouped by similar cost, and each bucket's batches are yielded in a random
    order seeded by ``(*seed, k)``: the same batches whenever the bucket is cut again, as
    a resume does (:meth:`resume`). Without ``bucket``, batches close greedily in release
    order."""

    def __init__(
        self,
        *,
        budget: int,
        max_count: int,
        cost: Callable[[Any], int],
        bucket: int | None = None,
        seed: Sequence[int] = (0,),
    ) -> None:
        self.budget, self.max_count, self.cost = budget, max_count, cost
        self.bucket = bucket
        self.seed = [int(s) for s in seed]
        self.values: list[Any] = []
        self.costs: list[int] = []
        self.positions: list[int] = []
        self.loose: list[int] = []  # positions of dropped samples, sent with the next batch
        self.total = 0
        self.number = 0  # the bucket being filled
        self.filled = 0  # positions released into it, dropped ones included
        self.delivered: set[int] = set()  # positions not to send again (see resume())
        self.discarded = 0  # samples of batches left out for that, not yet accounted for

    def drop(self) -> None:
        """Let go of the samples held (the epoch was cancelled)."""
        self.values, self.costs, self.positions, self.loose, self.total = [], [], [], [], 0

    def resume(self, start: int, delivered: set[int]) -> None:
        """The first bucket starts at position ``start`` (a multiple of ``bucket``), and
        every bucket from there is re-fetched whole; their samples at ``delivered``
        positions were sent before the save and are not sent again. Saved by the same
        batching, whole batches were: those are left out, and the others are the
        uninterrupted epoch's (under DataLoader workers, several buckets may be in
        progress at once). A state saved otherwise (unordered) cut other batches: what was
        delivered leaves the batches that hold it, nothing is sent twice."""
        assert self.bucket is not None
        self.number = start // self.bucket
        self.delivered = delivered

    @property
    def pending(self) -> bool:
        return bool(self.values)

    def add(self, value: Any, position: int) -> Batch | list[Batch] | None:
        cost = self.cost(value)
        if type(cost) is not int or cost < 0:
            cost = _whole_cost(cost)
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
        self.filled += 1
        if self.filled >= self.bucket:
            return self._bucket()
        return None

    def skip(self, position: int) -> list[Batch] | None:
        self.loose.append(position)
        if self.bucket is not None:
            self.filled += 1
            if self.filled >= self.bucket:
                return self._bucket()
        return None

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
        rng = np.random.default_rng([*self.seed, self.number])
        batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
        if batches and self.loose:
            # (A bucket of dropped samples only keeps them for the next one's first batch.)
            batches[0][1].extend(self.loose)
            self.loose = []
        if self.delivered:  # a bucket a resume re-fetched: what it sent before, not again
            assert self.bucket is not None
            batches = self._without(batches, self.delivered)
            # (Those of later buckets stay for them.)
            first = self.number * self.bucket
            self.delivered.difference_update(range(first, first + self.bucket))
        self.values, self.costs, self.positions = [], [], []
        self.number, self.filled = self.number + 1, 0
        return batches

    def _without(self, batches: list[Batch], delivered: set[int]) -> list[Batch]:
        """``batches`` without the samples (and dropped positions) at ``delivered``
        positions; batches left with no sample go, their other dropped positions with the
        next batch kept."""
        kept: list[Batch] = []
        carried: list[int] = []
        for values, positions in batches:
            pairs = [(v, p) for v, p in zip(values, positions, strict=False) if p not in delivered]
            loose = [p for p in positions[len(values) :] if p not in delivered]
            self.discarded += len(values) - len(pairs)
            if not pairs:
                carried += loose
                continue
            kept.append(([v for v, _ in pairs], [p for _, p in pairs] + loose + carried))
            carried = []
        self.loose.extend(carried)
        return kept


def _whole_cost(cost: Any) -> int:
    """A ``batch_cost`` result as a whole cost: a fraction rounded up (0.9 is not free)."""
    try:
        value = float(cost)
    except (TypeError, ValueError):
        value = math.nan
    if not (0 <= value < math.inf):  # (NaN too)
        raise ValueError(f"batch_cost returned {cost!r}: a cost is a finite number >= 0")
    return math.ceil(value)


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
            _raise(_dicts_error(samples, first))  # (keys that differ, not a bare KeyError)
            out: dict[str, Any] = {}
            for key in first:
                column = [s[key] for s in samples]
                if _ragged(column):
                    try:
                        out[key], extra = self._pad(column)
                    except ValueError as exc:
                        add_note(exc, f"PadCollate: in key {key!r}")
                        raise
                    out[f"{key}_{'mask' if self.mask else 'lengths'}"] = extra
                else:
                    out[key] = default_collate(column)
            return out
        return self._pad(samples)

    def _pad(self, arrays: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        arrays = [np.asarray(a) for a in arrays]
        first = arrays[0]
        _raise(_padding_error(arrays))
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        longest = int(lengths.max()) if len(lengths) else 0
        # The dtype all of them fit in (an int row then a float row: floats), as np.stack
        # would give; the first one's would truncate the others. And pad_value's, where
        # the rows' cannot hold it: NaN or 0.5 padding int rows makes them floats, a
        # longer string widens strings, where a cast would pad with another value.
        dtype = functools.reduce(np.promote_types, {a.dtype for a in arrays})
        if not _holds(dtype, self.pad_value):
            dtype = np.promote_types(dtype, np.asarray(self.pad_value).dtype)
        padded = np.full((len(arrays), longest, *first.shape[1:]), self.pad_value, dtype)
        for row, array in enumerate(arrays):
            padded[row, : len(array)] = array
        if self.mask:
            return padded, np.arange(longest)[None, :] < lengths[:, None]
        return padded, lengths


def _holds(dtype: np.dtype[Any], value: Any) -> bool:
    """Whether ``dtype`` stores ``value`` as it is: exactly for integers, bools and
    strings (0 stays a uint8 or bool pad, -1 does not); any real number for floats."""
    kind = np.asarray(value).dtype.kind
    if dtype.kind in "fc":
        return kind in "biuf" or (kind == "c" and dtype.kind == "c")
    if dtype.kind not in "biuUS" or kind not in "biufUS":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a cast that loses the value: seen below)
            stored = np.array(value, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        return False
    return bool(stored == value)


def _padding_error(arrays: list[np.ndarray]) -> ValueError | None:
    """``ValueError`` naming the positions when ``arrays`` cannot be padded along their
    first axis: a 0-d one, or shapes that differ past the first axis."""
    scalars = [i for i, a in enumerate(arrays) if a.ndim == 0]
    if scalars:
        return ValueError(
            f"PadCollate pads along the first axis: 0-d samples at batch {_positions(scalars)}"
        )
    at: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        at.setdefault(array.shape[1:], []).append(i)
    if len(at) > 1:
        shapes = "; ".join(
            f"(n, {', '.join(map(str, s))}) at batch {_positions(i)}" for s, i in at.items()
        )
        return ValueError(
            f"PadCollate pads the first axis only; the samples differ past it ({shapes})"
        )
    return None


def _ragged(column: list[Any]) -> bool:
    shapes = {getattr(v, "shape", None) for v in column}
    return None not in shapes and len(shapes) > 1
