"""The engine against a pure-Python model of the compatibility rules (Hypothesis stateful).

A few holders acquire (``block=False``), renew, refresh, release and let expire grants on
a small tree, in every mode; after each step ``status`` of every node must show exactly
the grants the model says are live. The model is :mod:`tests._reference`: it knows nothing
about marks, scripts or the engine's own conflict logic.
"""

from __future__ import annotations

import pickle
import secrets
import time
import uuid
from typing import ClassVar

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from celery_hilok import HiLok, Lease, LockLost, LockNotAcquired
from tests._reference import MODES, Mode, conflicts, relation, segments

TREE = ("a", "a/b", "a/c", "a/b/d", "e")
HOLDERS = 3
LONG_TTL = 120.0  # never runs out during an example
SHORT_TTL = 0.005  # runs out within the step that grants it

Key = tuple[int, str, Mode]  # (holder index, path, mode): one grant
Request = tuple[str, Mode]  # (path, mode)

holders = st.integers(0, HOLDERS - 1)
paths = st.sampled_from(TREE)
modes = st.sampled_from(MODES)


class LockModel(RuleBasedStateMachine):
    """One example: a fresh namespace, three holders, and the model of what they hold."""

    client: ClassVar[redis.Redis]  # set by the test, one server for all examples

    def __init__(self) -> None:
        super().__init__()
        self.namespace = f"m{uuid.uuid4().hex[:12]}"
        self.hl = HiLok(self.client, namespace=self.namespace, ttl=LONG_TTL)
        self.handles = [secrets.token_urlsafe(12) for _ in range(HOLDERS)]
        self.held: dict[Key, int] = {}  # live grants of the model, with their tokens
        self.ran_out: set[Key] = set()  # grants gone because their lease ran out
        self.top: dict[str, int] = {}  # per tree, the largest token handed out so far
        self.leases: list[Lease] = []  # every lease object handed out in this example

    def teardown(self) -> None:
        self.hl.close()
        keys = list(self.client.scan_iter(match=f"{self.namespace}:*", count=1000))
        if keys:
            self.client.delete(*keys)

    # -- helpers ------------------------------------------------------------------------

    def key_of(self, lease: Lease) -> Key:
        return (self.handles.index(lease.handle), lease.path, lease.mode)

    def blockers(self, holder: int, requests: list[Request]) -> list[Key]:
        return [
            key
            for key in self.held
            for path, mode in requests
            if key[0] != holder and conflicts(key[2], key[1], mode, path)
        ]

    def expect_acquire(self, holder: int, requests: list[Request], ttl: float) -> bool:
        """Acquire ``requests`` for ``holder`` and check the outcome against the model."""
        handle = self.handles[holder]
        blockers = self.blockers(holder, requests)
        if blockers:
            with pytest.raises(LockNotAcquired) as info:
                self.hl.acquire_many(requests, block=False, handle=handle, ttl=ttl)
            named = info.value.blocker or ""
            assert any(
                f"{mode} lock on {path!r} held by {self.handles[h][:6]}" in named
                for h, path, mode in blockers
            ), (named, blockers)
            return False
        leases = self.hl.acquire_many(requests, block=False, handle=handle, ttl=ttl)
        assert [(lease.path, lease.mode) for lease in leases] == requests
        before = dict(self.top)
        for lease in leases:
            assert lease.handle == handle
            key = self.key_of(lease)
            tree = segments(lease.path)[0]
            if key in self.held:
                assert lease.token == self.held[key], "renewing a live grant keeps its token"
            else:
                assert lease.token > before.get(tree, 0), "a new grant gets a larger token"
            self.held[key] = lease.token
            self.ran_out.discard(key)
            self.top[tree] = max(self.top.get(tree, 0), lease.token)
        self.leases.extend(leases)
        return True

    def wait_past_server_time(self, seconds: float) -> None:
        """Let ``seconds`` pass on the server's clock (leases expire by that clock)."""
        sec, usec = self.client.time()
        target_ms = sec * 1000 + usec // 1000 + round(seconds * 1000) + 1
        time.sleep(seconds)
        while True:
            sec, usec = self.client.time()
            if sec * 1000 + usec // 1000 >= target_ms:
                return
            time.sleep(0.001)

    # -- rules --------------------------------------------------------------------------

    @rule(holder=holders, path=paths, mode=modes)
    def acquire(self, holder: int, path: str, mode: Mode) -> None:
        self.expect_acquire(holder, [(path, mode)], LONG_TTL)

    @rule(
        holder=holders,
        pair=st.lists(st.tuples(paths, modes), min_size=2, max_size=2, unique=True),
    )
    def acquire_two_at_once(self, holder: int, pair: list[Request]) -> None:
        """All or nothing: a refused pair leaves neither grant behind (status shows it)."""
        self.expect_acquire(holder, pair, LONG_TTL)

    @precondition(lambda self: bool(self.held))
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        holder, path, mode = data.draw(st.sampled_from(sorted(self.held)), label="grant")
        assert self.expect_acquire(holder, [(path, mode)], LONG_TTL)

    @rule(holder=holders, path=paths, mode=modes)
    def acquire_and_let_expire(self, holder: int, path: str, mode: Mode) -> None:
        """A grant with a tiny ttl, left unrefreshed, is gone once that ttl has passed.

        When the holder already had this grant, the short ttl replaces its lease too.
        """
        if self.expect_acquire(holder, [(path, mode)], SHORT_TTL):
            self.wait_past_server_time(SHORT_TTL)
            del self.held[(holder, path, mode)]
            self.ran_out.add((holder, path, mode))

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data(), copy=st.booleans())
    def release(self, data: st.DataObject, copy: bool) -> None:
        """Release any lease ever handed out, or a pickled copy of it (as another process).

        Releasing a live grant frees it; a lease object already released is a no-op; a
        fresh copy of a grant that is gone releases quietly if it was released, and may
        raise LockLost (while Redis still has the evidence) only if its lease ran out.
        """
        lease = data.draw(st.sampled_from(self.leases), label="lease")
        if copy:
            lease = pickle.loads(pickle.dumps(lease))
        key = self.key_of(lease)
        if lease.released:
            self.hl.release(lease)
        elif key in self.held:
            self.hl.release(lease)
            del self.held[key]
            self.ran_out.discard(key)
        else:
            try:
                self.hl.release(lease)
            except LockLost:
                assert key in self.ran_out or lease.lost, "LockLost for a grant released"
        assert lease.released

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def refresh(self, data: st.DataObject) -> None:
        """Refresh succeeds exactly for live grants; a gone grant is never revived."""
        lease = data.draw(st.sampled_from(self.leases), label="lease")
        if self.key_of(lease) in self.held:
            self.hl.refresh(lease, ttl=LONG_TTL)
        else:
            with pytest.raises(LockLost):
                self.hl.refresh(lease, ttl=LONG_TTL)
            assert lease.lost

    # -- what must hold after every step ---------------------------------------------------

    @invariant()
    def status_shows_the_model(self) -> None:
        for node in TREE:
            status = self.hl.status(node)
            seen = {(h.handle, h.path, h.mode, h.relation) for h in status.holders}
            expected = set()
            for holder, path, mode in self.held:
                where = relation(path, node)
                if where is not None:
                    expected.add((self.handles[holder], path, mode, where))
            assert seen == expected, f"status({node!r})"
            assert all(0 < h.ttl <= LONG_TTL for h in status.holders)
            assert status.waiters == [], "block=False never queues"


