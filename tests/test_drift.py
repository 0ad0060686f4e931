"""Running statistics and drift (asyncload.drift): moments and histograms against numpy on
the same data, merges of any split equal to the whole, PSI and binned KS against direct
computations on the same bins (and the binned KS bounding the exact one), warnings and
errors past the thresholds, exact outlier counts, and JSON round trips."""

from __future__ import annotations

import functools
import json
import math
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload as al
from asyncload.drift import (
    DriftError,
    DriftMonitor,
    DriftWarning,
    RunningStats,
    binned_ks,
    psi,
)

EDGES = np.linspace(-3.0, 3.0, 25)


def expected_histogram(data: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """numpy's histogram, with an underflow and an overflow bin around it."""
    data = np.asarray(data, dtype=np.float64).ravel()
    data = data[np.isfinite(data)]
    inside, _ = np.histogram(data, edges)
    return np.concatenate(
        ([np.count_nonzero(data < edges[0])], inside, [np.count_nonzero(data > edges[-1])])
    )


def assert_matches_numpy(stats: RunningStats, data: np.ndarray) -> None:
    data = np.asarray(data, dtype=np.float64).ravel()
    finite = data[np.isfinite(data)]
    assert stats.count == finite.size
    assert stats.nonfinite == data.size - finite.size
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-12, abs=1e-12)
    assert stats.var == pytest.approx(finite.var(), rel=1e-9, abs=1e-12)
    assert stats.min == finite.min()
    assert stats.max == finite.max()
    np.testing.assert_array_equal(stats.histogram, expected_histogram(finite, stats.edges))


# -- running statistics against numpy -----------------------------------------------------


@pytest.mark.parametrize("size", [1, 100, 4095, 4096, 20_000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize(
    "edges",
    [EDGES, np.array([-2.0, -0.5, 0.0, 0.1, 1.0, 2.5])],
    ids=["uniform", "uneven"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int64, np.int16])
def test_arrays_match_numpy(size: int, edges: np.ndarray, dtype: Any) -> None:
    rng = np.random.default_rng(size)
    data = (rng.normal(scale=1.5, size=size) * (4 if dtype in (np.int64, np.int16) else 1)).astype(
        dtype
    )
    stats = RunningStats(edges)
    stats.update(data)
    assert_matches_numpy(stats, data)


def test_values_on_the_edges_bin_as_numpy_does() -> None:
    edges = np.linspace(0.0, 1.0, 11)
    data = np.concatenate([edges, edges, [-1e-300, 1.0 + 1e-15, 0.3, 0.7]])
    for chunk in (data, np.tile(data, 400)):  # the small and the large path
        stats = RunningStats(edges)
        stats.update(chunk)
        assert_matches_numpy(stats, chunk)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.bool_])
@pytest.mark.parametrize("shape", [(0,), (7,), (64, 64, 3)])
def test_one_byte_dtypes_match_numpy(dtype: Any, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=shape).astype(np.uint8).view(dtype)
    if dtype is np.bool_:
        data = rng.integers(0, 2, size=shape).astype(np.bool_)
    edges = np.linspace(-130, 260, 40)
    stats = RunningStats(edges)
    stats.update(data)
    if data.size:
        assert_matches_numpy(stats, data)
    else:
        assert stats.count == 0


def test_a_stream_of_scalars_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    data = rng.normal(size=500) * 2
    data[[3, 70]] = [np.nan, np.inf]
    stats = RunningStats(EDGES)
    for value in data:
        stats.update(float(value))
    for value in (np.float32(0.25), 1, True, np.int64(2)):
        stats.update(value)
    assert_matches_numpy(stats, np.concatenate([data, [0.25, 1, 1, 2]]))


def test_nonfinite_values_are_counted_not_used() -> None:
    data = np.array([1.0, np.nan, -np.inf, 2.0, np.inf, 0.5])
    stats = RunningStats(EDGES)
    stats.update(data)
    assert_matches_numpy(stats, data)
    assert stats.nonfinite == 3
    only_nan = RunningStats(EDGES)
    only_nan.update(np.full(5, np.nan))
    assert (only_nan.count, only_nan.nonfinite) == (0, 5)
    assert math.isnan(only_nan.var)


