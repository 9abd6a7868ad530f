"""The lock engine through both drivers, on a real redis-server: every case runs against
:class:`HiLok` (``[sync]``) and :class:`AsyncHiLok` (``[asyncio]``, called from the test's
threads through the bridge of :mod:`tests._drivers`). Cases only asyncio has (cancellation,
tasks sharing an instance) are in ``tests/test_aio.py``."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import redis

from celery_hilok import (
    HiLok,
    HiLokConnectionError,
    HiLokError,
    InvalidArgument,
    Lease,
    LockLost,
    LockNotAcquired,
    QueuedRequest,
)
from celery_hilok._core import (
    HANDOFF_TTL_MS,
    LIBRARY,
    SUBSCRIBE,
    Acquisition,
    Blocked,
    Mode,
    Request,
    new_handle,
    told,
)
from celery_hilok._engine import WaitCheck
from tests._drivers import DRIVERS, Driver, Locks, release_lease
from tests._redis import RedisServer, free_port
from tests.faults.proxy import FaultProxy

# -- helpers --------------------------------------------------------------------------------


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    """The driver of the case: opens its lock clients, closes them all at the end."""
    with Driver(request.param) as opened:
        yield opened


@pytest.fixture
def hl(driver: Driver, redis_url: str, namespace: str) -> Locks:
    return driver.open(redis_url, namespace=namespace, ttl=10.0)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Threads for blocking acquires (each of them has a timeout, so none outlives the test)."""
    executor = ThreadPoolExecutor(max_workers=8)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def wait_until(predicate: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail (rather than hang) after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def wait_for_waiter(hl: Locks, path: str, mode: Mode) -> QueuedRequest:
    """Wait until a ``mode`` request on ``path`` is queued; return its queue entry."""
    found: list[QueuedRequest] = []

    def queued() -> bool:
        found[:] = [w for w in hl.status(path).waiters if w.mode == mode and w.path == path]
        return bool(found)

    wait_until(queued, f"a queued {mode} request on {path!r}")
    return found[0]


@contextmanager
def live_channel(hl: Locks, pool: ThreadPoolExecutor) -> Iterator[None]:
    """Keep ``hl``'s wake-up channel subscribed and confirmed meanwhile, by a waiter of its
    own on another tree: a waiter refused then needs no second ask (see
    ``Client._register``), so what a release does to it is what the test says, not a race
    with that ask."""
    blocker = hl.acquire("live-channel/x", "write")
    other = pool.submit(lambda: hl.acquire("live-channel/x", "write", timeout=20))
    wait_for_waiter(hl, "live-channel/x", "write")
    engine: Any = getattr(hl, "locks", hl)  # the HiLok, or the AsyncHiLok behind the bridge
    table = engine._waker.table
    wait_until(lambda: engine._channel in table._confirmed_at, "the channel's subscription")
    try:
        yield
    finally:
        hl.release(blocker)
        hl.release(other.result(timeout=20))


def holders(hl: Locks, path: str) -> set[tuple[str, str, str, str]]:
    """(handle, mode, path, relation) of every live grant ``status`` reports for ``path``."""
    return {(h.handle, h.mode, h.path, h.relation) for h in hl.status(path).holders}


def handles(hl: Locks, path: str) -> set[str]:
    return {h.handle for h in hl.status(path).holders}


def forged(lease: Lease, handle: str | None = None) -> Lease:
    """A copy of ``lease`` as another process gets it (pickled), optionally with another handle."""
    copy: Lease = pickle.loads(pickle.dumps(lease))
    if handle is not None:
        copy.handle = handle
    return copy


# -- the compatibility table ----------------------------------------------------------------

HELD_PATH = "r/a/b"

# Where the requested lock sits relative to the held one (each relation at two distances).
RELATIONS: dict[str, tuple[str, ...]] = {
    "same": ("r/a/b", "/r//a/b/"),
    "ancestor": ("r/a", "r"),
    "descendant": ("r/a/b/c", "r/a/b/c/d"),
    "sibling": ("r/a/c", "r/x/y"),
    "unrelated": ("s/a/b", "s"),
}

OK, NO = True, False
# Written out from CONTRACT section 1, not computed: may `requested` be granted to another
# holder while `held` is live? Columns: same, ancestor, descendant, sibling, unrelated.
# read      = subtree shared (S), write = subtree exclusive (X),
# read-node = node-only shared (the seed's read: only writers at or above the node conflict).
TABLE: dict[tuple[Mode, Mode], tuple[bool, bool, bool, bool, bool]] = {
    ("read", "read"):           (OK, OK, OK, OK, OK),
    ("read", "write"):          (NO, NO, NO, OK, OK),
    ("read", "read-node"):      (OK, OK, OK, OK, OK),
    ("write", "read"):          (NO, NO, NO, OK, OK),
    ("write", "write"):         (NO, NO, NO, OK, OK),
    ("write", "read-node"):     (NO, OK, NO, OK, OK),
    ("read-node", "read"):      (OK, OK, OK, OK, OK),
    ("read-node", "write"):     (NO, NO, OK, OK, OK),
    ("read-node", "read-node"): (OK, OK, OK, OK, OK),
}  # fmt: skip

CASES = [
    pytest.param(held, requested, relation, expected, id=f"{held}-{requested}-{relation}")
    for (held, requested), row in TABLE.items()
    for relation, expected in zip(RELATIONS, row, strict=True)
]


@pytest.mark.parametrize(("held", "requested", "relation", "compatible"), CASES)
def test_compatibility(
    hl: Locks, held: Mode, requested: Mode, relation: str, compatible: bool
) -> None:
    holder = hl.acquire(HELD_PATH, held, block=False)
    for path in RELATIONS[relation]:
        if compatible:
            lease = hl.acquire(path, requested, block=False)
            assert lease.handle != holder.handle
            assert holder.handle in handles(hl, HELD_PATH)
            hl.release(lease)
        else:
            with pytest.raises(LockNotAcquired) as info:
                hl.acquire(path, requested, block=False)
            error = info.value
            assert error.path == path.strip("/").replace("//", "/")
            assert error.mode == requested
            assert error.blocker is not None
            assert f"{held} lock on {HELD_PATH!r} held by {holder.handle[:6]}" in error.blocker
            assert error.blocker in str(error)
        # Nothing of the second holder is left behind, granted or refused.
        assert handles(hl, path) <= {holder.handle}
        assert hl.status(path).waiters == []
    hl.release(holder)
    assert not hl.status(HELD_PATH).held


@pytest.fixture(scope="module", params=DRIVERS)
def shared_hl(request: pytest.FixtureRequest, redis_server: str) -> Iterator[Locks]:
    """One lock client per driver for many cases, each in trees of its own (saves a waker per
    case)."""
    with Driver(request.param) as driver:
        yield driver.open(f"{redis_server}/0", namespace=f"t{uuid.uuid4().hex[:12]}", ttl=10.0)


@pytest.mark.parametrize(("queued", "requested", "relation", "compatible"), CASES)
def test_compatibility_with_an_earlier_waiter(
    shared_hl: Locks,
    pool: ThreadPoolExecutor,
    queued: Mode,
    requested: Mode,
    relation: str,
    compatible: bool,
) -> None:
    """First come, first served: the same table decides who may pass a queued request."""
    hl = shared_hl
    case = f"{queued}.{requested}.{relation}"  # trees of this case only

    def at(path: str) -> str:
        return f"{case}.{path.lstrip('/')}"

    # The waiter wants `queued` on the path, and also a lock in another tree that is held:
    # so it queues in the path's tree without anybody holding anything there.
    blocker = hl.acquire(at("blocker"), "write", block=False)
    waiter = pool.submit(
        hl.acquire_many, [(at(HELD_PATH), queued), (at("blocker"), "write")], timeout=20
    )
    entry = wait_for_waiter(hl, at(HELD_PATH), queued)
    for path in RELATIONS[relation]:
        if compatible:
            hl.release(hl.acquire(at(path), requested, block=False))
        else:
            with pytest.raises(LockNotAcquired) as info:
                hl.acquire(at(path), requested, block=False)
            expected = f"{queued} lock on {at(HELD_PATH)!r} queued before you by {entry.handle[:6]}"
            assert expected in str(info.value)
    hl.release(blocker)
    leases = waiter.result(timeout=20)
    hl.release(*leases)
    assert not hl.status(at(HELD_PATH)).held
    assert hl.status(at(HELD_PATH)).waiters == []


def test_compatible_locks_on_one_line_all_together(hl: Locks) -> None:
    # Readers share a whole line; a node-only read above writers leaves them be.
    leases = [
        hl.acquire("t", "read-node", block=False),
        hl.acquire("t/a", "read", block=False),
        hl.acquire("t/a/b", "read-node", block=False),
        hl.acquire("t/a/b", "read", block=False),
        hl.acquire("t/z/1", "write", block=False),
        hl.acquire("t/z/2", "write", block=False),
    ]
    assert len({lease.handle for lease in leases}) == len(leases)
    with pytest.raises(LockNotAcquired):
        hl.acquire("t/z", "read", block=False)
    hl.release(*leases)
    hl.release(hl.acquire("t", "write", block=False))


# -- refusals and timeouts ------------------------------------------------------------------


def test_refusal_names_path_mode_and_blocker(hl: Locks) -> None:
    holder = hl.acquire("tenants/42", "write", ttl=7.0)
    with pytest.raises(LockNotAcquired) as info:
        hl.acquire("/tenants//42/x/", "read", block=False)
    error = info.value
    assert isinstance(error, HiLokError) and isinstance(error, RuntimeError)
    assert error.path == "tenants/42/x"
    assert error.mode == "read"
    message = str(error)
    assert "read lock on 'tenants/42/x'" in message
    assert "block=False" in message
    assert f"write lock on 'tenants/42' held by {holder.handle[:6]}" in message
    # The blocker's remaining lease is given, read from the server.
    assert "s left on its lease" in message
    hl.release(holder)


def test_refusal_message_uses_the_separator(driver: Driver, redis_url: str, namespace: str) -> None:
    with driver.open(redis_url, namespace=namespace, separator=".") as dotted:
        holder = dotted.acquire("a.b", "read")
        with pytest.raises(LockNotAcquired) as info:
            dotted.acquire(".a.", "write", block=False)
        assert info.value.path == "a"
        assert "write lock on 'a'" in str(info.value)
        assert "read lock on 'a.b'" in str(info.value)
        dotted.release(holder)


def test_timeout_gives_up(hl: Locks) -> None:
    holder = hl.acquire("t/x", "write")
    start = time.monotonic()
    with pytest.raises(LockNotAcquired) as info:
        hl.acquire("t", "read", timeout=0.3)
    assert time.monotonic() - start >= 0.3
    assert "within 0.3s" in str(info.value)
    assert holder.handle[:6] in str(info.value)
    # A waiter that gave up leaves no queue entry behind.
    assert hl.status("t").waiters == []
    assert handles(hl, "t") == {holder.handle}
    hl.release(holder)


def test_zero_timeout_is_one_try(hl: Locks) -> None:
    holder = hl.acquire("t", "write")
    with pytest.raises(LockNotAcquired):
        hl.acquire("t", "write", timeout=0)
    assert hl.status("t").waiters == []
    hl.release(holder)


def test_bad_arguments(driver: Driver, hl: Locks) -> None:
    with pytest.raises(InvalidArgument, match="'exclusive'"):
        hl.acquire("a", "exclusive")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="-1"):
        hl.acquire("a", "read", timeout=-1)
    with pytest.raises(InvalidArgument, match="0"):
        hl.acquire("a", "read", ttl=0)
    with pytest.raises(InvalidArgument, match="'/'"):
        hl.acquire("/", "read")
    with pytest.raises(InvalidArgument):
        hl.acquire("", "read")
    with pytest.raises(InvalidArgument, match="'nope'"):
        hl.acquire("a", "read", handle="nope")
    with pytest.raises(InvalidArgument):
        hl.status("")
    with pytest.raises(InvalidArgument):
        driver.open(hl.redis, namespace="bad namespace")
    with pytest.raises(InvalidArgument):
        driver.open(hl.redis, separator="")
    with pytest.raises(InvalidArgument):
        driver.open(hl.redis, ttl=-5)
    with pytest.raises(InvalidArgument, match="http://"):
        driver.open("http://127.0.0.1:6379")
    # Nothing was acquired by any of the above.
    assert not hl.status("a").held


