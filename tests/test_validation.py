"""Declarative schemas (asyncload.validation): every rule failing and passing on numpy
arrays, torch tensors and plain values; nested paths in messages; the three levels in
order; pickling; and a schema as a Loader's ``validate`` with ``on_error="skip"``."""

from __future__ import annotations

import pickle
import re
from typing import Any

import numpy as np
import pytest
import torch

import asyncload as al
from asyncload.validation import (
    Array,
    Bytes,
    Dict,
    Each,
    Float,
    Int,
    Rule,
    Schema,
    SchemaError,
    Str,
    Tuple,
    Value,
)


def failure(rule: Rule, sample: Any) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        rule(sample)
    assert not rule.is_valid(sample)
    return info.value


def passes(rule: Rule, sample: Any) -> None:
    assert rule(sample) is None
    assert rule.is_valid(sample)


def is_sorted(values: Any) -> bool:
    """A module-level predicate, so schemas that use it pickle."""
    return bool(np.all(np.diff(values) >= 0))


# (rule, a valid value, an invalid value, the rule keyword, a fragment of the message)
CASES = [
    (
        Array(dtype="uint8"),
        np.zeros(3, np.uint8),
        np.zeros(3, np.int16),
        "dtype",
        "int16 is not uint8",
    ),
    (Array(dtype=np.floating), np.zeros(3, np.float16), np.zeros(3, np.int32), "dtype", "floating"),
    (Array(dtype="integer"), np.zeros(3, np.uint16), np.zeros(3, np.float32), "dtype", "integer"),
    (
        Array(dtype=("uint8", "float32")),
        np.zeros(3, np.float32),
        np.zeros(3, np.float64),
        "dtype",
        "float32",
    ),
    (
        Array(shape=(3, None, None)),
        np.zeros((3, 4, 5)),
        np.zeros((4, 4, 5)),
        "shape",
        "(4, 4, 5) does not match (3, None, None)",
    ),
    (
        Array(shape=(3, 32, 32)),
        np.zeros((3, 32, 32)),
        np.zeros((3, 32, 31)),
        "shape",
        "(3, 32, 31) does not match (3, 32, 32)",
    ),
    (Array(shape=(None, None)), np.zeros((2, 2)), np.zeros((2, 2, 1)), "shape", "does not match"),
    (
        Array(shape=(..., 3)),
        np.zeros((2, 2, 2, 3)),
        np.zeros((2, 4)),
        "shape",
        "does not match (..., 3)",
    ),
    (Array(shape=(2, ...)), np.zeros(2), np.zeros((3, 2)), "shape", "does not match (2, ...)"),
    (
        Array(min=0.0),
        np.array([0.0, 1.0]),
        np.array([0.5, -0.5]),
        "min",
        "smallest value -0.5 is below min=0.0",
    ),
    (Array(max=9), np.array([0, 9]), np.array([3, 10]), "max", "largest value 10 is above max=9"),
    (Array(), np.array([1.0, 2.0]), np.array([1.0, np.nan]), "nan", "NaN"),
    (Array(), np.array([1.0, 2.0]), np.array([1.0, -np.inf]), "inf", "inf"),
    (
        Array(max_bytes=8),
        np.zeros(8, np.uint8),
        np.zeros(9, np.uint8),
        "max_bytes",
        "9 bytes is more than max_bytes=8",
    ),
    (
        Array(min_bytes=8),
        np.zeros(2, np.float32),
        np.zeros(1, np.float32),
        "min_bytes",
        "4 bytes is less than min_bytes=8",
    ),
    (Array(), np.zeros(2), [0.0, 0.0], "type", "expected a numpy array or torch tensor, got list"),
    (Int(min=0, max=9), 9, 10, "max", "value 10 is above max=9"),
    (Int(min=0), np.int64(0), -1, "min", "value -1 is below min=0"),
    (Int(), 3, 3.0, "type", "expected an int, got float"),
    (Int(), np.array(3), True, "type", "expected an int, got bool"),
    (Float(min=0.0, max=1.0), 1.0, 1.5, "max", "value 1.5 is above max=1.0"),
    (Float(min=0.0), np.float32(0.5), -0.1, "min", "below min=0.0"),
    (Float(), 2, float("nan"), "nan", "NaN"),
    (Float(), 2.0, float("inf"), "inf", "inf"),
    (Float(), 2.0, "2.0", "type", "expected a real number, got str"),
    (
        Str(pattern=r"[a-z]+"),
        "cat",
        "Cat",
        "pattern",
        "'Cat' does not fully match pattern '[a-z]+'",
    ),
    (Str(pattern=r"\d+"), "123", "123x", "pattern", "does not fully match"),
    (Str(max_bytes=4), "abcd", "abcde", "max_bytes", "5 bytes is more than max_bytes=4"),
    (Str(max_bytes=4), "éé", "ééé", "max_bytes", "6 bytes"),  # UTF-8: 2 bytes each
    (Str(min_bytes=1), "a", "", "min_bytes", "0 bytes is less than min_bytes=1"),
    (Str(), "text", b"text", "type", "expected a str, got bytes"),
    (Str(encoding="utf-8"), b"caf\xc3\xa9", b"caf\xe9", "decode", "do not decode as utf-8"),
    (Bytes(max_bytes=3), b"abc", b"abcd", "max_bytes", "4 bytes is more than max_bytes=3"),
    (Bytes(prefix=b"\x89PNG"), b"\x89PNG\r\n", b"GIF89a", "prefix", "does not start with prefix"),
    (Bytes(prefix=(b"GIF87a", b"GIF89a")), memoryview(b"GIF89a.."), b"GIF90a", "prefix", "prefix"),
    (Bytes(), bytearray(b"x"), "x", "type", "expected bytes, got str"),
    (Value(), 0, None, "required", "value is None"),
    (
        Value(custom=is_sorted),
        [1, 2, 3],
        [2, 1],
        "custom:is_sorted",
        "custom check 'is_sorted' failed",
    ),
    (Each(Int(), min_items=1), [1], [], "length", "0 items, fewer than min_items=1"),
    (Each(Int(), max_items=2), (1, 2), [1, 2, 3], "length", "3 items, more than max_items=2"),
    (Tuple(Int(), Int()), (1, 2), (1, 2, 3), "length", "3 items, expected 2"),
    (Dict({"a": Int()}), {"a": 1}, [("a", 1)], "type", "expected a dict, got list"),
    (
        Dict({"a": Int()}, allow_extra=False),
        {"a": 1},
        {"a": 1, "b": 2},
        "keys",
        "unexpected keys ['b']",
    ),
]