def test_torch_tensors_through_the_monitor() -> None:
    data = torch.linspace(-2, 2, 101, dtype=torch.float16)
    monitor = DriftMonitor(["x", "y"], bins=EDGES)
    monitor.observe({"x": data, "y": data.to(torch.bfloat16)})
    for name in ("x", "y"):
        expected = data.float().numpy() if name == "x" else data.to(torch.bfloat16).float().numpy()
        assert_matches_numpy(monitor.stats(name), expected)


def test_non_numeric_arrays_are_refused() -> None:
    with pytest.raises(TypeError, match="dtype"):
        RunningStats(EDGES).update(np.array(["a"]))


@pytest.mark.parametrize(
    "edges", [[1.0], [0.0, 0.0], [1.0, 0.0], [0.0, np.inf], [[0.0, 1.0]]], ids=repr
)
def test_bad_edges(edges: Any) -> None:
    with pytest.raises(ValueError, match="edges"):
        RunningStats(edges)


def test_quantiles_from_the_histogram() -> None:
    stats = RunningStats(np.linspace(0.0, 4.0, 5))
    stats.update(np.repeat([0.5, 1.5, 2.5, 3.5], 25))
    assert stats.quantile(0.25) == 1.0
    assert stats.quantile(0.5) == 2.0
    assert stats.quantile(0.75) == 3.0
    assert stats.quantile(0.1) == pytest.approx(0.4)
    stats.update(np.array([-5.0] * 1000))  # most values in the underflow bin
    assert stats.quantile(0.25) == 0.0
    assert math.isnan(RunningStats(EDGES).quantile(0.5))
    with pytest.raises(ValueError, match="q must be"):
        stats.quantile(1.5)


# -- merging ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(1, 3000),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    as_scalars=st.booleans(),
)
def test_merging_any_split_equals_the_whole(
    seed: int, size: int, cuts: list[float], as_scalars: bool
) -> None:
    rng = np.random.default_rng(seed)
    data = rng.normal(loc=rng.uniform(-2, 2), scale=rng.uniform(0.1, 3), size=size)
    points = sorted({int(c * size) for c in cuts})
    parts = np.split(data, points)
    whole = RunningStats(EDGES)
    whole.update(data)
    merged = RunningStats(EDGES)
    for part in parts:
        piece = RunningStats(EDGES)
        if as_scalars and part.size < 50:
            for value in part:
                piece.update(float(value))
        else:
            piece.update(part)
        # Through JSON, as a worker or another rank would send it.
        merged.merge(RunningStats.from_dict(json.loads(json.dumps(piece.to_dict()))))
    assert merged.count == whole.count
    np.testing.assert_array_equal(merged.histogram, whole.histogram)
    assert (merged.min, merged.max) == (whole.min, whole.max)
    assert merged.mean == pytest.approx(whole.mean, rel=1e-9, abs=1e-12)
    assert merged.var == pytest.approx(whole.var, rel=1e-9, abs=1e-12)
    assert_matches_numpy(merged, data)


def test_merging_different_edges_is_refused() -> None:
    with pytest.raises(ValueError, match="edges"):
        RunningStats(EDGES).merge(RunningStats(np.linspace(0, 1, 3)))


def test_merging_empty_statistics() -> None:
    stats = RunningStats(EDGES)
    stats.merge(RunningStats(EDGES))
    assert stats.count == 0
    other = RunningStats(EDGES)
    other.update(np.array([1.0, 2.0]))
    stats.merge(other)
    assert_matches_numpy(stats, np.array([1.0, 2.0]))


# -- PSI and KS against direct computations -----------------------------------------------


def direct_psi(reference: np.ndarray, current: np.ndarray, edges: np.ndarray, eps: float) -> float:
    r = expected_histogram(reference, edges) / reference.size
    c = expected_histogram(current, edges) / current.size
    r, c = np.maximum(r, eps), np.maximum(c, eps)
    return float(np.sum((c - r) * np.log(c / r)))


def direct_binned_ks(reference: np.ndarray, current: np.ndarray, edges: np.ndarray) -> float:
    # The empirical CDFs just below each edge, and at the last edge inclusive.
    r_cdf = [np.mean(reference < e) for e in edges[:-1]] + [np.mean(reference <= edges[-1])]
    c_cdf = [np.mean(current < e) for e in edges[:-1]] + [np.mean(current <= edges[-1])]
    return float(np.max(np.abs(np.array(r_cdf) - np.array(c_cdf))))


