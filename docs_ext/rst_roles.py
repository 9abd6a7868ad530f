"""A griffe extension for the API reference: Sphinx roles in docstrings become code spans.

The library's docstrings use reST roles (``:meth:`HiLok.read```, ``:class:`~x.Lease```),
which Markdown would show verbatim. mkdocs.yml loads this file through mkdocstrings'
``extensions`` option; it rewrites each role to a code span (``~`` keeps the last name
only, as in Sphinx) when griffe loads the docstring. The source is not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# A reST literal block marker: a line that is only "::" goes, "text::" keeps one colon (the
# indented block after it is a Markdown code block already).
LITERAL = re.compile(r"^([ \t]*)::[ \t]*\n|(?<=\S)::$", re.M)
ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|data|exc|mod|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _lists(text: str) -> str:
    """A blank line before a list that follows a paragraph line (Markdown needs one)."""
    lines = text.split("\n")
    out: list[str] = []
    for line in lines:
        prev = out[-1] if out else ""
        is_item = line.startswith(("- ", "* "))
        if is_item and prev.strip() and not prev.startswith(("- ", "* ", " ", "\t")):
            out.append("")
        out.append(line)
    return "\n".join(out)


def _literal(match: re.Match[str]) -> str:
    return "" if match.group(1) is not None else ":"


class RstRoles(griffe.Extension):
    """Roles to code spans, no ``::`` markers, a blank line before each list."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = ROLE.sub(_code, obj.docstring.value)
            obj.docstring.value = _lists(LITERAL.sub(_literal, text))
