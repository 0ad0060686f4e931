"""Review (helper-81) of validation.py and drift.py; each test failed before its fix:
false positives on float32/float16 values at their bound and on string/bytes/datetime
dtypes, float8 tensors, a defaultdict sample mutated by the check, unshortened messages,
a ragged list in drift, and a Welford overflow that made ``report()`` crash."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import pytest
import torch

from asyncload.drift import DriftMonitor, RunningStats
from asyncload.validation import Array, Float, Int, Schema, SchemaError

EDGES = np.linspace(-5, 5, 21)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "value"),
    [
        (
            Array(dtype="float32", min=0.0, max=0.1),
            np.clip(np.linspace(-1, 1, 10), 0.0, 0.1).astype(np.float32),
        ),
        (Array(max=0.1), torch.linspace(-1, 1, 10).clamp(0.0, 0.1)),
        (Array(max=0.3), torch.tensor([0.3], dtype=torch.float16)),
        (Float(max=0.1), np.float32(0.1)),
        (Float(max=0.1), torch.tensor(0.1)),
    ],
    ids=["numpy-f32-clip", "torch-f32-clamp", "torch-f16", "Float-np-f32", "Float-0d-tensor"],
)
def test_a_float32_value_clipped_to_the_bound_is_valid(rule: Any, value: Any) -> None:
    """Data clipped to ``[0, 0.1]`` in float32 (``np.clip``/``torch.clamp``) holds
    float32(0.1); numpy and torch both say ``x <= 0.1`` for it. Expected: valid. Got:
    SchemaError "largest value 0.10000000149011612 is above max=0.1": the value is widened
    to a Python float and compared with the float64 bound, a false positive on every
    sample that reaches the clip."""
    assert bool((torch.as_tensor(value) <= rule.max).all())  # as numpy/torch compare
    rule(value)


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        (str, np.array(["cat", "dog"])),
        (np.str_, np.array(["cat", "dog"])),
        ("U", np.array(["cat", "dog"])),
        (bytes, np.array([b"ab", b"c"])),
        ("datetime64", np.array(["2020-01-01"], dtype="datetime64[ns]")),
    ],
    ids=["str", "np.str_", "U", "bytes", "datetime64"],
)
def test_a_generic_string_dtype_matches_string_arrays(spec: Any, value: np.ndarray) -> None:
    """``Array(dtype=str)`` (or ``np.str_``, ``"U"``, ``bytes``, ``"datetime64"``) is
    accepted when built but matches no array: it is compared by name, ``"str"`` against the
    array's ``"str96"``. Expected: a string array passes (or the setting is refused when
    built, as docs/validation.md promises for settings that fail on every sample). Got:
    "dtype str96 is not str" on every sample."""
    Array(dtype=spec)(value)


def test_float8_tensors_are_floating_and_checked_for_nan() -> None:
    """A float8 tensor is a floating tensor with NaN. Expected: ``dtype="floating"``
    matches it and ``Array()`` refuses its NaN. Got: "dtype float8_e4m3fn is not floating"
    (false positive) and the NaN passes ``Array()`` (a miss): float8 dtypes fall back to
    ``np.generic`` in ``_dtype_of``."""
    value = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    Array(dtype="floating")(torch.tensor([1.0]).to(torch.float8_e4m3fn))
    with pytest.raises(SchemaError) as info:
        Array()(value)
    assert info.value.rule == "nan"


def test_a_defaultdict_sample_is_not_mutated_and_its_missing_key_is_reported() -> None:
    """A sample that is a ``defaultdict`` missing a required key. Expected: SchemaError
    rule "required" for the key, and the sample left as it was. Got: ``value[key]``
    inserts the default (0) into the user's sample, and the report is a wrong
    "value 0 is below min=5"."""
    sample = collections.defaultdict(int, {"b": 1})
    with pytest.raises(SchemaError) as info:
        Schema({"a": Int(min=5), "b": Int()})(sample)
    assert "a" not in sample  # today: sample["a"] == 0 was added
    assert (info.value.field, info.value.rule) == ("a", "required")


def test_a_custom_check_error_message_is_shortened() -> None:
    """A custom predicate that raises with the value in its message (``assert ok, x``).
    Expected: the SchemaError message stays short, as every other message does
    (``_short``: "never dump a whole caption or array" into logs and error_log). Got: the
    whole exception text, ~25 kB here, in the message."""

    def positive(x: np.ndarray) -> bool:
        raise ValueError(repr(x.tolist()))

    with pytest.raises(SchemaError) as info:
        Array(custom=positive)(np.zeros(5000))
    assert info.value.rule == "custom:positive"
    assert len(str(info.value)) < 500


def test_a_huge_int_out_of_range_fails_as_a_schema_error() -> None:
    """``Int(max=9)`` given a 5000-digit int. Expected: SchemaError (rule "max") with a
    short message. Got: ValueError "Exceeds the limit (4300 digits) for integer string
    conversion" from ``repr`` in the message (and 400 digits dumped for 10**400)."""
    with pytest.raises(SchemaError) as info:
        Int(max=9)(10**5000)
    assert info.value.rule == "max"
    assert len(str(info.value)) < 500


# -- drift ---------------------------------------------------------------------------------


def test_drift_a_ragged_list_raises_type_error_naming_the_field() -> None:
    """A field holding a ragged list (per-image box lists). Expected (DriftMonitor docs):
    a value that is not numbers raises TypeError naming the field, like a str value. Got:
    numpy's bare ValueError "setting an array element with a sequence", no field name."""
    monitor = DriftMonitor(["boxes"], bins=EDGES)
    with pytest.raises(TypeError, match="'boxes'"):
        monitor.observe({"boxes": [[0.1, 0.2], [0.3]]})


def test_drift_scalar_stream_of_huge_values_keeps_a_sane_mean_and_report() -> None:
    """Scalars 1e308 then -1e308 (finite, so they enter the moments). Expected: mean 0.0
    as numpy's and as the array path gives, and ``report()`` works. Got: Welford's
    ``delta = x - mean`` overflows: mean -inf, var -inf (negative), and ``report()``
    raises ValueError "math domain error" from ``math.sqrt``."""
    stats = RunningStats(EDGES)
    stats.update(1e308)
    stats.update(-1e308)
    assert stats.mean == np.mean(np.array([1e308, -1e308])) == 0.0
    assert not stats.var < 0
    monitor = DriftMonitor(["x"], bins=EDGES)
    monitor.observe({"x": 1e308})
    monitor.observe({"x": -1e308})
    assert monitor.report()["x"]["count"] == 2