def exact_ks(reference: np.ndarray, current: np.ndarray) -> float:
    """The two-sample KS statistic of the raw values (as scipy.stats.ks_2samp's)."""
    points = np.concatenate([reference, current])
    r = np.searchsorted(np.sort(reference), points, side="right") / reference.size
    c = np.searchsorted(np.sort(current), points, side="right") / current.size
    return float(np.max(np.abs(r - c)))


def stats_of(data: np.ndarray, edges: np.ndarray = EDGES) -> RunningStats:
    stats = RunningStats(edges)
    stats.update(data)
    return stats


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    shift=st.floats(-2, 2),
    scale=st.floats(0.3, 3),
    n_ref=st.integers(1, 2000),
    n_cur=st.integers(1, 2000),
)
def test_psi_and_ks_against_direct_computations(
    seed: int, shift: float, scale: float, n_ref: int, n_cur: int
) -> None:
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=n_ref)
    current = rng.normal(loc=shift, scale=scale, size=n_cur)
    r, c = stats_of(reference), stats_of(current)
    for eps in (1e-4, 1e-2):
        assert psi(r, c, eps=eps) == pytest.approx(direct_psi(reference, current, EDGES, eps))
    ks, bound = binned_ks(r, c)
    assert ks == pytest.approx(direct_binned_ks(reference, current, EDGES), abs=1e-12)
    # The binned statistic brackets the exact one.
    assert ks - 1e-12 <= exact_ks(reference, current) <= bound + 1e-12


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    shift=st.floats(-1, 1),
    n_ref=st.integers(1, 1500),
    n_cur=st.integers(1, 1500),
)
def test_ks_brackets_scipy_and_moments_match_scipy(
    seed: int, shift: float, n_ref: int, n_cur: int
) -> None:
    """Against scipy itself: the binned KS statistic and its bound bracket
    ``scipy.stats.ks_2samp``'s exact statistic, and the running moments equal
    ``scipy.stats.describe``'s."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=n_ref)
    current = rng.normal(loc=shift, size=n_cur).round(1)  # ties, as real data has
    exact = float(stats.ks_2samp(reference, current).statistic)
    assert exact == pytest.approx(exact_ks(reference, current), abs=1e-12)
    ks, bound = binned_ks(stats_of(reference), stats_of(current))
    assert ks - 1e-12 <= exact <= bound + 1e-12
    described = stats.describe(current, ddof=0)
    running = stats_of(current)
    assert running.count == described.nobs
    assert running.mean == pytest.approx(described.mean, rel=1e-9, abs=1e-12)
    assert running.var == pytest.approx(described.variance, rel=1e-9, abs=1e-12)
    assert (running.min, running.max) == tuple(described.minmax)


def test_identical_data_has_zero_psi_and_ks() -> None:
    data = np.random.default_rng(3).normal(size=1000)
    assert psi(stats_of(data), stats_of(data)) == 0.0
    assert binned_ks(stats_of(data), stats_of(data))[0] == 0.0


def test_psi_and_ks_need_data_and_equal_edges() -> None:
    with pytest.raises(ValueError, match="no values"):
        psi(RunningStats(EDGES), stats_of(np.zeros(3)))
    with pytest.raises(ValueError, match="edges"):
        binned_ks(stats_of(np.zeros(3)), stats_of(np.zeros(3), np.linspace(0, 1, 3)))


# -- the monitor --------------------------------------------------------------------------


def feed(monitor: DriftMonitor, seed: int, n: int, shift: float = 0.0) -> DriftMonitor:
    """Observe ``n`` samples: ``x`` normal around ``shift``, ``pixels`` uniform bytes."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        monitor.observe(
            {"x": float(rng.normal(loc=shift)), "pixels": rng.integers(0, 256, 16, np.uint8)}
        )
    return monitor


@functools.cache  # shared: tests only read it
def reference_monitor(seed: int = 0, n: int = 5000) -> DriftMonitor:
    bins = {"x": EDGES, "pixels": np.linspace(0, 256, 17)}
    return feed(DriftMonitor(["x", "pixels"], bins=bins), seed, n)


