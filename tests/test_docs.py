"""Every Python example in the README and docs/ runs as written (or, where it needs a
server or the reader's own data and is marked ``<!-- illustrative ... -->``, at least
compiles)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- illustrative[^>]*-->\n)?```python\n(.*?)```", re.S)


def examples() -> list[pytest.ParameterSet]:
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
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
