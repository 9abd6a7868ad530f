"""The one mark table (celery_hilok/_marks.py) and everything derived from it.

Checks the key layout tables of the core, the Python rule against the contract (CONFLICT
§1, see tests/_reference.py), the Lua ``conflict()`` in a real Redis against the Python
rule, and the tables of docs/concepts.md against the mark table.
"""

from __future__ import annotations

import itertools
import re
from importlib import resources
from pathlib import Path

import pytest
import redis

from celery_hilok import _core, _marks
from celery_hilok._core import ACQUIRE, LIBRARY, MODE_CODES, REFRESH, RELEASE, STATUS, related
from celery_hilok._marks import CONFLICTS, MARKS, PLACES, grants_conflict, lua_tables
from celery_hilok.paths import KeySpace
from tests import _reference

CONCEPTS = Path(__file__).resolve().parent.parent / "docs" / "concepts.md"
MODES = ("read", "write", "read-node")

# Path pairs by how the first path relates to the second: "same" node, first strictly
# "above" (an ancestor of) the second, "below" it, or "apart" (siblings, other trees, and
# string prefixes that are no ancestors).
PAIRS: dict[str, list[tuple[str, str]]] = {
    "same": [("a", "a"), ("a/b", "a/b"), ("a/b%2Fc", "a/b%2Fc")],
    "above": [("a", "a/b"), ("a", "a/b/c"), ("a/b", "a/b/c"), ("a/b", "a/b/%2F")],
    "below": [("a/b", "a"), ("a/b/c", "a"), ("a/b/c", "a/b")],
    "apart": [
        ("a/b", "a/c"),
        ("a/b/c", "a/c"),
        ("a/b", "a/bc"),
        ("a/bc", "a/b"),
        ("a/b", "a/b%2Fc"),
        ("a", "b"),
        ("a", "ab"),
        ("a/b", "b/a/b"),
    ],
}
PATHS = sorted({p for pairs in PAIRS.values() for pair in pairs for p in pair})
LINE = frozenset({"same", "above", "below"})

# The contract, per (mode of the first grant, mode of the second): the relations of the
# first path to the second in which the two grants conflict.
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("read", "read"): frozenset(),
    ("read", "read-node"): frozenset(),
    ("read-node", "read"): frozenset(),
    ("read-node", "read-node"): frozenset(),
    ("read", "write"): LINE,
    ("write", "read"): LINE,
    ("write", "write"): LINE,
    ("write", "read-node"): frozenset({"same", "above"}),  # a write at or above the node
    ("read-node", "write"): frozenset({"same", "below"}),
}


def relation(p: str, q: str) -> str:
    for name, pairs in PAIRS.items():
        if (p, q) in pairs:
            return name
    if p == q:
        return "same"
    if related(p, q):
        return "above" if len(p) < len(q) else "below"
    return "apart"


