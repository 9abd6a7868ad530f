"""The ``park`` policy on real prefork workers: a refused task gives its pool slot back,
keeps its place in the lock's queue, and is sent again, already holding the lock, when its
turn comes. Checked from the bodies' recorded intervals, not from times."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import redis
from celery import chain
from celery.result import AsyncResult

from celery_hilok import HiLok, LockNotAcquired
from celery_hilok._parked import parked_records
from celery_hilok.celery.park import PARKED
from celery_hilok.inspect import tasks_by_handle
from tests._wait import wait_for
from tests.celery.app import app as test_app
from tests.celery.app import events, open_gate, tasks
from tests.celery.conftest import WorkerProcess

pytestmark = pytest.mark.celery_worker

RESULT_TIMEOUT = 30.0


def account(run: str, name: str = "a1") -> str:
    return f"{run}/tenants/t1/accounts/{name}"


def intervals(lab: redis.Redis, run: str) -> dict[str, tuple[float, float]]:
    """(start, end) of each body that ran, by name; a body that ran twice fails."""
    starts: dict[str, float] = {}
    out: dict[str, tuple[float, float]] = {}
    for e in events(lab, run):
        if e["kind"] == "start":
            assert e["name"] not in starts, f"{e['name']} ran twice"
            starts[e["name"]] = e["t"]
        elif e["kind"] == "end":
            out[e["name"]] = (starts[e["name"]], e["t"])
    return out


def started(lab: redis.Redis, run: str, name: str) -> Callable[[], bool]:
    return lambda: any(e["kind"] == "start" and e["name"] == name for e in events(lab, run))


def parked(result: AsyncResult) -> Callable[[], bool]:
    return lambda: result.state == PARKED


def holding_first(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis
) -> tuple[WorkerProcess, AsyncResult]:
    """A prefork worker (2 pool processes) and the task `first` running in it, holding the
    account's write lock until gate "g" opens."""
    worker = worker_factory(2)
    first = tasks.write_park.apply_async((run, "t1", "a1", "first", "g"), queue=worker.queue)
    wait_for(started(lab, run, "first"), what="the first task to start")
    return worker, first


