"""The wait queue under contention: direct hand-off, the queue front, bounded work and memory.

White-box where it must be: a *ghost* waiter is a waiting request registered by sending the
acquire script once (as a refused blocking acquire does) and then never asking again, so
whatever it ends up holding was granted by a release alone. Everything runs on a real
redis-server; counts of the commands Redis ran (``INFO commandstats``, which counts the
commands inside scripts too) show what the scripts did.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from celery_hilok import HiLok, LockNotAcquired
from celery_hilok._core import HANDOFF_TTL_MS, Handed, Request, new_handle
from celery_hilok._core import told as told_of
from tests._redis import RedisServer
from tests._wait import wait_for
from tests.test_fairness import wait_past_server_time


@pytest.fixture
def server(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_server_factory()  # its own: command counts are this test's alone


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
        yield locks


class Ghost:
    """A waiting request that asks once and never again (see the module docstring)."""

    def __init__(
        self,
        hl: HiLok,
        locks: list[tuple[str, Any]],
        *,
        ttl: float = 30.0,
        queue_ttl_ms: int | None = None,
    ) -> None:
        self.hl = hl
        self.handle = new_handle()
        self.channel = f"{hl.namespace}:w:ghost-{secrets.token_hex(4)}"
        self.nonce = secrets.token_hex(6)
        self.requests = [Request.parse(path, mode, "/") for path, mode in locks]
        call = hl._protocol.acquire(self.handle, self.requests, ttl, True, self.nonce, self.channel)
        if queue_ttl_ms is not None:
            call.args[3] = queue_ttl_ms
        (reply,) = hl._drive(hl._send([call]))
        assert reply[0] == 0, "a ghost must be refused (and so queued)"

    def holds(self) -> bool:
        return any(h.handle == self.handle for r in self.requests for h in self.status(r))

    def queued(self) -> bool:
        return any(w.handle == self.handle for r in self.requests for w in self.status(r, True))

    def status(self, request: Request, waiters: bool = False) -> list[Any]:
        status = self.hl.status(request.path.text)
        return status.waiters if waiters else status.holders

    def leave(self) -> list[int]:
        """Give up, as a waiter that timed out does: release what its call was granted."""
        call = self.hl._protocol.release(self.handle, self.requests, self.nonce)
        (codes,) = self.hl._drive(self.hl._send([call]))
        return [int(c) for c in codes]


class Heard:
    """Subscribed to ghosts' channels: ``heard(ghost)`` lists the handles its channel was
    told, ``heard.words(ghost)`` the messages' words as they came (a granted waiter's word
    carries its grant: "<handle>/<nonce>/<token>/<lease ms>")."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
        self.heard: dict[str, list[str]] = {}

    def words(self, ghost: Ghost) -> list[str]:
        channel = ghost.channel
        if channel not in self.heard:
            self.heard[channel] = []
            self.pubsub.subscribe(channel)
            message = self.pubsub.get_message(timeout=5)
            assert message is not None and message["type"] == "subscribe"
        # A release publishes before it replies, so its messages are on their way by now:
        # read until the line stays quiet (the first wait is long, for a busy machine).
        timeout = 0.5
        while (message := self.pubsub.get_message(timeout=timeout)) is not None:
            timeout = 0.05
            if message["type"] == "message":
                name = message["channel"].decode()
                self.heard[name] += message["data"].decode().split(" ")
        return self.heard[channel]

    def __call__(self, ghost: Ghost) -> list[str]:
        return [word.split("/")[0] for word in self.words(ghost)]


@pytest.fixture
def told(client: redis.Redis) -> Iterator[Heard]:
    heard = Heard(client)
    try:
        yield heard
    finally:
        heard.pubsub.close()


def test_a_release_grants_the_next_waiter_by_itself(hl: HiLok, told: Heard) -> None:
    held = hl.acquire("d/x", "write")
    ghost = Ghost(hl, [("d/x", "write")])
    assert told(ghost) == []
    hl.release(held)
    # The release made the grant (the ghost never asked again) and said so on its channel,
    # with what it granted: the ghost's call (its nonce), the token, the lease.
    assert ghost.holds() and not ghost.queued()
    (word,) = told.words(ghost)
    (handed,) = told_of(word).values()
    assert handed is not None and told_of(word) == {ghost.handle: handed}, word
    assert handed == Handed(ghost.nonce, handed.token, HANDOFF_TTL_MS / 1000)
    assert handed.token > held.token
    (grant,) = hl.status("d/x").holders
    assert 0 < grant.ttl <= HANDOFF_TTL_MS / 1000  # a short first lease
    with pytest.raises(LockNotAcquired, match="held by"):
        hl.acquire("d/x", "read", block=False)
    # A waiter that gives up gives back what it was handed: the next one gets it.
    assert ghost.leave() == [1]
    hl.release(hl.acquire("d/x", "read", block=False))


