"""Which indices an epoch visits, in which order, on which rank and worker: plain arithmetic,
no I/O, identical on every rank and in every process.

An epoch's *plan* is this rank's (and, under ``to_torch()``, this worker's) list of dataset
indices, addressed by *position*. Progress through a plan is a set of finished positions,
which is what ``Loader.state_dict()`` saves.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Plan",
    "Progress",
    "WorkerProgress",
    "delivered_positions",
    "epoch_order",
    "rank_position",
    "rank_share",
    "remaining_positions",
    "to_intervals",
    "worker_progress",
]


def epoch_order(
    n: int, *, shuffle: bool, seed: int, epoch: int, sampler: Iterable[int] | None = None
) -> Sequence[int]:
    """The dataset indices of one epoch, before sharding.

    A seeded shuffle is a pure function of ``(seed, epoch)``: every rank computes the same
    permutation. A user ``sampler`` is asked for its indices (after ``set_epoch(epoch)``
    where it has one) with the global random generators (``random``, numpy's, torch's CPU
    one) seeded from ``(seed, epoch)`` and restored afterwards: a sampler that draws from
    them (torch's ``RandomSampler``) gives the same order in every rank, DataLoader worker
    and restarted process. One with a generator of its own must keep it in step itself.
    """
    if sampler is not None:
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        with _global_rngs_seeded(seed, epoch):
            order = [_sampler_index(i) for i in sampler]
        for i in order:
            if not 0 <= i < n:
                raise IndexError(f"sampler gave index {i}, out of range for {n} samples")
        return order
    if shuffle:
        permutation: Sequence[int] = np.random.default_rng([seed, epoch]).permutation(n)  # type: ignore[assignment]
        return permutation
    return range(n)


def _sampler_index(i: object) -> int:
    # Not int(): it truncates 1.5 to 1 (another sample, silently) and takes True as 1.
    if not isinstance(i, bool):
        with contextlib.suppress(TypeError):
            return operator.index(i)  # type: ignore[arg-type]
    hint = " (a batch sampler is not a sampler)" if isinstance(i, (list, tuple)) else ""
    raise TypeError(f"sampler gave {i!r}, not an integer index{hint}")


@contextlib.contextmanager
def _global_rngs_seeded(seed: int, epoch: int) -> Iterator[None]:
    """``random``'s, numpy's and (if imported) torch's CPU generator seeded from
    ``(seed, epoch)`` inside, restored on the way out."""
    value = int(np.random.SeedSequence([seed, epoch, 0x5A4D]).generate_state(1)[0])
    torch = sys.modules.get("torch")
    saved = random.getstate(), np.random.get_state()
    torch_saved = torch.default_generator.get_state() if torch is not None else None
    random.seed(value)
    np.random.seed(value)
    if torch is not None:
        torch.default_generator.manual_seed(value)  # (not torch.manual_seed: CUDA's too)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        if torch is not None:
            torch.default_generator.set_state(torch_saved)


def rank_share(n: int, world_size: int, drop_last: bool) -> int:
    """Samples each rank gets out of ``n``: equal on every rank, padded by wrapping around
    (as torch's DistributedSampler) or trimmed with ``drop_last``."""
    return n // world_size if drop_last else math.ceil(n / world_size)


def order_position(p: int, rank: int, world_size: int, n: int, runs: int = 1) -> int:
    """The epoch-order position (before wrapping around ``n``) of rank ``rank``'s plan
    position ``p``. Ranks take turns by runs of ``runs`` positions: rank ``r`` of ``w``
    takes runs ``r, r + w, ...`` of the order while whole rounds of ``w`` runs fit, then
    positions ``r, r + w, ...`` of the rest (``runs=1``: positions throughout, as torch's
    DistributedSampler). Runs keep together what a sampler put together: each batch of
    an `asyncload.StratifiedSampler`."""
    w = world_size
    if runs == 1 or w == 1:
        return p * w + rank
    rounds = n // (w * runs)
    if p < rounds * runs:
        run, offset = divmod(p, runs)
        return (run * w + rank) * runs + offset
    return rounds * w * runs + (p - rounds * runs) * w + rank


def rank_position(p: int, batch_size: int, worker: int, num_workers: int) -> int:
    """The rank-plan position of worker ``worker``'s plan position ``p``."""
    if num_workers == 1:
        return p
    chunk, offset = divmod(p, batch_size)
    return (chunk * num_workers + worker) * batch_size + offset


def worker_progress(rank: Progress, batch_size: int, worker: int, num_workers: int) -> Progress:
    """The part of a rank-level ``Progress`` that falls in ``worker``'s plan, in that
    worker's positions: what lets a DataLoader worker resume, whatever the number of
    workers that saved it."""
    if num_workers == 1:
        return Progress(rank.watermark, rank.done)
    bs, k = batch_size, num_workers
    full, rest = divmod(rank.watermark, bs)
    # Rank batches c < full with c % k == worker are done whole; batch `full` in part.
    watermark = len(range(worker, full, k)) * bs + (rest if full % k == worker else 0)
    done = []
    for q in rank.done:
        chunk, offset = divmod(q, bs)
        if chunk % k == worker:
            done.append((chunk // k) * bs + offset)
    return Progress(watermark, done)


class Plan(Sequence[int]):
    """This rank's, and this worker's, share of an epoch order.

    Rank ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...`` of the (padded) order,
    or with ``runs`` > 1, runs of that many positions in turn (see `order_position`).
    Under DataLoader workers the rank's share is split by whole batches: worker ``k`` of
    ``K`` takes batches ``k, k + K, ...``, so together the workers yield exactly the rank's
    batches. ``drop_last`` trims rank shares instead of padding them; with ``drop_tail``
    (default: ``drop_last``) the rank's last partial batch is not part of the plan either
    (fixed-count batches; buckets and budgets cut their own batches and keep every sample).
    """

    def __init__(
        self,
        order: Sequence[int],
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        batch_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        drop_tail: bool | None = None,
        runs: int = 1,
    ) -> None:
        self.order = order
        self.rank, self.world_size = rank, world_size
        self.runs = runs if world_size > 1 else 1
        self.batch_size, self.worker, self.num_workers = batch_size, worker, num_workers
        self.rank_length = rank_share(len(order), world_size, drop_last) if len(order) else 0
        bs, k = batch_size, num_workers
        full, tail = divmod(self.rank_length, bs)
        if drop_last if drop_tail is None else drop_tail:
            # As torch's BatchSampler: the sampler's tail is never fetched, whatever order
            # samples would finish in.
            tail = 0
        # Batches c with c % k == worker; the rank's last batch may be partial.
        mine = len(range(worker, full, k)) * bs
        if tail and full % k == worker:
            mine += tail
        self._length = mine

    def __len__(self) -> int:
        return self._length

    def _rank_position(self, p: int) -> int:
        return rank_position(p, self.batch_size, self.worker, self.num_workers)

    def __getitem__(self, p: Any) -> Any:
        if isinstance(p, slice):
            start, stop, step = p.indices(self._length)
            if step == 1:
                return self.indices(start, stop)
            return [self[i] for i in range(start, stop, step)]
        asked = operator.index(p)
        p = asked + self._length if asked < 0 else asked  # (from the end, as a list's)
        if not 0 <= p < self._length:
            raise IndexError(f"plan position {asked} out of range for {self._length}")
        n = len(self.order)
        q = order_position(self._rank_position(p), self.rank, self.world_size, n, self.runs)
        return int(self.order[q % n])

    def indices(self, start: int, stop: int) -> list[int]:
        """Dataset indices at positions ``[start, stop)``."""
        order, n, w, r = self.order, len(self.order), self.world_size, self.rank
        if self.runs > 1:
            return [self[p] for p in range(start, stop)]  # (ranks dealt in runs: rare)
        out: list[int] = []
        p = start
        # Positions within one batch (all of them, without workers) are consecutive rank
        # positions, i.e. a strided slice of the order: one slice per batch, not one
        # lookup per sample (this runs on the loader's hot path).
        while p < stop:
            end = (
                stop
                if self.num_workers == 1
                else min(stop, (p // self.batch_size + 1) * self.batch_size)
            )
            q0 = self._rank_position(p) * w + r
            q1 = q0 + (end - p - 1) * w + 1
            if q1 <= n:
                part = order[q0:q1:w]
                out += part.tolist() if isinstance(part, np.ndarray) else part
            else:  # the padding wraps around to the start of the order
                out += [int(order[q % n]) for q in range(q0, q1, w)]
            p = end
        return out


class Progress:
    """Which positions of a plan have been delivered: a watermark below which all are done,
    plus the (few) done positions above it. Unordered loading finishes positions out of order;
    the set above the watermark stays within the loader's in-flight window."""

    def __init__(self, watermark: int = 0, done: Iterable[int] = (), batches: int = 0) -> None:
        self.watermark = watermark
        self.done: set[int] = set(done)
        # Batches delivered: where a DataLoader's turn over its workers stood (see
        # Loader.for_worker); with buckets or budgets, not the positions over batch_size.
        self.batches = batches

    def mark(self, positions: Sequence[int], *, contiguous: bool = False) -> None:
        """Record ``positions`` as delivered, one batch. ``contiguous`` promises they are
        increasing (the ordered case), which makes the common case O(1)."""
        self.batches += 1
        if (
            contiguous
            and positions
            and positions[0] == self.watermark
            and positions[-1] - positions[0] + 1 == len(positions)
            and not self.done
        ):
            self.watermark = positions[-1] + 1
            return
        self.done.update(positions)
        while self.watermark in self.done:
            self.done.remove(self.watermark)
            self.watermark += 1

    def copy(self) -> Progress:
        return Progress(self.watermark, self.done, self.batches)

    def __contains__(self, position: int) -> bool:
        return position < self.watermark or position in self.done

    @property
    def empty(self) -> bool:
        """Nothing delivered: the start of the epoch."""
        return self.watermark == 0 and not self.done

    def state(self) -> dict[str, Any]:
        return {"watermark": self.watermark, "done": sorted(self.done), "batches": self.batches}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        # ("batches": not in states saved before it was kept)
        batches = int(state.get("batches", 0))
        return cls(int(state["watermark"]), (int(p) for p in state["done"]), batches)


class WorkerProgress:
    """A stream's progress under DataLoader workers: one `Progress` per worker, since each
    worker reads its own part of the stream."""

    def __init__(
        self,
        workers: int,
        slots: dict[int, Progress] | None = None,
        next_slot: int = 0,
        unit: int | None = None,
    ) -> None:
        self.workers = workers
        # A stream of known size: the batch unit of the workers' runs (Loader._run_unit),
        # which decides what a worker's positions mean; None otherwise.
        self.unit = unit
        self.slots: dict[int, Progress] = slots if slots is not None else {}
        # The worker the DataLoader asks next (it takes batches from each in turn): on
        # resume, that one is worker 0, so that batches come in the saved run's order.
        self.next_slot = next_slot

    @property
    def empty(self) -> bool:
        """Nothing delivered by any worker, and worker 0 asked first: the start of the
        epoch, which holds no per-worker position."""
        return self.next_slot == 0 and all(slot.empty for slot in self.slots.values())

    def mark(self, worker: int, positions: Sequence[int]) -> None:
        self.slots.setdefault(worker, Progress()).mark(positions)
        self.next_slot = (worker + 1) % self.workers

    def state(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "slots": {str(k): p.state() for k, p in sorted(self.slots.items())},
            "next": self.next_slot,
            "unit": self.unit,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WorkerProgress:
        slots = {int(k): Progress.from_state(v) for k, v in state["slots"].items()}
        unit = state.get("unit")  # (not in states saved before it was kept)
        return cls(
            int(state["workers"]),
            slots,
            int(state.get("next", 0)),
            None if unit is None else int(unit),
        )


def to_intervals(positions: Iterable[int]) -> list[list[int]]:
    """Sorted, merged ``[start, end)`` runs of ``positions``: a compact, JSON-able set."""
    runs: list[list[int]] = []
    for p in sorted(set(positions)):
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


def remaining_positions(n: int, excluded: Sequence[Sequence[int]]) -> list[int]:
    """The positions of ``range(n)`` outside the ``[start, end)`` runs of ``excluded``."""
    keep = np.ones(n, dtype=bool)
    for start, end in excluded:
        keep[start:end] = False
    return np.flatnonzero(keep).tolist()  # type: ignore[no-any-return]


def delivered_positions(
    progress: Progress,
    *,
    rank: int,
    world_size: int,
    remaining: Sequence[int],
    finished: bool,
    length: int,
    runs: int = 1,
) -> list[int]:
    """The epoch-order positions behind a rank's delivered plan positions: rank ``r`` of
    ``w`` holds order positions ``r, r + w, ...`` of ``remaining`` (or runs of them: see
    `order_position`), wrapping around; a finished rank delivered all ``length``
    positions of its plan."""
    n = len(remaining)
    plan_positions: Iterable[int] = (
        range(length) if finished else itertools.chain(range(progress.watermark), progress.done)
    )
    # Beyond n a rank's share wraps around (padding): that sample was delivered too.
    return (
        [remaining[order_position(p, rank, world_size, n, runs) % n] for p in plan_positions]
        if n
        else []
    )
