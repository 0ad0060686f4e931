"""Turn a list of samples into a batch."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["add_note", "default_collate"]


def default_collate(samples: Sequence[Any]) -> Any:
    """Stack ``samples`` into one batch.

    numpy arrays are stacked into a numpy array, numbers into a numpy array, torch tensors
    with ``torch.stack``; dicts, tuples (named ones too) and lists are collated field by
    field; bytes, strings and anything else are returned as a list. Subclasses (``np.memmap``,
    ``torch.nn.Parameter``) are stacked as their base class. torch is never imported here.

    The first sample decides: a batch that starts with a numpy array is a numpy array (a
    tensor among them is converted, as ``np.stack`` does). Raises ``ValueError`` naming
    the batch positions when arrays or tensors differ in shape, dicts differ in keys, or
    tuples or lists differ in length; ``TypeError`` naming the positions and types when a
    sample is of another kind than the first (an array among tensors, a string among
    numbers, a list among dicts, ...; ``None`` among any of those, as an ``on_error``
    substitute can be, and any of those among ``None``). An error inside a dict gets a
    note naming the key.
    """
    first = samples[0]
    kind = type(first)
    if kind is np.ndarray:
        if first.dtype.kind != "O":  # (object arrays: np.array would look inside them)
            try:
                # One C call: 2-3x faster than np.stack, which wraps each array first
                # (12 against 5 µs for 32 arrays of 1 KiB), and the same result.
                batch = np.array(samples)
            except ValueError:
                _raise(_kinds_error(samples, _array_types()) or _shapes_error(samples))
            else:
                kind_of = batch.dtype.kind
                if kind_of != "O" and (kind_of not in "SU" or first.dtype.kind in "SU"):
                    return batch
                # An object batch from arrays that are not (a None or another object got
                # in), or a text one from numbers (a string got in).
                _raise(_kinds_error(samples, _array_types()))
        return np.stack(samples)
    # torch only when it is imported: samples cannot be tensors otherwise (subclasses such
    # as Parameter included).
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(first, torch.Tensor):
        try:
            return torch.stack(list(samples))
        except (RuntimeError, TypeError):
            # torch names neither the positions nor, for a wrong type, the whole batch.
            _raise(_kinds_error(samples, torch.Tensor) or _shapes_error(samples))
            raise
    if isinstance(first, np.ndarray):
        # numpy imports numpy.ma on first use (26 ms, once: most of a first batch's CPU);
        # a masked array exists only once it is imported.
        ma = sys.modules.get("numpy.ma")
        if ma is not None and isinstance(first, ma.MaskedArray):
            try:
                return ma.stack(samples)  # masks kept
            except ValueError:
                _raise(_kinds_error(samples, _array_types()) or _shapes_error(samples))
                raise
        # Another subclass (np.memmap): plain arrays, collated (and checked) as such.
        return default_collate([np.asarray(s) if isinstance(s, np.ndarray) else s for s in samples])
    if isinstance(first, (str, bytes, bytearray, memoryview)):
        # As a string among numbers fails below, so does a number among strings (None,
        # an on_error substitute, may stand for a text).
        _raise(_kinds_error(samples, (*_TEXT, bytearray, memoryview, type(None))))
        return list(samples)
    if isinstance(first, (numbers.Number, np.generic)):
        try:
            batch = np.asarray(samples)
        except (ValueError, TypeError):
            _raise(_kinds_error(samples, _NUMBERS, _TEXT))
            raise
        # Numbers give a numeric array; an object or string one means a None or a string
        # got in (or ints beyond int64, or Decimals: numbers, kept as an object array).
        if batch.dtype.kind in "OSU":
            _raise(_kinds_error(samples, _NUMBERS, _TEXT))
        return batch
    if isinstance(first, Mapping):
        return _collate_dicts(samples, first)
    if isinstance(first, (tuple, list)):
        try:
            for i, s in enumerate(samples):
                if not isinstance(s, (tuple, list)):  # (a string of the right length too)
                    _raise(_kinds_error(samples, (tuple, list)))
                if len(s) != len(first):
                    raise ValueError(
                        f"default_collate: the samples' tuples or lists differ in length: "
                        f"{len(s)} at batch position {i}, {len(first)} at 0"
                    )
        except TypeError:  # len() of a sample that is no sequence
            _raise(_kinds_error(samples, (tuple, list)))
            raise
    if isinstance(first, tuple):
        fields = [default_collate(list(column)) for column in zip(*samples, strict=True)]
        return kind(*fields) if hasattr(first, "_fields") else tuple(fields)
    if isinstance(first, list):
        return [default_collate(list(column)) for column in zip(*samples, strict=True)]
    if first is None:
        # As a None among numbers fails above, so does a number among Nones: the batch's
        # fate must not depend on which sample happens to come first.
        _raise(_kinds_error(samples, object, (*_array_types(), *_NUMBERS, Mapping, tuple, list)))
    return list(samples)


_NUMBERS = (numbers.Number, np.generic)
_TEXT = (str, bytes)  # np.str_ and np.bytes_ are numpy scalars too


def _array_types() -> tuple[type, ...]:
    torch = sys.modules.get("torch")
    return (np.ndarray,) if torch is None else (np.ndarray, torch.Tensor)


def _collate_dicts(samples: Sequence[Any], first: Mapping[Any, Any]) -> dict[Any, Any]:
    # Plain dicts: every sample has the first's keys (else KeyError below), so equal sizes
    # mean equal key sets: one C-level pass instead of a key-set comparison per sample.
    # Other mappings may answer a missing key (Counter, defaultdict): compared in full.
    try:
        uneven = sum(map(len, samples)) != len(first) * len(samples)
    except TypeError:  # a sample without len(): not a dict
        uneven = True
    if uneven or not all(type(s) is dict for s in samples):
        _raise(_dicts_error(samples, first))
    batch = {}
    for key in first:
        try:
            column = [s[key] for s in samples]
        except (KeyError, TypeError, IndexError):
            _raise(_dicts_error(samples, first))
            raise
        try:
            batch[key] = default_collate(column)
        except Exception as exc:
            add_note(exc, f"default_collate: in key {key!r}")
            raise
    return batch


# The diagnoses below run only once a batch has failed (or come out as objects): they
# return the error that names the positions, or None when they find nothing to name.


def _raise(error: Exception | None) -> None:
    if error is not None:
        raise error from None  # the numpy or torch error it explains adds only noise


def _dicts_error(samples: Sequence[Any], first: Mapping[Any, Any]) -> Exception | None:
    """``TypeError`` for a sample that is no mapping, ``ValueError`` for the first one
    whose keys differ from the first sample's."""
    error = _kinds_error(samples, Mapping)
    if error is not None:
        return error
    for i, s in enumerate(samples):
        missing = next((key for key in first if key not in s), _NONE)
        if missing is not _NONE:
            return ValueError(
                f"default_collate: the sample at batch position {i} has no key {missing!r} "
                f"(the first sample's keys: {list(first)})"
            )
        extra = next((key for key in s if key not in first), _NONE)
        if extra is not _NONE:
            return ValueError(
                f"default_collate: the sample at batch position {i} has a key {extra!r} "
                f"that the first sample has not (the first sample's keys: {list(first)})"
            )
    return None


