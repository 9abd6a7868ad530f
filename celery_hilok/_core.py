"""The sans-I/O core shared by every driver.

Nothing here touches a socket: :class:`Protocol` turns lock requests into script calls
(:class:`Call`: which script, KEYS, ARGV) and decodes the replies into plain values, and
:func:`next_wait` decides how long a blocked waiter sleeps. :mod:`celery_hilok.sync`,
:mod:`celery_hilok.aio` and everything built on them only add the I/O.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Final, Literal, NamedTuple

from ._marks import HOLD_SETS, MODE_MARKS, lua_tables
from .errors import InvalidArgument
from .paths import KeySpace, LockPath, parse_path

__all__ = [
    "MODE_CODES",
    "Blocked",
    "Call",
    "Granted",
    "Protocol",
    "Request",
    "Script",
    "new_handle",
    "next_wait",
]

Mode = Literal["read", "write", "read-node"]

MODE_CODES: Final[dict[str, str]] = {"read": "S", "write": "X", "read-node": "N"}
"""Public mode name -> the one-letter code used in Redis (see ``_scripts/common.lua``)."""
_MODE_NAMES: Final = {v: k for k, v in MODE_CODES.items()}

WITHDRAW_ONLY: Final = "-"
"""Release scope that leaves every grant alone and only withdraws queue entries."""

QUEUE_TTL_MS: Final = 6000
"""Life of a wait-queue entry; a live waiter renews it at least every :data:`KEEPALIVE`."""
KEEPALIVE: Final = 2.0
"""Longest single sleep of a waiter, in seconds, so that its queue entry never lapses."""

_HANDLE_RE: Final = re.compile(r"[A-Za-z0-9_\-.:]{8,128}")


def new_handle() -> str:
    """A fresh, unguessable holder handle (144 random bits)."""
    return secrets.token_urlsafe(18)


def _handle_and_nonce() -> tuple[str, str]:
    """:func:`new_handle` and a call's nonce (48 random bits) from one read of the OS's
    random source: each read is a system call that lets go of the GIL, which with many
    threads costs a thread switch."""
    raw = os.urandom(24)
    return base64.urlsafe_b64encode(raw[:18]).decode(), raw[18:].hex()


def check_handle(handle: object) -> str:
    if not isinstance(handle, str) or not _HANDLE_RE.fullmatch(handle):
        raise InvalidArgument(
            f"handle must be 8-128 characters of letters, digits, '_', '-', '.', ':'; "
            f"got {handle!r}"
        )
    return handle


def check_mode(mode: object) -> Mode:
    if mode not in MODE_CODES:
        raise InvalidArgument(f"mode must be 'read', 'write' or 'read-node', got {mode!r}")
    return mode  # type: ignore[return-value]


def check_ttl(ttl: object, name: str = "ttl") -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise InvalidArgument(f"{name} must be a positive number of seconds, got {ttl!r}")
    if ttl * 1000 < 1 or ttl > 10**9:
        raise InvalidArgument(f"{name} must be between 0.001 and 1e9 seconds, got {ttl!r}")
    return float(ttl)


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
        raise InvalidArgument(f"timeout must be None or seconds >= 0, got {timeout!r}")
    if timeout < 0:
        raise InvalidArgument(f"timeout must not be negative, got {timeout!r}")
    return float(timeout)


def check_wait_replicas(replicas: object, timeout: object) -> tuple[int, float]:
    """Validate the ``wait_replicas`` / ``wait_timeout`` pair of a lock client."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise InvalidArgument(f"wait_replicas must be an int >= 0, got {replicas!r}")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0.001 <= timeout <= 10**6
    ):
        raise InvalidArgument(f"wait_timeout must be seconds in [0.001, 1e6], got {timeout!r}")
    return replicas, float(timeout)


CLUSTER_WAIT: Final = (
    "wait_replicas is not supported on Redis Cluster: WAIT counts the replicas of the node "
    "the connection talks to, and a cluster client sends it to an arbitrary node, not to the "
    "one that ran the acquire"
)


