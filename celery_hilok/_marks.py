"""The mark compatibility table, defined once for Python, the Lua scripts and the docs.

This is Gray's multi-granularity locking. A grant places a mark on every node of its chain:
its *leaf mark* on its own node and an *intention mark* on each ancestor. Two grants of
different holders conflict iff, on the node of the upper one (the one at or above the
other; unrelated paths never conflict), the upper grant's leaf mark conflicts with the mark
the other grant places there: its leaf mark if both are on the same node, else its intention
mark. Intention marks never conflict with each other, so no other node can decide.

Everything else is derived from :data:`CONFLICTS` and :data:`PLACES`: the key layout of
:mod:`celery_hilok._core` (:data:`MODE_MARKS`), :data:`CONFLICTING`, the Lua tables prepended to
every script (:func:`lua_tables`) and :func:`grants_conflict`. ``tests/test_marks.py``
checks them, the Lua ``conflict()`` and the tables of ``docs/concepts.md`` against it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONFLICTING",
    "CONFLICTS",
    "HOLD_SETS",
    "MARKS",
    "MODES",
    "MODE_MARKS",
    "PLACES",
    "grants_conflict",
    "lua_tables",
]

MARKS: Final = ("is", "ix", "s", "x")
"""The four marks, in the order of a node's keys (``KeySpace.node_keys``); index = position."""

CONFLICTS: Final[dict[str, frozenset[str]]] = {
    "is": frozenset({"x"}),
    "ix": frozenset({"s", "x"}),
    "s": frozenset({"ix", "x"}),
    "x": frozenset({"is", "ix", "s", "x"}),
}
"""Mark -> the marks it conflicts with (a symmetric relation)."""

PLACES: Final[dict[str, tuple[str, str]]] = {
    "S": ("s", "is"),  # read: the subtree, shared
    "X": ("x", "ix"),  # write: the subtree, exclusive
    "N": ("is", "is"),  # read-node: the node only, an IS asked for by name
}
"""Mode code -> (the mark it places on its own node, the mark it places on each ancestor)."""

MODES: Final[dict[str, str]] = {"read": "S", "write": "X", "read-node": "N"}
"""Public mode name -> mode code; the same map as ``_core.MODE_CODES`` (tests check it)."""

_INDEX: Final = {mark: i for i, mark in enumerate(MARKS)}

MODE_MARKS: Final[dict[str, tuple[int, int]]] = {
    name: (_INDEX[PLACES[code][0]], _INDEX[PLACES[code][1]]) for name, code in MODES.items()
}
"""Mode name -> (leaf mark index, intention mark index): ``_core._MARKS``."""

CONFLICTING: Final[tuple[tuple[int, ...], ...]] = tuple(
    tuple(j for j, other in enumerate(MARKS) if other in CONFLICTS[mark]) for mark in MARKS
)
"""Per mark index, the indices of the marks it conflicts with (itself included, for a
write's): the sets a script looks in for a conflicting holder, or an earlier waiter, on each
node of a chain (``CONFLICTING`` of :func:`lua_tables`)."""


HOLD_SETS: Final[tuple[tuple[int, ...], ...]] = tuple(
    tuple(sorted({*CONFLICTING[i], i})) for i in range(len(MARKS))
)
"""Per mark index, the hold sets a grant placing that mark needs on the node, in node-key
order: the conflicting ones and its own. A *lean* call (no queue in the tree, so no wait
set read or written) sends only these of each node (``LEAN_SETS`` of :func:`lua_tables`)."""


def _at_or_above(upper: str, lower: str) -> bool:
    """Is canonical path ``upper`` the node ``lower`` itself or one of its ancestors?"""
    return upper == lower or (lower.startswith(upper) and lower[len(upper) : len(upper) + 1] == "/")


def grants_conflict(mode1: str, path1: str, mode2: str, path2: str) -> bool:
    """Do grants (``mode1`` on ``path1``) and (``mode2`` on ``path2``) of two holders conflict?

    Modes are public names (``read``, ``write``, ``read-node``), paths canonical.
    """
    if not _at_or_above(path1, path2):
        if not _at_or_above(path2, path1):
            return False
        mode1, path1, mode2, path2 = mode2, path2, mode1, path1
    upper = PLACES[MODES[mode1]][0]
    leaf, intent = PLACES[MODES[mode2]]
    return (leaf if path1 == path2 else intent) in CONFLICTS[upper]


def _lua_bools(values: list[bool]) -> str:
    return "{ " + ", ".join("true" if v else "false" for v in values) + " }"


def lua_tables() -> str:
    """The Lua definitions of the table, prepended to ``_scripts/common.lua`` (1-based marks).

    ``LEAF_MARK`` / ``INTENT_MARK``: mode code -> mark index; ``CONFLICTS[a][b]``: marks a
    and b conflict; ``CONFLICTING[a]``: the list of marks conflicting with a;
    ``LEAN_SETS[a]``: :data:`HOLD_SETS`, and ``LEAN_POS[a][b]`` the place of b in it.
    """

    def by_code(pick: int) -> str:
        return "{ " + ", ".join(f"{c} = {_INDEX[p[pick]] + 1}" for c, p in PLACES.items()) + " }"

    def lua_places() -> str:
        rows = (
            "{ " + ", ".join(f"[{b + 1}] = {i}" for i, b in enumerate(row, 1)) + " }"
            for row in HOLD_SETS
        )
        return ", ".join(rows)

    def lua_lists(rows: tuple[tuple[int, ...], ...]) -> str:
        return ", ".join("{ " + ", ".join(str(j + 1) for j in row) + " }" for row in rows)

    legend = ", ".join(f"{i} {mark}" for i, mark in enumerate(MARKS, 1))
    return "\n".join(
        [
            "-- Generated from celery_hilok/_marks.py (edit the table there, not here).",
            f"-- marks by index: {legend}",
            "-- the mark a grant of each mode places on its own node, and on each ancestor",
            f"local LEAF_MARK = {by_code(0)}",
            f"local INTENT_MARK = {by_code(1)}",
            "-- CONFLICTS[a][b]: do marks a and b conflict; CONFLICTING[a]: the marks b that do",
            "local CONFLICTS = {",
            *(f"  {_lua_bools([b in CONFLICTS[a] for b in MARKS])},  -- {a}" for a in MARKS),
            "}",
            f"local CONFLICTING = {{ {lua_lists(CONFLICTING)} }}",
            "-- LEAN_SETS[a]: the hold sets a lean call sends for a node where it places a",
            f"local LEAN_SETS = {{ {lua_lists(HOLD_SETS)} }}",
            "-- LEAN_POS[a][b]: the place of b in LEAN_SETS[a] (a literal: a library's top",
            "-- level may not call ipairs)",
            f"local LEAN_POS = {{ {lua_places()} }}",
            "",
        ]
    )