# -- waiting --------------------------------------------------------------------------------


def test_waiter_is_woken_by_release(hl: Locks, pool: ThreadPoolExecutor) -> None:
    holder = hl.acquire("w/a", "write")
    future = pool.submit(hl.acquire, "w", "read", timeout=20)
    entry = wait_for_waiter(hl, "w", "read")
    assert not future.done()
    hl.release(holder)
    lease = future.result(timeout=20)
    assert lease.handle == entry.handle
    assert handles(hl, "w") == {lease.handle}
    assert hl.status("w").waiters == []
    hl.release(lease)


def test_waiter_gets_the_lock_when_the_holder_runs_out(hl: Locks) -> None:
    # Nobody releases: the wait is capped by the holder's lease, so its expiry is noticed.
    holder = hl.acquire("w2/a", "write", ttl=0.3)
    start = time.monotonic()
    lease = hl.acquire("w2", "write", timeout=20)
    assert time.monotonic() - start > 0.1
    assert handles(hl, "w2") == {lease.handle}
    with pytest.raises(LockLost):
        hl.refresh(holder)
    hl.release(lease)


def test_multi_tree_waiter_is_woken_by_releases_in_either_tree(
    hl: Locks, pool: ThreadPoolExecutor
) -> None:
    first = hl.acquire("m1/a", "write")
    second = hl.acquire("m2/b", "read")
    waiter = pool.submit(hl.acquire_many, [("m1", "read"), ("m2", "write")], timeout=20)
    wait_for_waiter(hl, "m1", "read")
    wait_for_waiter(hl, "m2", "write")
    hl.release(first)
    # Still blocked in the other tree; its queue entries stay in both.
    wait_until(lambda: handles(hl, "m1") == set(), "the first release")
    assert not waiter.done()
    assert len(hl.status("m1").waiters) == 1
    hl.release(second)
    leases = waiter.result(timeout=20)
    assert [(lease.path, lease.mode) for lease in leases] == [("m1", "read"), ("m2", "write")]
    hl.release(*leases)
    assert hl.status("m1").waiters == [] and hl.status("m2").waiters == []


