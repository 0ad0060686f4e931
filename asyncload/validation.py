"""Declarative sample schemas, usable directly as ``Loader(validate=schema)``.

A schema is a tree of rules. Calling it on a sample returns ``None`` when the sample is
valid and raises :class:`SchemaError` (an ``al.ValidationError``) naming the field and the
rule that failed when it is not::

    schema = Schema({
        "image": Array(dtype="uint8", shape=(None, None, 3)),
        "label": Int(min=0, max=9),
        "caption": Str(pattern=r"[ -~]*", max_bytes=1000, optional=True),
    })
    schema({"image": img, "label": 12})
    # SchemaError: field 'label': value 12 is above max=9

Checks run in three levels, each over the whole sample before the next one starts, and
the first failure is reported:

1. **existence** -- the value is there (not ``None``, dict keys present) and readable
   (bytes decode as text where a :class:`Str` asks for an ``encoding``);
2. **format** -- type, dtype, shape, dict keys, sequence length, byte size, byte prefix;
3. **content** -- value range, NaN/inf, regex, then the ``custom`` predicates.

So a cheap structural problem anywhere is reported before any expensive scan of array
values starts, and a custom predicate only ever sees well-formed values.

Shapes use ``None`` as the wildcard for one dimension (``(None, 224, 224)``) and at most
one ``...`` for any number of dimensions (``(..., 3)``), as Keras/TF and numpy indexing
spell them.

Arrays are numpy arrays (and numpy scalars) or torch tensors; torch is never imported
here: a tensor is recognised through ``sys.modules`` once the caller has imported torch.

Schemas are plain objects and pickle (for ``torch.utils.data.DataLoader`` workers) as
long as their ``custom`` predicates do: use module-level functions there, not lambdas.
"""

from __future__ import annotations

import codecs
import math
import re
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import lru_cache
from typing import Any, Final, NamedTuple, TypeAlias

import numpy as np

from ._callables import is_async_callable
from .errors import ValidationError

__all__ = [
    "Array",
    "Bytes",
    "Dict",
    "Each",
    "Float",
    "Int",
    "Rule",
    "Schema",
    "SchemaError",
    "Str",
    "Tuple",
    "Value",
]

EXISTENCE: Final = 0
FORMAT: Final = 1
CONTENT: Final = 2
_LEVELS: Final = ("existence", "format", "content")

# ``custom=``: one predicate (named by its __name__) or a {name: predicate} dict.
Custom: TypeAlias = Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None


class SchemaError(ValidationError):
    """A sample broke a schema rule.

    ``field`` is the path to the value (``"image"``, ``"meta.size"``, ``"[1]"``; ``None``
    for the sample itself), ``rule`` the rule's keyword (``"dtype"``, ``"shape"``, ``"min"``,
    ``"max"``, ``"nan"``, ``"inf"``, ``"pattern"``, ``"min_bytes"``, ``"max_bytes"``,
    ``"prefix"``, ``"required"``, ``"type"``, ``"keys"``, ``"length"``, ``"decode"``,
    ``"encode"``, ``"custom:<name>"``) and ``level`` one of ``"existence"``, ``"format"``,
    ``"content"``.
    """

    def __init__(
        self, message: str, field: str | None = None, rule: str = "", level: str = ""
    ) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.level = level

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.field, self.rule, self.level))


class _Failure:
    """A failed rule on the way up the tree; the path is collected only on failure, so a
    valid sample builds no path strings."""

    __slots__ = ("detail", "level", "path", "rule")

    def __init__(self, level: int, rule: str, detail: str) -> None:
        self.level = level
        self.rule = rule
        self.detail = detail
        self.path: list[Hashable] = []

    def at(self, key: Hashable) -> _Failure:
        self.path.append(key)
        return self

    def error(self) -> SchemaError:
        field = _render_path(reversed(self.path)) if self.path else None
        where = f"field {field!r}" if field is not None else "sample"
        return SchemaError(f"{where}: {self.detail}", field, self.rule, _LEVELS[self.level])


def _render_path(keys: Any) -> str:
    out = ""
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
    return out


def _short(value: Any, limit: int = 50) -> str:
    # Messages end up in logs and error_log: never dump a whole caption or array there.
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__} of {value.bit_length()} bits>"
    return _clip(text, limit)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: object) -> str:
    return type(value).__name__


