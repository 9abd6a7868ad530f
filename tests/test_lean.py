"""Lean calls (issue 14): where nobody waits in a tree, an acquire sends only the hold sets
its marks need (``_marks.HOLD_SETS``) and a release only its own marks' sets, not all eight
sets of every node. A lean
call that needs the wait sets after all (somebody waits in the tree, or it is refused and
would join the queue) does nothing and says so; the client then asks again in full, and
goes full at once in that tree for a while (``_engine.BUSY_MEMORY``).

Each test uses its own redis-server: the script calls are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis

from celery_hilok import HiLok, LockNotAcquired
from celery_hilok._core import ASK_FULL, RELEASE_ASK_FULL, Request, new_handle
from celery_hilok._marks import HOLD_SETS, MARKS, MODE_MARKS
from tests._redis import RedisServer
from tests.test_commandstats import reset, script_calls
from tests.test_handoff import Ghost

DEEP = "l1/l2/l3/l4/l5/l6/l7/l8"


@pytest.fixture
def server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_server_factory()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    admin = server.client()
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def hl(server: RedisServer, namespace: str) -> Iterator[HiLok]:
    with HiLok(f"{server.url}/0", namespace=namespace) as locks:
        locks.release(locks.acquire("warm/up", "write"))  # load the library first
        yield locks


def snapshot(client: redis.Redis, namespace: str) -> dict[bytes, object]:
    """Every key of the namespace with its content (sets and hashes as dicts)."""
    out: dict[bytes, object] = {}
    for key in client.scan_iter(f"{namespace}:*"):
        kind = client.type(key)
        if kind == b"zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"hash":
            out[key] = client.hgetall(key)
        else:
            out[key] = client.get(key)
    return out


def send(hl: HiLok, call: object) -> list[object]:
    (reply,) = hl._drive(hl._send([call]))  # type: ignore[list-item]
    assert isinstance(reply, list)
    return reply


@pytest.mark.parametrize("mode", ["read", "write", "read-node"])
def test_a_lean_call_sends_only_the_hold_sets_its_marks_need(hl: HiLok, mode: str) -> None:
    request = Request.parse(DEEP, mode, "/")
    full = hl._protocol.acquire("h" * 12, [request], 30, True, "n")
    lean = hl._protocol.acquire("h" * 12, [request], 30, True, "n", lean=True)
    leaf, intent = MODE_MARKS[mode]
    per_chain = 7 * len(HOLD_SETS[intent]) + len(HOLD_SETS[leaf])
    assert len(full.keys) == 6 + 1 + 8 * 8
    assert len(lean.keys) == 6 + 1 + per_chain
    assert set(lean.keys) <= set(full.keys)
    # the node blocks: hold sets only, never a wait set
    assert all(k.rsplit(":", 1)[1] in MARKS for k in lean.keys[7:])
    release = hl._protocol.release("h" * 12, [request], lean=True)
    own = hl._protocol.refresh([("h" * 12, request, 30)]).keys[2:]  # (refresh: h, hx first)
    assert release.keys == [*lean.keys[:7], *own[1:]]  # its own marks' sets only


@pytest.mark.parametrize("mode", ["read", "write", "read-node"])
def test_lean_and_full_calls_grant_and_release_alike(hl: HiLok, mode: str) -> None:
    other = hl.acquire("l1/l2/l3/l4/l5/l6/l7/other", "read")  # shares 7 nodes
    lease = hl.acquire(DEEP, mode)  # type: ignore[arg-type]
    assert hl._lean([lease.request]), "nobody waits: the calls went lean"
    status = hl.status(DEEP)
    assert [h.handle for h in status.holders] == [lease.handle]
    hl.release(lease)
    assert hl.status(DEEP).holders == []
    assert [h.handle for h in hl.status(other.path).holders] == [other.handle]
    hl.release(other)


def test_a_lean_acquire_where_somebody_waits_asks_again_in_full_having_done_nothing(
    hl: HiLok, client: redis.Redis, namespace: str
) -> None:
    held = hl.acquire("t/hot", "write")
    ghost = Ghost(hl, [("t/hot", "write")])
    assert ghost.queued()
    request = Request.parse("t/free/doc", "write", "/")
    before = snapshot(client, namespace)
    call = hl._protocol.acquire(new_handle(), [request], 30, True, "n1", "", True, lean=True)
    assert send(hl, call) == [ASK_FULL]
    assert snapshot(client, namespace) == before
    # the same request in full is granted, past the waiter on another line
    full = hl._protocol.acquire(new_handle(), [request], 30, True, "n1", "", True)
    assert send(hl, full)[0] == 1
    hl.release(held)


def test_a_lean_acquire_refused_asks_again_in_full_only_if_it_would_join_the_queue(
    hl: HiLok, client: redis.Redis, namespace: str
) -> None:
    held = hl.acquire("t/a", "write")
    request = Request.parse("t/a/b", "read", "/")
    before = snapshot(client, namespace)
    waiting = hl._protocol.acquire(new_handle(), [request], 30, True, "n2", "", True, lean=True)
    assert send(hl, waiting) == [ASK_FULL]
    one_try = hl._protocol.acquire(new_handle(), [request], 30, False, "n3", "", True, lean=True)
    reply = send(hl, one_try)
    assert reply[0] == 0 and reply[3] == b"held"  # refused, by the holder
    assert snapshot(client, namespace) == before  # and nobody joined the queue
    hl.release(held)


def test_a_lean_release_where_somebody_waits_asks_again_in_full_having_done_nothing(
    hl: HiLok, client: redis.Redis, namespace: str
) -> None:
    held = hl.acquire("t/a", "write")
    ghost = Ghost(hl, [("t/a", "write")])
    before = snapshot(client, namespace)
    call = hl._protocol.release(held.handle, [held.request], lean=True)
    assert send(hl, call) == [RELEASE_ASK_FULL]
    assert snapshot(client, namespace) == before
    assert not ghost.holds()
    full = hl._protocol.release(held.handle, [held.request])
    assert send(hl, full) == [1]
    assert ghost.holds(), "the full release handed the lock on"
    held.released = True
    assert ghost.leave() == [1]


def test_a_client_whose_lean_release_finds_a_waiter_hands_on_and_goes_full_there(
    hl: HiLok, client: redis.Redis
) -> None:
    held = hl.acquire("t/a", "write")  # nobody waited: lean
    assert hl._lean([held.request])
    ghost = Ghost(hl, [("t/a", "write")])
    reset(client)
    hl.release(held)
    assert script_calls(client) == 2  # the lean release, asked again in full
    assert ghost.holds(), "the lock was not handed on"
    # the client now knows somebody waits in the tree: its next calls there go full
    assert not hl._lean([Request.parse("t/elsewhere", "write", "/")])
    assert hl._lean([Request.parse("other/tree", "write", "/")])
    reset(client)
    with pytest.raises(LockNotAcquired):
        hl.acquire("t/a", "write", block=False)
    assert script_calls(client) == 1
    assert ghost.leave() == [1]


def test_a_client_refused_in_a_tree_goes_full_there(hl: HiLok, client: redis.Redis) -> None:
    held = hl.acquire("t/a", "write")
    other = HiLok(hl.redis, namespace=hl.namespace)
    try:
        assert other._lean([held.request])
        reset(client)
        with pytest.raises(LockNotAcquired):
            other.acquire("t/a", "write", block=False)
        assert script_calls(client) == 1  # a one-try refusal joins no queue: lean is enough
        assert not other._lean([held.request])
    finally:
        other.close()
        hl.release(held)