@dataclass(frozen=True, slots=True)
class Request:
    """One lock of a (possibly multi-lock) acquire: a normalised path and a mode."""

    path: LockPath
    mode: Mode

    @property
    def code(self) -> str:
        return MODE_CODES[self.mode]

    @classmethod
    def parse(cls, path: object, mode: object, separator: str) -> Request:
        if type(path) is str and type(mode) is str:
            return _request(path, mode, separator)  # (a Request is immutable: shared)
        return cls(parse_path(path, separator), check_mode(mode))

    def describe(self) -> str:
        return f"{self.mode} lock on {self.path.text!r}"


@lru_cache(maxsize=4096)
def _request(path: str, mode: str, separator: str) -> Request:
    return Request(parse_path(path, separator), check_mode(mode))


def _lua(name: str) -> str:
    return (resources.files("celery_hilok") / "_scripts" / f"{name}.lua").read_text("utf-8")


@lru_cache(maxsize=1)
def _prelude() -> str:
    # the mark table's Lua definitions, generated from our own constants (never from input)
    return lua_tables() + "\n" + _lua("common")


SCRIPT_NAMES: Final = ("acquire", "release", "refresh", "status")

SCRIPT_FLAGS: Final[dict[str, tuple[str, ...]]] = {
    "acquire": (),  # refused whole when Redis is out of memory: nothing is granted
    "release": ("allow-oom",),  # releasing frees memory; it must work when memory is full
    "refresh": ("allow-oom",),  # renews what exists (a holder keeps its lock meanwhile)
    "status": ("no-writes",),
}
"""The flags of each entry point as a Redis Function (they have no EVAL counterpart, which
keeps Redis's older rules: there a write that needs memory fails on a full server)."""


class Library:
    """The scripts as one library of Redis Functions, loaded once with ``FUNCTION LOAD`` and
    called with ``FCALL``: the prelude is then compiled once per server, not once per call
    (some 20 microseconds of Redis time a call).

    Its name, and its functions' names, carry a hash of its code, so that two versions of
    celery_hilok can share a server; the library is never changed in place."""

    __slots__ = ("name", "source", "tag")

    def __init__(self, names: Sequence[str]) -> None:
        code = _prelude() + "\n" + "\n".join(_lua(name) for name in names)
        flags = repr([SCRIPT_FLAGS[name] for name in names])
        self.tag = hashlib.sha1((code + flags).encode("utf-8")).hexdigest()[:16]
        self.name = f"celery_hilok_{self.tag}"
        register = [
            f"redis.register_function{{ function_name = '{self.function(name)}', "
            f"callback = {name}, flags = {{ {', '.join(repr(f) for f in SCRIPT_FLAGS[name])} }} }}"
            for name in names
        ]
        self.source = f"#!lua name={self.name}\n" + code + "\n" + "\n".join(register) + "\n"

    def function(self, name: str) -> str:
        """The name of entry point ``name`` in this library (for ``FCALL``)."""
        return f"hilok_{self.tag}_{name}"


LIBRARY: Final = Library(SCRIPT_NAMES)


class Script:
    """One entry point of the scripts: a function of :data:`LIBRARY` (``FCALL``), or, where
    the server refuses functions, a script of its own (the prelude, its body and a line
    calling it) addressed by SHA1 (``EVALSHA``)."""

    __slots__ = ("function", "name", "sha", "source")

    def __init__(self, name: str) -> None:
        self.name = name
        self.function = LIBRARY.function(name)
        self.source = (
            "local CALL_KEYS, CALL_ARGV = KEYS, ARGV\n"
            + _prelude()
            + "\n"
            + _lua(name)
            + f"\nreturn {name}(CALL_KEYS, CALL_ARGV)\n"
        )
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"<Script {self.name} {self.sha[:8]}>"


ACQUIRE: Final = Script("acquire")
RELEASE: Final = Script("release")
REFRESH: Final = Script("refresh")
STATUS: Final = Script("status")


Blocks = Literal["full", "lean", "own"]
"""What a call's node blocks hold (see :meth:`Protocol._chain_keys`)."""

ASK_FULL: Final = 2
"""An acquire's reply code: this lean call needs the wait sets (somebody waits in a tree of
the request, or it was refused and joins the queue); nothing was done, ask again in full."""
RELEASE_ASK_FULL: Final = -1
"""A release's code, for every grant of a lean call in a tree where somebody waits."""