class Rule:
    """Base of every schema rule. ``rule(sample)`` returns ``None`` or raises
    :class:`SchemaError`; :meth:`is_valid` answers ``True``/``False`` instead.

    ``optional=True``: the value may be ``None`` and, inside a :class:`Dict`, the key may be
    missing; its other rules apply only when a value is there. ``custom``: a predicate, or a
    ``{name: predicate}`` dict, run at the content level after the built-in rules; a
    predicate fails the sample by returning a falsy value other than ``None`` (``False``,
    ``np.False_``) or by raising, and the message names it (a bare function by its
    ``__name__``).
    """

    __slots__ = ("custom", "optional")

    def __init__(self, *, optional: bool = False, custom: Custom = None) -> None:
        self.optional = _check_flag("optional", optional)
        self.custom = _custom_checks(custom)

    def __call__(self, sample: Any) -> None:
        """Check ``sample``: ``None`` when valid, else raise :class:`SchemaError`."""
        failure = (
            self._check(sample, EXISTENCE)
            or self._check(sample, FORMAT)
            or self._check(sample, CONTENT)
        )
        if failure is not None:
            raise failure.error()

    def is_valid(self, sample: Any) -> bool:
        """``True`` when ``sample`` passes every rule (usable as a dataset ``filter``)."""
        return all(self._check(sample, level) is None for level in (EXISTENCE, FORMAT, CONTENT))

    def _check(self, value: Any, level: int) -> _Failure | None:
        if value is None:
            if self.optional or level != EXISTENCE:
                return None
            return _Failure(EXISTENCE, "required", "value is None")
        if level == EXISTENCE:
            return self._readable(value)
        if level == FORMAT:
            return self._format(value)
        failure = self._content(value)
        if failure is None and self.custom:
            failure = self._run_custom(value)
        return failure

    # Subclasses override these; each sees a value that is not None and may assume that
    # the earlier levels passed (the whole sample's, not just this value's).
    def _readable(self, value: Any) -> _Failure | None:
        return None

    def _format(self, value: Any) -> _Failure | None:
        return None

    def _content(self, value: Any) -> _Failure | None:
        return None

    def _run_custom(self, value: Any) -> _Failure | None:
        for name, predicate in self.custom:
            try:
                verdict = predicate(value)
            except Exception as exc:
                detail = f"custom check {name!r} raised {type(exc).__name__}: {_clip(str(exc))}"
                return _Failure(CONTENT, f"custom:{name}", detail)
            if verdict is not None and not verdict:
                return _Failure(CONTENT, f"custom:{name}", f"custom check {name!r} failed")
        return None

    def _options(self) -> dict[str, Any]:
        """The keyword arguments to show in ``repr`` (those that differ from the default)."""
        options: dict[str, Any] = {}
        if self.optional:
            options["optional"] = True
        if self.custom:
            options["custom"] = [name for name, _ in self.custom]
        return options

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({args})"


def _custom_checks(custom: Custom) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    if custom is None:
        return ()
    if isinstance(custom, Mapping):
        checks = tuple((str(name), fn) for name, fn in custom.items())
    elif callable(custom):
        checks = ((getattr(custom, "__name__", type(custom).__name__), custom),)
    else:
        raise TypeError(
            f"custom must be a callable or a {{name: callable}} dict, got {_type_name(custom)}"
        )
    for name, fn in checks:
        if not callable(fn):
            raise TypeError(f"custom check {name!r} is not callable: {_type_name(fn)}")
        if is_async_callable(fn):
            # Its coroutine would count as a pass, never awaited: rules run synchronously.
            raise TypeError(
                f"custom check {name!r} is async: a rule's custom checks are plain "
                "functions (an async check goes in the Loader's validate=)"
            )
    return checks


# Constructor checks: a bad setting fails when the rule is built, naming the argument,
# never once per sample.


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_short(value)}")
    return bool(value)


