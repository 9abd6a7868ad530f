"""HiLokTask on real worker subprocesses: refresh in prefork pool processes, chains published
from them, and every way a pool process can die (SIGKILL, hard time limit, terminate), plus
revoked chain steps, warm shutdown, and the solo pool.

The locks here have the default 30 s lease, and every "released" check gives up well
before that: a lock found free was released by someone, not left to run out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from subprocess import PIPE
from typing import Any

import pytest
import redis
from celery import chain
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError

from celery_hilok import HiLok
from celery_hilok.celery.request import when_gone
from tests._wait import wait_for
from tests.celery.app import events, open_gate, tasks
from tests.celery.conftest import WorkerProcess

pytestmark = pytest.mark.celery_worker

RESULT_TIMEOUT = 30.0
RELEASE_TIMEOUT = 15.0  # half the lease: a release seen within this came from the worker


def account(run: str) -> str:
    return f"{run}/tenants/t1/accounts/a1"


def start_of(lab: redis.Redis, run: str, name: str) -> Callable[[], dict[str, Any] | None]:
    def find() -> dict[str, Any] | None:
        for e in events(lab, run):
            if e["kind"] == "start" and e["name"] == name:
                return e
        return None

    return find


def holder_handles(hl: HiLok, path: str) -> list[str]:
    return [h.handle for h in hl.status(path).holders]


def count_renewals(hl: HiLok, path: str, handle: str, wanted: int) -> int:
    """Watch the lease of ``handle`` on ``path`` until it was renewed ``wanted`` times.

    Fails if anyone else holds it meanwhile or it disappears (it ran out).
    """
    seen, last = 0, float("inf")

    def renewed() -> bool:
        nonlocal seen, last
        holders = hl.status(path).holders
        assert [h.handle for h in holders] == [handle], "the lease was not kept"
        if holders[0].ttl > last:
            seen += 1
        last = holders[0].ttl
        return seen >= wanted

    wait_for(renewed, what=f"{wanted} renewals")
    return seen


def main_process_released(worker: WorkerProcess, task_id: str, why: str) -> bool:
    """Did the worker's main process log releasing ``task_id``'s locks for ``why``?"""
    return any(
        "MainProcess" in line and task_id in line and why in line
        for line in worker.log().splitlines()
    )


def released(hl: HiLok, path: str, why: str) -> None:
    wait_for(lambda: not hl.status(path).holders, timeout=RELEASE_TIMEOUT, what=why)


def test_pool_processes_refresh_and_serialise(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    q = prefork_worker.queue
    # `lose` holds a 0.6 s lease: it stays held for many leases only if the pool process's
    # refresher (started after fork) keeps renewing it.
    result = tasks.lose.apply_async((run, "t1", "a1"), queue=q)
    entry = wait_for(start_of(lab, run, "lose"), what="the task to start")
    assert entry["pid"] != prefork_worker.pid  # it runs in a pool process
    token = entry["tokens"][account(run)]
    renewals = count_renewals(hl, account(run), entry["handle"], wanted=4)
    assert renewals >= 4
    other = tasks.write_fail.apply_async((run, "t1", "a1"), queue=q)
    with pytest.raises(Exception, match="could not acquire"):
        other.get(timeout=RESULT_TIMEOUT)
    open_gate(lab, run, "lost")
    assert result.get(timeout=RESULT_TIMEOUT) == "lose"
    after = next(e for e in events(lab, run) if e["kind"] == "lost?")
    assert after["lost"] is False and after["tokens"][account(run)] == token
    released(hl, account(run), "the release")


def test_chain_steps_published_by_pool_processes_keep_the_lock(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "step 1", "s1"),
        tasks.keep_step.s(run, "t1", "a1", "step 2"),
        tasks.last_step.s(run, "t1", "a1", "step 3"),
    ).apply_async(queue=prefork_worker.queue)
    first = wait_for(start_of(lab, run, "step 1"), what="step 1")
    waiter = tasks.write_wait.apply_async((run, "t1", "a1", "outsider"), queue=prefork_worker.queue)
    wait_for(lambda: hl.status(account(run)).waiters, what="the outsider task to queue")
    open_gate(lab, run, "s1")
    assert result.get(timeout=RESULT_TIMEOUT) == "step 3"
    assert waiter.get(timeout=RESULT_TIMEOUT) == "outsider"
    names = [f"{e['kind']} {e['name']}" for e in events(lab, run)]
    assert names == [
        "start step 1",
        "end step 1",
        "start step 2",
        "end step 2",
        "start step 3",
        "end step 3",
        "start outsider",
        "end outsider",
    ]
    starts = {e["name"]: e for e in events(lab, run) if e["kind"] == "start"}
    assert starts["step 2"]["handle"] == starts["step 3"]["handle"] == first["handle"]
    released(hl, account(run), "the release")


def test_wait_tasks_in_every_slot_give_them_back_to_the_chain_step_they_wait_for(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # Two pool processes and prefetch 1: step 1 runs in one slot, waiter 0 waits in the
    # other, waiter 1 is queued. Step 1 hands its lock to step 2, whose message lands behind
    # waiter 1; waiter 1 takes the freed slot. Were both to wait, step 2 would get no slot
    # until their hilok_timeout (10 s) failed them: the worker would stall.
    worker = worker_factory(2)
    q = worker.queue
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "step 1", "s1"),
        tasks.last_step.s(run, "t1", "a1", "step 2"),
    ).apply_async(queue=q)
    wait_for(start_of(lab, run, "step 1"), what="step 1")
    waiters = [
        tasks.write_bounded_wait.apply_async((run, "t1", "a1", f"waiter {n}"), queue=q)
        for n in range(2)
    ]
    wait_for(lambda: hl.status(account(run)).waiters, what="waiter 0 to wait in its slot")
    open_gate(lab, run, "s1")
    assert result.get(timeout=RESULT_TIMEOUT) == "step 2"
    assert sorted(w.get(timeout=RESULT_TIMEOUT) for w in waiters) == ["waiter 0", "waiter 1"]
    records = events(lab, run)
    # Recorded in order, under the lock: each start is followed by its own end, so no two
    # bodies overlapped; and step 2 ran right after step 1, before any waiter.
    pairs = [
        (start["kind"], end["kind"], start["name"], end["name"])
        for start, end in zip(records[0::2], records[1::2], strict=True)
    ]
    assert all(pair[:2] == ("start", "end") and pair[2] == pair[3] for pair in pairs), pairs
    assert [pair[2] for pair in pairs] in (
        ["step 1", "step 2", "waiter 0", "waiter 1"],
        ["step 1", "step 2", "waiter 1", "waiter 0"],
    )
    assert "retries instead of waiting" in worker.log()
    released(hl, account(run), "the release")


def test_sigkilled_pool_process_is_released_by_the_main_process(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = tasks.exit.apply_async((run, "t1", "a1", "block"), queue=prefork_worker.queue)
    entry = wait_for(start_of(lab, run, "block"), what="the task to start")
    assert holder_handles(hl, account(run)) == [entry["handle"]]
    os.kill(entry["pid"], signal.SIGKILL)  # what the OOM killer does
    with pytest.raises(WorkerLostError):
        result.get(timeout=RESULT_TIMEOUT)
    released(hl, account(run), "the main process to release the dead process's lock")
    assert main_process_released(prefork_worker, result.id, "worker process lost")


def test_a_pool_process_stopped_past_its_lease_learns_it_lost_the_lock(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # `lose` holds its lock with a 0.6 s lease, renewed by its process's refresher thread.
    result = tasks.lose.apply_async((run, "t1", "a1"), queue=prefork_worker.queue)
    entry = wait_for(start_of(lab, run, "lose"), what="the task to start")
    stale = entry["tokens"][account(run)]
    os.kill(entry["pid"], signal.SIGSTOP)  # a GC pause, a VM freeze, a laptop lid
    try:
        # The lease runs out while the process cannot renew it; someone else gets the lock.
        other = hl.acquire(account(run), "write", timeout=RESULT_TIMEOUT)
        assert other.token > stale
        hl.release(other)
    finally:
        os.kill(entry["pid"], signal.SIGCONT)
    wait_for(
        lambda: f"{result.id}]: lost its write lock" in prefork_worker.log(),
        what="the resumed process's refresher to find the lease lost",
    )
    open_gate(lab, run, "lost")
    assert result.get(timeout=RESULT_TIMEOUT) == "lose"
    after = [e for e in events(lab, run) if e["kind"] == "lost?"]
    assert after[0]["lost"] is True
    assert after[0]["check"].startswith("lock lost while the task ran")
    assert not hl.status(account(run)).holders


def test_hard_time_limit_is_released_by_the_main_process(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = tasks.exit.apply_async(
        (run, "t1", "a1", "block"), queue=prefork_worker.queue, time_limit=1
    )
    wait_for(start_of(lab, run, "block"), what="the task to start")
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=RESULT_TIMEOUT)
    released(hl, account(run), "the release after the hard time limit")
    # The main process releases too (the process may die before its own release), once
    # the process is gone: after it was killed, so perhaps after the lock was seen free.
    wait_for(
        lambda: main_process_released(prefork_worker, result.id, "TimeLimitExceeded"),
        timeout=RELEASE_TIMEOUT,
        what="the main process to release for the killed process",
    )


def test_hard_time_limit_releases_only_once_the_process_is_gone(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # Billiard reports a hard time limit before it kills the process (SIGTERM, which this
    # task ignores, then SIGKILL), so the body still runs for a while: the lock must stay
    # held until the process is gone, and only the main process can release it. (A worker
    # of its own: after a kill, billiard may take a while to replace the dead process.)
    worker = worker_factory(2)
    q = worker.queue
    result = tasks.stubborn.apply_async((run, "t1", "a1"), queue=q, time_limit=1)
    wait_for(start_of(lab, run, "stubborn"), what="the task to start")
    waiter = tasks.write_wait.apply_async((run, "t1", "a1", "outsider"), queue=q)
    wait_for(lambda: hl.status(account(run)).waiters, what="the conflicting task to queue")
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=RESULT_TIMEOUT)
    assert waiter.get(timeout=RESULT_TIMEOUT) == "outsider"
    records = [(e["kind"], e["name"]) for e in events(lab, run)]
    first_outsider = records.index(("start", "outsider"))
    assert {name for _, name in records[:first_outsider]} == {"stubborn"}
    assert {name for _, name in records[first_outsider:]} == {"outsider"}
    assert main_process_released(worker, result.id, "TimeLimitExceeded")


def test_soft_time_limit_is_released_by_the_task(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = tasks.exit.apply_async(
        (run, "t1", "a1", "block"), queue=prefork_worker.queue, soft_time_limit=0.5
    )
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=RESULT_TIMEOUT)
    released(hl, account(run), "the release after the soft time limit")


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_terminated_task_is_released(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok, signum: str
) -> None:
    result = tasks.exit.apply_async((run, "t1", "a1", "block"), queue=prefork_worker.queue)
    wait_for(start_of(lab, run, "block"), what="the task to start")
    result.revoke(terminate=True, signal=signum)
    released(hl, account(run), "the release of the terminated task")
    wait_for(lambda: result.state == "REVOKED", what="the REVOKED state")
    # The main process releases once billiard reports the terminated process gone (SIGKILL
    # leaves the pool process no postrun: only the main process can release then).
    wait_for(
        lambda: main_process_released(prefork_worker, result.id, "its process exited"),
        timeout=RELEASE_TIMEOUT,
        what="the main process to release for the terminated process",
    )


def test_graceful_terminate_keeps_the_lock_until_the_cleanup_ends(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # revoke(terminate=True, signal="SIGUSR1") is Celery's graceful cancel: the pool process
    # survives, the body gets SoftTimeLimitExceeded and runs its cleanup, still under its lock.
    worker = worker_factory(2)
    q = worker.queue
    result = tasks.graceful.apply_async((run, "t1", "a1", 0.5), queue=q)
    entry = wait_for(start_of(lab, run, "graceful"), what="the task to start")
    waiter = tasks.write_wait.apply_async((run, "t1", "a1", "outsider"), queue=q)
    wait_for(lambda: hl.status(account(run)).waiters, what="the conflicting task to queue")
    result.revoke(terminate=True, signal="SIGUSR1")
    assert waiter.get(timeout=RESULT_TIMEOUT) == "outsider"
    # The records are pushed in the order things happened: the conflicting body starts only
    # after the cancelled one, cleanup included, has ended.
    records = [(e["kind"], e["name"]) for e in events(lab, run)]
    assert records == [
        ("start", "graceful"),
        ("cleanup", "graceful"),
        ("end", "graceful"),
        ("start", "outsider"),
        ("end", "outsider"),
    ]
    os.kill(entry["pid"], 0)  # the pool process survived the signal
    released(hl, account(run), "the release")


def test_chain_step_revoked_in_the_queue_releases_what_was_handed_to_it(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    sig = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "locker"),
        tasks.last_step.s(run, "t1", "a1", "never"),
    )
    last = sig.freeze()  # the ids of the steps, known before anything runs
    last.revoke()
    first = sig.apply_async(queue=prefork_worker.queue)
    assert first.parent.get(timeout=RESULT_TIMEOUT) == "locker"
    # The locker handed its lock over (kept for hilok_keep_ttl = 300 s) to a step that
    # was revoked: the worker's main process releases it when it drops the message.
    released(hl, account(run), "the release of the revoked step's handed lock")
    assert start_of(lab, run, "never")() is None


def test_warm_shutdown_lets_the_task_finish_and_release(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    worker = worker_factory(1)
    result = tasks.write_fail.apply_async((run, "t1", "a1", "busy", "g"), queue=worker.queue)
    entry = wait_for(start_of(lab, run, "busy"), what="the task to start")
    worker.warm_shutdown()
    # The worker waits for the running task, which still holds its lock ...
    assert holder_handles(hl, account(run)) == [entry["handle"]]
    open_gate(lab, run, "g")
    assert result.get(timeout=RESULT_TIMEOUT) == "busy"
    assert worker.wait() == 0
    # ... and released it on its way out.
    assert not hl.status(account(run)).holders


def test_solo_pool_runs_a_chain_under_one_holder(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok
) -> None:
    worker = worker_factory(1, pool="solo")  # everything in the worker's one process
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "step 1"),
        tasks.last_step.s(run, "t1", "a1", "step 2"),
    ).apply_async(queue=worker.queue)
    assert result.get(timeout=RESULT_TIMEOUT) == "step 2"
    starts = [e for e in events(lab, run) if e["kind"] == "start"]
    assert [e["pid"] for e in starts] == [worker.pid, worker.pid]
    assert starts[0]["handle"] == starts[1]["handle"]
    released(hl, account(run), "the release")


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_when_gone_calls_back_once_the_process_exited(
    pidfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The main process's wait for a pool process to exit, outside a worker (no event loop:
    # a thread waits), with a pidfd and, as on systems without one, by polling the pid.
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=PIPE)
    gone = threading.Event()
    when_gone(child.pid, gone.set, "test")
    assert not gone.is_set()  # it is still running
    assert child.stdin is not None
    child.stdin.close()  # now it exits
    child.wait()
    assert gone.wait(RESULT_TIMEOUT)


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_threads_and_solo_pools_have_no_terminate_nor_time_limits(
    worker_factory: Callable[..., WorkerProcess], run: str, lab: redis.Redis, hl: HiLok, pool: str
) -> None:
    # What docs/celery.md's failure table says of these pools: revoke(terminate=True) does
    # not stop a running task there, and time limits are not enforced, so the task keeps
    # its lock until it ends, and releases it then itself.
    worker = worker_factory(2 if pool == "threads" else 1, pool=pool)
    result = tasks.write_fail.apply_async(
        (run, "t1", "a1", "busy", None, 1.5),  # 1.5 s of work, past both limits
        queue=worker.queue,
        soft_time_limit=0.3,
        time_limit=0.6,
    )
    entry = wait_for(start_of(lab, run, "busy"), what="the task to start")
    replies = result.app.control.revoke(
        result.id, terminate=True, reply=True, timeout=1.0, destination=[worker.node]
    )
    if pool == "threads":  # the worker answers at once, but cannot terminate a thread
        assert "does not implement kill_job" in str(replies)
        assert holder_handles(hl, account(run)) == [entry["handle"]]
    # (The solo worker runs the task in its only thread: it reads the revoke after it.)
    assert result.get(timeout=RESULT_TIMEOUT) == "busy"  # neither limit stopped it
    assert [e["kind"] for e in events(lab, run)] == ["start", "end"]
    released(hl, account(run), "the task's own release")
