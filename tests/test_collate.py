"""The default collate_fn: numpy stacking, numbers, dicts/tuples/lists recursively, bytes
and strings into lists, torch tensors with torch; no torch needed for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

import asyncload as al

collate = al.default_collate


class Pair(NamedTuple):
    image: np.ndarray
    label: int


def test_numpy_arrays_are_stacked() -> None:
    samples = [np.full((2, 3), i, dtype=np.uint8) for i in range(4)]
    batch = collate(samples)
    assert isinstance(batch, np.ndarray)
    assert batch.shape == (4, 2, 3)
    assert batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[:, 0, 0], [0, 1, 2, 3])


def test_subclasses_are_stacked_as_their_base(tmp_path: Path) -> None:
    default_collate = al.default_collate
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(6.0).reshape(3, 2))
    rows = np.load(path, mmap_mode="r")
    batch = default_collate([rows[0], rows[2]])
    assert type(batch) is np.ndarray and batch.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    masked = default_collate([np.ma.masked_array([1, 2], mask=[0, 1])] * 2)
    assert isinstance(masked, np.ma.MaskedArray) and masked.mask.tolist() == [[0, 1], [0, 1]]
    parameters = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    stacked = default_collate(parameters)
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (3, 2)


def test_numbers_become_numpy_arrays() -> None:
    ints = collate([1, 2, 3])
    assert isinstance(ints, np.ndarray)
    np.testing.assert_array_equal(ints, [1, 2, 3])
    floats = collate([0.5, 1.5])
    assert isinstance(floats, np.ndarray) and floats.dtype.kind == "f"
    scalars = collate([np.float32(1), np.float32(2)])
    assert isinstance(scalars, np.ndarray) and scalars.dtype == np.float32
    assert collate([True, False]).tolist() == [True, False]


def test_bytes_and_strings_become_lists() -> None:
    assert collate([b"a", b"bc"]) == [b"a", b"bc"]
    assert collate(["x", "yz"]) == ["x", "yz"]


def test_dicts_are_collated_per_key() -> None:
    samples = [{"x": np.zeros(2) + i, "y": i, "name": f"n{i}", "raw": b"r"} for i in range(3)]
    batch = collate(samples)
    assert set(batch) == {"x", "y", "name", "raw"}
    assert batch["x"].shape == (3, 2)
    np.testing.assert_array_equal(batch["y"], [0, 1, 2])
    assert batch["name"] == ["n0", "n1", "n2"]
    assert batch["raw"] == [b"r"] * 3


def test_tuples_and_named_tuples() -> None:
    batch = collate([(np.ones(2), 1, "a"), (np.zeros(2), 2, "b")])
    assert isinstance(batch, tuple) and len(batch) == 3
    assert batch[0].shape == (2, 2)
    np.testing.assert_array_equal(batch[1], [1, 2])
    assert batch[2] == ["a", "b"]
    pairs = collate([Pair(np.ones(3), 0), Pair(np.ones(3), 1)])
    assert isinstance(pairs, Pair)
    assert pairs.image.shape == (2, 3)
    np.testing.assert_array_equal(pairs.label, [0, 1])


def test_lists_are_collated_column_wise() -> None:
    # As torch's default_collate: a batch of lists is a list of per-position batches.
    batch = collate([[1, b"a"], [2, b"b"], [3, b"c"]])
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_array_equal(batch[0], [1, 2, 3])
    assert batch[1] == [b"a", b"b", b"c"]


def test_nested() -> None:
    samples = [{"pair": (np.full(2, i), {"id": i})} for i in range(3)]
    batch = collate(samples)
    arrays, meta = batch["pair"]
    assert arrays.shape == (3, 2)
    np.testing.assert_array_equal(meta["id"], [0, 1, 2])


def test_torch_tensors_are_stacked_with_torch() -> None:
    batch = collate([torch.ones(2, 2) * i for i in range(3)])
    assert isinstance(batch, torch.Tensor)
    assert batch.shape == (3, 2, 2)
    assert batch[2, 0, 0].item() == 2
    mixed = collate([{"t": torch.zeros(1), "a": np.zeros(1)}] * 2)
    assert isinstance(mixed["t"], torch.Tensor) and isinstance(mixed["a"], np.ndarray)


def test_matches_torch_default_collate_shapes() -> None:
    """What a PyTorch user expects: the same structure as torch's default_collate."""
    from torch.utils.data import default_collate as torch_collate

    samples = [{"x": np.full(3, i, dtype=np.float32), "y": (i, f"s{i}")} for i in range(4)]
    ours, theirs = collate(samples), torch_collate(samples)
    assert set(ours) == set(theirs)
    assert tuple(ours["x"].shape) == tuple(theirs["x"].shape)
    np.testing.assert_array_equal(ours["x"], theirs["x"].numpy())
    np.testing.assert_array_equal(ours["y"][0], theirs["y"][0].numpy())
    assert list(ours["y"][1]) == list(theirs["y"][1])


