"""First come, first served among conflicting waiters, on a real Redis.

Order is judged by what Redis itself hands out: fencing tokens and queue tickets come from
one per-tree counter, so a grant with a token larger than a waiter's ticket was made after
that waiter had joined the queue. Threads share one ``HiLok``, each with its own handle.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import pytest
import redis

from celery_hilok import HiLok, Lease, LockNotAcquired

T = TypeVar("T")

WAIT = 30.0  # generous cap on every blocking step: a hang fails, slowness does not


@pytest.fixture
def hl(redis_url: str, namespace: str) -> Iterator[HiLok]:
    lock = HiLok(redis_url, namespace=namespace, ttl=30.0)
    try:
        yield lock
    finally:
        lock.close()


def new_handle() -> str:
    return secrets.token_urlsafe(12)


def wait_until(probe: Callable[[], T | None], what: str) -> T:
    """Poll Redis state (there is no event to wait for) until ``probe`` returns a value."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        time.sleep(0.001)
    raise AssertionError(f"timed out waiting until {what}")


def queued(hl: HiLok, path: str, *handles: str) -> list[int] | None:
    """The queue tickets of ``handles`` on ``path`` once all of them are queued."""
    tickets = {w.handle: w.ticket for w in hl.status(path).waiters}
    if all(h in tickets for h in handles):
        return [tickets[h] for h in handles]
    return None


def test_writer_behind_looping_readers_is_served(hl: HiLok) -> None:
    path = "docs/shared"
    readers = 4
    grants: list[tuple[str, int]] = []  # (who, token) in the order the threads recorded them
    changed = threading.Condition()
    stop = threading.Event()

    def record(who: str, token: int) -> None:
        with changed:
            grants.append((who, token))
            changed.notify_all()

    def wait_for_grants(count: int) -> None:
        with changed:
            assert changed.wait_for(lambda: len(grants) >= count, timeout=WAIT), grants[-5:]

    def reader(index: int) -> int:
        handle, rng, served = new_handle(), random.Random(index), 0
        while not stop.is_set():
            lease = hl.acquire(path, "read", handle=handle, timeout=WAIT)
            record(f"reader{index}", lease.token)
            served += 1
            time.sleep(rng.uniform(0.002, 0.010))  # the readers' work: overlapping holds
            hl.release(lease)
        return served

    writer_handle = new_handle()

    def writer() -> int:
        lease = hl.acquire(path, "write", handle=writer_handle, timeout=WAIT)
        record("writer", lease.token)
        hl.release(lease)
        return lease.token

    with ThreadPoolExecutor(readers + 1) as pool:
        reading = [pool.submit(reader, i) for i in range(readers)]
        try:
            wait_for_grants(40)  # the readers are looping
            # One more read held here makes sure the writer has to queue behind readers.
            gate = hl.acquire(path, "read")
            writing = pool.submit(writer)
            (ticket,) = wait_until(lambda: queued(hl, path, writer_handle), "the writer queues")
            with changed:
                seen_queued = len(grants)
            hl.release(gate)
            writer_token = writing.result(timeout=WAIT)
            with changed:
                at_writer = grants.index(("writer", writer_token))
            wait_for_grants(at_writer + 1 + 2 * readers)  # readers carry on after it
        finally:
            stop.set()
        served = [r.result(timeout=WAIT) for r in reading]

    reader_tokens = [token for who, token in grants if who != "writer"]
    overtook = [t for t in reader_tokens if ticket < t < writer_token]
    assert overtook == [], "readers that came after the queued writer were served before it"
    # Bounded, whatever the timing: only reads already granted inside Redis when the
    # writer queued can still be recorded after that, at most one per reader thread.
    late = [who for who, _ in grants[seen_queued:at_writer]]
    assert len(late) <= readers, late
    assert all(t < ticket for t in reader_tokens if t < writer_token)
    assert sum(t > writer_token for t in reader_tokens) >= 2 * readers
    assert all(n > 0 for n in served)


def test_reader_does_not_overtake_a_queued_writer(hl: HiLok) -> None:
    path = "ledger/7"
    first = hl.acquire(path, "read")
    writer_handle, reader_handle = new_handle(), new_handle()
    with ThreadPoolExecutor(2) as pool:
        writing = pool.submit(hl.acquire, path, "write", handle=writer_handle, timeout=WAIT)
        wait_until(lambda: queued(hl, path, writer_handle), "the writer queues")

        # Compatible with the held read, but the writer came first.
        with pytest.raises(LockNotAcquired) as refused:
            hl.acquire(path, "read", block=False)
        assert f"write lock on {path!r} queued before you" in (refused.value.blocker or "")

        reading = pool.submit(hl.acquire, path, "read", handle=reader_handle, timeout=WAIT)
        w_ticket, r_ticket = wait_until(
            lambda: queued(hl, path, writer_handle, reader_handle), "the reader queues"
        )
        assert w_ticket < r_ticket
        assert [w.handle for w in hl.status(path).waiters] == [writer_handle, reader_handle]

        hl.release(first)
        written = writing.result(timeout=WAIT)
        # The writer holds now: the reader is still waiting, and still queued.
        assert not reading.done()
        assert queued(hl, path, reader_handle) == [r_ticket]
        hl.release(written)
        read = reading.result(timeout=WAIT)

    assert first.token < written.token < read.token
    hl.release(read)