def test_same_distribution_does_not_warn() -> None:
    reference = json.loads(json.dumps(reference_monitor(0).to_dict()))
    monitor = feed(DriftMonitor(["x", "pixels"], reference=reference), seed=1, n=5000)
    report = monitor.report()
    assert report["x"]["psi"] < 0.02
    assert report["pixels"]["psi"] < 0.01
    assert report["x"]["ks"] < 0.05
    assert not report["x"]["drifted"]
    assert monitor.check() == {}  # and no warning: the test config turns warnings into errors


def test_the_reference_against_itself_is_zero() -> None:
    again = feed(DriftMonitor(["x", "pixels"], reference=reference_monitor(0)), seed=0, n=5000)
    report = again.report()
    assert report["x"]["psi"] == 0.0
    assert report["x"]["ks"] == 0.0


def shifted_monitor(action: str, shift: float = 1.0) -> DriftMonitor:
    monitor = DriftMonitor(["x", "pixels"], reference=reference_monitor(0), action=action)  # type: ignore[arg-type]
    return feed(monitor, seed=2, n=2000, shift=shift)


def test_a_shifted_distribution_warns() -> None:
    monitor = shifted_monitor("warn")
    with pytest.warns(DriftWarning, match="field 'x' PSI") as caught:
        drifted = monitor.check()
    assert list(drifted) == ["x"]
    assert drifted["x"]["psi"] > 0.2
    assert drifted["x"]["ks"] > 0.1
    assert "pixels" not in str(caught[0].message)
    # Users can silence it by category.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DriftWarning)
        assert list(monitor.check()) == ["x"]


def test_a_shifted_distribution_raises_with_action_raise() -> None:
    monitor = shifted_monitor("raise")
    with pytest.raises(DriftError, match="field 'x'") as info:
        monitor.check()
    assert isinstance(info.value, al.AsyncloadError)
    assert list(info.value.drifted) == ["x"]
    copy = pickle.loads(pickle.dumps(info.value))
    assert (str(copy), list(copy.drifted)) == (str(info.value), ["x"])


def test_thresholds_and_min_count() -> None:
    monitor = shifted_monitor("raise", shift=0.3)
    report = monitor.report()["x"]
    assert report["psi"] > 0.0
    assert report["ks"] > 0.0
    strict = DriftMonitor(
        ["x", "pixels"],
        reference=reference_monitor(0),
        psi_threshold=report["psi"] / 2,
        ks_threshold=None,
        action="raise",
    )
    strict.merge(monitor)
    with pytest.raises(DriftError):
        strict.check()
    lax = DriftMonitor(
        ["x", "pixels"],
        reference=reference_monitor(0),
        psi_threshold=None,
        ks_threshold=report["ks"] * 2,
        action="raise",
    )
    lax.merge(monitor)
    assert lax.check() == {}
    few = DriftMonitor(
        ["x", "pixels"], reference=reference_monitor(0), min_count=10**6, action="raise"
    )
    few.merge(shifted_monitor("raise", shift=3.0))
    assert few.check() == {}  # too few values to judge


def test_no_reference_reports_without_judging() -> None:
    monitor = reference_monitor(0, n=10)
    report = monitor.report()["x"]
    assert report["count"] == 10
    assert report["psi"] is None and report["outliers_z"] is None
    assert monitor.check() == {}