def test_engine_follows_the_model(redis_url: str) -> None:
    server = redis.Redis.from_url(redis_url)

    class OnTheTestServer(LockModel):
        client = server

    try:
        run_state_machine_as_test(
            OnTheTestServer,
            settings=settings(max_examples=100, stateful_step_count=25, deadline=None),
        )
    finally:
        server.close()


@pytest.mark.parametrize(
    ("held", "requested", "conflict"),
    [
        # CONTRACT §1 in its own words.
        (("read", "tenants/42"), ("write", "tenants/42/a"), True),
        (("read", "tenants/42"), ("write", "tenants"), True),
        (("read", "tenants/42"), ("read", "tenants"), False),
        (("write", "tenants/42/a"), ("write", "tenants/42/b"), False),
        (("write", "a"), ("read", "a/b/c"), True),
        (("read-node", "a"), ("write", "a/b"), False),
        (("read-node", "a/b"), ("write", "a"), True),
        (("read-node", "a/b"), ("write", "a/b"), True),
        (("read-node", "a/b"), ("read", "a"), False),
        (("write", "a/b"), ("write", "a/bc"), False),
    ],
)
def test_reference_rules(held: tuple[str, str], requested: tuple[str, str], conflict: bool) -> None:
    """The model itself, on the contract's examples, both ways round."""
    assert conflicts(*held, *requested) is conflict
    assert conflicts(*requested, *held) is conflict