_NONE = object()


def _kinds_error(
    samples: Sequence[Any],
    accepted: type | tuple[type, ...],
    refused: type | tuple[type, ...] = (),
) -> TypeError | None:
    """``TypeError`` naming the types and positions of the samples that are not
    ``accepted`` (or are ``refused``), unlike the first."""
    odd: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        if not isinstance(s, accepted) or isinstance(s, refused):
            odd.setdefault(type(s).__qualname__, []).append(i)
    if odd:
        found = "; ".join(f"{name} at batch {_positions(at)}" for name, at in odd.items())
        hint = (
            ' (an on_error substitute? return a sample like the others, or use on_error="skip")'
            if "NoneType" in odd or samples[0] is None
            else ""
        )
        return TypeError(
            f"default_collate: the sample at batch position 0 is {type(samples[0]).__qualname__}"
            f", but the batch also holds {found}: samples must be of one kind{hint}"
        )
    return None


def _shapes_error(arrays: Sequence[Any]) -> ValueError | None:
    """``ValueError`` naming the shapes and positions when ``arrays`` differ in shape."""
    at: dict[tuple[int, ...], list[int]] = {}
    for i, array in enumerate(arrays):
        at.setdefault(tuple(np.shape(array)), []).append(i)  # (torch.Size reprs as such)
    if len(at) > 1:
        shapes = "; ".join(f"{shape} at batch {_positions(i)}" for shape, i in at.items())
        return ValueError(
            f"default_collate: samples differ in shape ({shapes}): resize or crop them in a "
            "transform, or pad them with collate_fn=al.PadCollate()"
        )
    return None


def _positions(positions: list[int], most: int = 8) -> str:
    if len(positions) == 1:
        return f"position {positions[0]}"
    shown = ", ".join(map(str, positions[:most]))
    more = f" and {len(positions) - most} more" if len(positions) > most else ""
    return f"positions {shown}{more}"


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` where Python has it (3.11+): shown under the traceback."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
