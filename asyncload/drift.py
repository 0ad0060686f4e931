"""Running statistics of numeric sample fields, and drift against a reference run.

:class:`RunningStats` keeps, for one field, the count, mean and variance (Welford's update
per value, Chan et al.'s pairwise merge per array and across workers), min, max and a
histogram over bin edges fixed up front: O(bins) memory however many values it sees,
mergeable in any order, and a plain JSON-able dict through :meth:`RunningStats.to_dict`.

:class:`DriftMonitor` keeps one per chosen field. ``monitor.observe(sample)`` updates them
(an array contributes all its values, through vectorised numpy); ``report()`` gives per
field numbers; with a ``reference`` (``to_dict()`` of a monitor from an earlier run, e.g.
the training set's, saved with ``json.dump``) it also gives, per field:

- ``psi``: the population stability index over the reference's bins plus an underflow and
  an overflow bin, ``sum((c - r) * ln(c / r))`` over the bins' fractions ``r``
  (reference) and ``c`` (current), each fraction floored at ``eps`` (default ``1e-4``) so
  that an empty bin contributes a finite amount. Rules of thumb: < 0.1 stable, 0.1-0.25
  moderate shift, > 0.25 major shift.
- ``ks``: the two-sample Kolmogorov-Smirnov distance computed from the two histograms,
  ``max |R(e) - C(e)|`` over the bin edges ``e``. It is *binned*: the exact statistic D of
  the raw values satisfies ``ks <= D <= ks_bound``, where ``ks_bound`` adds the largest
  bin fraction of either side (within a bin the two empirical CDFs can part by at most
  that much more). It is an effect size, not a p-value: compare it with ``ks_threshold``.
- ``outliers_z``: values with ``|x - mean_ref| > z_threshold * std_ref`` (with a
  reference std of 0, every value other than its mean);
- ``outliers_iqr``: values outside ``[Q1 - k * IQR, Q3 + k * IQR]`` with ``k =
  iqr_factor`` and the quartiles read from the reference histogram (linear within a bin;
  a quartile in the underflow or overflow bin is taken at the outer edge).

``check()`` warns with :class:`DriftWarning` (filter it like any warning) or raises
:class:`DriftError` when a field's PSI or binned KS passes its threshold.

NaN and ±inf never enter the moments, histogram or outlier counts: they are counted as
``nonfinite``. Statistics are population statistics (``var`` is numpy's ``ddof=0``).
"""

from __future__ import annotations

import bisect
import math
import numbers
import operator
import sys
import threading
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np

from .errors import AsyncloadError

__all__ = [
    "DriftError",
    "DriftMonitor",
    "DriftWarning",
    "RunningStats",
    "binned_ks",
    "psi",
]

_STATE_VERSION: Final = 1
# Arrays below this size are binned by binary search instead of np.histogram.
_SMALL: Final = 4096
DEFAULT_EPS: Final = 1e-4
# Scalars taken as one number (bool is an int). Not np.number: a complex scalar would be
# recorded as its real part, where a complex array is refused.
_REAL_SCALARS: Final = (int, float, np.integer, np.floating, np.bool_)


class DriftWarning(UserWarning):
    """A monitored field's distribution moved past a threshold (``DriftMonitor.check``)."""


class DriftError(AsyncloadError):
    """A monitored field drifted and the monitor's ``action`` is ``"raise"``. ``drifted``
    maps each drifted field to its ``report()`` entry."""

    def __init__(self, message: str, drifted: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.drifted = drifted if drifted is not None else {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.drifted))


Fence = tuple[float, float]


def _check_edges(edges: Any) -> np.ndarray:
    array = np.asarray(edges, dtype=np.float64)
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"bin edges must be a 1-d sequence of at least 2 numbers, got {edges!r}")
    if not np.all(np.isfinite(array)) or not np.all(np.diff(array) > 0):
        raise ValueError("bin edges must be finite and strictly increasing")
    return array