def test_tickets_that_differ_past_14_digits_keep_their_order(
    hl: HiLok, client: redis.Redis, namespace: str
) -> None:
    """Tickets have 16 digits; Lua writes a number with 14 when it joins it to a string, so
    a ticket compared that way (as a score bound) rounds up past the next ones, and two
    waiters each found the other in front: neither was ever granted (a stall until they
    timed out, seen under load when waiters queue within the same 100 microseconds)."""
    # Tickets and tokens count on from the tree's counter: make them 16-digit neighbours
    # whose 14-digit spelling (5e+15) is larger than the next ones.
    client.set(f"{namespace}:{{tk}}::n", 4_999_999_999_999_950, px=60_000)
    held = hl.acquire("tk/x", "write")
    first, second = Ghost(hl, [("tk/x", "write")]), Ghost(hl, [("tk/x", "write")])
    hl.release(held)
    assert first.holds() and second.queued()  # first come, first served
    assert first.leave() == [1]
    assert second.holds()
    assert second.leave() == [1]


def test_readers_go_in_together_and_a_writer_keeps_its_place(hl: HiLok, told: Heard) -> None:
    held = hl.acquire("c", "write")
    r1, r2 = Ghost(hl, [("c", "read")]), Ghost(hl, [("c", "read")])
    writer = Ghost(hl, [("c", "write")])
    r3 = Ghost(hl, [("c", "read")])
    for ghost in (r1, r2, writer, r3):
        told(ghost)
    hl.release(held)
    assert r1.holds() and r2.holds()
    assert writer.queued() and r3.queued()  # r3 came after the writer: it waits behind it
    assert r1.leave() == [1]
    assert not writer.holds()  # r2 still reads
    assert r2.leave() == [1]
    assert writer.holds() and r3.queued()
    assert writer.leave() == [1]
    assert r3.holds()
    assert r3.leave() == [1]
    for ghost in (r1, r2, writer, r3):  # each told once, when granted, on its own channel
        assert told(ghost) == [ghost.handle]


def test_a_waiter_below_the_released_node_is_told_not_granted(hl: HiLok, told: Heard) -> None:
    held = hl.acquire("b", "write")
    below = Ghost(hl, [("b/x/y", "write")])
    several = Ghost(hl, [("b", "read"), ("b/z", "read")])
    told(below)
    told(several)
    hl.release(held)
    # Neither can be granted by this release (keys of b/x/y are not in it; a request of
    # two locks is granted whole or not at all): both are told to ask again.
    assert told(below) == [below.handle]
    assert told(several) == [several.handle]
    assert below.queued() and several.queued()
    assert not below.holds() and not several.holds()


def test_a_dead_waiter_is_passed_over(hl: HiLok, client: redis.Redis, told: Heard) -> None:
    held = hl.acquire("e", "write")
    dead = Ghost(hl, [("e", "write")], queue_ttl_ms=50)  # stops renewing its entry
    alive = Ghost(hl, [("e", "write")])
    told(dead)
    told(alive)
    wait_past_server_time(client, 0.05)
    hl.release(held)
    assert alive.holds() and not dead.holds() and not dead.queued()
    assert told(dead) == [] and told(alive) == [alive.handle]
    assert alive.leave() == [1]


def test_a_waiter_that_holds_in_the_tree_is_granted_past_the_queue(hl: HiLok, told: Heard) -> None:
    # R reads g/a; W writes g/b; A (write g) waits for R and W; R then waits for g/b.
    r = hl.acquire("g/a", "read")
    w = hl.acquire("g/b", "write")
    a = Ghost(hl, [("g", "write")])
    call = hl._protocol.acquire(r.handle, [Request.parse("g/b", "write", "/")], 30, True, "n", "")
    (reply,) = hl._drive(hl._send([call]))
    assert reply[0] == 0
    hl.release(w)
    # A came first but R's read stands in its way; R skips the queue (it would otherwise
    # wait for A, which waits for R) and is granted at once.
    assert any(h.handle == r.handle and h.path == "g/b" for h in hl.status("g/b").holders)
    assert a.queued() and not told(a)
    hl.release(r)


def inner_commands(client: redis.Redis) -> int:
    """Commands Redis ran since the last ``CONFIG RESETSTAT``, those inside scripts too."""
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def test_the_cost_of_an_acquire_does_not_grow_with_waiters_elsewhere(
    hl: HiLok, client: redis.Redis
) -> None:
    def measure() -> int:
        with hl.write("t/free/doc"):
            pass  # warm: the same keys exist before counting
        client.config_resetstat()
        with hl.write("t/free/doc"):
            pass
        return inner_commands(client) - 1  # RESETSTAT itself is not counted; INFO is

    held = hl.acquire("t/hot", "write")
    Ghost(hl, [("t/hot", "write")])
    one = measure()  # somebody waits in the tree (a few more commands: whether it is us)
    ghosts = [Ghost(hl, [("t/hot", "write")]) for _ in range(300)]
    ghosts += [Ghost(hl, [("t/hot/deep/er", "read")]) for _ in range(100)]
    crowded = measure()
    assert crowded == one, "an acquire elsewhere in the tree looked at the waiters"
    hl.release(held)


