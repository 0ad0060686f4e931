"""The public surface: ``__all__`` matches what the package exports, every name and keyword
of the contract (docs ``api.md``) exists, and ``import asyncload`` does not import torch."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import asyncload
import asyncload as al

REPO = Path(__file__).resolve().parent.parent

# Public attributes of ``asyncload`` that are deliberately not in ``__all__``.
NOT_EXPORTED: set[str] = set()

# Contract names whose issue has not landed yet. Strict: the mark fails once the name exists,
# so it is removed in the change that builds it.
NOT_YET_BUILT: dict[str, str] = {}


def _pending(names: list[str]) -> list[Any]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=NOT_YET_BUILT[name]))
        if name in NOT_YET_BUILT
        else name
        for name in names
    ]


def _api_md() -> Path | None:
    for candidate in (
        Path("/work/shared/guide/api.md"),
        REPO.parent / "shared" / "guide" / "api.md",
    ):
        if candidate.is_file():
            return candidate
    return None


API_MD = _api_md()
API_TEXT = API_MD.read_text() if API_MD is not None else ""
needs_api_md = pytest.mark.skipif(API_MD is None, reason="the contract api.md is not available")


def _resolve(dotted: str) -> Any:
    obj: Any = al
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _contract_names() -> list[str]:
    names = set()
    for match in re.finditer(
        r"\bal\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", API_TEXT
    ):
        names.add(match.group(1))
    return sorted(names)


def _contract_signatures() -> list[tuple[str, str]]:
    """``(dotted name, parameter text)`` of every ``al.X(...)`` written with parameters."""
    found = {}
    for match in re.finditer(r"`al\.([A-Za-z_][\w.]*)\(([^`]*)\)`", API_TEXT):
        if match.group(2).strip():
            found[match.group(1)] = match.group(2)
    return sorted(found.items())


def _loader_keywords() -> list[tuple[str, str]]:
    """``(keyword, default source)`` from the ``loader = al.Loader(...)`` block."""
    block = re.search(r"loader = al\.Loader\(\n(.*?)\n\)", API_TEXT, re.S)
    if block is None:
        return []
    pairs = []
    for line in block.group(1).splitlines():
        code = line.split("#", 1)[0]
        for match in re.finditer(r"(\w+)=([^,]+)", code):
            pairs.append((match.group(1), match.group(2).strip()))
    return pairs


def test_every_name_in_all_exists() -> None:
    missing = [name for name in asyncload.__all__ if not hasattr(asyncload, name)]
    assert missing == []
    assert len(set(asyncload.__all__)) == len(asyncload.__all__), "duplicates in __all__"


def test_every_public_class_and_function_is_in_all() -> None:
    unlisted = []
    for name, obj in vars(asyncload).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not getattr(obj, "__module__", "").startswith("asyncload"):
            continue
        if name not in asyncload.__all__ and name not in NOT_EXPORTED:
            unlisted.append(name)
    assert unlisted == []


def test_sources_all_matches() -> None:
    for name in al.sources.__all__:
        assert hasattr(al.sources, name), name


@needs_api_md
@pytest.mark.parametrize("name", _pending(_contract_names()) or ["<none>"])
def test_contract_name_exists(name: str) -> None:
    assert name != "<none>", "no al.X names were found in api.md"
    try:
        _resolve(name)
    except AttributeError:
        pytest.fail(f"api.md names al.{name}, which asyncload does not have", pytrace=False)


@needs_api_md
@pytest.mark.parametrize(
    ("name", "params"),
    [
        pytest.param(
            name,
            params,
            id=name,
            marks=[pytest.mark.xfail(strict=True, reason=NOT_YET_BUILT[name])]
            if name in NOT_YET_BUILT
            else [],
        )
        for name, params in _contract_signatures()
    ]
    or [pytest.param("<none>", "", id="none")],
)
def test_contract_signature(name: str, params: str) -> None:
    """Each keyword the contract spells exists, with the contract's default where it gives one."""
    assert name != "<none>", "no al.X(...) signatures were found in api.md"
    try:
        obj = _resolve(name)
    except AttributeError:
        pytest.fail(f"api.md names al.{name}, which asyncload does not have", pytrace=False)
    signature = inspect.signature(obj)
    keyword_only = False
    for raw in params.split(","):
        part = raw.strip()
        if not part or part == "...":
            continue
        if part == "*":
            keyword_only = True
            continue
        pname, _, default = part.partition("=")
        pname, default = pname.strip(), default.strip()
        assert pname in signature.parameters, f"al.{name} has no parameter {pname!r}"
        param = signature.parameters[pname]
        if keyword_only:
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{pname} should be keyword-only"
        if default and default != "...":
            expected = ast.literal_eval(default)
            assert param.default == expected, f"al.{name}({pname}=...) default"


@needs_api_md
def test_loader_keywords_and_defaults() -> None:
    keywords = _loader_keywords()
    assert len(keywords) >= 19, keywords
    parameters = inspect.signature(al.Loader).parameters
    first = next(iter(parameters))
    assert first == "dataset"
    for name, default in keywords:
        assert name in parameters, f"Loader has no keyword {name!r}"
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].default == ast.literal_eval(default), name


@needs_api_md
def test_loader_members_of_the_contract() -> None:
    members = set(re.findall(r"`(?:await )?loader\.(\w+)\(", API_TEXT))
    assert {"set_epoch", "state_dict", "load_state_dict", "statistics", "to_torch"} <= members
    for member in members:
        assert callable(getattr(al.Loader, member, None)), member
    for dunder in (
        "__aiter__",
        "__iter__",
        "__len__",
        "__enter__",
        "__exit__",
        "__aenter__",
        "__aexit__",
    ):
        assert hasattr(al.Loader, dunder), dunder


def test_error_hierarchy() -> None:
    for name in ("SampleError", "CircuitOpenError", "HTTPStatusError"):
        assert issubclass(getattr(al, name), al.AsyncloadError), name
    assert issubclass(al.AsyncloadError, Exception)
    assert issubclass(al.SampleFiltered, LookupError)


def test_import_does_not_import_torch() -> None:
    code = "import asyncload, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_basic_use_does_not_import_torch() -> None:
    """A whole epoch over numpy samples, async and sync, needs no torch."""
    code = (
        "import sys, anyio, numpy as np, asyncload as al\n"
        "loader = al.Loader(al.from_sequence(np.arange(12).reshape(6, 2)), batch_size=4)\n"
        "async def main():\n"
        "    return [b async for b in loader]\n"
        "batches = anyio.run(main)\n"
        "assert [b.shape for b in batches] == [(4, 2), (2, 2)], batches\n"
        "assert len(list(loader)) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
