"""Every Python example in the README and docs/ (subfolders too) runs as written (or,
where it needs a server or the reader's own data and is marked
``<!-- illustrative: reason -->`` on the line before it, at least compiles); the API
reference generated from docstrings (docs/reference/, built by ``mkdocs build``) covers
every public name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import asyncload as al

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- illustrative[^>]*-->\n)?```python\n(.*?)```", re.S)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def examples() -> list[pytest.ParameterSet]:
    found = []
    for path in PAGES:
        for n, match in enumerate(BLOCK.finditer(path.read_text())):
            found.append(
                pytest.param(
                    match.group(2), bool(match.group(1)), id=f"{path.relative_to(REPO)}#{n}"
                )
            )
    return found


@pytest.mark.parametrize(("code", "illustrative"), examples())
def test_example(code: str, illustrative: bool) -> None:
    compiled = compile(code, "<example>", "exec")
    if not illustrative:
        exec(compiled, {"__name__": "__example__"})


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_block_is_found(path: Path) -> None:
    """A block the pattern misses (```py, ```python3, an unclosed fence) would go untested."""
    text = path.read_text()
    assert len(BLOCK.findall(text)) == text.count("```python")
    assert not re.search(r"^\s*```(py|python3|pycon)\s*$", text, re.M)


def test_reference_covers_the_public_names() -> None:
    documented = set()
    for page in (REPO / "docs" / "reference").glob("*.md"):
        documented |= set(re.findall(r"^::: ([\w.]+)", page.read_text(), re.M))
    modules = {"drift", "sources", "validation"}
    public = {f"asyncload.{name}" for name in al.__all__ if name not in modules}
    public |= {f"asyncload.sources.{name}" for name in al.sources.__all__}
    assert public <= documented, sorted(public - documented)