def _check_bound(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{name} must be a number or None, got {_short(value)}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _check_count(name: str, value: int | None) -> int | None:
    """A size or a number of items: a non-negative int, or ``None`` for no bound."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative int or None, got {_short(value)}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return int(value)


def _check_order(low_name: str, low: Any, high_name: str, high: Any) -> None:
    if low is not None and high is not None and low > high:
        raise ValueError(f"{low_name}={low!r} is larger than {high_name}={high!r}")


def _check_sizes(min_bytes: int | None, max_bytes: int | None) -> tuple[int | None, int | None]:
    sizes = _check_count("min_bytes", min_bytes), _check_count("max_bytes", max_bytes)
    _check_order("min_bytes", sizes[0], "max_bytes", sizes[1])
    return sizes


def _size_failure(size: int, min_bytes: int | None, max_bytes: int | None) -> _Failure | None:
    if min_bytes is not None and size < min_bytes:
        return _Failure(FORMAT, "min_bytes", f"{size} bytes is less than min_bytes={min_bytes}")
    if max_bytes is not None and size > max_bytes:
        return _Failure(FORMAT, "max_bytes", f"{size} bytes is more than max_bytes={max_bytes}")
    return None


def _range_failure(
    lo: Any,
    hi: Any,
    minimum: float | None,
    maximum: float | None,
    *,
    scalar: bool,
    dtype: Any = None,
) -> _Failure | None:
    """``lo``/``hi``: the smallest and largest value (the same number for a scalar), of a
    value of ``dtype`` (None: a Python number)."""
    if minimum is not None and lo < _in_precision(minimum, dtype):
        what = "value" if scalar else "smallest value"
        return _Failure(CONTENT, "min", f"{what} {_short(lo)} is below min={minimum!r}")
    if maximum is not None and hi > _in_precision(maximum, dtype):
        what = "value" if scalar else "largest value"
        return _Failure(CONTENT, "max", f"{what} {_short(hi)} is above max={maximum!r}")
    return None


@lru_cache(maxsize=256)
def _in_precision(bound: float, dtype: Any) -> float:
    """``bound`` rounded to a floating ``dtype`` narrower than a Python float, as numpy and
    torch compare (``x <= 0.1`` is true for float32(0.1), which is 0.10000000149 as a
    Python float): data clipped to a bound in float32 must not fail it."""
    if dtype is None or not issubclass(_dtype_of(dtype).type, np.floating) or dtype.itemsize >= 8:
        return bound
    if isinstance(dtype, np.dtype):
        with np.errstate(over="ignore"):  # (past float16's range: inf, as numpy has it)
            return float(np.asarray(bound, dtype=dtype))
    torch = sys.modules["torch"]  # (a torch dtype: torch is imported)
    return float(torch.tensor(float(bound), dtype=dtype).item())


# -- arrays and tensors -------------------------------------------------------------------

# dtype kinds by numpy's abstract scalar types, and the names that spell them as strings
# (none of which np.dtype() accepts, so they never shadow a concrete dtype: "float" is
# float64 to numpy, so kinds are spelled "floating", "integer", ...).
_KINDS: Final[dict[str, type[Any]]] = {
    "number": np.number,
    "integer": np.integer,
    "signedinteger": np.signedinteger,
    "unsignedinteger": np.unsignedinteger,
    "inexact": np.inexact,
    "floating": np.floating,
    "complexfloating": np.complexfloating,
}
# Tensor dtypes numpy lacks, by name, and the kind they belong to.
_TORCH_ONLY: Final[dict[str, type[Any]]] = {
    "bfloat16": np.floating,
    **{
        f"float8_{kind}": np.floating
        for kind in ("e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz", "e8m0fnu")
    },
}


class _DType(NamedTuple):
    """A value's dtype in numpy terms: its name and its scalar type (for the kind)."""

    name: str
    type: type[Any]


@lru_cache(maxsize=256)
def _dtype_of(dtype: Any) -> _DType:
    """The numpy view of a numpy or torch dtype (cached: dtypes are few and hashable)."""
    if isinstance(dtype, np.dtype):
        return _DType(dtype.name, dtype.type)
    name = str(dtype).removeprefix("torch.")
    try:
        np_dtype = np.dtype(name)
    except TypeError:
        return _DType(name, _TORCH_ONLY.get(name, np.generic))
    return _DType(np_dtype.name, np_dtype.type)


_SKIP, _SCAN, _SCAN_COMPLEX, _NOT_NUMBERS = 0, 1, 2, 3


@lru_cache(maxsize=1024)
def _scan_plan(
    dtype: Any, minimum: float | None, maximum: float | None, allow_nan: bool, allow_inf: bool
) -> int:
    """Whether an array of ``dtype`` needs its values scanned (cached per dtype and rule
    options). Integers hold no NaN/inf, and their dtype may already keep every value in
    bounds (uint8 with min=0, max=255): then the scan is skipped. Strings, bytes and
    objects hold no numbers: nothing to scan, and bounds cannot hold (``_NOT_NUMBERS``)."""
    kind = _dtype_of(dtype).type
    bounded = minimum is not None or maximum is not None
    if not issubclass(kind, (np.number, np.bool_)):
        return _NOT_NUMBERS if bounded else _SKIP
    if issubclass(kind, (np.integer, np.bool_)):
        if issubclass(kind, np.bool_):
            lo, hi = 0, 1
        else:
            info = np.iinfo(kind)
            lo, hi = int(info.min), int(info.max)
        vacuous = (minimum is None or minimum <= lo) and (maximum is None or hi <= maximum)
        return _SKIP if vacuous else _SCAN
    if not bounded and allow_nan and allow_inf:
        return _SKIP
    return _SCAN_COMPLEX if issubclass(kind, np.complexfloating) else _SCAN


class _DTypeSpec:
    """What ``dtype=`` accepts: concrete dtypes (by name) and kinds (abstract types)."""

    __slots__ = ("kinds", "names", "text")

    def __init__(self, spec: Any) -> None:
        items = spec if isinstance(spec, (tuple, list, set, frozenset)) else (spec,)
        if not items:
            raise ValueError(f"dtype: {spec!r} is empty: it would match no array")
        names: list[str] = []
        kinds: list[type[Any]] = []
        for item in items:
            if isinstance(item, str) and item in _KINDS:
                kinds.append(_KINDS[item])
            elif isinstance(item, str) and item in _TORCH_ONLY:
                names.append(item)
            elif (
                isinstance(item, type)
                and issubclass(item, np.generic)
                and (item in _KINDS.values() or item is np.generic)
            ):
                kinds.append(item)
            elif _is_torch_dtype(item):
                names.append(_dtype_of(item).name)
            elif item is None:  # np.dtype(None) is float64: never what None meant here
                raise TypeError(
                    "dtype: None inside a tuple of dtypes is neither a dtype nor a kind"
                )
            else:
                try:
                    dtype = np.dtype(item)
                except Exception as exc:  # TypeError mostly; SyntaxError for "i4,,"
                    raise TypeError(f"dtype: {_short(item)} is neither a dtype nor a kind") from exc
                if _generic(dtype):
                    kinds.append(dtype.type)  # str: any length of str, as str96
                else:
                    names.append(dtype.name)
        self.names = frozenset(names)
        self.kinds = tuple(kinds)
        self.text = " or ".join([*sorted(self.names), *(k.__name__ for k in self.kinds)])

    def matches(self, dtype: _DType) -> bool:
        return dtype.name in self.names or issubclass(dtype.type, self.kinds)


def _generic(dtype: np.dtype[Any]) -> bool:
    """A dtype without a size or unit (``str``, ``bytes``, ``"V"``, ``"datetime64"``): it
    stands for all of them, whose names differ (``str96``, ``datetime64[ms]``)."""
    if dtype.kind in "USV":
        return dtype.itemsize == 0
    return dtype.kind in "mM" and np.datetime_data(dtype)[0] == "generic"


def _is_torch_dtype(item: object) -> bool:
    """A torch dtype, or its name as ``"torch.<name>"`` (checked against torch when it is
    imported, else against numpy's names and ``_TORCH_ONLY``)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(item, torch.dtype):
        return True
    if not (isinstance(item, str) and item.startswith("torch.")):
        return False
    name = item.removeprefix("torch.")
    if torch is not None:
        return isinstance(getattr(torch, name, None), torch.dtype)
    if name in _TORCH_ONLY:
        return True
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


class _Shape:
    """A shape pattern: ints, ``None`` for any one dimension, one ``...`` for any number."""

    __slots__ = ("_exact", "_fixed", "_ndim", "spec", "variadic")

    def __init__(self, spec: Sequence[Any]) -> None:
        # torch.Size is a tuple; a bare int or a string is a mistake, not a 1-d shape.
        if not isinstance(spec, (tuple, list)):
            raise TypeError(
                f"shape must be a tuple or list of ints >= 0, None or ..., got {_short(spec)}"
            )
        dims: list[Any] = []
        for dim in spec:
            if dim is None or dim is Ellipsis:
                dims.append(dim)
            elif isinstance(dim, (int, np.integer)) and not isinstance(dim, (bool, np.bool_)):
                if dim < 0:
                    raise ValueError(f"shape entries must be ints >= 0, None or ..., got {dim!r}")
                dims.append(int(dim))  # numpy ints compare equal, but repr as np.int64(3)
            else:
                raise TypeError(f"shape entries must be ints >= 0, None or ..., got {dim!r}")
        spec = tuple(dims)
        if spec.count(Ellipsis) > 1:
            raise ValueError("shape may contain at most one ...")
        self.spec = spec
        self.variadic = Ellipsis in spec
        cut = spec.index(Ellipsis) if self.variadic else len(spec)
        head, tail = spec[:cut], spec[cut + 1 :]
        # (position, size) for every fixed dimension; after a ``...``, counted from the end.
        self._fixed = tuple((i, d) for i, d in enumerate(head) if d is not None) + tuple(
            (i - len(tail), d) for i, d in enumerate(tail) if d is not None
        )
        self._ndim = len(head) + len(tail)  # exact, or the least with a ``...``
        # No wildcard: one tuple comparison (numpy shapes and torch.Size are tuples).
        self._exact = spec if not self.variadic and len(self._fixed) == len(spec) else None

    def matches(self, shape: tuple[int, ...]) -> bool:
        if self._exact is not None:
            return shape == self._exact
        if len(shape) != self._ndim and not (self.variadic and len(shape) > self._ndim):
            return False
        for position, size in self._fixed:  # noqa: SIM110 - a loop: all() costs a generator
            if shape[position] != size:
                return False
        return True

    def __repr__(self) -> str:
        inner = ", ".join("..." if d is Ellipsis else repr(d) for d in self.spec)
        return f"({inner},)" if len(self.spec) == 1 else f"({inner})"


def _torch_tensor_type() -> type | None:
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _is_tensor(value: object) -> bool:
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(value, tensor)


class Array(Rule):
    """A numpy array (or numpy scalar) or a torch tensor.

    ``dtype``: a dtype (``"uint8"``, ``np.float32``, ``torch.float16``), a kind
    (``np.floating``/``"floating"``, ``np.integer``/``"integer"``, ``"unsignedinteger"``,
    ``"number"``, ...), or a tuple of those, any of which matches. ``shape``: a pattern
    with ``None`` for any one dimension and at most one ``...`` (``(None, None, 3)``,
    ``(..., 224, 224)``). ``min``/``max``: inclusive bounds on every value. NaN and ±inf
    are refused unless ``allow_nan``/``allow_inf``; with a bound set, ±inf still fails the
    bound. ``min_bytes``/``max_bytes``: bounds on the data size (``nbytes``).

    Cost: dtype and shape are O(1); a range or NaN check is one min and one max reduction
    (NaN propagates through both), skipped when the dtype cannot hold an out-of-range value
    (``uint8`` with ``min=0, max=255``).
    """

    __slots__ = (
        "_dtype",
        "_shape",
        "allow_inf",
        "allow_nan",
        "max",
        "max_bytes",
        "min",
        "min_bytes",
    )

    def __init__(
        self,
        *,
        dtype: Any = None,
        shape: Sequence[Any] | None = None,
        min: float | None = None,
        max: float | None = None,
        allow_nan: bool = False,
        allow_inf: bool = False,
        min_bytes: int | None = None,
        max_bytes: int | None = None,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        self._dtype = _DTypeSpec(dtype) if dtype is not None else None
        self._shape = _Shape(shape) if shape is not None else None
        self.min = _check_bound("min", min)
        self.max = _check_bound("max", max)
        _check_order("min", self.min, "max", self.max)
        self.allow_nan = _check_flag("allow_nan", allow_nan)
        self.allow_inf = _check_flag("allow_inf", allow_inf)
        self.min_bytes, self.max_bytes = _check_sizes(min_bytes, max_bytes)

    def _format(self, value: Any) -> _Failure | None:
        if isinstance(value, (np.ndarray, np.generic)):
            nbytes = value.nbytes
        elif _is_tensor(value):
            nbytes = value.numel() * value.element_size()
        else:
            return _Failure(
                FORMAT, "type", f"expected a numpy array or torch tensor, got {_type_name(value)}"
            )
        if self._dtype is not None:
            dtype = _dtype_of(value.dtype)
            if not self._dtype.matches(dtype):
                return _Failure(FORMAT, "dtype", f"dtype {dtype.name} is not {self._dtype.text}")
        if self._shape is not None and not self._shape.matches(value.shape):
            shape = tuple(value.shape)
            return _Failure(FORMAT, "shape", f"shape {shape} does not match {self._shape}")
        if self.min_bytes is not None or self.max_bytes is not None:
            return _size_failure(nbytes, self.min_bytes, self.max_bytes)
        return None

    def _content(self, value: Any) -> _Failure | None:
        minimum, maximum = self.min, self.max
        plan = _scan_plan(value.dtype, minimum, maximum, self.allow_nan, self.allow_inf)
        if plan == _SKIP or _size(value) == 0:
            return None
        if plan == _NOT_NUMBERS:
            dtype = _dtype_of(value.dtype).name
            return _Failure(FORMAT, "dtype", f"min/max need numbers, got dtype {dtype}")
        bounded = minimum is not None or maximum is not None
        if isinstance(value, np.generic):
            value = np.asarray(value)  # a 0-d array: maskable like any other
        if plan == _SCAN_COMPLEX:
            return self._complex_content(value, bounded)
        lo, hi = _min_max(value)
        if lo != lo or hi != hi:  # NaN propagates through min and max
            if not self.allow_nan:
                return _Failure(CONTENT, "nan", "contains NaN (allow_nan=False)")
            if not bounded and self.allow_inf:
                return None
            kept = value[~_isnan(value)]
            if _size(kept) == 0:
                return None
            lo, hi = _min_max(kept)
        if not self.allow_inf and (lo == -math.inf or hi == math.inf):
            return _Failure(CONTENT, "inf", "contains inf (allow_inf=False)")
        return _range_failure(lo, hi, minimum, maximum, scalar=False, dtype=value.dtype)

    def _complex_content(self, value: Any, bounded: bool) -> _Failure | None:
        if bounded:
            rule = "min" if self.min is not None else "max"
            return _Failure(CONTENT, rule, f"complex values have no order for {rule}")
        array = value if isinstance(value, np.ndarray) else value.numpy(force=True)
        if not self.allow_nan and bool(np.isnan(array).any()):
            return _Failure(CONTENT, "nan", "contains NaN (allow_nan=False)")
        if not self.allow_inf and bool(np.isinf(array).any()):
            return _Failure(CONTENT, "inf", "contains inf (allow_inf=False)")
        return None

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self._dtype is not None:
            options["dtype"] = self._dtype.text
        if self._shape is not None:
            options["shape"] = self._shape
        for name in ("min", "max", "min_bytes", "max_bytes"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        for name in ("allow_nan", "allow_inf"):
            if getattr(self, name):
                options[name] = True
        return {**options, **super()._options()}


def _min_max(value: Any) -> tuple[Any, Any]:
    """The smallest and largest element as Python numbers (numpy or torch)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.min().item(), value.max().item()
    if value.dtype.is_floating_point and value.dtype.itemsize == 1:
        value = value.float()  # (float8: torch has no min/max for it)
    if value.dtype.is_floating_point or value.dtype.is_signed:
        lo, hi = value.aminmax()  # one pass over the tensor
        return lo.item(), hi.item()
    if value.dtype.itemsize > 1:
        # torch has no min/max for uint16/32/64 (16-bit images decode to uint16).
        return _min_max(value.numpy(force=True))
    return value.min().item(), value.max().item()


def _isnan(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return np.isnan(value)
    if value.dtype.is_floating_point and value.dtype.itemsize == 1:
        value = value.float()  # (float8)
    return value.isnan()


def _size(value: Any) -> int:
    return int(value.size) if isinstance(value, (np.ndarray, np.generic)) else int(value.numel())


# -- scalars, text and bytes --------------------------------------------------------------


def _scalar_of(value: Any, kinds: tuple[type[Any], ...]) -> Any:
    """``value`` as a Python number when it is a number, a numpy scalar or a 0-d
    array/tensor whose dtype is of ``kinds``; else ``None``. Booleans are not numbers."""
    if isinstance(value, np.generic):
        # np.bool_ is no np.integer: kinds never admit booleans.
        return value.item() if isinstance(value, kinds) else None
    if (
        (isinstance(value, np.ndarray) or _is_tensor(value))
        and value.ndim == 0
        and issubclass(_dtype_of(value.dtype).type, kinds)
    ):
        return value.item()
    return None


class Int(Rule):
    """An integer: a Python ``int`` (not ``bool``), a numpy integer, or a 0-d integer
    array/tensor. ``min``/``max``: inclusive bounds."""

    __slots__ = ("max", "min")

    def __init__(
        self,
        *,
        min: int | None = None,
        max: int | None = None,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        self.min = _check_bound("min", min)
        self.max = _check_bound("max", max)
        _check_order("min", self.min, "max", self.max)

    @staticmethod
    def _number(value: Any) -> Any:
        if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        return _scalar_of(value, (np.integer,))

    def _format(self, value: Any) -> _Failure | None:
        if self._number(value) is None:
            return _Failure(FORMAT, "type", f"expected an int, got {_type_name(value)}")
        return None

    def _content(self, value: Any) -> _Failure | None:
        minimum, maximum = self.min, self.max
        number = value if type(value) is int else self._number(value)
        if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
            return _range_failure(number, number, minimum, maximum, scalar=True)
        return None

    def _options(self) -> dict[str, Any]:
        options = {k: getattr(self, k) for k in ("min", "max") if getattr(self, k) is not None}
        return {**options, **super()._options()}


class Float(Rule):
    """A real number: ``float``, ``int`` (not ``bool``), a numpy float or integer, or a 0-d
    array/tensor of those. ``min``/``max``: inclusive bounds. NaN and ±inf are refused
    unless ``allow_nan``/``allow_inf``."""

    __slots__ = ("allow_inf", "allow_nan", "max", "min")

    def __init__(
        self,
        *,
        min: float | None = None,
        max: float | None = None,
        allow_nan: bool = False,
        allow_inf: bool = False,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        self.min = _check_bound("min", min)
        self.max = _check_bound("max", max)
        _check_order("min", self.min, "max", self.max)
        self.allow_nan = _check_flag("allow_nan", allow_nan)
        self.allow_inf = _check_flag("allow_inf", allow_inf)

    @staticmethod
    def _number(value: Any) -> Any:
        kind = type(value)
        if kind is float or kind is int:
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        return _scalar_of(value, (np.floating, np.integer))

    def _format(self, value: Any) -> _Failure | None:
        if self._number(value) is None:
            return _Failure(FORMAT, "type", f"expected a real number, got {_type_name(value)}")
        return None

    def _content(self, value: Any) -> _Failure | None:
        number = self._number(value)
        if number != number:
            if self.allow_nan:
                return None
            return _Failure(CONTENT, "nan", "value is NaN (allow_nan=False)")
        if not self.allow_inf and (number == math.inf or number == -math.inf):
            return _Failure(CONTENT, "inf", f"value is {number} (allow_inf=False)")
        dtype = getattr(value, "dtype", None)  # (a numpy scalar, a 0-d array or tensor)
        return _range_failure(number, number, self.min, self.max, scalar=True, dtype=dtype)

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            k: getattr(self, k) for k in ("min", "max") if getattr(self, k) is not None
        }
        options.update({k: True for k in ("allow_nan", "allow_inf") if getattr(self, k)})
        return {**options, **super()._options()}


class Str(Rule):
    """A ``str``; with ``encoding``, also ``bytes`` that decode in it (undecodable bytes fail
    at the existence level: the value is unreadable). ``pattern``: a regex the whole text
    must match (``re.fullmatch``). ``min_bytes``/``max_bytes``: bounds on the encoded size
    (UTF-8, or ``encoding``; raw length for bytes)."""

    __slots__ = ("_ascii_compatible", "_pattern", "encoding", "max_bytes", "min_bytes")

    def __init__(
        self,
        *,
        pattern: str | re.Pattern[str] | None = None,
        min_bytes: int | None = None,
        max_bytes: int | None = None,
        encoding: str | None = None,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        self._pattern = _compile(pattern)
        self.min_bytes, self.max_bytes = _check_sizes(min_bytes, max_bytes)
        codec = _check_encoding(encoding)
        self.encoding = encoding
        # In these, ASCII text is one byte per character: its size needs no encode.
        self._ascii_compatible = codec in ("utf-8", "ascii", "latin-1", "iso8859-1", "cp1252")

    def _readable(self, value: Any) -> _Failure | None:
        if self.encoding is not None and isinstance(value, (bytes, bytearray, memoryview)):
            try:
                bytes(value).decode(self.encoding)
            except UnicodeDecodeError as exc:
                return _Failure(
                    EXISTENCE, "decode", f"bytes do not decode as {self.encoding}: {exc.reason}"
                )
        return None

    def _format(self, value: Any) -> _Failure | None:
        if isinstance(value, str):
            if self.min_bytes is None and self.max_bytes is None:
                return None
            if self._ascii_compatible and value.isascii():
                size = len(value)
            else:
                encoding = self.encoding or "utf-8"
                try:
                    size = len(value.encode(encoding))
                except UnicodeEncodeError as exc:  # "é" in ascii, a lone surrogate in utf-8
                    detail = f"text does not encode as {encoding}: {exc.reason}"
                    return _Failure(FORMAT, "encode", detail)
        elif self.encoding is not None and isinstance(value, (bytes, bytearray, memoryview)):
            size = memoryview(value).nbytes
        else:
            accepted = "a str or bytes" if self.encoding is not None else "a str"
            return _Failure(FORMAT, "type", f"expected {accepted}, got {_type_name(value)}")
        return _size_failure(size, self.min_bytes, self.max_bytes)

    def _content(self, value: Any) -> _Failure | None:
        if self._pattern is None:
            return None
        text = value if isinstance(value, str) else bytes(value).decode(self.encoding or "utf-8")
        if self._pattern.fullmatch(text) is None:
            return _Failure(
                CONTENT,
                "pattern",
                f"{_short(text)} does not fully match pattern {self._pattern.pattern!r}",
            )
        return None

    def _options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self._pattern is not None:
            options["pattern"] = self._pattern.pattern
        for name in ("min_bytes", "max_bytes", "encoding"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        return {**options, **super()._options()}


def _compile(pattern: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    if isinstance(pattern, re.Pattern):
        compiled = pattern
    elif isinstance(pattern, str):
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"pattern {_short(pattern)} is not a regular expression: {exc}"
            ) from exc
    else:
        raise TypeError(f"pattern must be a str or a compiled regex, got {_short(pattern)}")
    if not isinstance(compiled.pattern, str):  # a bytes regex fails on every str sample
        raise TypeError(f"pattern must match text, got a bytes regex {_short(compiled.pattern)}")
    return compiled


def _check_encoding(encoding: str | None) -> str:
    """The codec's canonical name (``utf-8`` for ``None``); a name Python does not know,
    or a codec that is not a text encoding (``"base64"``), fails here, not once per
    sample."""
    if encoding is None:
        return "utf-8"
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a str or None, got {_short(encoding)}")
    try:
        name = codecs.lookup(encoding).name
        "a".encode(encoding)  # LookupError for bytes-to-bytes codecs, UnicodeError "undefined"
    except UnicodeEncodeError:
        pass  # a text codec without "a" (none known; harmless)
    except (LookupError, UnicodeError) as exc:
        raise ValueError(f"encoding {encoding!r}: {exc}") from exc
    return name


class Bytes(Rule):
    """``bytes``, ``bytearray`` or ``memoryview``. ``prefix``: the data must start with it
    (a magic number, e.g. ``b"\\x89PNG\\r\\n\\x1a\\n"``), or with one of a tuple of them.
    ``min_bytes``/``max_bytes``: bounds on the size."""

    __slots__ = ("_head", "max_bytes", "min_bytes", "prefix")

    def __init__(
        self,
        *,
        prefix: bytes | tuple[bytes, ...] | None = None,
        min_bytes: int | None = None,
        max_bytes: int | None = None,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        self.min_bytes, self.max_bytes = _check_sizes(min_bytes, max_bytes)
        if prefix is not None and not (
            isinstance(prefix, bytes)
            or (isinstance(prefix, tuple) and all(isinstance(p, bytes) for p in prefix))
        ):
            raise TypeError(f"prefix must be bytes or a tuple of bytes, got {_short(prefix)}")
        if prefix == ():
            raise ValueError("prefix=() is empty: it would match no data")
        self.prefix = prefix
        # How much of a memoryview to copy for the prefix test.
        options = (prefix,) if isinstance(prefix, bytes) else (prefix or ())
        self._head = max((len(p) for p in options), default=0)

    def _format(self, value: Any) -> _Failure | None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            return _Failure(FORMAT, "type", f"expected bytes, got {_type_name(value)}")
        if self.prefix is not None:
            head = value[: self._head].tobytes() if isinstance(value, memoryview) else value
            if not head.startswith(self.prefix):
                start = _short(bytes(head[:16]))
                return _Failure(
                    FORMAT, "prefix", f"{start} does not start with prefix {_short(self.prefix)}"
                )
        return _size_failure(memoryview(value).nbytes, self.min_bytes, self.max_bytes)

    def _options(self) -> dict[str, Any]:
        options = {
            k: getattr(self, k)
            for k in ("prefix", "min_bytes", "max_bytes")
            if getattr(self, k) is not None
        }
        return {**options, **super()._options()}


class Value(Rule):
    """Any value that is there (not ``None`` unless ``optional``): for fields that only need
    a ``custom`` predicate, or only need to exist."""

    __slots__ = ()


# -- containers ---------------------------------------------------------------------------

# What Dict/Tuple/Each/Schema accept as a child: a rule, or the dict/tuple shorthand.
Spec: TypeAlias = Rule | Mapping[Hashable, Any] | tuple[Any, ...]


def _rule(spec: Spec) -> Rule:
    """A rule from a spec: a rule itself, a dict (a :class:`Dict`) or a tuple (a
    :class:`Tuple`)."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, Mapping):
        return Dict(spec)
    if isinstance(spec, tuple):
        return Tuple(*spec)
    raise TypeError(
        f"a schema entry must be a rule (Array, Int, Str, ...), a dict or a tuple, got {spec!r}"
    )


class Dict(Rule):
    """A mapping with the given keys, each checked by its rule (or nested dict/tuple spec).

    Every key is required unless its rule is ``optional``. ``allow_extra=False`` refuses
    keys the schema does not name (WebDataset samples carry ``__key__``, and ``__url__``
    with ``with_url=True``: leave it ``True`` there, or name them with :class:`Value`).
    """

    __slots__ = ("allow_extra", "fields")

    def __init__(
        self,
        fields: Mapping[Hashable, Spec],
        *,
        allow_extra: bool = True,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        if not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a dict of rules, got {_type_name(fields)}")
        self.fields = {key: _rule(spec) for key, spec in fields.items()}
        self.allow_extra = _check_flag("allow_extra", allow_extra)

    def _children(self, value: Any, level: int) -> _Failure | None:
        for key, rule in self.fields.items():
            # `in` first: a defaultdict would make the missing key up (and keep it).
            if key not in value:
                if level == EXISTENCE and not rule.optional:
                    return _Failure(EXISTENCE, "required", "required key is missing").at(key)
                continue
            item = value[key]
            failure = rule._check(item, level)
            if failure is not None:
                return failure.at(key)
        return None

    def _readable(self, value: Any) -> _Failure | None:
        # Not a mapping: nothing to look into yet; the format level reports the type.
        return self._children(value, EXISTENCE) if _is_mapping(value) else None

    def _format(self, value: Any) -> _Failure | None:
        if not _is_mapping(value):
            return _Failure(FORMAT, "type", f"expected a dict, got {_type_name(value)}")
        if not self.allow_extra:
            extra = [k for k in value if k not in self.fields]
            if extra:
                return _Failure(
                    FORMAT, "keys", f"unexpected keys {_short(extra)} (allow_extra=False)"
                )
        return self._children(value, FORMAT)

    def _content(self, value: Any) -> _Failure | None:
        return self._children(value, CONTENT)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self._options().items())
        if not self.allow_extra:
            options += ", allow_extra=False"
        return f"Dict({self.fields!r}{options})"


def _is_mapping(value: object) -> bool:
    # The ABC check costs far more than the exact-type test that settles the common case.
    return type(value) is dict or isinstance(value, Mapping)


def _is_sequence(value: object) -> bool:
    return isinstance(value, (tuple, list))


class Tuple(Rule):
    """A tuple or list with one item per rule, checked position by position (a torch
    dataset's ``(image, label)``)."""

    __slots__ = ("items",)

    def __init__(self, *items: Spec, optional: bool = False, custom: Custom = None) -> None:
        super().__init__(optional=optional, custom=custom)
        self.items = tuple(_rule(item) for item in items)

    def _children(self, value: Any, level: int) -> _Failure | None:
        for position, (rule, item) in enumerate(zip(self.items, value, strict=True)):
            failure = rule._check(item, level)
            if failure is not None:
                return failure.at(position)
        return None

    def _readable(self, value: Any) -> _Failure | None:
        # A wrong length is a format failure, reported at that level.
        if _is_sequence(value) and len(value) == len(self.items):
            return self._children(value, EXISTENCE)
        return None

    def _format(self, value: Any) -> _Failure | None:
        if not _is_sequence(value):
            return _Failure(FORMAT, "type", f"expected a tuple or list, got {_type_name(value)}")
        if len(value) != len(self.items):
            return _Failure(FORMAT, "length", f"{len(value)} items, expected {len(self.items)}")
        return self._children(value, FORMAT)

    def _content(self, value: Any) -> _Failure | None:
        return self._children(value, CONTENT)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return f"Tuple({', '.join(map(repr, self.items))}{options})"


class Each(Rule):
    """A tuple or list whose every item passes ``item`` (a rule or dict/tuple spec), with
    ``min_items``/``max_items`` bounds on its length."""

    __slots__ = ("item", "max_items", "min_items")

    def __init__(
        self,
        item: Spec,
        *,
        min_items: int | None = None,
        max_items: int | None = None,
        optional: bool = False,
        custom: Custom = None,
    ) -> None:
        super().__init__(optional=optional, custom=custom)
        self.item = _rule(item)
        self.min_items = _check_count("min_items", min_items)
        self.max_items = _check_count("max_items", max_items)
        _check_order("min_items", self.min_items, "max_items", self.max_items)

    def _children(self, value: Any, level: int) -> _Failure | None:
        check = self.item._check
        for position, item in enumerate(value):
            failure = check(item, level)
            if failure is not None:
                return failure.at(position)
        return None

    def _readable(self, value: Any) -> _Failure | None:
        return self._children(value, EXISTENCE) if _is_sequence(value) else None

    def _format(self, value: Any) -> _Failure | None:
        if not _is_sequence(value):
            return _Failure(FORMAT, "type", f"expected a tuple or list, got {_type_name(value)}")
        n = len(value)
        if self.min_items is not None and n < self.min_items:
            return _Failure(FORMAT, "length", f"{n} items, fewer than min_items={self.min_items}")
        if self.max_items is not None and n > self.max_items:
            return _Failure(FORMAT, "length", f"{n} items, more than max_items={self.max_items}")
        return self._children(value, FORMAT)

    def _content(self, value: Any) -> _Failure | None:
        return self._children(value, CONTENT)

    def __repr__(self) -> str:
        options = {
            k: getattr(self, k) for k in ("min_items", "max_items") if getattr(self, k) is not None
        }
        options.update(self._options())
        return f"Each({self.item!r}{''.join(f', {k}={v!r}' for k, v in options.items())})"


class Schema(Rule):
    """The root of a schema: ``Schema(spec)`` where ``spec`` is a rule, a dict of field
    specs (a :class:`Dict`) or a tuple of position specs (a :class:`Tuple`).

    Pass it as ``Loader(validate=schema)``: it returns ``None`` for a valid sample and
    raises :class:`SchemaError` (an ``al.ValidationError``) for an invalid one. ``custom``
    predicates here see the whole sample, for rules across fields (``len(boxes) ==
    len(labels)``); they run after every field's rules passed.
    """

    __slots__ = ("root",)

    def __init__(self, spec: Spec, *, custom: Custom = None) -> None:
        self.root = _rule(spec)
        super().__init__(optional=self.root.optional, custom=custom)

    def _check(self, value: Any, level: int) -> _Failure | None:
        if self.custom:
            return super()._check(value, level)
        return self.root._check(value, level)  # one call less per level, per sample

    def _readable(self, value: Any) -> _Failure | None:
        return self.root._check(value, EXISTENCE)

    def _format(self, value: Any) -> _Failure | None:
        return self.root._check(value, FORMAT)

    def _content(self, value: Any) -> _Failure | None:
        return self.root._check(value, CONTENT)

    def __repr__(self) -> str:
        custom = f", custom={[n for n, _ in self.custom]!r}" if self.custom else ""
        return f"Schema({self.root!r}{custom})"
