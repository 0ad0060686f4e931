"""Corners of validation.py and drift.py (found by helper-45): non-numeric or complex
values refused before any field is updated, quantile(0), rules over string arrays and
wide unsigned tensors, async custom checks refused when a rule is built."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from asyncload.drift import DriftMonitor, RunningStats
from asyncload.validation import Array, Int, Schema, SchemaError

EDGES = np.linspace(-5, 5, 21)


# -- drift ---------------------------------------------------------------------------------


def test_drift_non_numeric_array_raises_and_updates_no_field() -> None:
    """api.md: ``observe`` with a non-numeric value "raises TypeError and changes nothing".
    A numpy array of strings in the second field must not leave the first field counted,
    and the error names the field (as it does for a ``str`` value)."""
    monitor = DriftMonitor(["a", "b"], bins=EDGES)
    with pytest.raises(TypeError) as info:
        monitor.observe({"a": 1.0, "b": np.array(["x", "y"])})
    assert monitor.report()["a"]["count"] == 0  # today: 1, field "a" was updated
    assert "'b'" in str(info.value)


def test_drift_complex_numpy_scalar_is_refused_like_complex_arrays() -> None:
    """A complex array (and a Python ``complex``) raises TypeError; a numpy complex scalar
    must not be silently recorded as its real part (only a ComplexWarning today)."""
    monitor = DriftMonitor(["x"], bins=EDGES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the ComplexWarning the bug emits)
        with pytest.raises(TypeError, match="field 'x'"):
            monitor.observe({"x": np.complex128(1 + 2j)})
    assert monitor.report()["x"]["count"] == 0


def test_running_stats_quantile_zero_is_not_below_the_data() -> None:
    """quantile(q) reads the histogram "linear within a bin": every value lies in
    [0.7, 0.8], so quantile(0) is 0.7 (as quantile(1e-9) is), not the first edge 0.0."""
    stats = RunningStats(np.linspace(0, 1, 11))
    stats.update(np.full(100, 0.75))
    assert stats.quantile(1e-9) == pytest.approx(0.7, abs=1e-6)
    assert stats.quantile(0.0) == pytest.approx(0.7)


# -- validation ----------------------------------------------------------------------------


def test_array_without_bounds_accepts_a_string_array() -> None:
    """``Array(shape=(None,))`` on a numpy array of strings: no NaN or inf can be in it and
    no range is asked, so it is valid; today the NaN scan crashes with numpy's
    UFuncTypeError (so ``is_valid`` raises, and a Loader fails or skips every sample)."""
    rule = Array(shape=(None,))
    tags = np.array(["cat", "dog"])
    assert rule(tags) is None
    assert rule.is_valid(tags)


def test_array_bounds_on_a_uint16_tensor() -> None:
    """16-bit images decode to torch.uint16 tensors; ``Array(max=...)`` must check them
    (SchemaError naming the rule), not crash with torch's NotImplementedError ("min_all"
    not implemented for 'UInt16')."""
    torch = pytest.importorskip("torch")
    rule = Array(max=4095)
    assert rule(torch.tensor([0, 4095], dtype=torch.uint16)) is None
    with pytest.raises(SchemaError) as info:
        rule(torch.tensor([0, 5000], dtype=torch.uint16))
    assert info.value.rule == "max"


def test_async_custom_predicate_is_refused_when_the_rule_is_built() -> None:
    """A rule is synchronous: an ``async def`` custom predicate returns a coroutine (truthy,
    never awaited), so today every value passes silently. Like any setting that cannot
    work, it must be refused at construction with a TypeError naming ``custom``."""

    async def positive(value: int) -> bool:
        return value > 0

    with pytest.raises(TypeError, match="custom"):
        Int(custom=positive)
    with pytest.raises(TypeError, match="custom"):
        Schema({"x": Int()}, custom={"positive": positive})


def test_array_bounds_on_strings_fail_naming_the_dtype() -> None:
    """With min/max asked, an array holding no numbers cannot satisfy them: a SchemaError
    (rule ``dtype``), not numpy's UFuncTypeError."""
    with pytest.raises(SchemaError) as info:
        Array(min=0)(np.array(["cat", "dog"]))
    assert info.value.rule == "dtype"
    assert not Array(max=1).is_valid(np.array([object()], dtype=object))


@pytest.mark.parametrize("name", ["uint32", "uint64"])
def test_array_bounds_on_wide_unsigned_tensors(name: str) -> None:
    torch = pytest.importorskip("torch")
    rule = Array(min=1, max=9)
    assert rule(torch.tensor([1, 9], dtype=getattr(torch, name))) is None
    with pytest.raises(SchemaError) as info:
        rule(torch.tensor([0, 9], dtype=getattr(torch, name)))
    assert info.value.rule == "min"