def test_readers_queued_behind_a_writer_are_granted_together(hl: HiLok) -> None:
    path = "catalog"
    first = hl.acquire(path, "read")
    writer_handle = new_handle()
    reader_handles = [new_handle() for _ in range(3)]
    all_hold = threading.Barrier(len(reader_handles) + 1, timeout=WAIT)
    done = threading.Event()
    release_writer = threading.Event()

    def writer() -> Lease:
        lease = hl.acquire(path, "write", handle=writer_handle, timeout=WAIT)
        assert release_writer.wait(WAIT)
        hl.release(lease)
        return lease

    def reader(handle: str) -> Lease:
        lease = hl.acquire(path, "read", handle=handle, timeout=WAIT)
        all_hold.wait()  # passes only if all three hold at the same time
        assert done.wait(WAIT)
        hl.release(lease)
        return lease

    with ThreadPoolExecutor(4) as pool:
        writing = pool.submit(writer)
        wait_until(lambda: queued(hl, path, writer_handle), "the writer queues")
        reading = [pool.submit(reader, h) for h in reader_handles]
        tickets = wait_until(
            lambda: queued(hl, path, writer_handle, *reader_handles), "the readers queue"
        )
        assert tickets[0] < min(tickets[1:])

        hl.release(first)
        # Once the writer holds, no reader is in; all of them still wait in the queue.
        wait_until(
            lambda: [h.handle for h in hl.status(path).holders] == [writer_handle] or None,
            "the writer holds",
        )
        assert not any(r.done() for r in reading)
        assert queued(hl, path, *reader_handles) == tickets[1:]

        release_writer.set()
        all_hold.wait()
        holding = {h.handle for h in hl.status(path).holders}
        assert holding == set(reader_handles)
        done.set()
        written = writing.result(timeout=WAIT)
        tokens = [r.result(timeout=WAIT).token for r in reading]

    assert first.token < written.token < min(tokens)
    assert hl.status(path).waiters == []


def test_waiter_that_times_out_leaves_the_queue(hl: HiLok) -> None:
    holder = hl.acquire("tree/x", "read")
    quitter, later = new_handle(), new_handle()
    with ThreadPoolExecutor(2) as pool:
        # Blocked by the read on tree/x; gives up after its timeout.
        quitting: Future[Lease] = pool.submit(
            hl.acquire, "tree", "write", handle=quitter, timeout=2.0
        )
        wait_until(lambda: queued(hl, "tree", quitter), "the first writer queues")
        # Compatible with the held read on tree/x, but not with the queued write on tree.
        with pytest.raises(LockNotAcquired, match="queued before you"):
            hl.acquire("tree/y", "write", block=False)
        waiting = pool.submit(hl.acquire, "tree/y", "write", handle=later, timeout=WAIT)
        waiters = wait_until(lambda: queued(hl, "tree", quitter, later), "the second queues")
        assert waiters[0] < waiters[1]

        with pytest.raises(LockNotAcquired):
            quitting.result(timeout=WAIT)
        assert all(w.handle != quitter for w in hl.status("tree").waiters)
        # The read on tree/x is still held; only the withdrawn entry was in the way.
        granted = waiting.result(timeout=WAIT)

    assert [h.handle for h in hl.status("tree/x").holders] == [holder.handle]
    assert hl.status("tree").waiters == []
    hl.release(granted, holder)


def test_holder_is_not_blocked_by_waiters_behind_it(hl: HiLok) -> None:
    path = "shelf"
    handle = new_handle()
    mine = hl.acquire(path, "read", handle=handle)
    writer_handle = new_handle()
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(hl.acquire, path, "write", handle=writer_handle, timeout=WAIT)
        wait_until(lambda: queued(hl, path, writer_handle), "the writer queues")

        # Someone else is refused: the writer queued first.
        with pytest.raises(LockNotAcquired, match="queued before you"):
            hl.acquire(f"{path}/1", "read", block=False)
        # The holder is not: renewing, reading deeper, even upgrading to a write.
        renewed = hl.acquire(path, "read", handle=handle, block=False)
        assert renewed.token == mine.token
        deeper = hl.acquire(f"{path}/1", "read", handle=handle, block=False)
        upgraded = hl.acquire(path, "write", handle=handle, block=False)
        assert not writing.done()

        hl.release(mine, deeper, upgraded)
        written = writing.result(timeout=WAIT)

    assert written.token > upgraded.token > mine.token
    hl.release(written)


