"""Lock paths: normalisation, validation, and the Redis key names built from them."""

from __future__ import annotations

import re

import pytest

from celery_hilok import InvalidArgument
from celery_hilok.paths import (
    MAX_DEPTH,
    MAX_PATH_LENGTH,
    KeySpace,
    decode_canonical,
    parse_path,
    validate_namespace,
)

# -- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["a/b", "/a/b", "a/b/", "a//b", "//a///b//"])
def test_empty_segments_are_dropped(spelling: str) -> None:
    path = parse_path(spelling)
    assert path == parse_path("a/b")
    assert path.segments == ("a", "b")
    assert path.text == "a/b"
    assert str(path) == "a/b"
    assert path.canonical == "a/b"
    assert path.chain == ("a", "a/b")
    assert path.tree == "a"
    assert path.depth == 2


def test_single_segment_is_its_own_tree() -> None:
    path = parse_path("/root/")
    assert path.segments == ("root",)
    assert path.chain == ("root",)
    assert path.tree == "root"


def test_custom_separator() -> None:
    dotted = parse_path(".a..b.c.", ".")
    assert dotted.segments == ("a", "b", "c")
    assert dotted.text == "a.b.c"
    # The canonical form does not depend on the separator...
    assert dotted.canonical == parse_path("a/b/c").canonical
    assert dotted.chain == ("a", "a/b", "a/b/c")
    # ...and a '/' inside a segment is just a character of that segment.
    slashed = parse_path("a/b.c", ".")
    assert slashed.segments == ("a/b", "c")
    assert slashed.canonical != parse_path("a/b/c").canonical
    assert decode_canonical(slashed.canonical, ".") == "a/b.c"


def test_multi_character_separator() -> None:
    path = parse_path("::x::::y::", "::")
    assert path.segments == ("x", "y")
    assert path.text == "x::y"
    assert path.canonical == "x/y"


def test_ancestor_or_self() -> None:
    a, ab, abc, ac = (parse_path(p) for p in ("a", "a/b", "a/b/c", "a/c"))
    assert a.is_ancestor_or_self_of(a)
    assert a.is_ancestor_or_self_of(abc)
    assert ab.is_ancestor_or_self_of(abc)
    assert not abc.is_ancestor_or_self_of(ab)
    assert not ab.is_ancestor_or_self_of(ac)
    # Segments are compared whole: "a/b" is not an ancestor of "a/bc".
    assert not ab.is_ancestor_or_self_of(parse_path("a/bc"))


def test_limits_are_inclusive() -> None:
    deep = "/".join(["s"] * MAX_DEPTH)
    assert parse_path(deep).depth == MAX_DEPTH
    long = "x" * MAX_PATH_LENGTH
    assert parse_path(long).segments == (long,)


# -- key names ------------------------------------------------------------------------------

AWKWARD_SEGMENTS = [
    "plain",
    "with space",
    "tab\there",
    "50%",
    "%20",
    "a:b",
    "{tag}",
    "}{",
    "{",
    "}",
    "ünïcødé",
    "日本語",
    "emoji🔒",
    "pipe|bar",
    "a+b=c",
    "*",
    "\\",
]


def _node_keys(namespace: str, path: str, separator: str = "/") -> tuple[str, ...]:
    lock_path = parse_path(path, separator)
    return KeySpace(namespace).node_keys(lock_path.tree, lock_path.canonical)


def _hash_tag(key: str) -> str:
    """The Redis Cluster hash tag of a key: what lies between its first '{' and the next '}'."""
    start = key.index("{")
    end = key.index("}", start + 1)
    assert end > start + 1, f"empty hash tag in {key!r}"
    return key[start + 1 : end]


@pytest.mark.parametrize("segment", AWKWARD_SEGMENTS)
def test_awkward_segments_give_well_formed_keys(segment: str) -> None:
    path = parse_path(f"{segment}/{segment}/leaf")
    space = KeySpace("ns")
    keys = [
        *space.node_block(path.tree, path.canonical),
        *space.tree_keys(path.tree),
        space.holder_key(path.tree, "handle-1234"),
    ]
    for key in keys:
        assert key.startswith("ns:{")
        # One hash tag, the same for the whole tree: exactly one brace of each kind.
        assert key.count("{") == 1 and key.count("}") == 1, key
        assert _hash_tag(key) == path.tree
        # Key text is printable ASCII: no whitespace or raw unicode reaches Redis.
        assert re.fullmatch(r"[\x21-\x7e]+", key), key
    # Canonical members use '|' and '/' as field separators: segments never contain them.
    assert "|" not in path.canonical
    assert path.canonical.count("/") == path.depth - 1
    assert decode_canonical(path.canonical) == path.text