class Call(NamedTuple):
    """A script invocation ready to send: ``EVALSHA script.sha len(keys) *keys *args``."""

    script: Script
    keys: list[str]
    args: list[str | int]


@dataclass(frozen=True, slots=True)
class Granted:
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why an acquire was refused: a live holder or an earlier waiter (``queued``)."""

    handle: str
    mode: Mode
    path: str  # canonical
    remaining: float  # seconds the blocker's lease or queue entry has left
    queued: bool
    holding: bool = False  # the refused holder already holds a live grant in a tree asked

    def describe(self, separator: str = "/") -> str:
        from .paths import decode_canonical

        who = "queued before you" if self.queued else "held"
        return (
            f"{self.mode} lock on {decode_canonical(self.path, separator)!r} {who} by "
            f"{self.handle[:6]}..., {self.remaining:.3f}s left on its lease"
        )


@dataclass(frozen=True, slots=True)
class Mark:
    """A live mark as seen by ``status``: which holder, which grant, how long it has left."""

    handle: str
    mode: Mode
    path: str  # canonical path of the grant that placed this mark
    remaining: float


@dataclass(frozen=True, slots=True)
class NodeMarks:
    """The live marks on one node, by kind: its own grants and intention marks from below."""

    path: str  # canonical
    intent_shared: list[Mark]
    intent_exclusive: list[Mark]
    shared: list[Mark]
    exclusive: list[Mark]


@dataclass(frozen=True, slots=True)
class Waiter:
    handle: str
    mode: Mode
    path: str  # canonical
    ticket: int
    remaining: float


def make_member(handle: str, code: str, canonical: str) -> str:
    """A grant's or waiting request's member in the scripts' sets (see :func:`parse_member`):
    its holder, mode code and canonical path."""
    return f"{handle}|{code}|{canonical}"


def parse_member(member: str | bytes) -> tuple[str, Mode, str]:
    text = member.decode() if isinstance(member, bytes) else member
    handle, code, path = text.split("|", 2)
    return handle, _MODE_NAMES[code], path  # type: ignore[return-value]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# The mark a grant of each mode places on its own node and on each ancestor, as an index into
# a node's keys (is, ix, s, x); derived from the one mark table, in _marks.py.
_MARKS: Final = MODE_MARKS
_ALL_TREE_KEYS: Final = slice(0, 6)  # n, q, qx, qc, h, hx: acquire and release
_HOLDER_TREE_KEYS: Final = slice(4, 6)  # h, hx: refresh

HANDOFF_TTL_MS: Final = 5000
"""The first lease of a lock a release hands to a waiter (at most the waiter's own ttl): the
waiter renews it to its full ttl when it wakes (at the latest after :data:`KEEPALIVE`), or,
in a ``with`` block, takes it from the release's message and its refresher renews it within
a third of this; one that died meanwhile blocks the lock no longer than this."""


class Protocol:
    """Builds the calls of one namespace and decodes their replies."""

    __slots__ = ("_chains", "keys", "separator")

    def __init__(self, namespace: str, separator: str) -> None:
        self.keys = KeySpace(namespace)
        self.separator = separator
        self._chains: dict[tuple[Request, Blocks], tuple[str, ...]] = {}  # see _chain_keys

    # -- key blocks ---------------------------------------------------------------------

    def _layout(
        self, items: Sequence[tuple[str, Request]], tree_slice: slice, blocks: Blocks
    ) -> tuple[list[str], list[tuple[Request, int]], int]:
        """KEYS for (handle, request) pairs (see ``_scripts/common.lua``): the ``tree_slice``
        of each tree's keys (n, q, qx, qc, h, hx), then per grant its holder's hash in the
        tree and one block per chain node (see :meth:`_chain_keys`)."""
        space = self.keys
        trees: dict[str, int] = {}
        for _, req in items:
            trees.setdefault(req.path.tree, len(trees) + 1)
        keys: list[str] = []
        for tree in trees:
            keys.extend(space.tree_keys(tree)[tree_slice])
        placed: list[tuple[Request, int]] = []
        for handle, req in items:
            tree = req.path.tree
            keys.append(space.holder_key(tree, handle))
            keys.extend(self._chain_keys(req, blocks))
            placed.append((req, trees[tree]))
        return keys, placed, len(trees)

    def _chain_keys(self, req: Request, blocks: Blocks) -> tuple[str, ...]:
        """The node blocks of ``req``'s chain, root first, from a cache (most calls are of a
        few hot locks): ``"full"`` all eight sets of each node, ``"lean"`` the hold sets
        the mark placed there needs (:data:`~celery_hilok._marks.HOLD_SETS`), ``"own"``
        the set of that mark only."""
        cached = self._chains.get((req, blocks))
        if cached is not None:
            return cached
        tree, chain, space = req.path.tree, req.path.chain, self.keys
        if blocks == "full":
            keys = tuple(k for node in chain for k in space.node_block(tree, node))
        else:
            leaf, intent = _MARKS[req.mode]
            last = len(chain) - 1
            marks = [leaf if level == last else intent for level in range(len(chain))]
            if blocks == "own":
                keys = tuple(
                    space.node_block(tree, n)[m] for n, m in zip(chain, marks, strict=True)
                )
            else:
                keys = tuple(
                    space.node_block(tree, n)[i]
                    for n, m in zip(chain, marks, strict=True)
                    for i in HOLD_SETS[m]
                )
        if len(self._chains) >= 4096:
            self._chains.clear()
        self._chains[(req, blocks)] = keys
        return keys

    # -- calls ----------------------------------------------------------------------------

    def acquire(
        self,
        handle: str,
        requests: Sequence[Request],
        ttl: float,
        register: bool,
        nonce: str,
        channel: str = "",
        new: bool = False,
        queue_ttl_ms: int = QUEUE_TTL_MS,
        lean: bool = False,
    ) -> Call:
        """Acquire ``requests`` for ``handle``; ``nonce`` names this call (see :meth:`undo`);
        a release tells a waiting request on ``channel`` (its client's) that it may go.
        ``new``: the first call for a handle just made, of which nothing can exist yet (the
        script then looks nothing of it up). ``queue_ttl_ms``: how long a request refused
        (with ``register``) stays in the queue unless asked again. ``lean``: send only the
        hold sets, for a tree where nobody is thought to wait; the script then answers
        :data:`ASK_FULL` (having done nothing) if it needs the wait sets after all."""
        flags = (1 if register else 0) | (2 if new else 0) | (4 if lean else 0)
        pairs = [(handle, r) for r in requests]
        keys, placed, ntrees = self._layout(pairs, _ALL_TREE_KEYS, "lean" if lean else "full")
        args: list[str | int] = [
            handle,
            int(ttl * 1000),
            flags,
            queue_ttl_ms,
            ntrees,
            len(placed),
            nonce,
            channel,
        ]
        for req, tree in placed:
            args += (req.code, req.path.depth, tree, req.path.canonical)
        return Call(ACQUIRE, keys, args)

    def release(
        self, handle: str, requests: Sequence[Request], scope: str = "", lean: bool = False
    ) -> Call:
        """Release ``handle``'s grants of ``requests``, withdraw its waiting requests for them
        and hand the freed locks on to the waiters next in line.

        ``scope`` limits what is released: ``""`` everything, :data:`WITHDRAW_ONLY` no grant
        (only waiting requests), an acquire call's nonce only the grants that call made.
        ``lean``: send only the sets of the grants' own marks (all a release touches where
        nobody waits); the codes are then all :data:`RELEASE_ASK_FULL` if somebody waits in
        a tree of the call (nothing was done).
        """
        pairs = [(handle, r) for r in requests]
        keys, placed, ntrees = self._layout(pairs, _ALL_TREE_KEYS, "own" if lean else "full")
        args: list[str | int] = [handle, scope, ntrees, len(placed), HANDOFF_TTL_MS, int(lean)]
        for req, tree in placed:
            args += (req.code, req.path.depth, tree, req.path.canonical)
        return Call(RELEASE, keys, args)

    def refresh(self, items: Sequence[tuple[str, Request, float]]) -> Call:
        pairs = [(h, r) for h, r, _ in items]
        keys, placed, ntrees = self._layout(pairs, _HOLDER_TREE_KEYS, "own")
        args: list[str | int] = [ntrees, len(placed)]
        for (req, tree), (handle, _, ttl) in zip(placed, items, strict=True):
            args += (req.code, req.path.depth, tree, req.path.canonical, handle, int(ttl * 1000))
        return Call(REFRESH, keys, args)

    def refresh_batches(
        self, items: Sequence[tuple[str, Request, float]], per_tree: bool
    ) -> list[tuple[list[int], Call]]:
        """Refresh calls for any number of (handle, request, ttl) items, each with the
        indices of the items it covers, to be sent in one pipeline: calls of at most
        :data:`MAX_CALL_KEYS` keys, and with ``per_tree`` (Redis Cluster: one slot per
        script) each of one tree only."""

        def key(item: tuple[str, Request, float]) -> object:
            return item[1].path.tree if per_tree else None

        parts = _batches(items, key, tree_keys=2, node_keys=1)
        return [(part, self.refresh([items[i] for i in part])) for part in parts]

    def release_batches(
        self, items: Sequence[tuple[str, Request]], per_tree: bool, lean: bool = False
    ) -> list[tuple[list[int], Call]]:
        """Release calls for (handle, request) items: one holder per call (and one tree with
        ``per_tree``), at most :data:`MAX_CALL_KEYS` keys each (its trees' queue keys
        included), like :meth:`refresh_batches`."""

        def key(item: tuple[str, Request]) -> object:
            return (item[0], item[1].path.tree) if per_tree else item[0]

        if len(items) == 1:  # one lease (a with block's): always fits one call
            handle, request = items[0]
            return [([0], self.release(handle, [request], lean=lean))]
        out = []
        # budgeted by what a release writes (its own marks), not by the sets it only reads
        for part in _batches(items, key, tree_keys=6, node_keys=1):
            handle = items[part[0]][0]
            call = self.release(handle, [items[i][1] for i in part], lean=lean)
            out.append((part, call))
        return out

    def status(self, path: LockPath) -> Call:
        keys = list(self.keys.tree_keys(path.tree))
        for node in path.chain:
            keys.extend(self.keys.node_keys(path.tree, node))
        return Call(STATUS, keys, [path.depth])

    # -- replies --------------------------------------------------------------------------

    @staticmethod
    def decode_acquire(reply: list[object]) -> Granted | Blocked | None:
        """The outcome of an acquire call; None: a lean call must be made again in full."""
        if reply[0] == ASK_FULL:
            return None
        if reply[0] == 1:
            tokens = reply[1]
            assert isinstance(tokens, list)
            return Granted([int(t) for t in tokens])
        member, remaining, kind = reply[1], reply[2], reply[3]
        assert isinstance(member, (str, bytes)) and isinstance(kind, (str, bytes))
        handle, mode, path = parse_member(member)
        return Blocked(
            handle,
            mode,
            path,
            max(0.0, int(remaining) / 1000),  # type: ignore[call-overload]
            _text(kind) == "queued",
            len(reply) > 4 and int(reply[4]) == 1,  # type: ignore[call-overload]
        )

    @staticmethod
    def decode_codes(reply: list[object]) -> list[int]:
        return [int(x) for x in reply]  # type: ignore[call-overload]

    @staticmethod
    def decode_status(path: LockPath, reply: list[object]) -> tuple[list[NodeMarks], list[Waiter]]:
        levels, queue = reply
        assert isinstance(levels, list) and isinstance(queue, list)
        nodes: list[NodeMarks] = []
        for canonical, level in zip(path.chain, levels, strict=True):
            kinds: list[list[Mark]] = []
            for flat in level:
                marks = []
                for i in range(0, len(flat), 2):
                    h, m, p = parse_member(flat[i])
                    marks.append(Mark(h, m, p, int(flat[i + 1]) / 1000))
                kinds.append(marks)
            nodes.append(NodeMarks(canonical, *kinds))
        waiters: list[Waiter] = []
        for i in range(0, len(queue), 3):
            h, m, p = parse_member(queue[i])
            waiters.append(Waiter(h, m, p, int(float(queue[i + 1])), int(queue[i + 2]) / 1000))
        return nodes, waiters


MAX_CALL_KEYS: Final = 128
"""The budget of one refresh or release script call, in keys it writes (per grant its
holder's hash and its own mark on each node of its chain; per tree two or six keys);
more are split into several calls, sent in one pipeline (one round trip). Redis runs
nothing else while a script runs, and a refresh costs some 10-15 microseconds per key it
renews: 128 keys (14 grants at depth 8, 3 at depth 32) keep each call to a few
milliseconds at most, where one call for 1,000 grants at depth 8 took some 60 ms."""


def _batches(
    items: Sequence[tuple[Any, ...]],
    key: Callable[[Any], object],
    tree_keys: int = 0,
    node_keys: int = 1,
) -> list[list[int]]:
    """Indices of ``items`` (tuples whose second element is a :class:`Request`) grouped by
    ``key`` (in first-seen order), each group cut into calls of at most
    :data:`MAX_CALL_KEYS` keys: per item its holder's hash and ``node_keys`` per chain
    node, plus ``tree_keys`` for each tree of a call. One item alone always fits (depth <= 32)."""
    groups: dict[object, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    out: list[list[int]] = []
    for idxs in groups.values():
        part: list[int] = []
        size = 0
        trees: set[str] = set()
        for i in idxs:
            path = items[i][1].path
            need = 1 + node_keys * path.depth + (0 if path.tree in trees else tree_keys)
            if part and size + need > MAX_CALL_KEYS:
                out.append(part)
                part, size, trees = [], 0, set()
                need = 1 + node_keys * path.depth + tree_keys
            part.append(i)
            size += need
            trees.add(path.tree)
        if part:
            out.append(part)
    return out


def by_tree(requests: Sequence[Request]) -> list[list[Request]]:
    """Requests grouped by tree, trees in sorted order: the order in which a client that
    cannot take several trees in one script (Redis Cluster) acquires them, so that two such
    acquires never wait for each other in a cycle."""
    groups: dict[str, list[Request]] = {}
    for req in requests:
        groups.setdefault(req.path.tree, []).append(req)
    return [groups[tree] for tree in sorted(groups)]


def related(a: str, b: str) -> bool:
    """Are canonical paths ``a`` and ``b`` on one line (either an ancestor of the other)?"""
    if len(a) > len(b):
        a, b = b, a
    return a == b or (b.startswith(a) and b[len(a)] == "/")


class Handed(NamedTuple):
    """A lock a release granted to a waiting acquire call, as the release's message says."""

    nonce: str  # of the acquire call that asked for it (Acquisition.nonce)
    token: int
    lease: float  # seconds it lasts from the release (the hand-off lease, at most its ttl)


def told(message: str) -> dict[str, Handed | None]:
    """The waiters a release's message on a client's channel tells, by handle: those it
    granted the lock to, with the grant, and those it found in front of the line with a
    lock it could not grant there (below the released node, or several locks): None, ask
    again. A word that does not parse only wakes (its holder asks again)."""
    out: dict[str, Handed | None] = {}
    for word in message.split(" "):
        handle, _, grant = word.partition("/")
        nonce, _, rest = grant.partition("/")
        token, _, lease = rest.partition("/")
        if token.isdigit() and lease.isdigit():
            out[handle] = Handed(nonce, int(token), int(lease) / 1000)
        else:
            out.setdefault(handle, None)
    return out


def next_wait(now: float, deadline: float | None, blocked: Blocked) -> float:
    """Seconds to sleep before retrying a refused acquire, unless a wake-up comes first.

    Capped by the blocker's remaining lease (plus a millisecond, so its expiry is seen),
    by :data:`KEEPALIVE` (the waiter's queue entry must be renewed) and by the deadline.
    """
    wait = min(blocked.remaining + 0.001, KEEPALIVE)
    if deadline is not None:
        wait = min(wait, deadline - now)
    return max(wait, 0.0)


_PAIRS: Final = "locks must be an iterable of (path, mode) pairs, such as [('a/b', 'write')]"

MAX_LOCKS: Final = 256
"""Most distinct locks one ``acquire_many`` may ask for.

An atomic acquire is one script call, and Redis runs nothing else meanwhile; its work grows
with locks x depth (256 writes at depth 32 take some 70 ms of Redis time, at depth 2 some
5 ms). Without a limit, Lua's ``unpack`` (at most about 8000 values) failed the call past
1,333 depth-2 or 121 depth-32 writes; the script now takes its keys in slices, so this
limit, not Lua, is what refuses."""


def normalise_requests(spec: Iterable[tuple[object, object]], separator: str) -> list[Request]:
    """Parse (path, mode) pairs; the same lock asked twice is kept once.

    Raises :class:`InvalidArgument` for anything but an iterable of pairs (a str, a mapping,
    None), for more than :data:`MAX_LOCKS` distinct locks, and for a bad path or mode.
    """
    if type(spec) is list and len(spec) == 1 and type(spec[0]) is tuple and len(spec[0]) == 2:
        return [Request.parse(spec[0][0], spec[0][1], separator)]  # one lock: the usual call
    if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Iterable):
        hint = "; for a mapping, pass its .items()" if isinstance(spec, Mapping) else ""
        raise InvalidArgument(f"{_PAIRS}, got {type(spec).__name__}: {spec!r:.80}{hint}")
    out: list[Request] = []
    seen: set[Request] = set()
    for pair in spec:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidArgument(f"{_PAIRS}; one of them is {type(pair).__name__}: {pair!r:.80}")
        req = Request.parse(pair[0], pair[1], separator)
        if req not in seen:
            if len(out) == MAX_LOCKS:
                asked = f"{len(spec)} pairs" if isinstance(spec, Sized) else "more"
                raise InvalidArgument(
                    f"acquire_many takes at most {MAX_LOCKS} distinct locks in one atomic "
                    f"acquire, got {asked}: split them into several acquires (with "
                    "handle= to keep one holder), or lock a common ancestor instead"
                )
            seen.add(req)
            out.append(req)
    if not out:
        raise InvalidArgument("at least one lock must be requested")
    return out