class RunningStats:
    """Count, mean, variance, min, max and a fixed-bin histogram of a stream of numbers.

    ``edges``: the bin edges, strictly increasing (``np.linspace(0, 1, 33)``: 32 bins). The
    bins are numpy's, ``[e0, e1), ..., [e(n-1), en]``, plus an underflow bin (``< e0``) and
    an overflow bin (``> en``): ``histogram`` has ``n + 2`` counts and sums to ``count``.
    Edges made by ``np.linspace`` take numpy's fast equal-width path.
    """

    def __init__(self, edges: Sequence[float] | np.ndarray) -> None:
        self.edges = _check_edges(edges)
        nbins = self.edges.size - 1
        self.histogram = np.zeros(nbins + 2, dtype=np.int64)
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        self._uniform = bool(np.array_equal(self.edges, np.linspace(lo, hi, nbins + 1)))
        # For the per-value path: bisect over plain floats beats numpy on one value.
        self._inner = [float(e) for e in self.edges[:-1]]
        self._top = hi
        # Per 1-byte dtype: each byte code's value and bin, for the bincount path.
        self._tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._masks: dict[tuple[str, float, float], np.ndarray] = {}

    @property
    def var(self) -> float:
        """Population variance (``ddof=0``); NaN before any value."""
        return self.m2 / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count else math.nan

    # -- updates ---------------------------------------------------------------------------

    def update(self, values: Any, fences: Sequence[Fence] = ()) -> list[int]:
        """Add a number or every element of an array (numpy, or anything ``np.asarray``
        takes). Returns, for each ``(lo, hi)`` in ``fences``, how many of the finite values
        added lie outside ``[lo, hi]`` (the monitor's outlier counts)."""
        kind = type(values)
        if kind is float or kind is int or isinstance(values, _REAL_SCALARS):
            return self._update_one(float(values), fences)
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"expected numbers, got an array of dtype {array.dtype}")
        if array.dtype.itemsize == 1:
            return self._update_bytes(array, fences)
        return self._update_array(array, fences)

    def _update_one(self, x: float, fences: Sequence[Fence]) -> list[int]:
        if not math.isfinite(x):
            self.nonfinite += 1
            return [0] * len(fences)
        # Welford: one value into the running mean and sum of squared deviations.
        n = self.count + 1
        delta = x - self.mean
        if math.isfinite(delta):
            self.mean += delta / n
            self.m2 += delta * (x - self.mean)
        else:  # values near the float range's ends: their difference overflows
            self.mean += x / n - self.mean / n
            self.m2 = math.inf
        self.count = n
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x
        slot = bisect.bisect_right(self._inner, x)
        if x > self._top:
            slot += 1
        self.histogram[slot] += 1
        return [int(x < lo or x > hi) for lo, hi in fences]

    def _update_array(self, array: np.ndarray, fences: Sequence[Fence]) -> list[int]:
        x = array.astype(np.float64, copy=False).ravel()
        if x.size == 0:
            return [0] * len(fences)
        lo, hi = x.min(), x.max()
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN and inf reach min or max
            finite = np.isfinite(x)
            x = x[finite]
            self.nonfinite += finite.size - x.size
            if x.size == 0:
                return [0] * len(fences)
            lo, hi = x.min(), x.max()
        lo, hi = float(lo), float(hi)
        mean = float(x.mean())
        deviations = x - mean
        self._merge_moments(x.size, mean, float(deviations @ deviations), lo, hi)
        self.histogram += self._bin(x, lo, hi)
        # min and max settle most fences without a pass over the values.
        return [_outside(x, lo, hi, a, b) for a, b in fences]

    def _bin(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        edges = self.edges
        nbins = edges.size - 1
        # numpy's equal-width path is O(n) but costs ~50 us per call; binary search is
        # O(n log bins) and cheap to call: the latter wins on small arrays.
        if self._uniform and x.size >= _SMALL:
            first, last = edges[0], edges[-1]
            counts = np.zeros(nbins + 2, dtype=np.int64)
            counts[1:-1], _ = np.histogram(x, bins=nbins, range=(first, last))
            counts[0] = np.count_nonzero(x < first) if lo < first else 0
            counts[-1] = np.count_nonzero(x > last) if hi > last else 0
            return counts
        return np.bincount(self._slots(x), minlength=nbins + 2)

    def _update_bytes(self, array: np.ndarray, fences: Sequence[Fence]) -> list[int]:
        # uint8/int8/bool: count the 256 byte codes once, then do all the work on the codes
        # (moments, bins, outliers are exact from the code counts), not on every value.
        values, slots = self._table(array.dtype)
        codes = np.bincount(array.reshape(-1).view(np.uint8), minlength=256)
        n = int(codes.sum())
        if n == 0:
            return [0] * len(fences)
        present = values[codes > 0]
        mean = float(codes @ values) / n
        deviations = values - mean
        m2 = float(codes @ (deviations * deviations))
        self._merge_moments(n, mean, m2, float(present.min()), float(present.max()))
        self.histogram += np.bincount(slots, weights=codes, minlength=self.histogram.size).astype(
            np.int64
        )
        return [int(codes @ self._outside_codes(array.dtype, fence)) for fence in fences]

    def _table(self, dtype: np.dtype[Any]) -> tuple[np.ndarray, np.ndarray]:
        table = self._tables.get(dtype.str)
        if table is None:
            codes = np.arange(256, dtype=np.uint8)
            values = (codes.view(np.int8) if dtype.kind == "i" else codes).astype(np.float64)
            table = self._tables[dtype.str] = (values, self._slots(values))
        return table

    def _outside_codes(self, dtype: np.dtype[Any], fence: Fence) -> np.ndarray:
        """1 for each byte code whose value lies outside ``fence``, else 0 (cached)."""
        key = (dtype.str, *fence)
        mask = self._masks.get(key)
        if mask is None:
            values, _ = self._table(dtype)
            outside = (values < fence[0]) | (values > fence[1])
            mask = self._masks[key] = outside.astype(np.int64)
        return mask

    def _slots(self, x: np.ndarray) -> np.ndarray:
        slots = np.searchsorted(self.edges[:-1], x, side="right")
        slots[x > self.edges[-1]] = self.edges.size
        return slots

    def _merge_moments(self, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        # Chan, Golub & LeVeque's pairwise update: exact for any split of the data.
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def merge(self, other: RunningStats) -> None:
        """Add ``other``'s values to these (same edges), as if this had seen them all."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge statistics over different bin edges")
        self.nonfinite += other.nonfinite
        if other.count:
            self._merge_moments(other.count, other.mean, other.m2, other.min, other.max)
            self.histogram += other.histogram

    def reset(self) -> None:
        """Forget every value; keep the edges."""
        self.histogram[:] = 0
        self.count, self.mean, self.m2, self.nonfinite = 0, 0.0, 0.0, 0
        self.min, self.max = math.inf, -math.inf

    # -- reading ---------------------------------------------------------------------------

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 <= q <= 1) read from the histogram, linear within a bin; in
        the underflow/overflow bin, the outer edge. NaN before any value."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if not self.count:
            return math.nan
        target = q * self.count
        cumulative = np.cumsum(self.histogram)
        # The first bin whose running count reaches the target; for q=0, the first with
        # any value (an empty bin below the data does not hold its minimum).
        slot = int(np.searchsorted(cumulative, target, side="left" if target else "right"))
        edges = self.edges
        if slot == 0:
            return float(edges[0])
        if slot >= edges.size:
            return float(edges[-1])
        below = float(cumulative[slot - 1])
        inside = float(self.histogram[slot])
        left, right = float(edges[slot - 1]), float(edges[slot])
        return left + (right - left) * ((target - below) / inside if inside else 0.0)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of lists, ints and floats (``None`` for min/max before any value):
        picklable and JSON-able. :meth:`from_dict` rebuilds the same statistics."""
        return {
            "edges": self.edges.tolist(),
            "histogram": self.histogram.tolist(),
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> RunningStats:
        missing = {"edges", "histogram", "count", "mean", "m2", "min", "max"} - state.keys()
        if missing:
            raise ValueError(f"statistics state is missing {sorted(missing)}")
        stats = cls(state["edges"])
        histogram = np.asarray(state["histogram"], dtype=np.int64)
        if histogram.shape != stats.histogram.shape or int(histogram.sum()) != state["count"]:
            raise ValueError("statistics state: histogram does not match edges and count")
        stats.histogram = histogram
        stats.count = int(state["count"])
        stats.mean = float(state["mean"])
        stats.m2 = float(state["m2"])
        if stats.count:
            stats.min, stats.max = float(state["min"]), float(state["max"])
        stats.nonfinite = int(state.get("nonfinite", 0))
        return stats

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tables"], state["_masks"] = {}, {}  # rebuilt on demand
        return state

    def __repr__(self) -> str:
        return (
            f"RunningStats(count={self.count}, mean={self.mean:.6g}, std={self.std:.6g}, "
            f"min={self.min:.6g}, max={self.max:.6g}, bins={self.edges.size - 1})"
        )


def _outside(x: np.ndarray, lo: float, hi: float, a: float, b: float) -> int:
    """How many of ``x`` (whose min is ``lo`` and max ``hi``) lie outside ``[a, b]``."""
    below = int(np.count_nonzero(x < a)) if lo < a else 0
    above = int(np.count_nonzero(x > b)) if hi > b else 0
    return below + above


def _fractions(stats: RunningStats) -> np.ndarray:
    if not stats.count:
        raise ValueError("no values observed: the distribution is undefined")
    return stats.histogram / stats.count


def psi(reference: RunningStats, current: RunningStats, *, eps: float = DEFAULT_EPS) -> float:
    """Population stability index of ``current`` against ``reference`` over their common
    bins (underflow and overflow included), with each bin fraction floored at ``eps`` so
    an empty bin adds a finite term. 0 for identical histograms."""
    if not np.array_equal(reference.edges, current.edges):
        raise ValueError("PSI needs the same bin edges on both sides")
    r = np.maximum(_fractions(reference), eps)
    c = np.maximum(_fractions(current), eps)
    return float(np.sum((c - r) * np.log(c / r)))


def binned_ks(reference: RunningStats, current: RunningStats) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov distance from the histograms: ``(ks, bound)``
    where ``ks = max |R(e) - C(e)|`` over the bin edges and the exact statistic of the raw
    values lies in ``[ks, bound]``, ``bound = ks + the largest bin fraction of either
    side``."""
    if not np.array_equal(reference.edges, current.edges):
        raise ValueError("KS needs the same bin edges on both sides")
    r, c = _fractions(reference), _fractions(current)
    # The CDFs just below each edge (the underflow and inner bins summed up to it).
    gap = np.abs(np.cumsum(r)[:-1] - np.cumsum(c)[:-1])
    ks = float(gap.max())
    return ks, min(1.0, ks + float(np.maximum(r, c).max()))


# -- the monitor --------------------------------------------------------------------------

Extractor = Callable[[Any], Any]


class _Field:
    """One monitored field: how to get it from a sample, its statistics, its outlier
    fences from the reference and the counts outside them."""

    def __init__(self, name: str, key: Hashable | Extractor, stats: RunningStats) -> None:
        self.name = name
        self.key = key
        # itemgetter: fast, and it pickles (a closure would not).
        self.get: Extractor = key if callable(key) else operator.itemgetter(key)
        self.stats = stats
        self.missing = 0
        self.reference: RunningStats | None = None
        self.fences: list[Fence] = []  # [z-score fence, IQR fence] with a reference
        self.outliers = [0, 0]


def _to_numbers(name: str, value: Any) -> Any:
    """A value as a real number or a numpy array of them; a torch tensor via numpy.
    Anything else (complex numbers included) raises ``TypeError`` naming the field, before
    any field is updated."""
    kind = type(value)
    if kind is float or kind is int or isinstance(value, _REAL_SCALARS):
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    elif isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError as exc:  # ragged: lists of different lengths
            raise TypeError(
                f"field {name!r}: expected numbers, got a ragged {type(value).__name__}"
            ) from exc
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return value
        raise TypeError(f"field {name!r}: expected numbers, got an array of dtype {value.dtype}")
    raise TypeError(f"field {name!r}: expected numbers or an array, got {type(value).__name__}")


class DriftMonitor:
    """Running statistics of chosen numeric fields, compared with a reference.

    ``fields``: a list of keys (dict keys or tuple positions: ``["image", "label"]``,
    ``[0, 1]``), or a ``{name: key or callable(sample)}`` dict (``{"brightness": lambda s:
    s["image"].mean()}``). A field's value is a number, a numpy array, a torch tensor or a
    list of numbers; arrays contribute every element. A sample without the field (missing
    key or index, or ``None``) counts as ``missing``; a value that is not numeric raises
    ``TypeError`` and leaves every field's statistics unchanged.

    ``bins``: bin edges, for every field or as a ``{name: edges}`` dict; not needed with a
    ``reference``, whose edges are used (a field's histogram only compares over equal
    edges). ``reference``: a :class:`DriftMonitor` or its :meth:`to_dict` (e.g. loaded
    from JSON) with the same field names.

    ``psi_threshold``/``ks_threshold``: a field drifts when its PSI or binned KS is above
    them (``None`` disables one); fields with fewer than ``min_count`` values this run are
    not judged. ``z_threshold``/``iqr_factor``: the outlier rules. ``action``: ``"warn"``
    (:class:`DriftWarning`) or ``"raise"`` (:class:`DriftError`), in :meth:`check`.
    ``every``: observe one sample in ``every`` (the k-th, 2k-th, ... call), to bound the
    cost on large arrays.

    Thread-safe: ``observe`` may run in a loader's event-loop thread while another thread
    calls ``report``. Picklable (for DataLoader workers, whose copies count separately:
    ship their :meth:`to_dict` back and :meth:`merge` them).
    """

    def __init__(
        self,
        fields: Sequence[Hashable] | Mapping[str, Hashable | Extractor],
        *,
        reference: DriftMonitor | Mapping[str, Any] | None = None,
        bins: Sequence[float]
        | np.ndarray
        | Mapping[str, Sequence[float] | np.ndarray]
        | None = None,
        psi_threshold: float | None = 0.2,
        ks_threshold: float | None = 0.1,
        z_threshold: float = 3.0,
        iqr_factor: float = 1.5,
        min_count: int = 100,
        eps: float = DEFAULT_EPS,
        action: Literal["warn", "raise"] = "warn",
        every: int = 1,
    ) -> None:
        if action not in ("warn", "raise"):
            raise ValueError(f'action must be "warn" or "raise", got {action!r}')
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        for name, value, optional in (
            ("psi_threshold", psi_threshold, True),
            ("ks_threshold", ks_threshold, True),
            ("z_threshold", z_threshold, False),
            ("iqr_factor", iqr_factor, False),
            ("eps", eps, False),
        ):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"min_count must be an int >= 0, got {min_count!r}")
        keys = _field_keys(fields)
        references = _reference_stats(reference) if reference is not None else None
        self._fields: list[_Field] = []
        for name, key in keys.items():
            edges = _edges_for(name, bins, references)
            field = _Field(name, key, RunningStats(edges))
            if references is not None:
                field.reference = references[name]
                field.fences = _fences(field.reference, z_threshold, iqr_factor)
            self._fields.append(field)
        self.psi_threshold = psi_threshold
        self.ks_threshold = ks_threshold
        self.z_threshold = z_threshold
        self.iqr_factor = iqr_factor
        self.min_count = min_count
        self.eps = eps
        self.action = action
        self.every = every
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def fields(self) -> list[str]:
        return [field.name for field in self._fields]

    @property
    def has_reference(self) -> bool:
        return any(field.reference is not None for field in self._fields)

    def stats(self, name: str) -> RunningStats:
        """The running statistics of field ``name`` (live: do not mutate)."""
        for field in self._fields:
            if field.name == name:
                return field.stats
        raise KeyError(name)

    def observe(self, sample: Any) -> None:
        """Add ``sample``'s fields to the statistics. Also works on a collated batch:
        arrays contribute all their values either way."""
        self._calls += 1
        if self.every > 1 and self._calls % self.every:
            return
        values: list[Any] = []
        # Extract and convert every field first, so a bad value leaves no field updated.
        for field in self._fields:
            try:
                value = field.get(sample)
            except (KeyError, IndexError):
                value = None
            values.append(None if value is None else _to_numbers(field.name, value))
        with self._lock:
            for field, value in zip(self._fields, values, strict=True):
                if value is None:
                    field.missing += 1
                    continue
                counts = field.stats.update(value, field.fences)
                if counts:
                    field.outliers[0] += counts[0]
                    field.outliers[1] += counts[1]

    def merge(self, other: DriftMonitor | Mapping[str, Any]) -> None:
        """Add another monitor's counts (a DataLoader worker's, another rank's), given as a
        monitor or its :meth:`to_dict`. Fields, edges and outlier fences must match."""
        state = other.to_dict() if isinstance(other, DriftMonitor) else other
        entries = _state_fields(state)
        if set(entries) != set(self.fields):
            raise ValueError(f"cannot merge fields {sorted(entries)} into {sorted(self.fields)}")
        # Check every field before changing any: a refused merge leaves this monitor as it was.
        incoming = {}
        for field in self._fields:
            entry = entries[field.name]
            if [tuple(f) for f in entry.get("fences", [])] != field.fences:
                raise ValueError(f"field {field.name!r}: merged monitors use other references")
            stats = incoming[field.name] = RunningStats.from_dict(entry["stats"])
            if not np.array_equal(stats.edges, field.stats.edges):
                raise ValueError(f"field {field.name!r}: cannot merge over different bin edges")
        with self._lock:
            for field in self._fields:
                entry = entries[field.name]
                field.stats.merge(incoming[field.name])
                field.missing += int(entry.get("missing", 0))
                outliers = entry.get("outliers")
                if outliers is not None:
                    field.outliers[0] += int(outliers[0])
                    field.outliers[1] += int(outliers[1])

    def reset(self) -> None:
        """Forget what was observed (e.g. at the start of an epoch); keep the reference."""
        with self._lock:
            for field in self._fields:
                field.stats.reset()
                field.missing = 0
                field.outliers = [0, 0]

    def report(self) -> dict[str, dict[str, Any]]:
        """Per field: ``count``, ``missing``, ``nonfinite``, ``mean``, ``std``, ``min``,
        ``max`` (``None`` before any value); with a reference, ``psi``, ``ks``,
        ``ks_bound``, ``outliers_z``, ``outliers_iqr`` (else ``None``); and ``drifted``."""
        with self._lock:
            return {field.name: self._field_report(field) for field in self._fields}

    def _field_report(self, field: _Field) -> dict[str, Any]:
        stats = field.stats
        seen = stats.count > 0
        entry: dict[str, Any] = {
            "count": stats.count,
            "missing": field.missing,
            "nonfinite": stats.nonfinite,
            "mean": stats.mean if seen else None,
            "std": stats.std if seen else None,
            "min": stats.min if seen else None,
            "max": stats.max if seen else None,
            "psi": None,
            "ks": None,
            "ks_bound": None,
            "outliers_z": None,
            "outliers_iqr": None,
            "drifted": False,
        }
        reference = field.reference
        if reference is None:
            return entry
        entry["outliers_z"], entry["outliers_iqr"] = field.outliers
        if seen and reference.count:
            entry["psi"] = psi(reference, stats, eps=self.eps)
            entry["ks"], entry["ks_bound"] = binned_ks(reference, stats)
            entry["drifted"] = stats.count >= self.min_count and (
                (self.psi_threshold is not None and entry["psi"] > self.psi_threshold)
                or (self.ks_threshold is not None and entry["ks"] > self.ks_threshold)
            )
        return entry

    def check(self) -> dict[str, dict[str, Any]]:
        """The drifted fields' :meth:`report` entries; when there are any, warn
        (:class:`DriftWarning`) or raise (:class:`DriftError`) as ``action`` says. Without
        a reference nothing can drift: returns ``{}``."""
        drifted = {name: entry for name, entry in self.report().items() if entry["drifted"]}
        if not drifted:
            return drifted
        message = "data drift: " + "; ".join(
            f"field {name!r} PSI {entry['psi']:.3g} (threshold {self.psi_threshold}), "
            f"binned KS {entry['ks']:.3g} (threshold {self.ks_threshold}) over "
            f"{entry['count']} values"
            for name, entry in drifted.items()
        )
        if self.action == "raise":
            raise DriftError(message, drifted)
        warnings.warn(DriftWarning(message), stacklevel=2)
        return drifted

    def to_dict(self) -> dict[str, Any]:
        """A plain, picklable, JSON-able dict: per field its statistics, missing count,
        outlier fences and counts, and its key where that is a str or int. Use it as a
        later monitor's ``reference``, as :meth:`merge`'s argument, or with
        :meth:`from_dict`."""
        with self._lock:
            fields = {
                field.name: {
                    "key": field.key if isinstance(field.key, (str, int)) else None,
                    "stats": field.stats.to_dict(),
                    "missing": field.missing,
                    "fences": [list(f) for f in field.fences],
                    "outliers": list(field.outliers) if field.fences else None,
                }
                for field in self._fields
            }
        return {"version": _STATE_VERSION, "fields": fields}

    @classmethod
    def from_dict(
        cls,
        state: Mapping[str, Any],
        fields: Mapping[str, Hashable | Extractor] | None = None,
        **options: Any,
    ) -> DriftMonitor:
        """A monitor holding ``state``'s statistics (no reference: pass ``reference=`` in
        ``options``, with the other keywords of the constructor). ``fields`` gives the
        extractors of fields saved without a key (callables); the others keep theirs."""
        entries = _state_fields(state)
        keys: dict[str, Hashable | Extractor] = {}
        for name, entry in entries.items():
            if fields is not None and name in fields:
                keys[name] = fields[name]
            elif entry.get("key") is not None:
                keys[name] = entry["key"]
            else:
                raise ValueError(f"field {name!r} was saved without a key: pass it in fields=")
        bins = {name: entry["stats"]["edges"] for name, entry in entries.items()}
        monitor = cls(keys, bins=options.pop("bins", bins), **options)
        for field in monitor._fields:
            entry = entries[field.name]
            field.stats.merge(RunningStats.from_dict(entry["stats"]))
            field.missing = int(entry.get("missing", 0))
            if field.fences and [tuple(f) for f in entry.get("fences", [])] == field.fences:
                field.outliers = [int(n) for n in entry["outliers"]]
        return monitor

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"DriftMonitor(fields={self.fields}, reference={self.has_reference}, "
            f"psi_threshold={self.psi_threshold}, ks_threshold={self.ks_threshold}, "
            f"action={self.action!r})"
        )


def _field_keys(
    fields: Sequence[Hashable] | Mapping[str, Hashable | Extractor],
) -> dict[str, Hashable | Extractor]:
    if isinstance(fields, Mapping):
        keys = {str(name): key for name, key in fields.items()}
    elif isinstance(fields, Iterable) and not isinstance(fields, (str, bytes)):
        keys = {str(key): key for key in fields}
    else:
        raise TypeError(f"fields must be a list of keys or a {{name: key}} dict, got {fields!r}")
    if not keys:
        raise ValueError("fields must name at least one field")
    return keys


def _state_fields(state: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(state, Mapping) or "fields" not in state:
        raise TypeError("expected a DriftMonitor or its to_dict()")
    if state.get("version") != _STATE_VERSION:
        raise ValueError(f"drift state version {state.get('version')!r} is not supported")
    return dict(state["fields"])


def _reference_stats(reference: DriftMonitor | Mapping[str, Any]) -> dict[str, RunningStats]:
    state = reference.to_dict() if isinstance(reference, DriftMonitor) else reference
    return {
        name: RunningStats.from_dict(entry["stats"]) for name, entry in _state_fields(state).items()
    }


def _edges_for(name: str, bins: Any, references: dict[str, RunningStats] | None) -> Any:
    edges = bins.get(name) if isinstance(bins, Mapping) else bins
    if references is not None:
        if name not in references:
            raise ValueError(f"the reference has no field {name!r} (it has {sorted(references)})")
        reference_edges = references[name].edges
        if edges is not None and not np.array_equal(_check_edges(edges), reference_edges):
            raise ValueError(f"field {name!r}: bins differ from the reference's edges")
        return reference_edges
    if edges is None:
        raise ValueError(
            f"field {name!r} needs bin edges: pass bins= (e.g. np.linspace(0, 1, 33)) or a "
            "reference"
        )
    return edges


def _fences(reference: RunningStats, z: float, k: float) -> list[Fence]:
    if not reference.count:
        return []
    mean, std = reference.mean, reference.std
    q1, q3 = reference.quantile(0.25), reference.quantile(0.75)
    iqr = q3 - q1
    return [(mean - z * std, mean + z * std), (q1 - k * iqr, q3 + k * iqr)]