def test_awkward_segments_give_distinct_keys() -> None:
    paths = [f"t/{s}" for s in AWKWARD_SEGMENTS] + [f"{s}/x" for s in AWKWARD_SEGMENTS]
    # Spellings that must not collide with their encoded or escaped look-alikes.
    paths += ["t/with%20space", "t/a%3Ab", "t/%7Btag%7D", "t/a/b", "t/a%2Fb"]
    keys = {_node_keys("ns", p) for p in paths}
    assert len(keys) == len(paths)
    trees = {parse_path(f"{s}/x").tree for s in AWKWARD_SEGMENTS}
    assert len(trees) == len(AWKWARD_SEGMENTS)


def test_key_layout() -> None:
    path = parse_path("tenants/42/invoices")
    space = KeySpace("hilok")
    assert space.node_block(path.tree, path.canonical) == (
        "hilok:{tenants}:tenants/42/invoices:is",
        "hilok:{tenants}:tenants/42/invoices:ix",
        "hilok:{tenants}:tenants/42/invoices:s",
        "hilok:{tenants}:tenants/42/invoices:x",
        "hilok:{tenants}:tenants/42/invoices:wis",
        "hilok:{tenants}:tenants/42/invoices:wix",
        "hilok:{tenants}:tenants/42/invoices:ws",
        "hilok:{tenants}:tenants/42/invoices:wx",
    )
    assert (
        space.node_keys(path.tree, path.canonical)
        == space.node_block(path.tree, path.canonical)[:4]
    )
    assert space.tree_keys("tenants") == (
        "hilok:{tenants}::n",
        "hilok:{tenants}::q",
        "hilok:{tenants}::qx",
        "hilok:{tenants}::qc",
        "hilok:{tenants}::h",
        "hilok:{tenants}::hx",
    )
    assert space.channel("Zx8_c-1") == "hilok:w:Zx8_c-1"  # a client's, not a tree's
    assert space.holder_key("tenants", "h123") == "hilok:{tenants}::hl:h123"
    assert space.tree_pattern() == "hilok:{*"


def test_namespaces_do_not_share_keys() -> None:
    assert set(_node_keys("ns1", "a/b")).isdisjoint(_node_keys("ns2", "a/b"))
    assert set(_node_keys("ns", "a/b")).isdisjoint(_node_keys("ns", "a/b/c"))


def test_node_keys_cache_is_per_path() -> None:
    space = KeySpace("ns")
    first = space.node_keys("a", "a/b")
    assert space.node_keys("a", "a/b") == first
    assert space.node_keys("a", "a/c") != first


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 42, 4.2, b"a/b", ["a", "b"], ("a",), object()])
def test_non_str_path(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_path(bad)
    assert repr(bad) in str(info.value)
    assert type(bad).__name__ in str(info.value)


@pytest.mark.parametrize("bad", ["", "/", "//", "///", "/////"])
def test_path_without_segment(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_path(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(("bad", "separator"), [("..", "."), ("::::", "::"), ("", ".")])
def test_path_without_segment_custom_separator(bad: str, separator: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_path(bad, separator)
    assert repr(bad) in str(info.value)


def test_path_too_long() -> None:
    bad = "p" * (MAX_PATH_LENGTH + 1)
    with pytest.raises(InvalidArgument) as info:
        parse_path(bad)
    message = str(info.value)
    assert str(MAX_PATH_LENGTH + 1) in message
    assert bad[:40] in message
    # Separators count: a path of only separators past the limit is rejected for length.
    with pytest.raises(InvalidArgument):
        parse_path("a" + "/" * MAX_PATH_LENGTH)


def test_path_too_deep() -> None:
    bad = "/".join(f"s{i}" for i in range(MAX_DEPTH + 1))
    with pytest.raises(InvalidArgument) as info:
        parse_path(bad)
    message = str(info.value)
    assert str(MAX_DEPTH + 1) in message
    assert bad[:40] in message


@pytest.mark.parametrize("bad", ["", None, 1, b"/"])
def test_bad_separator(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_path("a/b", bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["", "a b", "a:b", "{ns}", "ns/x", "é", "x" * 65, None, 7, b"ns"])
def test_bad_namespace(bad: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_namespace(bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(InvalidArgument):
        KeySpace(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("good", ["hilok", "a", "x" * 64, "my-app.locks_v2", "t0123456789ab"])
def test_good_namespace(good: str) -> None:
    assert validate_namespace(good) == good


def test_invalid_argument_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_path("")
    assert issubclass(InvalidArgument, ValueError)