def test_parked_tasks_free_the_pool_and_run_in_order_holding_the_lock(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    worker, first = holding_first(worker_factory, run, lab)
    q = worker.queue
    later = []
    for name in ("second", "third", "fourth"):
        result = tasks.write_park.apply_async((run, "t1", "a1", name), queue=q)
        wait_for(parked(result), what=f"{name} to park")
        later.append(result)
    # Both pool slots are free again (one runs `first`): tasks on other paths run now.
    free = [
        tasks.write_park.apply_async((run, "t1", f"free{i}", f"free{i}"), queue=q) for i in range(3)
    ]
    assert [r.get(timeout=RESULT_TIMEOUT) for r in free] == ["free0", "free1", "free2"]
    assert not started(lab, run, "second")()
    waiters = hl.status(account(run)).waiters
    named = tasks_by_handle(hl)  # what `celery hilok tree` shows beside each waiter
    assert [named[w.handle].task_id for w in waiters] == [r.id for r in later]  # in order
    assert all(named[w.handle].parked for w in waiters)
    open_gate(lab, run, "g")
    assert first.get(timeout=RESULT_TIMEOUT) == "first"
    assert [r.get(timeout=RESULT_TIMEOUT) for r in later] == ["second", "third", "fourth"]
    ran = intervals(lab, run)
    order = ["first", "second", "third", "fourth"]
    for before, after in itertools.pairwise(order):
        assert ran[before][1] <= ran[after][0], f"{after} started before {before} ended"
    # The same task id ran (the caller's AsyncResult), once each, holding the lock.
    starts = [e for e in events(lab, run) if e["kind"] == "start" and e["name"] in order[1:]]
    assert [e["id"] for e in starts] == [r.id for r in later]
    assert all(e["tokens"].get(account(run)) for e in starts)
    wait_for(lambda: not hl.status(account(run)).holders, what="the last release")
    left = [p for p in parked_records(hl) if p.task_id in {r.id for r in later}]
    assert not left, f"parked records left behind: {left}"


def test_a_revoked_parked_task_leaves_the_queue(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    worker, first = holding_first(worker_factory, run, lab)
    q = worker.queue
    dropped = tasks.write_park.apply_async((run, "t1", "a1", "dropped"), queue=q)
    wait_for(parked(dropped), what="the task to park")
    after = tasks.write_park.apply_async((run, "t1", "a1", "after"), queue=q)
    wait_for(parked(after), what="the next task to park")
    assert len(hl.status(account(run)).waiters) == 2
    test_app.control.revoke(dropped.id, destination=[worker.node])
    wait_for(lambda: dropped.state == "REVOKED", what="the parked task to be dropped")
    assert len(hl.status(account(run)).waiters) == 1  # only `after` waits now
    open_gate(lab, run, "g")
    assert first.get(timeout=RESULT_TIMEOUT) == "first"
    assert after.get(timeout=RESULT_TIMEOUT) == "after"
    assert "dropped" not in intervals(lab, run)


def test_a_parked_task_fails_when_its_timeout_passes(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    worker, first = holding_first(worker_factory, run, lab)
    q = worker.queue
    late = tasks.write_park_timeout.apply_async((run, "t1", "a1", "late"), queue=q)
    with pytest.raises(LockNotAcquired) as caught:
        late.get(timeout=RESULT_TIMEOUT)
    assert caught.value.path == account(run) and caught.value.mode == "write"
    assert "hilok_timeout" in str(caught.value)
    assert not hl.status(account(run)).waiters
    open_gate(lab, run, "g")
    assert first.get(timeout=RESULT_TIMEOUT) == "first"
    assert "late" not in intervals(lab, run)


def test_parked_tasks_wait_in_redis_while_no_worker_runs(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    first = worker_factory(1)
    # held past any slow start or stop of a worker: released by the test, not by its ttl
    blocker = hl.acquire(account(run), "write", ttl=300)
    result = tasks.write_park.apply_async((run, "t1", "a1", "later"), queue=first.queue)
    wait_for(parked(result), what="the task to park")
    first.stop()
    # named in `celery hilok tree` with no worker (and no worker's holder directory) left
    [waiter] = hl.status(account(run)).waiters
    assert tasks_by_handle(hl)[waiter.handle].task_id == result.id
    hl.release(blocker)  # granted to the parked task: nobody hears of it
    assert not started(lab, run, "later")()
    worker_factory(1, queue=first.queue)  # a worker starts: it finds the parked task
    assert result.get(timeout=RESULT_TIMEOUT) == "later"
    left = [p for p in parked_records(hl) if p.task_id == result.id]
    assert not left, f"parked records left behind: {left}"


def test_parked_tasks_leave_every_slot_to_the_chain_step_they_wait_for(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # Two pool processes: step 1 runs in one, holding the lock it hands to step 2. The two
    # tasks behind it park, so step 2 (whose message comes after theirs) gets a slot at
    # once; they run after it, in the order they came (the `wait` policy's stall, issue 13
    # item 3, cannot happen).
    worker = worker_factory(2)
    q = worker.queue
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "step 1", "s1"),
        tasks.last_step.s(run, "t1", "a1", "step 2"),
    ).apply_async(queue=q)
    wait_for(started(lab, run, "step 1"), what="step 1")
    waiters = []
    for n in range(2):
        waiter = tasks.write_park.apply_async((run, "t1", "a1", f"waiter {n}"), queue=q)
        wait_for(parked(waiter), what=f"waiter {n} to park")
        waiters.append(waiter)
    open_gate(lab, run, "s1")
    assert result.get(timeout=RESULT_TIMEOUT) == "step 2"
    assert [w.get(timeout=RESULT_TIMEOUT) for w in waiters] == ["waiter 0", "waiter 1"]
    ran = intervals(lab, run)
    order = ["step 1", "step 2", "waiter 0", "waiter 1"]
    assert sorted(ran, key=lambda name: ran[name][0]) == order
    for before, after in itertools.pairwise(order):
        assert ran[before][1] <= ran[after][0], f"{after} started before {before} ended"
    assert "retries instead of waiting" not in worker.log()


def test_no_parked_record_outlives_its_task(hl: HiLok) -> None:
    """Run last in this module: every task the tests here (and the Celery tests before them,
    in this namespace) parked is sent again or dropped, so no record is left (a task
    parked by a test that stopped its worker is sent by the next scan that asks for it)."""
    wait_for(lambda: not list(parked_records(hl)), timeout=40, what="no parked record left")