def test_outlier_counts_are_exact() -> None:
    reference = DriftMonitor(["v"], bins=np.linspace(0.0, 4.0, 5))
    reference.observe({"v": np.repeat([0.5, 1.5, 2.5, 3.5], 25)})
    # mean 2, std sqrt(1.25): z fence 2 -/+ 3 * 1.118 = [-1.354, 5.354].
    # quartiles 1 and 3 from the histogram: IQR fence [1 - 3, 3 + 3] = [-2, 6].
    current = np.array([-3.0, -1.5, -1.0, 0.0, 2.0, 5.0, 5.5, 6.5, 100.0])
    as_array = DriftMonitor(["v"], reference=reference)
    as_array.observe({"v": current})
    as_scalars = DriftMonitor(["v"], reference=reference)
    for value in current:
        as_scalars.observe({"v": float(value)})
    for monitor in (as_array, as_scalars):
        report = monitor.report()["v"]
        assert (report["outliers_z"], report["outliers_iqr"]) == (5, 3)
    # The one-byte path counts from byte codes: the same answer.
    as_bytes = DriftMonitor(["v"], reference=reference)
    as_bytes.observe({"v": np.array([-3, -1, 0, 2, 5, 7, 100], dtype=np.int8)})
    report = as_bytes.report()["v"]
    assert (report["outliers_z"], report["outliers_iqr"]) == (3, 3)
    as_bytes.observe({"v": np.array([250, 1], dtype=np.uint8)})
    report = as_bytes.report()["v"]
    assert (report["outliers_z"], report["outliers_iqr"]) == (4, 4)


def test_a_constant_reference_makes_every_other_value_a_z_outlier() -> None:
    reference = DriftMonitor(["v"], bins=EDGES)
    reference.observe({"v": np.ones(10)})
    monitor = DriftMonitor(["v"], reference=reference)
    monitor.observe({"v": np.array([1.0, 1.0, 1.5, 0.0])})
    assert monitor.report()["v"]["outliers_z"] == 2


def test_fields_by_index_by_callable_and_missing() -> None:
    monitor = DriftMonitor(
        {"label": 1, "mean": lambda s: s[0].mean(), "extra": 2}, bins=np.linspace(0, 10, 11)
    )
    monitor.observe((np.array([1.0, 3.0]), 4))
    monitor.observe((np.array([5.0]), 6, None))
    monitor.observe((torch.tensor([7.0]), torch.tensor(8), [1, 2]))
    report = monitor.report()
    assert (report["label"]["count"], report["label"]["mean"]) == (3, 6.0)
    assert report["mean"]["mean"] == pytest.approx((2.0 + 5.0 + 7.0) / 3)
    assert (report["extra"]["count"], report["extra"]["missing"]) == (2, 2)
    assert monitor.fields == ["label", "mean", "extra"]


def test_a_bad_value_raises_and_updates_nothing() -> None:
    monitor = DriftMonitor(["a", "b"], bins=EDGES)
    with pytest.raises(TypeError, match="field 'b'"):
        monitor.observe({"a": 1.0, "b": "text"})
    assert monitor.report()["a"]["count"] == 0


def test_every_observes_one_sample_in_k() -> None:
    monitor = DriftMonitor(["a"], bins=EDGES, every=3)
    for i in range(10):
        monitor.observe({"a": float(i)})
    assert monitor.report()["a"]["count"] == 3  # calls 3, 6, 9: values 2, 5, 8


def test_merging_workers_equals_one_monitor() -> None:
    reference = reference_monitor(0, n=500)
    rng = np.random.default_rng(5)
    samples = [
        {"x": float(rng.normal(0.2)), "pixels": rng.integers(0, 256, 16, dtype=np.uint8)}
        for _ in range(300)
    ]
    one = DriftMonitor(["x", "pixels"], reference=reference)
    workers = [pickle.loads(pickle.dumps(one)) for _ in range(3)]
    for i, sample in enumerate(samples):
        one.observe(sample)
        workers[i % 3].observe(sample)
    merged = DriftMonitor(["x", "pixels"], reference=reference)
    for worker in workers:
        merged.merge(json.loads(json.dumps(worker.to_dict())))
    expected, actual = one.report(), merged.report()
    for name in ("x", "pixels"):
        for key in ("count", "min", "max", "outliers_z", "outliers_iqr", "missing"):
            assert actual[name][key] == expected[name][key]
        for key in ("mean", "std", "psi", "ks"):
            assert actual[name][key] == pytest.approx(expected[name][key], rel=1e-9)


def test_merge_refuses_other_fields_and_other_references() -> None:
    monitor = reference_monitor(0, n=20)
    with pytest.raises(ValueError, match="cannot merge fields"):
        monitor.merge(DriftMonitor(["x"], bins=EDGES))
    with_reference = DriftMonitor(["x", "pixels"], reference=monitor)
    with pytest.raises(ValueError, match="other references"):
        with_reference.merge(DriftMonitor(["x", "pixels"], reference=reference_monitor(1, n=20)))
    # Field x would merge, field pixels cannot: nothing is merged, not even x.
    target = feed(DriftMonitor(["x", "pixels"], bins={"x": EDGES, "pixels": EDGES}), 3, 5)
    before = target.to_dict()
    with pytest.raises(ValueError, match="different bin edges"):
        target.merge(monitor)
    assert target.to_dict() == before


