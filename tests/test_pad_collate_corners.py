"""Corners of PadCollate (found by helper-60, following docs/batching.md): a pad_value the
arrays' dtype cannot hold, and arrays that differ past the first axis (or have none)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import asyncload as al


def test_pad_collate_pad_value_that_the_dtype_cannot_hold_is_not_silently_changed() -> None:
    """docs/batching.md: ``PadCollate(pad_value=...)`` pads with ``pad_value``. A NaN
    ``pad_value`` over integer arrays was cast with ``casting="unsafe"`` to
    -9223372036854775808 (and 0.5 to 0), silently: the padding is not what was asked for.
    Expected: the padded positions hold ``pad_value`` (a float result), or the call is
    refused naming ``pad_value``."""
    collate = al.PadCollate(pad_value=math.nan)
    try:
        padded, lengths = collate([np.arange(1, 2), np.arange(1, 3)])
    except (ValueError, TypeError) as exc:
        assert "pad_value" in str(exc)
        return
    assert lengths.tolist() == [1, 2]
    assert np.isnan(padded[0, 1]), padded

    collate = al.PadCollate(pad_value=0.5)
    try:
        padded, _ = collate([np.arange(1, 2), np.arange(1, 3)])
    except (ValueError, TypeError) as exc:
        assert "pad_value" in str(exc)
        return
    assert padded[0, 1] == 0.5, padded


def test_pad_collate_arrays_that_differ_past_the_first_axis_name_the_positions() -> None:
    """docs/batching.md: ``PadCollate`` pads along the first axis; samples whose other
    dimensions differ cannot be padded. The error was numpy's bare broadcast message
    ("could not broadcast input array from shape (2,4) into shape (2,3)"), naming neither
    the batch positions nor the collate, where ``default_collate`` names the positions and
    shapes of a batch that cannot be stacked. Expected: a ``ValueError`` that names the
    batch position(s) of the odd sample(s), as ``default_collate`` does."""
    with pytest.raises(ValueError, match="position"):
        al.PadCollate()([np.zeros((2, 3)), np.zeros((2, 4))])


def test_pad_collate_names_a_0d_sample_and_the_key() -> None:
    with pytest.raises(ValueError, match="0-d samples at batch position 1"):
        al.PadCollate()([np.zeros(2), np.float64(1.0)])
    with pytest.raises(ValueError, match="position 1") as caught:
        al.PadCollate()([{"x": np.zeros((2, 3))}, {"x": np.zeros((1, 4))}])
    if hasattr(caught.value, "__notes__"):
        assert "PadCollate: in key 'x'" in caught.value.__notes__


@pytest.mark.parametrize(
    ("rows", "pad", "dtype"),
    [
        (np.uint8, 0, np.uint8),
        (np.uint8, -1, np.int64),
        (np.float32, np.float64(0), np.float32),
        (np.float32, float("nan"), np.float32),
        (np.int64, 0.5, np.float64),
        (np.bool_, False, np.bool_),
        (np.bool_, 2, np.int64),
    ],
)
def test_pad_collate_keeps_the_rows_dtype_when_it_holds_the_pad_value(
    rows: Any, pad: Any, dtype: Any
) -> None:
    padded, _ = al.PadCollate(pad)([np.ones(2, dtype=rows), np.ones(1, dtype=rows)])
    assert padded.dtype == dtype
    assert np.array_equal(padded[1, 1:], np.array([pad], dtype=dtype), equal_nan=True)