@pytest.mark.parametrize(("rule", "good", "bad", "keyword", "fragment"), CASES)
def test_each_rule_passes_and_fails_with_its_name(
    rule: Rule, good: Any, bad: Any, keyword: str, fragment: str
) -> None:
    passes(rule, good)
    error = failure(rule, bad)
    assert error.rule == keyword
    assert fragment in str(error)
    assert str(error).startswith("sample: ")  # the rule is the root: no field


@pytest.mark.parametrize(("rule", "good", "bad", "keyword", "fragment"), CASES)
def test_a_failing_field_is_named(
    rule: Rule, good: Any, bad: Any, keyword: str, fragment: str
) -> None:
    schema = Schema({"image": rule})
    passes(schema, {"image": good})
    error = failure(schema, {"image": bad})
    assert error.field == "image"
    assert error.rule == keyword
    assert str(error).startswith("field 'image': ")
    assert fragment in str(error)


def test_the_message_reads_as_in_the_docs() -> None:
    schema = Schema({"image": Array(shape=(3, 32, None))})
    error = failure(schema, {"image": np.zeros((3, 31, 32))})
    assert str(error) == "field 'image': shape (3, 31, 32) does not match (3, 32, None)"
    assert (error.field, error.rule, error.level) == ("image", "shape", "format")


# -- numpy arrays and torch tensors -------------------------------------------------------


