"""Locks across real processes: handles that travel, mutual exclusion, crashed holders.

Children are started with the ``spawn`` method (nothing inherited but their arguments) and
talk to the test through multiprocessing queues. The safety test follows the Jepsen
recipe for locks: record every grant's interval and token in every process, then check the
whole history offline against the compatibility rules (:mod:`tests._reference`, which
shares nothing with the engine).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from celery_hilok import HiLok, Lease, LockLost, LockNotAcquired
from tests._reference import MODES, Mode, conflicts, segments

SPAWN = multiprocessing.get_context("spawn")
WAIT = 60.0  # cap on every cross-process step: a hang fails, slowness does not

Queue = multiprocessing.queues.Queue


@pytest.fixture
def hl(redis_url: str, namespace: str) -> Iterator[HiLok]:
    lock = HiLok(redis_url, namespace=namespace, ttl=30.0)
    try:
        yield lock
    finally:
        lock.close()


def in_child(target: Callable[..., None], *args: Any) -> Any:
    """Run ``target(*args, out)`` in a spawned process and return what it put on ``out``."""
    out: Queue[Any] = SPAWN.Queue()
    proc = SPAWN.Process(target=target, args=(*args, out), daemon=True)
    proc.start()
    try:
        result = out.get(timeout=WAIT)
    finally:
        proc.join(WAIT)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0, f"child exited with {proc.exitcode}"
    return result


# -- children (top level, so that spawned processes can import them) -------------------------


def acquire_and_send(url: str, namespace: str, path: str, out: Queue[Any]) -> None:
    """Acquire a write lock and send the (pickled) lease to the parent, then exit."""
    hl = HiLok(url, namespace=namespace, ttl=30.0)
    try:
        out.put(hl.acquire(path, "write", block=False))
    finally:
        hl.close()


def refresh_and_renew(url: str, namespace: str, lease: Lease, out: Queue[Any]) -> None:
    """Refresh a lease granted elsewhere, then renew it by its handle."""
    hl = HiLok(url, namespace=namespace, ttl=30.0)
    try:
        hl.refresh(lease)
        renewed = hl.acquire(lease.path, lease.mode, handle=lease.handle, block=False)
        out.put(("renewed", renewed.token))
    except Exception as exc:
        out.put(("error", repr(exc)))
    finally:
        hl.close()


def try_acquire(url: str, namespace: str, path: str, mode: Mode, out: Queue[Any]) -> None:
    hl = HiLok(url, namespace=namespace, ttl=30.0)
    try:
        lease = hl.acquire(path, mode, block=False)
        out.put(("granted", lease.token))
        hl.release(lease)
    except LockNotAcquired as exc:
        out.put(("refused", str(exc)))
    finally:
        hl.close()


def hold_until_killed(url: str, namespace: str, path: str, out: Queue[Any]) -> None:
    """Hold a write lock, refreshed in the background, until the process is killed."""
    hl = HiLok(url, namespace=namespace, ttl=1.0)
    with hl.write(path, ttl=1.0) as lease:
        out.put((lease.handle, lease.token))
        threading.Event().wait()


SAFETY_TREE = ("a", "a/b", "a/c", "a/b/d", "a/b/e", "f", "f/g")
SAFETY_WEIGHTS = {"read": 5, "write": 4, "read-node": 2}


class Grant(NamedTuple):
    pid: int
    path: str
    mode: str
    token: int
    start: float  # time.monotonic() right after acquire returned
    end: float  # time.monotonic() right before release


def safety_worker(
    url: str,
    namespace: str,
    seed: int,
    duration: float,
    start: Any,  # a SPAWN.Barrier shared by all workers and the test
    out: Queue[Any],
) -> None:
    """Acquire random locks in a loop for ``duration`` seconds, recording every grant."""
    try:
        rng = random.Random(seed)
        hl = HiLok(url, namespace=namespace, ttl=30.0)
        hl.status(SAFETY_TREE[0])  # connect before the race starts
        grants: list[tuple[int, str, str, int, float, float]] = []
        timeouts = 0
        start.wait(WAIT)
        until = time.monotonic() + duration
        while time.monotonic() < until:
            path = rng.choice(SAFETY_TREE)
            mode = rng.choices(MODES, [SAFETY_WEIGHTS[m] for m in MODES])[0]
            try:
                lease = hl.acquire(path, mode, timeout=2.0)
            except LockNotAcquired:
                timeouts += 1
                continue
            began = time.monotonic()
            time.sleep(rng.uniform(0.0, 0.005))
            ended = time.monotonic()
            hl.release(lease)
            grants.append((os.getpid(), path, mode, lease.token, began, ended))
        hl.close()
        out.put(("ok", seed, grants, timeouts))
    except BaseException:
        out.put(("error", seed, traceback.format_exc(), 0))


# -- handles across processes --------------------------------------------------------------


def test_lease_travels_between_processes(hl: HiLok, redis_url: str, namespace: str) -> None:
    lease = in_child(acquire_and_send, redis_url, namespace, "p/q")
    assert isinstance(lease, Lease)
    assert (lease.path, lease.mode) == ("p/q", "write")
    # The child has exited; its lease lives on, and the parent can renew it.
    holders = hl.status("p/q").holders
    assert [(h.handle, h.mode, h.path) for h in holders] == [(lease.handle, "write", "p/q")]
    hl.refresh(lease)

    outcome, message = in_child(try_acquire, redis_url, namespace, "p", "write")
    assert outcome == "refused"
    assert lease.handle[:6] in message

    # A third process refreshes it, and renews it by its handle: same grant, same token.
    assert in_child(refresh_and_renew, redis_url, namespace, lease) == ("renewed", lease.token)

    hl.release(lease)
    assert hl.status("p/q").holders == []
    with pytest.raises(LockLost):
        hl.refresh(lease)
    outcome, token = in_child(try_acquire, redis_url, namespace, "p", "write")
    assert outcome == "granted"
    assert token > lease.token


# -- the safety test -----------------------------------------------------------------------


def check_history(grants: list[Grant]) -> int:
    """Fail on two conflicting grants whose intervals overlap, or whose tokens are out of
    order; return how many conflicting pairs were checked.

    Grants are grouped by (path, mode); each conflicting pair of groups is swept once in
    order of start, keeping the latest end and the largest token seen in either group, so
    every conflicting pair is checked without comparing all pairs one by one.
    """
    groups: dict[tuple[str, str], list[Grant]] = {}
    for g in grants:
        groups.setdefault((g.path, g.mode), []).append(g)
    kinds = sorted(groups)
    checked = 0
    for i, one in enumerate(kinds):
        for other in kinds[i:]:
            if not conflicts(one[1], one[0], other[1], other[0]):
                continue
            a, b = groups[one], groups[other]
            checked += len(a) * (len(a) - 1) // 2 if one == other else len(a) * len(b)
            sweep(a, None if one == other else b)
    return checked


def sweep(a: list[Grant], b: list[Grant] | None) -> None:
    """Check every pair (one grant of ``a``, one of ``b``), or of ``a`` with itself."""
    tagged = sorted(
        [(g.start, 0, g) for g in a] + [(g.start, 1, g) for g in (b or [])],
        key=lambda item: (item[0], item[1]),
    )
    # per side: the grant with the latest end, and the one with the largest token, so far
    latest: list[Grant | None] = [None, None]
    top: list[Grant | None] = [None, None]
    for _, side, g in tagged:
        across = side if b is None else 1 - side
        ended, tokened = latest[across], top[across]
        if ended is not None and ended.end > g.start:
            raise AssertionError(f"conflicting grants overlap:\n  {ended}\n  {g}")
        if tokened is not None and tokened.token >= g.token:
            raise AssertionError(
                f"a later conflicting grant has a smaller token:\n  {tokened}\n  {g}"
            )
        mine = latest[side]
        if mine is None or mine.end < g.end:
            latest[side] = g
        mine = top[side]
        if mine is None or mine.token < g.token:
            top[side] = g


def test_check_history_catches_overlaps_and_stale_tokens() -> None:
    """The checker itself: it must not pass vacuously."""
    w1 = Grant(1, "a", "write", 10, 1.0, 2.0)
    r2 = Grant(2, "a/b", "read", 11, 1.5, 2.5)  # overlaps a write on its ancestor
    with pytest.raises(AssertionError, match="overlap"):
        check_history([w1, r2])
    r2_late_small = Grant(2, "a/b", "read", 9, 2.5, 3.0)  # after it, but an older token
    with pytest.raises(AssertionError, match="smaller token"):
        check_history([w1, r2_late_small])
    fine = [w1, Grant(2, "a/b", "read", 12, 2.5, 3.0), Grant(3, "a/c", "read", 13, 2.6, 2.9)]
    assert check_history(fine) == 2
    node_only = [
        w1,
        Grant(2, "a", "read-node", 12, 2.1, 3.0),
        Grant(3, "a/b", "write", 13, 2.2, 2.3),  # below a node-only read: no conflict
    ]
    assert check_history(node_only) == 2


def test_no_two_conflicting_grants_overlap_across_processes(redis_url: str, namespace: str) -> None:
    workers, duration = 6, 3.5
    start = SPAWN.Barrier(workers + 1)
    out: Queue[Any] = SPAWN.Queue()
    seeds = [random.randrange(2**32) for _ in range(workers)]
    procs = [
        SPAWN.Process(
            target=safety_worker,
            args=(redis_url, namespace, seed, duration, start, out),
            daemon=True,
        )
        for seed in seeds
    ]
    for proc in procs:
        proc.start()
    try:
        start.wait(WAIT)
        reports = [out.get(timeout=WAIT + duration) for _ in procs]  # drain before join
    finally:
        for proc in procs:
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()

    errors = [f"seed {seed}:\n{text}" for kind, seed, text, _ in reports if kind == "error"]
    assert not errors, "\n".join(errors)
    grants = [Grant(*row) for _, _, rows, _ in reports for row in rows]
    timeouts = sum(t for *_, t in reports)

    assert len(grants) > 200, f"only {len(grants)} grants: the test proves nothing"
    assert len({g.pid for g in grants}) == workers
    for tree in {segments(g.path)[0] for g in grants}:
        tokens = [g.token for g in grants if segments(g.path)[0] == tree]
        assert len(set(tokens)) == len(tokens), f"a token was handed out twice in {tree!r}"
    pairs = check_history(grants)
    assert pairs > 1000
    writes = sum(g.mode == "write" for g in grants)
    print(
        f"\nsafety: {workers} processes, {len(grants)} grants ({writes} writes), "
        f"{timeouts} timeouts, {pairs} conflicting pairs checked, seeds {seeds}"
    )


# -- a crashed holder ----------------------------------------------------------------------


def test_killed_holder_lock_expires_after_its_ttl(
    hl: HiLok, redis_url: str, namespace: str
) -> None:
    path = "jobs/nightly"
    out: Queue[Any] = SPAWN.Queue()
    proc = SPAWN.Process(
        target=hold_until_killed, args=(redis_url, namespace, path, out), daemon=True
    )
    proc.start()
    try:
        dead_handle, dead_token = out.get(timeout=WAIT)
        # Alive, the child keeps its 1 s lease refreshed: still held well past 1 s.
        with pytest.raises(LockNotAcquired):
            hl.acquire(path, "write", timeout=1.5)
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(WAIT)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        if proc.is_alive():
            proc.kill()

    # Death releases nothing: the lease simply stops being refreshed...
    assert [h.handle for h in hl.status(path).holders] == [dead_handle]
    # ...and runs out on its own, after which another holder gets the lock.
    began = time.monotonic()
    lease = hl.acquire(path, "write", timeout=10.0)
    waited = time.monotonic() - began
    assert lease.token > dead_token
    assert [h.handle for h in hl.status(path).holders] == [lease.handle]
    print(f"\nkilled holder: lock taken over {waited:.3f}s after the kill")
    hl.release(lease)