@dataclass(frozen=True, slots=True)
class Sleep:
    """Acquisition step: wait up to ``seconds`` for a wake-up, then call again."""

    seconds: float


SUBSCRIBE: Final = Sleep(0.0)
"""Acquisition step: subscribe to wake-ups, then call again at once (nothing may slip by)."""
RESEND: Final = Sleep(0.0)
"""Acquisition step: a lean call needs the wait sets after all; send :attr:`Acquisition.call`
(full now) at once (compare with ``is``)."""


class Acquisition:
    """The decisions of one blocking acquire, without its I/O.

    A driver sends :attr:`call`, feeds the reply to :meth:`step`, and obeys the answer: the
    tokens (done), :data:`SUBSCRIBE`, :data:`RESEND` or a :class:`Sleep`; :meth:`step` raises
    :class:`LockNotAcquired` when it must give up. When anything at all goes wrong the driver
    sends :meth:`cleanup` (if not None) before re-raising, so nothing is left behind.
    """

    __slots__ = (
        "asked_new",
        "block",
        "call",
        "can_wait",
        "channel",
        "deadline",
        "fresh",
        "handle",
        "holding",
        "last",
        "lean",
        "nonce",
        "protocol",
        "queue_ttl_ms",
        "requests",
        "subscribed",
        "timeout",
        "ttl",
    )

    def __init__(
        self,
        protocol: Protocol,
        requests: list[Request],
        *,
        handle: str | None,
        ttl: float,
        block: bool,
        timeout: float | None,
        now: float,
        channel: str = "",
        queue_ttl_ms: int = QUEUE_TTL_MS,
        lean: bool = False,
    ) -> None:
        self.protocol = protocol
        # the first call may be lean (nobody is thought to wait in its trees): see RESEND
        self.lean = lean
        self.queue_ttl_ms = queue_ttl_ms
        self.requests = requests
        self.fresh = handle is None
        if handle is None:
            self.handle, self.nonce = _handle_and_nonce()
        else:
            self.handle, self.nonce = check_handle(handle), secrets.token_hex(6)
        self.ttl = ttl
        self.block = bool(block)
        self.timeout = check_timeout(timeout)
        self.can_wait = self.block and self.timeout != 0
        self.deadline = None if self.timeout is None else now + self.timeout
        self.subscribed = False
        self.holding = False  # as of the last refusal
        self.last: Blocked | None = None  # the last refusal
        self.channel = channel
        # the first call of a handle made here looks nothing of it up; the next ones do (a
        # release may have handed it the lock, or it holds a ticket)
        self.asked_new = self.fresh
        self.call = self._make_call()

    def _make_call(self) -> Call:
        return self.protocol.acquire(
            self.handle, self.requests, self.ttl, self.can_wait, self.nonce, self.channel,
            self.asked_new, self.queue_ttl_ms, self.lean,
        )  # fmt: skip

    def step(self, reply: list[object], now: float) -> list[int] | Sleep:
        outcome = self.protocol.decode_acquire(reply)
        if isinstance(outcome, Granted):
            return outcome.tokens
        if outcome is None:  # a lean call that needs the wait sets: nothing was done
            self.lean = False
            self.call = self._make_call()
            return RESEND
        if self.asked_new:  # asked as a new holder: not any more
            self.asked_new = False
            self.call = self._make_call()
        self.holding = outcome.holding
        if not self.can_wait or (self.deadline is not None and now >= self.deadline):
            raise self._not_acquired(outcome)
        self.last = outcome
        if not self.subscribed:
            self.subscribed = True
            return SUBSCRIBE
        return self.pause(now)

    def pause(self, now: float) -> Sleep:
        """The sleep after the last refusal, unless a wake-up comes first."""
        assert self.last is not None
        return Sleep(next_wait(now, self.deadline, self.last))

    def cleanup(self, error: BaseException) -> Call | None:
        """The call that undoes whatever a failed acquire may have left.

        A one-try refusal left nothing. Any other failure (a waiter giving up, a lost reply, a
        cancellation, a grant too few replicas acknowledged) may have left a waiting request
        and grants: the request is withdrawn, and exactly the grants made for this call
        (found by its nonce: by its own script, or handed to it by a release) are released;
        grants the holder had before, even if this call renewed them, stay.
        """
        from .errors import LockNotAcquired, LockNotReplicated

        refused = isinstance(error, LockNotAcquired) and not isinstance(error, LockNotReplicated)
        if refused and not self.can_wait:
            return None  # a one-try refusal joined no queue and was granted nothing
        # A waiter that gives up may have been handed the lock by a release meanwhile (made
        # with this call's nonce): that grant goes too, and so on to the next in line.
        return self.protocol.release(self.handle, self.requests, self.nonce)

    def not_replicated(self, acknowledged: int, replicas: int, timeout: float) -> Exception:
        """The error for a grant that too few replicas acknowledged; raising it makes
        :meth:`cleanup` release exactly the grants of this call."""
        from .errors import LockNotReplicated

        what = ", ".join(r.describe() for r in self.requests)
        first = self.requests[0]
        return LockNotReplicated(
            f"{what} was granted, but only {acknowledged} of {replicas} replica(s) "
            f"acknowledged it within {timeout}s (WAIT), so it was released again",
            path=first.path.text,
            mode=first.mode,
            replicas=replicas,
            acknowledged=acknowledged,
        )

    def gave_up(self, why: str) -> Exception:
        """The error for a waiter that stops waiting (``why``) after its last refusal;
        raising it makes :meth:`cleanup` withdraw the request from the queue."""
        assert self.last is not None
        return self._not_acquired(self.last, f"(gave up waiting: {why})")

    def _not_acquired(self, blocked: Blocked, when: str | None = None) -> Exception:
        from .errors import LockNotAcquired

        what = ", ".join(r.describe() for r in self.requests)
        if when is None:
            when = "at once (block=False)" if not self.block else f"within {self.timeout}s"
        reason = blocked.describe(self.protocol.separator)
        # Name the request that was in the blocker's way (on one line with it, preferring
        # one where either side writes), not just the first one asked for.
        on_line = [r for r in self.requests if related(r.path.canonical, blocked.path)]
        writes = [r for r in on_line if "write" in (r.mode, blocked.mode)]
        stuck = (writes or on_line or self.requests)[0]
        return LockNotAcquired(
            f"could not acquire {what} {when}: {reason}",
            path=stuck.path.text,
            mode=stuck.mode,
            blocker=reason,
        )