def wait_past_server_time(client: redis.Redis, seconds: float) -> None:
    sec, usec = client.time()
    target_ms = sec * 1000 + usec // 1000 + round(seconds * 1000) + 1
    time.sleep(seconds)
    while True:
        sec, usec = client.time()
        if sec * 1000 + usec // 1000 >= target_ms:
            return
        time.sleep(0.001)


@pytest.mark.parametrize("own_handle", [False, True], ids=["given handle", "own handle"])
def test_handle_with_only_expired_grants_queues_like_anyone(
    hl: HiLok, redis_client: redis.Redis, own_handle: bool
) -> None:
    """Also with the client's own handle, whose hash knows its latest expiry from the
    start: the release of the grant it named must not leave it standing."""
    if own_handle:
        kept = hl.acquire("a/b", "read")  # long lease
        handle = kept.handle
    else:
        handle = secrets.token_urlsafe(12)
        kept = hl.acquire("a/b", "read", handle=handle)
    hl.acquire("a/c", "read", handle=handle, ttl=0.05)  # left to run out
    hl.release(kept)
    wait_past_server_time(redis_client, 0.05)
    assert all(h.handle != handle for h in hl.status("a").holders)  # holds nothing now

    other = hl.acquire("a/x", "read")
    writer = secrets.token_urlsafe(12)
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(hl.acquire, "a", "write", handle=writer, timeout=30.0)
        wait_until(lambda: queued(hl, "a", writer), "the writer to queue")
        try:
            overtaking = hl.acquire("a/c", "read", handle=handle, block=False)
        except LockNotAcquired as exc:
            overtaking = None
            assert "queued before you" in str(exc)
        hl.release(other)
        if overtaking is not None:
            hl.release(overtaking)
        hl.release(writing.result(timeout=30.0))
    assert overtaking is None, (
        "a handle holding nothing live in the tree overtook the queued writer"
    )


@pytest.mark.parametrize("how", ["released", "renewed shorter", "ran out"])
def test_holder_whose_latest_grant_went_still_skips_the_queue(
    hl: HiLok, redis_client: redis.Redis, how: str
) -> None:
    """A holder's hash remembers its latest expiry; when the grant it names goes (released,
    renewed to a shorter lease, or run out) while an earlier grant is still live, the holder
    still holds something in the tree, so it must not queue behind a writer that waits for
    it (it would wait for that writer, which waits for it)."""
    kept = hl.acquire("a/b", "read", ttl=30.0)  # a handle of its own: the hash knows its latest
    handle = kept.handle
    later = hl.acquire("a/c", "read", handle=handle, ttl=60.0 if how != "ran out" else 30.05)
    if how == "released":
        hl.release(later)
    elif how == "renewed shorter":
        hl.acquire("a/c", "read", handle=handle, ttl=0.05)
        wait_past_server_time(redis_client, 0.05)
    else:  # run out: its lease was the latest until the kept one was renewed past it
        hl.acquire("a/b", "read", handle=handle, ttl=30.0)
        hl.acquire("a/c", "read", handle=handle, ttl=0.05)
        wait_past_server_time(redis_client, 0.05)
    assert {h.handle for h in hl.status("a/b").holders} == {handle}
    assert all(h.handle != handle for h in hl.status("a/c").holders)

    writer = new_handle()
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(hl.acquire, "a", "write", handle=writer, timeout=WAIT)
        wait_until(lambda: queued(hl, "a", writer), "the writer to queue")
        deeper = hl.acquire("a/d", "read", handle=handle, block=False)  # not "queued before you"
        again = hl.acquire("a/e", "read", handle=handle, block=False)  # and it stays known
        assert not writing.done()
        hl.release(kept, deeper, again)
        hl.release(writing.result(timeout=WAIT))


def test_handle_whose_only_grant_was_renewed_shorter_and_ran_out_queues(
    hl: HiLok, redis_client: redis.Redis
) -> None:
    """The latest expiry a holder's hash remembers must come down when the grant it names
    is renewed to a shorter lease: once that lease runs out, the holder holds nothing."""
    handle = hl.acquire("a/c", "read", ttl=60.0).handle  # its hash knows its latest expiry
    hl.acquire("a/c", "read", handle=handle, ttl=0.05)  # renewed, shorter
    wait_past_server_time(redis_client, 0.05)
    assert all(h.handle != handle for h in hl.status("a").holders)

    other = hl.acquire("a/x", "read")
    writer = new_handle()
    with ThreadPoolExecutor(1) as pool:
        writing = pool.submit(hl.acquire, "a", "write", handle=writer, timeout=WAIT)
        wait_until(lambda: queued(hl, "a", writer), "the writer to queue")
        with pytest.raises(LockNotAcquired, match="queued before you"):
            hl.acquire("a/c", "read", handle=handle, block=False)
        hl.release(other)
        hl.release(writing.result(timeout=WAIT))