def test_waiters_on_another_instance_are_woken(
    driver: Driver, hl: Locks, redis_url: str, namespace: str, pool: ThreadPoolExecutor
) -> None:
    with driver.open(redis_url, namespace=namespace) as other:
        holder = hl.acquire("w3", "write")
        waiters = [pool.submit(other.acquire, "w3", "read", timeout=20) for _ in range(3)]
        wait_until(
            lambda: len(other.status("w3").waiters) == 3, "three queued readers on another instance"
        )
        hl.release(holder)
        leases = [waiter.result(timeout=20) for waiter in waiters]
        assert handles(hl, "w3") == {lease.handle for lease in leases}
        other.release(*leases)
        assert not hl.status("w3").held
        assert hl.status("w3").waiters == []


def test_one_pubsub_connection_whichever_threads_wait(
    driver: Driver, redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()  # only this test's clients subscribe there
    admin = server.client()
    trees = [f"tree{i}" for i in range(16)]
    with (
        driver.open(f"{server.url}/0", namespace=namespace) as holder_side,
        driver.open(f"{server.url}/0", namespace=namespace) as hl,
        ThreadPoolExecutor(len(trees)) as threads,
    ):
        held = [holder_side.acquire(tree, "write") for tree in trees]
        start = threading.Barrier(len(trees))

        def wait_for(tree: str) -> Lease:
            start.wait(10)  # all threads start waiting at once, on a fresh waker
            return hl.acquire(tree, "write", timeout=30)

        waiters = [threads.submit(wait_for, tree) for tree in trees]

        def subscriptions() -> list[int]:
            counts = (int(client.get("sub", 0)) for client in admin.client_list())
            return [count for count in counts if count]

        try:
            for tree in trees:
                wait_for_waiter(hl, tree, "write")
            wait_until(lambda: sum(subscriptions()) >= 1, "the client's subscription")
            # one connection, and one channel on it (the client's), whatever the trees
            assert subscriptions() == [1], "waiters subscribed on several connections"
        finally:
            holder_side.release(*held)
        hl.release(*(waiter.result(timeout=30) for waiter in waiters))
    admin.close()


def test_earlier_conflicting_waiter_goes_first(hl: Locks, pool: ThreadPoolExecutor) -> None:
    reader = hl.acquire("f/a", "read")
    writer: Future[Lease] = pool.submit(hl.acquire, "f", "write", timeout=20)
    wait_for_waiter(hl, "f", "write")
    # A newcomer's read is compatible with the holder but not with the queued writer.
    with pytest.raises(LockNotAcquired) as info:
        hl.acquire("f/b", "read", block=False)
    assert "write lock on 'f' queued before you" in str(info.value)
    # The holder itself is not held up by the queue (it could never finish otherwise).
    more = hl.acquire("f/c", "read", block=False, handle=reader.handle)
    # A request that does not conflict with the waiter passes it.
    elsewhere = hl.acquire("g", "write", block=False)
    hl.release(reader, more, elsewhere)
    lease = writer.result(timeout=20)
    assert lease.mode == "write"
    hl.release(lease)
    hl.release(hl.acquire("f/b", "read", block=False))


def test_a_release_hands_the_lock_to_the_queue_front_and_tells_only_it(
    hl: Locks, redis_client: redis.Redis, pool: ThreadPoolExecutor
) -> None:
    held_x, held_y = hl.acquire("f/x", "write"), hl.acquire("f/y", "write")
    # Queue, in this order: A write f/x, B read f/y (another line), C write f/x (behind A).
    first = pool.submit(hl.acquire, "f/x", "write", timeout=30)
    a = wait_for_waiter(hl, "f/x", "write").handle
    second = pool.submit(hl.acquire, "f/y", "read", timeout=30)
    b = wait_for_waiter(hl, "f/y", "read").handle
    third = pool.submit(hl.acquire, "f/x", "write", timeout=30)
    wait_until(lambda: len(hl.status("f").waiters) == 3, "three queued requests")
    c = ({w.handle for w in hl.status("f").waiters} - {a, b}).pop()
    with redis_client.pubsub() as pubsub:  # type: ignore[no-untyped-call, unused-ignore]
        pubsub.subscribe(hl._channel)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        hl.release(held_x)
        message = pubsub.get_message(timeout=5)
        # the release granted A there and then, and told A alone (on its client's channel),
        # with the grant
        assert message is not None and list(told(message["data"].decode())) == [a]
        assert told(message["data"].decode())[a] is not None
        assert pubsub.get_message(timeout=0.2) is None
    lease_a = first.result(timeout=10)
    assert lease_a.handle == a and lease_a.contended
    assert not second.done() and not third.done()
    hl.release(lease_a)
    assert third.result(timeout=10).handle == c
    hl.release(held_y)
    hl.release(second.result(timeout=10), hl.acquire("f/x", "read", handle=c))


def test_a_holder_queued_behind_others_is_still_woken(hl: Locks, pool: ThreadPoolExecutor) -> None:
    # R holds read g/a and wants write g/b, held by W; A (write g, blocked by R) queued first.
    r = hl.acquire("g/a", "read")
    w = hl.acquire("g/b", "write")
    a = pool.submit(hl.acquire, "g", "write", timeout=30)
    wait_for_waiter(hl, "g", "write")
    more = pool.submit(hl.acquire, "g/b", "write", timeout=30, handle=r.handle)
    wait_for_waiter(hl, "g/b", "write")
    # W's release names A alone as the front; R, which skips the queue, is woken anyway
    # (it was told, when refused, that it holds something in the tree).
    hl.release(w)
    assert more.result(timeout=10).handle == r.handle
    assert not a.done()
    hl.release(r, more.result())
    hl.release(a.result(timeout=10))


def test_a_refused_request_is_told_whether_its_holder_holds_in_the_tree(hl: Locks) -> None:
    r = hl.acquire("g/a", "read")
    w = hl.acquire("g/b", "write")
    for handle, holding in ((r.handle, True), (None, False)):
        request = Request.parse("g/b", "write", "/")
        attempt = Acquisition(
            hl._protocol, [request], handle=handle, ttl=10.0, block=True, timeout=None, now=0.0
        )
        assert attempt.step(hl._drive(hl._send([attempt.call]))[0], 0.0) is SUBSCRIBE
        assert attempt.holding is holding
        withdraw = attempt.cleanup(LockNotAcquired("gave up"))
        assert withdraw is not None
        hl._drive(hl._send([withdraw]))
    assert hl.status("g").waiters == []
    hl.release(r, w)


# -- release --------------------------------------------------------------------------------


def test_release_is_idempotent(hl: Locks) -> None:
    lease = hl.acquire("i/a", "write")
    hl.release(lease)
    assert lease.released and not lease.lost
    hl.release(lease)
    release_lease(hl, lease)  # lease.release() itself
    hl.release(lease, lease)
    assert not hl.status("i/a").held
    other = hl.acquire("i/a", "write", block=False)
    release_lease(hl, other)
    assert other.released
    assert not hl.status("i/a").held
    release_lease(hl, other)


def test_release_by_another_handle_frees_nothing(hl: Locks) -> None:
    lease = hl.acquire("o/a", "write")
    stranger = hl.acquire("elsewhere", "read")
    for handle in (new_handle(), stranger.handle):
        impostor = forged(lease, handle)
        hl.release(impostor)  # it holds nothing, so it frees nothing (and has no lease to lose)
        assert impostor.released and not impostor.lost
        with pytest.raises(LockLost):
            hl.refresh(forged(lease, handle))
        assert handles(hl, "o/a") == {lease.handle}
        with pytest.raises(LockNotAcquired):
            hl.acquire("o", "read", block=False)
    # The true holder still holds, refreshes and releases normally.
    hl.refresh(lease)
    hl.release(lease, stranger)
    assert not hl.status("o/a").held


def test_handle_works_from_another_client(
    driver: Driver, redis_url: str, namespace: str, hl: Locks
) -> None:
    lease = hl.acquire("p/a", "write", ttl=5.0)
    copy = forged(lease)
    assert (copy.path, copy.mode, copy.handle, copy.token) == (
        lease.path,
        lease.mode,
        lease.handle,
        lease.token,
    )
    with driver.open(redis_url, namespace=namespace) as elsewhere:
        elsewhere.refresh(copy, ttl=20.0)
        assert hl.status("p/a").holders[0].ttl > 10.0
        elsewhere.release(copy)
    assert not hl.status("p/a").held
    # The original copy finds it released elsewhere: a release twice never raises.
    hl.release(lease)
    assert lease.released and not lease.lost
    hl.release(lease)


def _use_handle_elsewhere(
    driver_name: str, url: str, namespace: str, blob: bytes
) -> tuple[int, int]:
    """In a child process: act as the holder of a pickled lease, then release it."""
    lease: Lease = pickle.loads(blob)
    with Driver(driver_name) as driver, driver.open(url, namespace=namespace) as hl:
        hl.refresh(lease)
        # The holder never blocks on itself, whichever process it acts from.
        below = hl.acquire(f"{lease.path}/child", "read", block=False, handle=lease.handle)
        hl.release(below)
        hl.release(lease)
        return lease.token, below.token


def test_handle_works_in_another_process(
    driver: Driver, hl: Locks, redis_url: str, namespace: str
) -> None:
    lease = hl.acquire("p/b", "write")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as procs:
        token, below = procs.submit(
            _use_handle_elsewhere, driver.name, redis_url, namespace, pickle.dumps(lease)
        ).result(timeout=60)
    assert token == lease.token
    assert below > lease.token
    assert not hl.status("p/b").held
    hl.release(lease)  # released in the child already: a release twice never raises
    assert lease.released and not lease.lost


def test_release_through_a_second_lease_of_the_same_grant_never_raises(hl: Locks) -> None:
    # A re-entrant acquire (or a Celery task that took over a caller's handle) has its own
    # Lease object of the same grant: whichever is released second finds it released.
    first = hl.acquire("rr/a", "write")
    second = hl.acquire("rr/a", "write", handle=first.handle)
    assert second.token == first.token  # one grant, renewed
    hl.release(first)
    assert not hl.status("rr/a").held
    hl.release(second)
    assert second.released and not second.lost and not first.lost


def test_release_of_a_lease_that_ran_out_raises_lock_lost(hl: Locks) -> None:
    for taken in (False, True):
        path = f"ro/{int(taken)}"
        lease = hl.acquire(path, "write", ttl=0.2)
        time.sleep(0.3)  # outlive the lease, unrefreshed
        if taken:  # another holder's acquire sweeps its expired marks away
            hl.release(hl.acquire(path, "write", block=False))
        with pytest.raises(LockLost, match="had run out"):
            hl.release(lease)
        assert lease.released and lease.lost
        hl.release(lease)  # then idempotent


def test_a_release_whose_reply_was_lost_is_not_reported_lost(
    driver: Driver, redis_server: str, namespace: str
) -> None:
    # The server ran the release, the reply never came, redis-py sent it again (RETRIES):
    # the second run finds the grant released, which is no sign that its lease ran out.
    port = int(redis_server.rsplit(":", 1)[1])
    with FaultProxy(port) as proxy, driver.open(f"{proxy.url}/0", namespace=namespace) as hl:
        lease = hl.acquire("lr/a", "write")
        proxy.drop_next_reply()
        hl.release(lease)
        assert proxy.dropped.is_set(), "the release's reply was not the one dropped"
        assert lease.released and not lease.lost
        assert not hl.status("lr/a").held


def test_unpickled_lease_needs_a_driver(hl: Locks) -> None:
    lease = hl.acquire("u", "read")
    with pytest.raises(TypeError):
        forged(lease).release()
    hl.release(lease)


# -- re-entrancy and renewal ----------------------------------------------------------------


def test_holder_never_blocks_on_itself(hl: Locks) -> None:
    read = hl.acquire("e/a", "read")
    write = hl.acquire("e/a", "write", handle=read.handle, block=False)
    below = hl.acquire("e/a/b", "read", handle=read.handle, block=False)
    above = hl.acquire("e", "write", handle=read.handle, block=False)
    assert {read.handle, write.handle, below.handle, above.handle} == {read.handle}
    assert [h.mode for h in hl.status("e").holders if h.relation == "self"] == ["write"]
    with pytest.raises(LockNotAcquired):
        hl.acquire("e/a/b", "read", block=False)
    # Each grant is released on its own; the others stay.
    hl.release(above, write)
    other = hl.acquire("e/a/x", "read", block=False)
    with pytest.raises(LockNotAcquired):
        hl.acquire("e/a", "write", block=False)
    hl.release(read, below, other)
    hl.release(hl.acquire("e", "write", block=False))


def test_write_then_read_below_same_holder(hl: Locks) -> None:
    write = hl.acquire("e/a", "write")
    read = hl.acquire("e/a/b", "read", handle=write.handle, block=False)
    hl.release(write)
    # The read below is still held.
    with pytest.raises(LockNotAcquired):
        hl.acquire("e/a/b/c", "write", block=False)
    hl.release(hl.acquire("e/a/c", "write", block=False))
    hl.release(read)
    hl.release(hl.acquire("e", "write", block=False))


def test_renewal_keeps_the_token_and_does_not_stack(hl: Locks) -> None:
    first = hl.acquire("n/a", "read", ttl=1.0)
    again = hl.acquire("n/a", "read", ttl=8.0, handle=first.handle, block=False)
    assert again.token == first.token
    assert again.handle == first.handle
    found = hl.status("n/a").holders
    assert [(h.handle, h.mode) for h in found] == [(first.handle, "read")]
    assert found[0].ttl > 1.0  # renewed with the new ttl
    # One release frees it.
    hl.release(again)
    assert not hl.status("n/a").held
    hl.release(hl.acquire("n", "write", block=False))


def test_reacquire_after_expiry_is_a_new_grant(hl: Locks) -> None:
    lease = hl.acquire("n/b", "write", ttl=0.1)
    wait_until(lambda: not hl.status("n/b").held, "the lease to run out")
    again = hl.acquire("n/b", "write", handle=lease.handle, block=False)
    assert again.token > lease.token
    hl.release(again)


# -- leases ---------------------------------------------------------------------------------


def test_dead_reader_expires_while_live_reader_refreshes(
    hl: Locks, pool: ThreadPoolExecutor
) -> None:
    live = hl.acquire("x/node", "read", ttl=0.6)
    dead = hl.acquire("x/node", "read", ttl=0.6)
    hl.keep_alive(live)  # refreshed in the background; `dead` never is
    wait_until(lambda: dead.handle not in handles(hl, "x/node"), "the dead reader to expire")
    assert handles(hl, "x/node") == {live.handle}
    # A writer (on the node, or above it through the intention marks) is blocked by the live
    # reader only.
    for path in ("x/node", "x"):
        with pytest.raises(LockNotAcquired) as info:
            hl.acquire(path, "write", block=False)
        assert live.handle[:6] in str(info.value)
        assert dead.handle[:6] not in str(info.value)
    writer = pool.submit(hl.acquire, "x", "write", timeout=20)
    wait_for_waiter(hl, "x", "write")
    hl.release(live)
    lease = writer.result(timeout=20)
    assert handles(hl, "x/node") == {lease.handle}
    with pytest.raises(LockLost):
        hl.refresh(dead)
    hl.release(lease)


def test_refresh_after_expiry_raises_and_never_revives(hl: Locks) -> None:
    lease = hl.acquire("l/a", "write", ttl=0.2)
    hl.refresh(lease)  # still fine
    time.sleep(0.3)  # outlive the lease: nobody else took the lock meanwhile
    with pytest.raises(LockLost) as info:
        hl.refresh(lease)
    assert "l/a" in str(info.value)
    assert lease.lost
    with pytest.raises(LockLost):
        hl.refresh(lease)
    assert not hl.status("l/a").held
    hl.release(hl.acquire("l", "write", block=False))
    # Releasing a lease that ran out reports it.
    with pytest.raises(LockLost):
        hl.release(lease)


def test_refresh_extends(hl: Locks) -> None:
    first = hl.acquire("l/b", "read", ttl=0.5)
    second = hl.acquire("l/c", "write", ttl=0.5)
    hl.refresh(first, second, ttl=30.0)
    assert first.ttl == second.ttl == 30.0
    time.sleep(0.6)
    assert handles(hl, "l") == {first.handle, second.handle}
    assert hl.refresh_many([first, second]) == [True, True]
    assert hl.refresh_many([]) == []
    hl.release(first, second)
    assert hl.refresh_many([first, second]) == [False, False]


def test_refresh_many_of_several_holders_reports_each(hl: Locks) -> None:
    alive = hl.acquire("m/a", "read", ttl=5.0)
    short = hl.acquire("m/b", "read", ttl=0.1)
    gone = hl.acquire("m/c", "read")
    hl.release(gone)
    wait_until(lambda: short.handle not in handles(hl, "m"), "the short lease to run out")
    assert hl.refresh_many([alive, short, gone]) == [True, False, False]
    assert not alive.lost and short.lost and gone.lost
    hl.release(alive)


# -- fencing tokens -------------------------------------------------------------------------


def test_tokens_increase_across_conflicting_grants(hl: Locks, pool: ThreadPoolExecutor) -> None:
    tokens = []
    for path, mode in [("k/a", "write"), ("k/a/b", "write"), ("k/a", "read"), ("k", "write")]:
        lease = hl.acquire(path, mode)  # type: ignore[arg-type]
        tokens.append(lease.token)
        hl.release(lease)
    # Blocked then granted after the holder's release.
    holder = hl.acquire("k/a/b", "write")
    tokens.append(holder.token)
    waiter = pool.submit(hl.acquire, "k", "read", timeout=20)
    wait_for_waiter(hl, "k", "read")
    hl.release(holder)
    lease = waiter.result(timeout=20)
    tokens.append(lease.token)
    hl.release(lease)
    # After an expiry (no release): the next conflicting grant still gets a larger token.
    expired = hl.acquire("k/a", "write", ttl=0.1)
    tokens.append(expired.token)
    wait_until(lambda: not hl.status("k/a").held, "the lease to run out")
    tokens.append(hl.acquire("k/a/b/c", "write").token)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_concurrent_grants_get_distinct_tokens(hl: Locks) -> None:
    leases = [hl.acquire("k2/a", "read") for _ in range(5)]
    tokens = [lease.token for lease in leases]
    assert tokens == sorted(tokens) and len(set(tokens)) == 5
    hl.release(*leases)


# -- status ---------------------------------------------------------------------------------


def test_status_shows_holders_and_waiters(hl: Locks, pool: ThreadPoolExecutor) -> None:
    above = hl.acquire("s/a", "read", ttl=9.0, block=False)
    on = hl.acquire("s/a/b", "read", block=False)
    node_only = hl.acquire("s/a/b", "read-node", block=False)
    below = hl.acquire("s/a/b/c/d", "read", block=False)
    beside = hl.acquire("s/x", "write", block=False)  # not on the line of s/a/b
    elsewhere = hl.acquire("t/a/b", "write", block=False)  # another tree
    waiter = pool.submit(hl.acquire, "s", "write", timeout=20)
    entry = wait_for_waiter(hl, "s", "write")

    status = hl.status("/s/a/b/")
    assert status.path == "s/a/b"
    assert status.held
    assert {(h.handle, h.mode, h.path, h.relation) for h in status.holders} == {
        (above.handle, "read", "s/a", "above"),
        (on.handle, "read", "s/a/b", "self"),
        (node_only.handle, "read-node", "s/a/b", "self"),
        (below.handle, "read", "s/a/b/c/d", "below"),
    }
    for holder in status.holders:
        assert 0 < holder.ttl <= (9.0 if holder.handle == above.handle else 10.0)
    assert [(w.handle, w.mode, w.path) for w in status.waiters] == [(entry.handle, "write", "s")]
    assert status.waiters[0].ttl > 0

    assert (beside.handle, "write", "s/x", "below") in holders(hl, "s")
    assert holders(hl, "s/x") == {(beside.handle, "write", "s/x", "self")}
    assert holders(hl, "s/x/y") == {(beside.handle, "write", "s/x", "above")}
    assert holders(hl, "t") == {(elsewhere.handle, "write", "t/a/b", "below")}
    assert not hl.status("u/v").held
    assert hl.status("t").waiters == []

    hl.release(above, on, node_only, below, beside, elsewhere)
    lease = waiter.result(timeout=20)
    assert holders(hl, "s/a/b") == {(lease.handle, "write", "s", "above")}
    hl.release(lease)
    assert not hl.status("s/a/b").held and hl.status("s").waiters == []


# -- context managers -----------------------------------------------------------------------


def test_context_managers_release(hl: Locks) -> None:
    with hl.write("c/a", timeout=1.0) as lease:
        assert (lease.path, lease.mode) == ("c/a", "write")
        assert handles(hl, "c/a") == {lease.handle}
    assert lease.released
    assert not hl.status("c/a").held
    with hl.read("/c/", block=False, ttl=3.0) as lease:
        assert (lease.path, lease.mode, lease.ttl) == ("c", "read", 3.0)
        with pytest.raises(LockNotAcquired):
            hl.acquire("c/a", "write", block=False)
    assert not hl.status("c").held


def test_context_manager_releases_on_error(hl: Locks) -> None:
    with pytest.raises(KeyError):
        with hl.write("c/b") as lease:
            raise KeyError("boom")
    assert lease.released
    assert not hl.status("c/b").held


def test_context_manager_refreshes_in_the_background(hl: Locks) -> None:
    ttl = 0.5
    with hl.write("c/r", ttl=ttl) as lease:
        start = time.monotonic()
        while time.monotonic() - start < 3 * ttl:  # outlive the ttl several times over
            assert handles(hl, "c/r") == {lease.handle}
            time.sleep(0.05)
        with pytest.raises(LockNotAcquired):
            hl.acquire("c", "read", block=False)
    assert not lease.lost
    assert not hl.status("c/r").held


def test_a_with_block_takes_a_lock_a_release_handed_it_from_the_message(
    hl: Locks, pool: ThreadPoolExecutor, redis_client: redis.Redis
) -> None:
    """The release grants the waiter the lock and says so with the token: a ``with`` block
    takes it without asking again, for the short hand-off lease, and its refresher soon
    renews it for the block's ttl (and puts it in its holder's index)."""
    before = _all_keys(redis_client)
    held = hl.acquire("ho/x", "write")
    inside, leave = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def block() -> None:
        with hl.write("ho/x", ttl=10.0, timeout=20) as lease:
            seen["term"], seen["token"] = lease.term, lease.token
            inside.set()
            assert leave.wait(20)
            seen["renewed"] = lease.term

    with live_channel(hl, pool):
        done = pool.submit(block)
        wait_for_waiter(hl, "ho/x", "write")
        hl.release(held)
        assert inside.wait(20), "the waiter did not get the lock"
    assert seen["term"] == HANDOFF_TTL_MS / 1000  # taken from the message: not asked again
    assert isinstance(seen["token"], int) and seen["token"] > held.token
    (holder,) = hl.status("ho/x").holders
    assert holder.ttl <= HANDOFF_TTL_MS / 1000
    # renewed within a third of the hand-off lease, for its own ttl
    wait_until(lambda: hl.status("ho/x").holders[0].ttl > HANDOFF_TTL_MS / 1000, "a renewal")
    leave.set()
    done.result(timeout=20)
    assert seen["renewed"] == 10.0
    assert not hl.status("ho/x").held
    # and the release's note of the grant went when the grant entered the holder's index
    assert all(key.endswith(b"::n") for key in _all_keys(redis_client) - before)


def test_a_holder_that_took_a_handed_lock_still_skips_the_queue_in_its_tree(
    hl: Locks, pool: ThreadPoolExecutor, redis_client: redis.Redis
) -> None:
    """A lock taken from a release's message is not in its holder's index until renewed;
    the release notes it under the holder's handle, so the holder's next acquire in the
    tree does not queue behind a waiter that waits for the holder itself (which would
    stall both)."""
    before = _all_keys(redis_client)
    held = hl.acquire("re/a", "write")
    got: dict[str, object] = {}

    def block() -> None:
        with hl.write("re/a", ttl=10.0, timeout=20) as lease:
            got["term"] = lease.term
            # c waits for "re" (queued before this request): it waits for this very holder
            inner = hl.acquire("re/a/x", "read", handle=lease.handle, block=False)
            hl.release(inner)
            got["inner"] = inner.token

    with live_channel(hl, pool):
        b = pool.submit(block)
        wait_for_waiter(hl, "re/a", "write")
        c = pool.submit(lambda: hl.acquire("re", "write", timeout=20))
        wait_for_waiter(hl, "re", "write")
        hl.release(held)
        b.result(timeout=20)  # LockNotAcquired here: it queued behind c
    assert got["term"] == HANDOFF_TTL_MS / 1000  # (the hand-off path, not a second ask)
    hl.release(c.result(timeout=20))  # and c gets "re" once b is done
    # the note of b's grant went with its release (b left before its first renewal)
    assert all(key.endswith(b"::n") for key in _all_keys(redis_client) - before)


def test_context_manager_raises_lock_lost_on_exit(hl: Locks) -> None:
    lost = threading.Event()
    with pytest.raises(LockLost):
        with hl.write("c/l", ttl=0.3) as lease:
            lease.on_lost(lambda _: lost.set())
            hl.release(forged(lease))  # released "elsewhere", e.g. by another process
            # The background refresh notices.
            assert lost.wait(10), "the refresher did not report the lost lease"
            assert lease.lost
    assert not hl.status("c/l").held


def test_release_during_a_background_refresh_is_not_a_loss(hl: Locks) -> None:
    # The refresher renews 50 other leases every millisecond, so releases land on ticks in
    # flight: such a tick finds the lease gone, but it was released, not lost.
    others = hl.acquire_many([(f"c/other/{i}/x/y", "read") for i in range(50)])
    for lease in others:
        hl.keep_alive(lease, interval=0.001)
    rng = random.Random(5)
    reported: list[Lease] = []
    leases = []
    for i in range(100):
        lease = hl.acquire(f"c/busy/{i}", "write", ttl=10.0)
        lease.on_lost(reported.append)
        hl.keep_alive(lease, interval=0.001)
        time.sleep(rng.uniform(0, 0.003))
        hl.release(lease)  # a live lease: must not raise
        leases.append(lease)
    hl.close()  # waits for the refresher's last tick
    assert reported == []
    assert not any(lease.lost for lease in leases + others)


# -- several locks at once ------------------------------------------------------------------


def test_acquire_many_is_all_or_nothing(hl: Locks) -> None:
    blocker = hl.acquire("b/x", "write")
    with pytest.raises(LockNotAcquired) as info:
        hl.acquire_many(
            [("a/1", "write"), ("a/2", "read"), ("b", "read"), ("c", "write")], block=False
        )
    assert "b/x" in str(info.value)
    assert (info.value.path, info.value.mode) == ("b", "read")  # the request in the way
    for path in ("a", "a/1", "a/2", "b", "c"):
        assert handles(hl, path) <= {blocker.handle}, path
    with pytest.raises(LockNotAcquired) as info:
        hl.acquire_many([("a/1", "write"), ("b/x/y", "read")], timeout=0.2)
    assert (info.value.path, info.value.mode) == ("b/x/y", "read")
    assert not hl.status("a").held
    assert hl.status("b").waiters == [] and hl.status("a").waiters == []
    hl.release(blocker)

    leases = hl.acquire_many([("a/1", "write"), ("a/2", "read"), ("b", "read"), ("a/1", "write")])
    assert [(lease.path, lease.mode) for lease in leases] == [
        ("a/1", "write"),
        ("a/2", "read"),
        ("b", "read"),
    ]
    assert len({lease.handle for lease in leases}) == 1
    assert handles(hl, "a") == handles(hl, "b") == {leases[0].handle}
    hl.release(*leases)
    assert not hl.status("a").held and not hl.status("b").held


# -- Redis failures -------------------------------------------------------------------------


def test_unreachable_redis_raises_connection_error(driver: Driver, namespace: str) -> None:
    port = free_port()  # nothing listens there
    with driver.open(f"redis://127.0.0.1:{port}/0", namespace=namespace) as hl:
        for call in (
            lambda: hl.acquire("a", "write"),
            lambda: hl.acquire("a", "write", block=False),
            lambda: hl.status("a"),
        ):
            with pytest.raises(HiLokConnectionError) as info:
                call()
            assert not isinstance(info.value, LockNotAcquired)
            assert f"127.0.0.1:{port}" in str(info.value)


def test_server_killed_mid_wait(
    driver: Driver,
    redis_server_factory: Callable[..., RedisServer],
    namespace: str,
    pool: ThreadPoolExecutor,
) -> None:
    server = redis_server_factory()
    with driver.open(f"{server.url}/0", namespace=namespace) as hl:
        holder = hl.acquire("d/a", "write")
        waiter = pool.submit(hl.acquire, "d", "write")  # no timeout: must not hang either
        wait_for_waiter(hl, "d", "write")
        server.kill()
        with pytest.raises(HiLokConnectionError) as info:
            waiter.result(timeout=60)
        assert f"127.0.0.1:{server.port}" in str(info.value)
        with pytest.raises(HiLokConnectionError):
            hl.refresh(holder)
        with pytest.raises(HiLokConnectionError):
            hl.release(holder)


def test_server_that_stops_answering(
    driver: Driver, redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    admin = server.client()
    options = {"socket_timeout": 0.2}
    with driver.open(f"{server.url}/0", namespace=namespace, ttl=1.0, redis_options=options) as hl:
        hl.release(hl.acquire("e/a", "write"))  # connected, scripts loaded
        admin.client_pause(1000, all=True)
        with pytest.raises(HiLokConnectionError) as info:
            hl.acquire("e/a", "write")
        assert not isinstance(info.value, LockNotAcquired)
        assert "Timeout" in str(info.value)
        assert f"127.0.0.1:{server.port}" in str(info.value)
        # Once the server answers again, whatever the lost call did is undone or runs out.
        with driver.open(f"{server.url}/0", namespace=namespace) as other:
            other.release(other.acquire("e", "write", timeout=20))
    admin.close()


# Regression: the client's Retry (RETRIES=1) must reach its pool's connections (redis-py
# ignores a retry= next to connection_pool=). Without it, since redis-py 8.1 the asyncio
# pool hands out the connection the restart closed, and the first call after a restart
# failed with HiLokConnectionError instead of reconnecting.
def test_restart_loses_locks_but_scripts_come_back(
    driver: Driver, redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    with driver.open(f"{server.url}/0", namespace=namespace) as hl:
        lease = hl.acquire("d/a", "write")
        server.restart()  # no data, no scripts
        with pytest.raises(LockLost):
            hl.refresh(lease)
        again = hl.acquire("d/a", "write", block=False)
        hl.release(again)


def test_the_library_is_loaded_again_after_a_function_flush(
    hl: Locks, redis_client: redis.Redis
) -> None:
    hl.release(hl.acquire("z/a", "read"))
    assert redis_client.function_list(library=LIBRARY.name)
    lease: Lease | None = None
    for step in ("acquire", "status", "refresh", "release"):
        redis_client.function_flush()  # as after a restart without persistence
        if step == "acquire":
            lease = hl.acquire("z/a", "write", block=False)
        elif step == "status":
            assert hl.status("z/a").held
        elif step == "refresh":
            assert lease is not None
            hl.refresh(lease)
        else:
            assert lease is not None
            hl.release(lease)
        assert redis_client.function_list(library=LIBRARY.name)  # loaded again
    assert not hl.status("z/a").held
    assert hl._functions  # still calling functions: nothing refused them


# -- keys -----------------------------------------------------------------------------------


# -- keys -----------------------------------------------------------------------------------


def _all_keys(client: redis.Redis) -> set[bytes]:
    return set(client.scan_iter(count=1000))


def test_keys_stay_inside_the_namespace(
    hl: Locks, redis_client: redis.Redis, namespace: str, pool: ThreadPoolExecutor
) -> None:
    before = _all_keys(redis_client)
    leases = [
        hl.acquire("user/42/a/b/c/d/e/f", "write"),
        hl.acquire("{tag}/x y/50%", "read"),
        hl.acquire("ünï:cødé", "read-node"),
        *hl.acquire_many([("m/1", "read"), ("n/2", "write")]),
    ]
    waiter = pool.submit(hl.acquire, "user", "read", timeout=20)
    wait_for_waiter(hl, "user", "read")
    during = _all_keys(redis_client) - before
    hl.refresh(*leases)
    hl.release(*leases)
    hl.release(waiter.result(timeout=20))
    after = _all_keys(redis_client) - before
    assert during, "locking created no key at all?"
    prefix = f"{namespace}:".encode()
    for key in during | after:
        assert key.startswith(prefix), key
        assert key.count(b"{") == 1 and key.count(b"}") == 1, key
    # Released locks leave at most the trees' token counters behind.
    assert all(key.endswith(b"::n") for key in after), after


def test_application_keys_named_like_paths(
    driver: Driver, redis_url: str, redis_client: redis.Redis, namespace: str
) -> None:
    app_keys = ["user", "user/42", "user/42:s", namespace, f"{namespace}:user", "{user}"]
    for key in app_keys:
        redis_client.set(key, "application data")
    redis_client.hset("user:42", mapping={"name": "x"})
    try:
        with driver.open(redis_url, namespace=namespace) as hl:
            with hl.write("user/42") as lease:
                with pytest.raises(LockNotAcquired):
                    hl.acquire("user", "read", block=False)
                assert handles(hl, "user") == {lease.handle}
            hl.release(hl.acquire("user", "write", block=False))
        for key in app_keys:
            assert redis_client.get(key) == b"application data"
            assert redis_client.ttl(key) == -1
        assert redis_client.hgetall("user:42") == {b"name": b"x"}
    finally:
        redis_client.delete(*app_keys, "user:42")


def test_existing_client_is_not_closed(driver: Driver, redis_url: str, namespace: str) -> None:
    client = driver.client(redis_url)  # a redis.Redis, or a redis.asyncio.Redis
    hl = driver.open(client, namespace=namespace)
    hl.release(hl.acquire("q", "write"))
    hl.close()
    assert driver.ping(client)


def test_a_wait_check_keeps_the_place_in_line_and_can_stop_the_wait(
    redis_url: str, namespace: str
) -> None:
    # The sync client's hook for the Celery integration (HiLok._acquire_many_checked): the
    # check sees each refusal's blocker, at least every `every` seconds, while the request
    # stays queued with one ticket; stopping withdraws it.
    with HiLok(redis_url, namespace=namespace, ttl=10.0) as client:
        path = f"{uuid.uuid4().hex[:8]}/a"
        holder = client.acquire(path, "write")
        seen: list[Blocked] = []
        tickets: list[list[int]] = []

        def stop(blocked: Blocked) -> str | None:
            seen.append(blocked)
            tickets.append([w.ticket for w in client.status(path).waiters])
            return "enough" if len(seen) >= 3 else None

        started = time.monotonic()
        with pytest.raises(LockNotAcquired, match=r"\(gave up waiting: enough\): write lock"):
            client._acquire_many_checked([(path, "write")], WaitCheck(0.05, stop), timeout=10)
        assert time.monotonic() - started < 5.0  # checked every 0.05 s, not at the lease cap
        assert [(b.handle, b.queued) for b in seen] == [(holder.handle, False)] * 3
        assert len(tickets[0]) == 1 and tickets == [tickets[0]] * 3  # one place throughout
        assert client.status(path).waiters == []
        client.release(holder)


def test_a_cleanup_that_could_not_be_sent_goes_with_the_next_call(
    driver: Driver, redis_server: str, namespace: str
) -> None:
    # An acquire granted in Redis whose reply was lost, with Redis out of reach right after:
    # its cleanup (release the grants of that call) fails too. It is not dropped: it goes
    # first in the client's next round trip, so the grant does not block others for its ttl.
    port = int(redis_server.rsplit(":", 1)[1])
    direct = driver.open(redis_server, namespace=namespace)
    with FaultProxy(port) as proxy, driver.open(f"{proxy.url}/0", namespace=namespace) as hl:
        hl.release(hl.acquire("cl/warm", "write"))  # the library loaded, a connection open
        proxy.drop_next_reply(refuse_after=True)
        with pytest.raises(HiLokConnectionError):
            hl.acquire("cl/a", "write", ttl=60)
        assert proxy.dropped.is_set(), "the acquire's reply was not the one dropped"
        assert direct.status("cl/a").held, "the grant whose reply was lost is in Redis"
        proxy.serve()
        assert not hl.status("cl/b").held  # any call of the client's
        assert not direct.status("cl/a").held, "the cleanup did not go with the next call"


def test_one_warning_per_outage_for_cleanups_that_could_not_be_sent(
    driver: Driver, redis_server: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Every acquire that fails while Redis is out of reach leaves a cleanup: the first one
    # is a warning, the rest of that outage only debug lines, and the send that carries
    # them says how many went. The next outage warns again.
    port = int(redis_server.rsplit(":", 1)[1])
    with FaultProxy(port) as proxy, driver.open(f"{proxy.url}/0", namespace=namespace) as hl:
        hl.release(hl.acquire("ow/warm", "write"))
        caplog.set_level(logging.DEBUG, logger="celery_hilok")

        def cleanups() -> list[tuple[int, str]]:
            return [
                (r.levelno, r.getMessage())
                for r in caplog.records
                if "clean up after a failed acquire" in r.getMessage()
                or "cleanup(s)" in r.getMessage()
            ]

        for _ in range(2):  # two outages
            caplog.clear()
            proxy.drop_next_reply(refuse_after=True)
            for path in ("ow/a", "ow/b", "ow/c"):
                with pytest.raises(HiLokConnectionError):
                    hl.acquire(path, "write", ttl=60)
            proxy.serve()
            assert not hl.status("ow/z").held  # carries the three cleanups
            levels = [level for level, _ in cleanups()]
            assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.INFO]
            assert cleanups()[-1][1] == "sent 3 cleanup(s) left by calls that failed earlier"