def test_collate_needs_no_torch() -> None:
    code = (
        "import sys, numpy as np, asyncload as al\n"
        "batch = al.default_collate([{'x': np.zeros(2), 'y': 1, 'b': b'z'}] * 3)\n"
        "assert batch['x'].shape == (3, 2)\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_numpy_stacking_matches_np_stack() -> None:
    """The fast path gives np.stack's result: dtype promotion, shape, a fresh copy."""
    mixed = [np.arange(3, dtype=np.uint8), np.arange(3, dtype=np.int64)]
    for samples in (mixed, [np.float32(2) * np.ones((2, 2), np.float32)] * 3):
        batch, expected = collate(samples), np.stack(samples)
        assert batch.dtype == expected.dtype and batch.shape == expected.shape
        np.testing.assert_array_equal(batch, expected)
    source = [np.zeros(2), np.ones(2)]
    batch = collate(source)
    batch[0, 0] = 5
    assert source[0][0] == 0  # a copy, not a view of a sample


def test_numpy_arrays_of_different_shapes_name_the_shapes() -> None:
    samples = [np.zeros(2)] * 10 + [np.zeros(3)]
    with pytest.raises(ValueError) as info:
        collate(samples)
    assert str(info.value) == (
        "default_collate: samples differ in shape ((2,) at batch positions 0, 1, 2, 3, 4, 5, "
        "6, 7 and 2 more; (3,) at batch position 10): resize or crop them in a transform, or "
        "pad them with collate_fn=al.PadCollate()"
    )


def test_a_missing_key_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"position 2 has no key 'y' \(the first sample's keys: \['x', 'y'\]\)"
    ):
        collate([{"x": 1, "y": 2}, {"x": 1, "y": 2}, {"x": 3}])


def test_uneven_tuples_name_the_sample() -> None:
    with pytest.raises(ValueError, match="differ in length: 3 at batch position 1, 2 at 0"):
        collate([(1, 2), (1, 2, 3)])


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_an_error_inside_a_dict_names_the_keys() -> None:
    samples = [{"pair": {"image": np.zeros(2)}}, {"pair": {"image": np.zeros(3)}}]
    with pytest.raises(ValueError, match="differ in shape") as info:
        collate(samples)
    assert info.value.__notes__ == [
        "default_collate: in key 'image'",
        "default_collate: in key 'pair'",
    ]


def test_object_arrays_are_stacked_as_np_stack_does() -> None:
    samples = [np.array([[1, 2], [3]], dtype=object), np.array([[4], [5, 6]], dtype=object)]
    batch = collate(samples)
    assert batch.shape == (2, 2) and batch[1, 1] == [5, 6]


def test_tensors_of_different_shapes_name_the_positions() -> None:
    """As numpy arrays do: a ValueError naming shapes and positions, not torch's
    RuntimeError naming two entries."""
    samples = [torch.zeros(2), torch.zeros(3), torch.zeros(2)]
    with pytest.raises(ValueError) as info:
        collate(samples)
    assert str(info.value).startswith(
        "default_collate: samples differ in shape ((2,) at batch positions 0, 2; "
        "(3,) at batch position 1)"
    )
    assert info.value.__suppress_context__  # torch's RuntimeError it explains: noise
    # Other failures of torch.stack are torch's own (here: tensors on two devices).
    with pytest.raises(RuntimeError):
        collate([torch.zeros(2), torch.zeros(2, device="meta")])


