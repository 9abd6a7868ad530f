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

ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|data|exc|mod|obj|const):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class RstRoles(griffe.Extension):
    """Rewrite ``:role:`target``` to ```target``` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