def test_draining_waiters_costs_a_bounded_number_of_commands_each(
    hl: HiLok, client: redis.Redis
) -> None:
    def drain(count: int) -> list[int]:
        held = hl.acquire("q", "write")
        ghosts = [Ghost(hl, [("q", "write")]) for _ in range(count)]
        hl.release(held)
        commands = []
        for ghost in ghosts:
            assert ghost.holds(), "the lock was not handed on in FIFO order"
            before = inner_commands(client)
            assert ghost.leave() == [1]
            commands.append(inner_commands(client) - before)
        return commands

    few, many = drain(40), drain(400)
    # Every release hands on to the next in the same call, and reads the queue from its
    # front only: with 10x the waiters, no release runs more commands.
    assert max(many) <= max(few), (max(few), max(many))


def test_expired_marks_do_not_pile_up_on_an_ancestor(hl: HiLok, client: redis.Redis) -> None:
    ns = hl.namespace
    for i in range(1000):
        hl.acquire(f"tenants/{i}/doc", "read", ttl=0.05)  # left to run out
    keep = hl.acquire("tenants/keep", "read")
    wait_past_server_time(client, 0.05)
    for i in range(40):
        with hl.read(f"tenants/{i}/doc"):
            pass

    def members() -> int:
        total = 0
        for key in client.scan_iter(f"{ns}:{{tenants}}:tenants*"):
            if client.type(key) == b"zset":
                total += int(client.zcard(key))
        return total

    # live: keep's two marks; the root's intention marks were swept by the ordinary ops
    assert members() <= 2 + 64
    hl.release(keep)


def test_every_key_keeps_a_ttl(hl: HiLok, client: redis.Redis) -> None:
    held = hl.acquire("k/a", "write")
    ghost = Ghost(hl, [("k", "read")])
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(hl.acquire, "k/a/b", "write", timeout=30)
        wait_for(lambda: any(w.path == "k/a/b" for w in hl.status("k").waiters), what="waiter")
        lease = hl.acquire("other/x", "read")
        hl.refresh(lease)
        keys = list(client.scan_iter(f"{hl.namespace}:*"))
        assert keys
        no_ttl = [k for k in keys if client.pttl(k) < 0]
        assert no_ttl == []
        hl.release(held)
        hl.release(waiting.result(timeout=30), lease)
    ghost.leave()


# -- cleanups scoped to one call (a cleanup may arrive late: see _engine.Client._undone) ------


def _acquire_call(hl: HiLok, handle: str, path: str, nonce: str, register: bool = True) -> Any:
    call = hl._protocol.acquire(handle, [Request.parse(path, "write", "/")], 30, register, nonce)
    (reply,) = hl._drive(hl._send([call]))
    return reply


def _release_call(hl: HiLok, handle: str, path: str, scope: str) -> list[int]:
    call = hl._protocol.release(handle, [Request.parse(path, "write", "/")], scope)
    (codes,) = hl._drive(hl._send([call]))
    return [int(c) for c in codes]


def test_a_grant_another_call_renewed_is_not_taken_back_by_either_calls_cleanup(
    hl: HiLok,
) -> None:
    handle = new_handle()
    assert _acquire_call(hl, handle, "sc/a", "call1")[0] == 1  # made by call1
    assert _acquire_call(hl, handle, "sc/a", "call2")[0] == 1  # renewed by another call
    assert _release_call(hl, handle, "sc/a", "call1") == [0], "a late cleanup took it back"
    assert _release_call(hl, handle, "sc/a", "call2") == [0], "the renewal's cleanup took it"
    assert hl.status("sc/a").held
    # the same call asking again (redis-py resending it) keeps it the call's own
    assert _acquire_call(hl, handle, "sc/b", "call3")[0] == 1
    assert _acquire_call(hl, handle, "sc/b", "call3")[0] == 1
    assert _release_call(hl, handle, "sc/b", "call3") == [1]
    assert _release_call(hl, handle, "sc/a", "") == [1]


def test_a_cleanup_withdraws_only_its_own_calls_waiting_request(hl: HiLok) -> None:
    held = hl.acquire("sc/q", "write")
    handle = new_handle()
    assert _acquire_call(hl, handle, "sc/q", "wait1")[0] == 0  # queued by wait1

    def queued() -> bool:
        return any(w.handle == handle for w in hl.status("sc/q").waiters)

    assert queued()
    assert _acquire_call(hl, handle, "sc/q", "wait2")[0] == 0  # wait2 took the place over
    assert _release_call(hl, handle, "sc/q", "wait1") == [0]
    assert queued(), "a late cleanup of wait1 withdrew wait2's request"
    assert _release_call(hl, handle, "sc/q", "wait2") == [0]
    assert not queued()
    hl.release(held)