def test_to_dict_round_trips_through_json() -> None:
    monitor = shifted_monitor("warn")
    monitor.observe({"pixels": np.zeros(3, np.uint8)})  # one missing x
    state = json.loads(json.dumps(monitor.to_dict()))
    copy = DriftMonitor.from_dict(state, reference=reference_monitor(0))
    assert copy.report() == monitor.report()
    assert copy.to_dict() == monitor.to_dict()
    stats = monitor.stats("x")
    again = RunningStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again.to_dict() == stats.to_dict()
    empty = RunningStats.from_dict(json.loads(json.dumps(RunningStats(EDGES).to_dict())))
    assert empty.count == 0 and empty.min == math.inf


def test_from_dict_needs_extractors_for_callables() -> None:
    monitor = DriftMonitor({"m": lambda s: s["a"]}, bins=EDGES)
    state = monitor.to_dict()
    with pytest.raises(ValueError, match="saved without a key"):
        DriftMonitor.from_dict(state)
    copy = DriftMonitor.from_dict(state, fields={"m": lambda s: s["b"]})
    copy.observe({"b": 1.0})
    assert copy.report()["m"]["count"] == 1


def test_reset_keeps_the_reference() -> None:
    monitor = shifted_monitor("warn")
    monitor.reset()
    report = monitor.report()["x"]
    assert (report["count"], report["outliers_z"], report["psi"]) == (0, 0, None)
    assert monitor.has_reference


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fields": ["x"]}, ValueError, "needs bin edges"),
        ({"fields": [], "bins": EDGES}, ValueError, "at least one"),
        ({"fields": "x", "bins": EDGES}, TypeError, "fields must be"),
        ({"fields": ["x"], "bins": EDGES, "action": "log"}, ValueError, "action"),
        ({"fields": ["x"], "bins": EDGES, "every": 0}, ValueError, "every"),
        ({"fields": ["x"], "bins": EDGES, "eps": 0.0}, ValueError, "eps"),
        ({"fields": ["x"], "bins": EDGES, "eps": "1e-4"}, TypeError, "eps"),
        ({"fields": ["x"], "bins": EDGES, "psi_threshold": "0.2"}, TypeError, "psi_threshold"),
        ({"fields": ["x"], "bins": EDGES, "ks_threshold": float("nan")}, ValueError, "ks_thr"),
        ({"fields": ["x"], "bins": EDGES, "z_threshold": -1}, ValueError, "z_threshold"),
        ({"fields": ["x"], "bins": EDGES, "iqr_factor": 0}, ValueError, "iqr_factor"),
        ({"fields": ["x"], "bins": EDGES, "min_count": -5}, ValueError, "min_count"),
        ({"fields": ["x"], "bins": EDGES, "min_count": 1.5}, ValueError, "min_count"),
        ({"fields": ["nope"], "reference": {"version": 1, "fields": {}}}, ValueError, "no field"),
        ({"fields": ["x"], "reference": {"fields": {}}}, ValueError, "version"),
        ({"fields": ["x"], "reference": [1]}, TypeError, "to_dict"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DriftMonitor(**kwargs)


def test_bins_must_agree_with_the_reference() -> None:
    reference = reference_monitor(0, n=20)
    with pytest.raises(ValueError, match="differ"):
        DriftMonitor(["x", "pixels"], reference=reference, bins=np.linspace(0, 1, 3))
    same = DriftMonitor(["x"], reference=reference, bins={"x": EDGES})
    assert same.fields == ["x"]


def test_monitor_repr_and_pickle() -> None:
    monitor = shifted_monitor("raise")
    copy = pickle.loads(pickle.dumps(monitor))
    assert copy.report() == monitor.report()
    assert "DriftMonitor(fields=['x', 'pixels'], reference=True" in repr(monitor)
    assert "RunningStats(count=2000" in repr(monitor.stats("x"))
