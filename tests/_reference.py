"""The compatibility rules of CONTRACT §1, written again from the contract text alone.

Tests check the engine against this, so it deliberately shares no code (and no method)
with ``celery_hilok``: it works on segment tuples, not on canonical strings or marks.

- ``read`` (subtree shared) conflicts with a ``write`` on the same node, an ancestor or a
  descendant;
- ``write`` (subtree exclusive) conflicts with anything on one line with it;
- ``read-node`` (node-only shared) conflicts only with a ``write`` on the node itself or
  on an ancestor;
- shared modes never conflict with each other, and a holder never conflicts with itself
  (callers compare holders before asking).
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["read", "write", "read-node"]
MODES: tuple[Mode, ...] = ("read", "write", "read-node")


def segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


def at_or_above(upper: str, lower: str) -> bool:
    """Is ``upper`` the node ``lower`` itself or one of its ancestors?"""
    up, low = segments(upper), segments(lower)
    return len(up) <= len(low) and low[: len(up)] == up


def on_one_line(a: str, b: str) -> bool:
    return at_or_above(a, b) or at_or_above(b, a)


def conflicts(mode_a: str, path_a: str, mode_b: str, path_b: str) -> bool:
    """Do grants (mode_a on path_a) and (mode_b on path_b) of two holders conflict?"""
    if mode_a not in MODES or mode_b not in MODES:
        raise ValueError(f"unknown mode: {mode_a!r} or {mode_b!r}")
    if "write" not in (mode_a, mode_b):
        return False
    if mode_a == "write":
        write_path, other_mode, other_path = path_a, mode_b, path_b
    else:
        write_path, other_mode, other_path = path_b, mode_a, path_a
    if other_mode == "read-node":
        return at_or_above(write_path, other_path)
    return on_one_line(write_path, other_path)


def relation(grant_path: str, asked: str) -> str | None:
    """Where a grant sits relative to the path asked about in ``status``, if on its line."""
    if segments(grant_path) == segments(asked):
        return "self"
    if at_or_above(grant_path, asked):
        return "above"
    if at_or_above(asked, grant_path):
        return "below"
    return None
