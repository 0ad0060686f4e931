"""A griffe extension for the API reference (mkdocs.yml): asyncload's docstrings use Sphinx
roles (``:class:`~asyncload.Loader` ``) and ``::`` literal blocks; Markdown has neither, so
roles become code spans and ``::`` a plain colon before the (already indented) code block."""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`~a.b.C` -> `C`; :role:`a.b.C` -> `a.b.C`; :role:`text <a.b.C>` -> `text`
_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`<]*?)\s*(?:<[^`>]*>)?`")
_LITERAL = re.compile(r"::$", re.M)


def _code(match: re.Match[str]) -> str:
    short, text = match.group(1), match.group(2).strip()
    if short:
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            value = _ROLE.sub(_code, obj.docstring.value)
            obj.docstring.value = _LITERAL.sub(":", value)