def test_a_key_only_in_a_later_sample_is_named() -> None:
    """Dropped silently before; now the same error as a key missing from a later sample."""
    with pytest.raises(
        ValueError,
        match=r"position 2 has a key 'z' that the first sample has not "
        r"\(the first sample's keys: \['x', 'y'\]\)",
    ):
        collate([{"x": 1, "y": 2}, {"x": 1, "y": 2}, {"x": 3, "y": 4, "z": 5}])
    with pytest.raises(ValueError, match="position 1 has a key 'b'") as info:
        collate([{"m": {"a": 1}}, {"m": {"a": 1, "b": 2}}])
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == ["default_collate: in key 'm'"]
    # Same keys in another order are the same keys.
    batch = collate([{"x": 1, "y": 2}, {"y": 4, "x": 3}])
    assert batch["x"].tolist() == [1, 3] and batch["y"].tolist() == [2, 4]


def test_a_tensor_batch_refuses_other_kinds_by_position() -> None:
    samples = [torch.zeros(2), np.zeros(2), torch.zeros(2), np.zeros(2)]
    with pytest.raises(TypeError) as info:
        collate(samples)
    assert str(info.value) == (
        "default_collate: the sample at batch position 0 is Tensor, but the batch also holds "
        "ndarray at batch positions 1, 3: samples must be of one kind"
    )


def test_a_numpy_batch_converts_tensors_among_its_samples() -> None:
    """The first sample decides (documented): numpy first, a numpy batch, as np.stack
    gives; torch's default_collate converts the other way, to a tensor."""
    batch = collate([np.zeros(2, np.float32), torch.ones(2)])
    assert type(batch) is np.ndarray and batch.tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError, match=r"\(2,\) at batch position 0; \(3,\) at batch position 1"):
        collate([np.zeros(2), torch.ones(3)])


@pytest.mark.parametrize(
    ("samples", "message"),
    [
        ([1, None, 2, None], "is int, but the batch also holds NoneType at batch positions 1, 3"),
        ([None, 1.5, 2.5], "is NoneType, but the batch also holds float at batch positions 1, 2"),
        ([np.float32(1), "a"], "is float32, but the batch also holds str at batch position 1"),
        ([1, np.zeros(2)], "is int, but the batch also holds ndarray at batch position 1"),
        ([np.zeros(2), None], "is ndarray, but the batch also holds NoneType at batch position 1"),
        ([np.zeros(()), None], "is ndarray, but the batch also holds NoneType"),  # 0-d
        ([torch.zeros(2), None], "is Tensor, but the batch also holds NoneType"),
        ([{"x": 1}, None], "is dict, but the batch also holds NoneType at batch position 1"),
        ([None, {"x": 1}], "is NoneType, but the batch also holds dict at batch position 1"),
        ([{"x": 1}, [1]], "is dict, but the batch also holds list at batch position 1"),
        ([(1, 2), None], "is tuple, but the batch also holds NoneType at batch position 1"),
    ],
)
def test_a_sample_of_another_kind_is_named(samples: list[object], message: str) -> None:
    """A None (an on_error substitute) or another kind among numbers, arrays, tensors,
    dicts or tuples: a TypeError naming it, whatever its position, instead of an object
    array ([1, None, 2]), a list ([None, 1]) or a stray numpy or torch error."""
    with pytest.raises(TypeError) as info:
        collate(samples)
    assert message in str(info.value)
    assert ('on_error="skip"' in str(info.value)) == any(s is None for s in samples)


def test_what_stays_a_list_or_an_object_array() -> None:
    """Not refused: None among strings or bytes (an optional caption), all None, numbers
    numpy holds only as objects."""
    assert collate([None, "a"]) == [None, "a"]
    assert collate(["a", None]) == ["a", None]
    assert collate([None, None]) == [None, None]
    assert collate([None, object]) == [None, object]
    huge = collate([2**70, 1])
    assert huge.dtype == object and huge.tolist() == [2**70, 1]
    from decimal import Decimal

    assert collate([Decimal(1), 2]).tolist() == [Decimal(1), 2]


def test_collating_does_not_import_numpy_ma() -> None:
    """numpy imports ``numpy.ma`` on first use, which cost 26 ms of a first batch: plain
    batches must not touch it (a masked array exists only once it is imported)."""
    code = (
        "import sys, numpy as np, asyncload as al\n"
        "al.default_collate([b'a', b'b'])\n"
        "al.default_collate([1, 2])\n"
        "al.default_collate([{'x': np.zeros(2), 'y': 'a'}] * 2)\n"
        "class Sub(np.ndarray): pass\n"
        "al.default_collate([np.zeros(2).view(Sub)] * 2)\n"
        "assert 'numpy.ma' not in sys.modules, 'numpy.ma imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