@pytest.mark.parametrize("make", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
def test_arrays_and_tensors_alike(make: Any) -> None:
    def image(values: Any, dtype: Any = np.float32) -> Any:
        return make(np.asarray(values, dtype=dtype))

    rule = Array(dtype="float32", shape=(2, None), min=0.0, max=1.0)
    passes(rule, image([[0.0, 0.5], [1.0, 0.25]]))
    assert failure(rule, image([[0.0, 0.5]])).rule == "shape"
    assert failure(rule, image([[0, 1], [1, 0]], np.float64)).rule == "dtype"
    assert failure(rule, image([[0.0, 0.5], [1.5, 0.2]])).rule == "max"
    assert failure(rule, image([[0.0, -0.5], [1.0, 0.2]])).rule == "min"
    assert failure(rule, image([[0.0, np.nan], [1.0, 0.2]])).rule == "nan"
    assert failure(rule, image([[0.0, np.inf], [1.0, 0.2]])).rule == "inf"
    # NaN allowed: the range still applies to the other values.
    lenient = Array(min=0.0, max=1.0, allow_nan=True)
    passes(lenient, image([np.nan, 0.5]))
    passes(lenient, image([np.nan, np.nan]))
    assert failure(lenient, image([np.nan, 2.0])).rule == "max"
    # inf allowed, but outside a finite bound it still fails the bound.
    passes(Array(allow_inf=True), image([np.inf, -np.inf]))
    assert failure(Array(allow_inf=True, max=1.0), image([np.inf])).rule == "max"
    # Empty arrays have no values to be out of range.
    passes(rule, image(np.zeros((2, 0))))
    # Integer arrays: the range is checked, NaN/inf cannot occur.
    assert failure(Array(max=9), image([1, 12], np.int64)).rule == "max"
    passes(Array(dtype="uint8", min=0, max=255), image([0, 255], np.uint8))
    assert failure(Array(dtype="uint8", max=254), image([0, 255], np.uint8)).rule == "max"
    assert failure(Array(max_bytes=7), image([1.0, 2.0])).rule == "max_bytes"  # 8 bytes


def test_torch_dtypes() -> None:
    passes(Array(dtype=torch.float16), torch.zeros(2, dtype=torch.float16))
    passes(Array(dtype="float16"), torch.zeros(2, dtype=torch.float16))
    passes(Array(dtype="bfloat16", min=0.0), torch.zeros(2, dtype=torch.bfloat16))
    passes(Array(dtype=np.floating, max=0.0), torch.zeros(2, dtype=torch.bfloat16))
    error = failure(Array(dtype="bfloat16"), torch.zeros(2))
    assert str(error) == "sample: dtype float32 is not bfloat16"
    passes(Array(dtype=bool, max=1), torch.ones(2, dtype=torch.bool))
    passes(Array(dtype="unsignedinteger", max=255), torch.zeros(2, dtype=torch.uint8))
    passes(Int(max=9), torch.tensor(3))
    assert failure(Int(max=9), torch.tensor(12)).rule == "max"
    assert failure(Int(), torch.tensor([3])).rule == "type"  # not 0-d
    passes(Float(max=1.0), torch.tensor(0.5))
    assert failure(Float(), torch.tensor(float("nan"))).rule == "nan"


def test_complex_arrays() -> None:
    passes(Array(dtype="complexfloating"), np.array([1 + 2j]))
    assert failure(Array(), np.array([complex("nan")])).rule == "nan"
    assert failure(Array(max=1), np.array([1j])).rule == "max"


def test_numpy_scalars_are_zero_d_arrays() -> None:
    passes(Array(dtype="float32", shape=(), max=1.0), np.float32(0.5))
    assert failure(Array(max=1.0), np.float32(2.0)).rule == "max"
    assert failure(Array(), np.float64("nan")).rule == "nan"


# -- containers and paths -----------------------------------------------------------------


def test_nested_paths_name_the_field() -> None:
    schema = Schema(
        {
            "image": Array(dtype="uint8", shape=(None, None, 3)),
            "meta": {"size": (Int(min=1), Int(min=1)), "tags": Each(Str(pattern=r"\w+"))},
            "boxes": Each(Dict({"x": Float(min=0.0), "label": Int(max=9)}), max_items=10),
        }
    )
    good = {
        "image": np.zeros((4, 4, 3), np.uint8),
        "meta": {"size": (4, 4), "tags": ["cat", "indoor"]},
        "boxes": [{"x": 0.5, "label": 1}, {"x": 0.1, "label": 2}],
    }
    passes(schema, good)

    def error(**change: Any) -> SchemaError:
        sample = {**good, **change}
        return failure(schema, sample)

    e = error(meta={"size": (4, 0), "tags": []})
    assert (e.field, e.rule) == ("meta.size[1]", "min")
    assert str(e) == "field 'meta.size[1]': value 0 is below min=1"
    e = error(meta={"size": (4, 4), "tags": ["ok", "not ok"]})
    assert (e.field, e.rule) == ("meta.tags[1]", "pattern")
    e = error(boxes=[{"x": 0.5, "label": 1}, {"x": 0.5, "label": 10}])
    assert (e.field, e.rule) == ("boxes[1].label", "max")
    e = error(boxes=[{"x": 0.5}])
    assert (e.field, e.rule, e.level) == ("boxes[0].label", "required", "existence")
    e = error(meta={"size": (4, 4)})
    assert str(e) == "field 'meta.tags': required key is missing"


def test_a_tuple_sample() -> None:
    schema = Schema((Array(dtype=np.floating, shape=(3, None, None)), Int(min=0, max=9)))
    passes(schema, (np.zeros((3, 2, 2), np.float32), 4))
    passes(schema, [torch.zeros(3, 2, 2), torch.tensor(4)])
    e = failure(schema, (np.zeros((3, 2, 2), np.float32), 11))
    assert str(e) == "field '[1]': value 11 is above max=9"
    assert failure(schema, (np.zeros((3, 2, 2)),)).rule == "length"


def test_optional_fields() -> None:
    schema = Schema({"label": Int(), "caption": Str(max_bytes=3, optional=True)})
    passes(schema, {"label": 1})
    passes(schema, {"label": 1, "caption": None})
    passes(schema, {"label": 1, "caption": "abc"})
    assert failure(schema, {"label": 1, "caption": "abcd"}).rule == "max_bytes"
    e = failure(schema, {"label": None})
    assert (e.field, e.rule, e.level) == ("label", "required", "existence")


def test_integer_dict_keys_and_non_dict_mappings() -> None:
    from types import MappingProxyType

    schema = Schema({0: Int(), "b": Int()})
    passes(schema, MappingProxyType({0: 1, "b": 2}))
    assert failure(schema, {0: "x", "b": 2}).field == "[0]"


# -- levels -------------------------------------------------------------------------------


def test_levels_run_in_order_over_the_whole_sample() -> None:
    schema = Schema({"a": Int(max=0), "b": Array(dtype="uint8"), "c": Int()})
    # a: content failure, b: format failure, c: existence failure: c is reported.
    sample = {"a": 5, "b": np.zeros(2, np.int8), "c": None}
    e = failure(schema, sample)
    assert (e.field, e.level) == ("c", "existence")
    # Without c's problem, b's format failure comes before a's content failure.
    e = failure(schema, {**sample, "c": 1})
    assert (e.field, e.level) == ("b", "format")
    e = failure(schema, {**sample, "c": 1, "b": np.zeros(2, np.uint8)})
    assert (e.field, e.level) == ("a", "content")


def test_content_checks_never_see_malformed_values() -> None:
    seen: list[Any] = []

    def record(value: Any) -> bool:
        seen.append(value)
        return True

    schema = Schema({"a": Value(custom=record), "b": Int()})
    failure(schema, {"a": 1, "b": "not an int"})
    assert seen == []
    schema({"a": 1, "b": 2})
    assert seen == [1]


def test_undecodable_bytes_fail_before_format() -> None:
    schema = Schema({"n": Int(), "txt": Str(encoding="utf-8", pattern="[a-z]+")})
    e = failure(schema, {"n": "wrong type", "txt": b"\xff"})
    assert (e.field, e.rule, e.level) == ("txt", "decode", "existence")
    passes(schema, {"n": 1, "txt": b"abc"})
    assert failure(schema, {"n": 1, "txt": b"ABC"}).rule == "pattern"


# -- custom predicates --------------------------------------------------------------------


def test_custom_predicates() -> None:
    def raises(value: Any) -> None:
        raise ValueError("bad checksum")

    schema = Schema(
        {"boxes": Array(custom={"non-empty": lambda a: a.size > 0}), "labels": Array()},
        custom={"same length": lambda s: len(s["boxes"]) == len(s["labels"])},
    )
    passes(schema, {"boxes": np.zeros(2), "labels": np.zeros(2)})
    e = failure(schema, {"boxes": np.zeros(0), "labels": np.zeros(0)})
    assert str(e) == "field 'boxes': custom check 'non-empty' failed"
    assert e.rule == "custom:non-empty"
    e = failure(schema, {"boxes": np.zeros(2), "labels": np.zeros(3)})
    assert str(e) == "sample: custom check 'same length' failed"
    e = failure(Value(custom=raises), 1)
    assert str(e) == "sample: custom check 'raises' raised ValueError: bad checksum"
    # None passes (a predicate that raises for bad values); numpy's False fails.
    passes(Value(custom=lambda v: None), 1)
    assert failure(Value(custom=lambda v: np.False_), 1).rule == "custom:<lambda>"


# -- construction, pickling, the error type -----------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Array(shape=(3, -1)), ValueError, "shape entries"),
        (lambda: Array(shape=(..., 3, ...)), ValueError, "at most one"),
        (lambda: Array(dtype="floaty"), TypeError, "neither a dtype nor a kind"),
        (lambda: Array(min=2, max=1), ValueError, "larger than"),
        (lambda: Array(min=float("nan")), ValueError, "NaN"),
        (lambda: Int(min="0"), TypeError, "min must be a number"),  # type: ignore[arg-type]
        (lambda: Str(max_bytes=-1), ValueError, "max_bytes"),
        (lambda: Str(min_bytes=3, max_bytes=2), ValueError, "larger than"),
        (lambda: Str(encoding="no-such-codec"), ValueError, "encoding 'no-such-codec'"),
        (lambda: Bytes(prefix="PNG"), TypeError, "prefix"),  # type: ignore[arg-type]
        (lambda: Value(custom=3), TypeError, "custom"),  # type: ignore[arg-type]
        (lambda: Schema([Int()]), TypeError, "a schema entry"),  # type: ignore[arg-type]
        (lambda: Dict([Int()]), TypeError, "fields must be a dict"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_fail_at_construction(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        # Ranges: a rule that no value could pass.
        (lambda: Int(min=5, max=1), ValueError, "min=5 is larger than max=1"),
        (lambda: Float(min=1.0, max=0.5), ValueError, "min=1.0 is larger than max=0.5"),
        (lambda: Array(min_bytes=4, max_bytes=np.int64(2)), ValueError, "min_bytes=4 is larger"),
        (lambda: Each(Int(), min_items=3, max_items=1), ValueError, "min_items=3 is larger"),
        (lambda: Each(Int(), max_items=-1), ValueError, "max_items must be a non-negative"),
        (lambda: Each(Int(), min_items="3"), TypeError, "min_items must be"),  # type: ignore[arg-type]
        (lambda: Str(max_bytes="3"), TypeError, "max_bytes must be"),  # type: ignore[arg-type]
        # Shapes: a tuple or list of ints, None and one ...
        (lambda: Array(shape=3), TypeError, "shape must be a tuple or list"),  # type: ignore[arg-type]
        (lambda: Array(shape="ab"), TypeError, "shape must be a tuple or list"),
        (lambda: Array(shape=(2.0,)), TypeError, "shape entries must be ints"),
        # dtypes: nothing that matches no array, nothing numpy reads as another dtype.
        (lambda: Array(dtype=()), ValueError, "dtype: () is empty"),
        (lambda: Array(dtype=("uint8", None)), TypeError, "dtype: None inside"),
        (lambda: Array(dtype="i4,,"), TypeError, "dtype: 'i4,,' is neither"),
        (lambda: Array(dtype="torch.floaty"), TypeError, "dtype: 'torch.floaty' is neither"),
        # Regexes and codecs: ValueError naming the argument, not re.error or LookupError.
        (lambda: Str(pattern="("), ValueError, "pattern '(' is not a regular expression: missing"),
        (lambda: Str(pattern=3), TypeError, "pattern must be a str"),  # type: ignore[arg-type]
        (lambda: Str(pattern=re.compile(b"x")), TypeError, "pattern must match text"),  # type: ignore[arg-type]
        (lambda: Str(encoding="base64"), ValueError, "encoding 'base64': 'base64' is not a text"),
        (lambda: Str(encoding=""), ValueError, "encoding '': unknown encoding"),
        (lambda: Str(encoding=5), TypeError, "encoding must be a str"),  # type: ignore[arg-type]
        # Prefixes: bytes only (a str in a tuple failed on every sample), never none at all.
        (lambda: Bytes(prefix=(b"a", "b")), TypeError, "prefix must be bytes"),  # type: ignore[arg-type]
        (lambda: Bytes(prefix=()), ValueError, "prefix=() is empty"),
        # Flags.
        (lambda: Value(optional="yes"), TypeError, "optional must be True or False"),  # type: ignore[arg-type]
        (lambda: Dict({}, allow_extra=None), TypeError, "allow_extra must be"),  # type: ignore[arg-type]
        (lambda: Float(allow_nan=1), TypeError, "allow_nan must be"),  # type: ignore[arg-type]
        (lambda: Array(allow_inf="no"), TypeError, "allow_inf must be"),  # type: ignore[arg-type]
    ],
)
def test_every_bad_setting_names_its_argument(make: Any, error: type, message: str) -> None:
    """api.md: a bad setting raises ValueError or TypeError at construction, naming the
    argument (not later, once per sample; not as re.error or LookupError)."""
    with pytest.raises(error) as info:
        make()
    assert type(info.value) is error
    assert str(info.value).startswith(message)


def test_construction_errors_keep_their_cause() -> None:
    with pytest.raises(ValueError) as info:
        Str(pattern="a(")
    assert isinstance(info.value.__cause__, re.error)
    with pytest.raises(ValueError) as codec:
        Str(encoding="no-such-codec")
    assert isinstance(codec.value.__cause__, LookupError)


def test_settings_of_other_spellings_are_accepted() -> None:
    """What the stricter checks must not refuse: numpy ints, torch.Size, lists, torch
    dtypes numpy lacks, compiled patterns, an empty range of one value."""
    rule = Array(shape=(np.int64(2), None), max_bytes=np.int64(64))
    assert repr(rule) == "Array(shape=(2, None), max_bytes=64)"
    passes(rule, np.zeros((2, 5), np.uint8))
    passes(Array(shape=torch.Size([2, 3])), np.zeros((2, 3)))
    passes(Array(shape=[2, ...]), np.zeros((2, 3, 4)))
    passes(Array(dtype=(torch.complex32, "torch.bfloat16", "torch.half")), torch.zeros(1).half())
    passes(Str(pattern=re.compile("[a-z]+")), "abc")
    passes(Int(min=3, max=3), 3)
    passes(Each(Int(), min_items=1, max_items=1), [1])
    passes(Value(optional=np.True_), None)  # type: ignore[arg-type]


def test_text_that_does_not_encode_fails_the_rule() -> None:
    """A str is sized in ``encoding``: one it cannot hold is a schema failure, not a
    UnicodeEncodeError out of the check."""
    e = failure(Schema({"t": Str(encoding="ascii", max_bytes=10)}), {"t": "café"})
    assert (e.field, e.rule, e.level) == ("t", "encode", "format")
    assert str(e) == "field 't': text does not encode as ascii: ordinal not in range(128)"
    assert failure(Str(max_bytes=10), "\ud800").rule == "encode"  # a lone surrogate
    passes(Str(encoding="ascii", max_bytes=10), "cafe")


def test_schemas_pickle() -> None:
    schema = Schema(
        {
            "image": Array(dtype=("uint8", np.floating), shape=(..., 3), min=0, max=255),
            "values": Array(custom=is_sorted),
            "caption": Str(pattern=r"[a-z ]+", max_bytes=100, encoding="utf-8"),
            "raw": Bytes(prefix=b"\x89PNG", optional=True),
            "pair": (Int(), Float(allow_nan=True)),
            "list": Each(Int(min=0)),
        }
    )
    copy = pickle.loads(pickle.dumps(schema))
    good = {
        "image": np.zeros((2, 3), np.uint8),
        "values": np.arange(3),
        "caption": b"a cat",
        "pair": (1, float("nan")),
        "list": [0, 1],
    }
    passes(copy, good)
    assert failure(copy, {**good, "values": np.array([2, 1])}).rule == "custom:is_sorted"
    assert failure(copy, {**good, "image": np.zeros((2, 4), np.uint8)}).rule == "shape"
    assert repr(copy) == repr(schema)


def test_schema_error_is_a_validation_error_and_pickles() -> None:
    error = failure(Schema({"label": Int(max=9)}), {"label": 10})
    assert isinstance(error, al.ValidationError)
    assert isinstance(error, al.AsyncloadError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.field, copy.rule, copy.level) == (
        str(error),
        "label",
        "max",
        "content",
    )


def test_repr_shows_the_rules() -> None:
    schema = Schema({"image": Array(dtype="uint8", shape=(None, 3)), "label": Int(min=0)})
    assert repr(schema) == (
        "Schema(Dict({'image': Array(dtype='uint8', shape=(None, 3)), 'label': Int(min=0)}))"
    )


def test_long_values_are_shortened_in_messages() -> None:
    error = failure(Str(pattern=r"\d+"), "x" * 10_000)
    assert len(str(error)) < 120


# -- through the Loader -------------------------------------------------------------------


def test_loader_skips_and_counts_invalid_samples() -> None:
    schema = Schema(
        {
            "image": Array(dtype="uint8", shape=(2, 2, 3)),
            "label": Int(min=0, max=9),
        }
    )
    samples = [{"image": np.full((2, 2, 3), i, np.uint8), "label": i % 10} for i in range(12)]
    samples[3]["label"] = 42  # max
    samples[5]["image"] = np.zeros((2, 3, 3), np.uint8)  # shape
    samples[8] = {"image": samples[8]["image"]}  # required
    loader = al.Loader(al.from_sequence(samples), batch_size=None, validate=schema, on_error="skip")
    labels = [int(sample["label"]) for sample in loader]
    assert labels == [0, 1, 2, 4, 6, 7, 9, 0, 1]
    stats = loader.statistics()
    assert stats["skipped"] == 3
    assert stats["errors"] == 3
    log = {entry["index"]: entry["error"] for entry in stats["error_log"]}
    assert set(log) == {3, 5, 8}
    assert "field 'label': value 42 is above max=9" in log[3]
    assert "field 'image': shape (2, 3, 3) does not match (2, 2, 3)" in log[5]
    assert "field 'label': required key is missing" in log[8]


def test_loader_raises_a_sample_error_caused_by_the_schema_error() -> None:
    schema = Schema((Int(max=2),))
    loader = al.Loader(al.from_sequence([(0,), (1,), (3,)]), batch_size=None, validate=schema)
    with pytest.raises(al.SampleError) as info:
        list(loader)
    assert info.value.index == 2
    assert isinstance(info.value.__cause__, SchemaError)
    assert info.value.__cause__.rule == "max"