def chain(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


# -- the table and the core's layout --------------------------------------------------------


def test_core_tables_are_derived_from_the_mark_table() -> None:
    assert _marks.MODE_MARKS == {"read": (2, 0), "write": (3, 1), "read-node": (0, 0)}
    assert _marks.CONFLICTING == ((3,), (2, 3), (1, 3), (0, 1, 2, 3))
    assert _core._MARKS is _marks.MODE_MARKS


def test_table_is_consistent_with_the_core() -> None:
    assert _marks.MODES == MODE_CODES
    assert set(PLACES) == set(MODE_CODES.values())
    suffixes = [key.rsplit(":", 1)[1] for key in KeySpace("ns").node_keys("a", "a")]
    assert tuple(suffixes) == MARKS  # mark index = position among a node's keys
    assert set(CONFLICTS) == set(MARKS)
    for a in MARKS:
        assert CONFLICTS[a] <= set(MARKS)
        for b in MARKS:
            assert (b in CONFLICTS[a]) == (a in CONFLICTS[b]), (a, b)  # symmetric
    intentions = {intent for _, intent in PLACES.values()}
    for a, b in itertools.product(intentions, repeat=2):
        assert b not in CONFLICTS[a]  # what makes the upper node the only one to look at


def test_lua_tables_are_rendered_before_the_prelude() -> None:
    common = (resources.files("celery_hilok") / "_scripts" / "common.lua").read_text("utf-8")
    prelude = lua_tables() + "\n" + common + "\n"
    for script in (ACQUIRE, RELEASE, REFRESH, STATUS):
        assert script.source.split("\n", 1)[1].startswith(prelude)  # after KEYS/ARGV
    assert LIBRARY.source.split("\n", 1)[1].startswith(prelude)  # after the shebang
    for name in ("LEAF_MARK", "INTENT_MARK", "CONFLICTS", "CONFLICTING"):
        assert re.search(rf"^local {name} = ", lua_tables(), re.M), name
        assert not re.search(rf"^local {name}\b", common, re.M), name  # defined once


# -- the Python rule --------------------------------------------------------------------------


@pytest.mark.parametrize(("mode1", "mode2"), list(itertools.product(MODES, repeat=2)))
def test_grants_conflict_follows_the_contract(mode1: str, mode2: str) -> None:
    for rel, pairs in PAIRS.items():
        for p, q in pairs:
            want = rel in EXPECTED[mode1, mode2]
            assert grants_conflict(mode1, p, mode2, q) is want, (mode1, p, mode2, q)
    for p, q in itertools.product(PATHS, repeat=2):
        got = grants_conflict(mode1, p, mode2, q)
        assert got == (relation(p, q) in EXPECTED[mode1, mode2]), (mode1, p, mode2, q)
        assert got == _reference.conflicts(mode1, p, mode2, q), (mode1, p, mode2, q)
        assert got == grants_conflict(mode2, q, mode1, p)


@pytest.mark.parametrize(("mode1", "mode2"), list(itertools.product(MODES, repeat=2)))
def test_upper_node_rule_is_gray_rule_on_every_shared_node(mode1: str, mode2: str) -> None:
    """Checking the upper grant's node alone equals checking every node both chains share."""

    def placed(mode: str, path: str, node: str) -> str:
        leaf, intent = PLACES[MODE_CODES[mode]]
        return leaf if node == path else intent

    for p, q in itertools.product(PATHS, repeat=2):
        shared = set(chain(p)) & set(chain(q))
        gray = any(placed(mode2, q, n) in CONFLICTS[placed(mode1, p, n)] for n in shared)
        assert grants_conflict(mode1, p, mode2, q) == gray, (mode1, p, mode2, q)


# -- the Lua rule, in a real Redis ---------------------------------------------------------

LUA_BODY = """
local function b(v) if v then return 1 end return 0 end
local out, leaf, intent, sizes, table, self = {}, {}, {}, {}, {}, {}
for i = 1, #CALL_ARGV, 4 do
  out[#out + 1] = b(conflict(CALL_ARGV[i], CALL_ARGV[i + 1], CALL_ARGV[i + 2], CALL_ARGV[i + 3]))
end
for _, c in ipairs({ 'S', 'X', 'N' }) do
  leaf[#leaf + 1] = LEAF_MARK[c]
  intent[#intent + 1] = INTENT_MARK[c]
end
for a = 1, 4 do
  sizes[a] = CONFLICTING[a]
  self[a] = b(CONFLICTS[a][a])
  for c = 1, 4 do table[#table + 1] = b(CONFLICTS[a][c]) end
end
return { out, leaf, intent, sizes, table, self }
"""


def test_lua_conflict_agrees_with_python(redis_client: redis.Redis) -> None:
    common = (resources.files("celery_hilok") / "_scripts" / "common.lua").read_text("utf-8")
    source = "local CALL_ARGV = ARGV\n" + lua_tables() + "\n" + common + "\n" + LUA_BODY
    cases = [
        (m1, p, m2, q)
        for m1, m2 in itertools.product(MODES, repeat=2)
        for p, q in itertools.product(PATHS, repeat=2)
    ]
    args = [x for m1, p, m2, q in cases for x in (MODE_CODES[m1], p, MODE_CODES[m2], q)]
    out, leaf, intent, sizes, table, self = redis_client.eval(source, 0, *args)
    assert len(out) == len(cases)
    for case, got in zip(cases, out, strict=True):
        assert bool(got) == grants_conflict(*case), case
    index = {mark: i + 1 for i, mark in enumerate(MARKS)}
    assert leaf == [index[PLACES[c][0]] for c in ("S", "X", "N")]
    assert intent == [index[PLACES[c][1]] for c in ("S", "X", "N")]
    assert sizes == [[j + 1 for j in c] for c in _marks.CONFLICTING]
    assert table == [int(b in CONFLICTS[a]) for a in MARKS for b in MARKS]
    assert self == [int(a in CONFLICTS[a]) for a in MARKS]


LEAN_BODY = """
local sets, places = {}, {}
for a = 1, 4 do
  sets[a] = LEAN_SETS[a]
  for b = 1, 4 do places[#places + 1] = LEAN_POS[a][b] or 0 end
end
return { sets, places }
"""


def test_lua_lean_sets_are_the_hold_sets(redis_client: redis.Redis) -> None:
    """A lean call's node blocks (Python's key layout and Lua's reading of it) agree: each
    mark's conflicting marks and itself, in node-key order, and the place of each in it."""
    common = (resources.files("celery_hilok") / "_scripts" / "common.lua").read_text("utf-8")
    source = lua_tables() + "\n" + common + "\n" + LEAN_BODY
    sets, places = redis_client.eval(source, 0)
    for i, mark in enumerate(MARKS):
        assert _marks.HOLD_SETS[i] == tuple(
            j for j, other in enumerate(MARKS) if other in CONFLICTS[mark] or other == mark
        )
    assert sets == [[j + 1 for j in row] for row in _marks.HOLD_SETS]
    assert places == [
        row.index(b) + 1 if b in row else 0 for row in _marks.HOLD_SETS for b in range(4)
    ]


def test_library_loads_as_functions(redis_client: redis.Redis) -> None:
    """The library is valid as Redis Functions (whose top level may call no function, not
    even ipairs): else every client falls back to EVALSHA, slower, with only a log line."""
    assert redis_client.function_load(LIBRARY.source, replace=True) == LIBRARY.name.encode()


def test_scripts_load_under_their_sha(redis_client: redis.Redis) -> None:
    for script in (ACQUIRE, RELEASE, REFRESH, STATUS):
        assert redis_client.script_load(script.source) == script.sha


# -- docs/concepts.md ----------------------------------------------------------------------


def table_after(header: str) -> list[list[str]]:
    """The body rows (cells stripped) of the Markdown table whose header row is ``header``."""
    lines = CONCEPTS.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows: list[list[str]] = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert rows, header
    return rows


def test_docs_marks_table_is_the_mark_table() -> None:
    rows = table_after("| mark held on a node | conflicts with a new mark |")
    described = {
        ("read", "somewhere below"): PLACES[MODE_CODES["read"]][1],
        ("write", "somewhere below"): PLACES[MODE_CODES["write"]][1],
        ("read", "of this subtree"): PLACES[MODE_CODES["read"]][0],
        ("write", "of this subtree"): PLACES[MODE_CODES["write"]][0],
    }
    seen = {}
    for held, conflicting in rows:
        match = re.fullmatch(r"(\w+) \(a (read|write) (somewhere below|of this subtree)\)", held)
        assert match, held
        mark = match[1].lower()
        assert described[match[2], match[3]] == mark, held
        seen[mark] = {m.strip().lower() for m in conflicting.split(",")}
    assert seen == {mark: set(CONFLICTS[mark]) for mark in MARKS}
    text = CONCEPTS.read_text(encoding="utf-8")
    read_intent, write_intent = (PLACES[MODE_CODES[m]][1].upper() for m in ("read", "write"))
    assert f"{read_intent} under a read, {write_intent} under a write" in text
    assert "`celery_hilok/_marks.py`" in text and "tests/test_marks.py" in text


# What the read/write table's cells say, as the relations of p (held) to q (requested) in
# which the two conflict; a cell worded otherwise fails the test until it is listed here.
CELLS: dict[str, frozenset[str]] = {
    "always compatible": frozenset(),
    "conflict iff p and q are on one line": LINE,
    "conflict iff q is p, an ancestor or a descendant of p": LINE,
}


def test_docs_read_write_table_follows_the_mark_table() -> None:
    rows = table_after("| held \\ requested | `read(q)` | `write(q)` |")
    requested = ("read", "write")
    held_modes = []
    for held, *cells in rows:
        match = re.fullmatch(r"`(read|write)\(p\)`", held)
        assert match, held
        held_modes.append(match[1])
        assert len(cells) == len(requested), held
        for want, cell in zip(requested, cells, strict=True):
            assert cell in CELLS, cell
            for rel, pairs in PAIRS.items():
                for p, q in pairs:
                    expected = rel in CELLS[cell]
                    assert grants_conflict(match[1], p, want, q) is expected, (held, want, p, q)
    assert held_modes == ["read", "write"]


def test_docs_node_only_read_sentence_follows_the_mark_table() -> None:
    text = " ".join(CONCEPTS.read_text(encoding="utf-8").split())
    assert "it conflicts only with a write on the node or above it" in text
    for mode in MODES:
        for rel, pairs in PAIRS.items():
            for p, q in pairs:  # p: the node-only read, q: the other grant
                expected = mode == "write" and rel in ("same", "below")
                assert grants_conflict("read-node", p, mode, q) is expected, (mode, p, q)
