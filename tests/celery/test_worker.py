"""HiLokTask on a real worker (in-process, threads pool): locking, policies, ways out."""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import task_postrun, task_retry
from click.testing import CliRunner

from celery_hilok import HiLok, LockNotAcquired, hilok_lease_lost
from celery_hilok.cli import hilok as hilok_command
from celery_hilok.inspect import tasks_by_handle
from tests._wait import wait_for
from tests.celery.app import events, open_gate, tasks

pytestmark = pytest.mark.usefixtures("inproc_worker")

RESULT_TIMEOUT = 30.0


def path(run: str, tenant: str, account: str | None = None) -> str:
    return f"{run}/tenants/{tenant}" + (f"/accounts/{account}" if account else "")


def holders(hl: HiLok, p: str) -> list[tuple[str, str, str]]:
    """(mode, path, relation) of everything held on, above or below ``p``."""
    return sorted((h.mode, h.path, h.relation) for h in hl.status(p).holders)


def is_free(hl: HiLok, p: str) -> bool:
    return not hl.status(p).holders


def started(lab: redis.Redis, run: str, name: str) -> dict[str, Any] | None:
    for e in events(lab, run):
        if e["kind"] == "start" and e["name"] == name:
            return e
    return None


def intervals(lab: redis.Redis, run: str) -> dict[str, tuple[float, float]]:
    spans: dict[str, list[float]] = {}
    for e in events(lab, run):
        if e["kind"] in ("start", "end"):
            spans.setdefault(e["name"], []).append(e["t"])
    return {name: (ts[0], ts[-1]) for name, ts in spans.items() if len(ts) == 2}


def overlapping(spans: list[tuple[float, float]]) -> list[tuple[Any, Any]]:
    ordered = sorted(spans)
    return [(a, b) for a, b in itertools.pairwise(ordered) if b[0] < a[1]]


# -- locking ------------------------------------------------------------------------------


def test_body_runs_under_its_lock_which_is_released_after(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = tasks.write_retry.delay(run, "t1", "a1", gate="g")
    entry = wait_for(lambda: started(lab, run, "write a1"), what="the task to start")
    assert holders(hl, path(run, "t1", "a1")) == [("write", path(run, "t1", "a1"), "self")]
    holder = hl.status(path(run, "t1", "a1")).holders[0]
    assert holder.handle == entry["handle"]
    assert list(entry["tokens"]) == [path(run, "t1", "a1")]
    open_gate(lab, run, "g")
    assert result.get(timeout=RESULT_TIMEOUT) == "write a1"
    wait_for(lambda: is_free(hl, path(run, "t1")), what="the lock to be released")


def test_the_lock_tree_names_the_task_and_worker_of_holders_and_waiters(
    run: str, lab: redis.Redis, hl: HiLok, inproc_worker: Any
) -> None:
    from celery_hilok.cli import render_tree
    from celery_hilok.inspect import snapshot

    holder = tasks.write_retry.delay(run, "t1", "a1", gate="g")
    wait_for(lambda: started(lab, run, "write a1"), what="the task to start")
    waiter = tasks.write_wait.delay(run, "t1", "a1", name="second")
    wait_for(lambda: hl.status(path(run, "t1", "a1")).waiters, what="the second to wait")

    def named() -> Any:
        snap = snapshot(hl, path(run, "t1"))
        if snap.grants and snap.waiters and snap.grants[0].task and snap.waiters[0].task:
            return snap
        return None

    snap = wait_for(named, what="the worker to publish who holds and who waits")
    grant, queued = snap.grants[0].task, snap.waiters[0].task
    assert grant is not None and queued is not None
    assert (grant.task_id, grant.task) == (holder.id, "hilok_tests.write_retry")
    assert (queued.task_id, queued.task) == (waiter.id, "hilok_tests.write_wait")
    assert grant.worker == inproc_worker.hostname and grant.pid == os.getpid()
    drawn = render_tree(snap, "/")
    assert f"task hilok_tests.write_retry[{holder.id}] on {inproc_worker.hostname}" in drawn
    assert f"task hilok_tests.write_wait[{waiter.id}]" in drawn
    open_gate(lab, run, "g")
    assert holder.get(timeout=RESULT_TIMEOUT) == "write a1"
    assert waiter.get(timeout=RESULT_TIMEOUT) == "second"
    wait_for(
        lambda: not {holder.id, waiter.id} & {t.task_id for t in tasks_by_handle(hl).values()},
        what="the finished tasks to leave the directory",
    )


def test_conflicting_tasks_never_overlap_while_others_run_in_parallel(
    run: str, lab: redis.Redis
) -> None:
    # Three accounts; two concurrent tasks per account (one worker has 6 threads).
    results = [
        tasks.write_retry.delay(run, "t1", account, name=f"{account}#{i}", work=0.05)
        for i in range(2)
        for account in ("a1", "a2", "a3")
    ]
    for r in results:
        r.get(timeout=RESULT_TIMEOUT)
    spans = intervals(lab, run)
    assert len(spans) == 6
    for account in ("a1", "a2", "a3"):
        same = [span for name, span in spans.items() if name.startswith(account)]
        assert overlapping(same) == [], f"writers of {account} overlapped"
    # Tasks on different accounts do not wait for each other: with gates that only open
    # when all three are running, they can only finish if they run at the same time.
    gated = [
        tasks.write_fail.delay(run, "t2", account, name=f"gated {account}", gate="all")
        for account in ("b1", "b2", "b3")
    ]
    wait_for(
        lambda: all(started(lab, run, f"gated {a}") for a in ("b1", "b2", "b3")),
        what="three writers on different accounts to hold their locks at once",
    )
    open_gate(lab, run, "all", times=3)
    assert [r.get(timeout=RESULT_TIMEOUT) for r in gated] == ["gated b1", "gated b2", "gated b3"]


def test_readers_share_and_keep_writers_of_the_subtree_out(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    readers = [tasks.read.delay(run, "t1", name=f"reader {i}", gate="readers") for i in range(2)]
    wait_for(
        lambda: started(lab, run, "reader 0") and started(lab, run, "reader 1"),
        what="both readers to hold tenant t1 at once",
    )
    # A writer below the read lock cannot get in; one in another tenant can.
    blocked = tasks.write_fail.delay(run, "t1", "a1")
    with pytest.raises(LockNotAcquired, match=r"write lock on '.*/tenants/t1/accounts/a1'"):
        blocked.get(timeout=RESULT_TIMEOUT)
    assert tasks.write_fail.delay(run, "t2", "a1").get(timeout=RESULT_TIMEOUT) == "write a1"
    open_gate(lab, run, "readers", times=2)
    assert sorted(r.get(timeout=RESULT_TIMEOUT) for r in readers) == ["reader 0", "reader 1"]


def test_all_locks_of_a_task_are_taken_at_once(run: str, lab: redis.Redis, hl: HiLok) -> None:
    # multi: write on the account and on audit/<account>, read on <run>/config (a callable).
    outside = hl.acquire(f"{run}/audit/a1", "write")
    result = tasks.multi.delay(run, "t1", "a1")
    wait_for(lambda: result.state == "PARKED", what="multi to park on contention")
    # Refused the audit lock, it holds none of the others either (all or nothing).
    assert is_free(hl, path(run, "t1", "a1")) and is_free(hl, f"{run}/config")
    hl.release(outside)
    assert result.get(timeout=RESULT_TIMEOUT) == "multi"
    entry = started(lab, run, "multi")
    assert entry is not None
    assert sorted(entry["tokens"]) == sorted(
        [path(run, "t1", "a1"), f"{run}/audit/a1", f"{run}/config"]
    )


# -- contention policies ------------------------------------------------------------------


def test_retry_policy_retries_until_free_without_using_max_retries(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # flaky has max_retries=1 and retries itself once; contention retries come on top.
    retried: list[str] = []

    def on_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
        if isinstance(reason.exc, LockNotAcquired):
            retried.append(request.id)

    task_retry.connect(on_retry)
    try:
        outside = hl.acquire(path(run, "t1", "a1"), "write")
        result = tasks.flaky.delay(run, "t1", "a1", fail_times=1)
        wait_for(lambda: retried.count(result.id) >= 3, what="three contention retries")
        assert lab.get(f"lab:{run}:tries") is None  # the body never ran meanwhile
        hl.release(outside)
    finally:
        task_retry.disconnect(on_retry)
    assert result.get(timeout=RESULT_TIMEOUT) == "done after 2 tries"
    runs = [e for e in events(lab, run) if e["kind"] == "start"]
    assert [e["retries"] for e in runs] == [0, 1]  # the contention retries did not count
    assert runs[0]["handle"] != runs[1]["handle"]  # every execution has its own handle


def test_retry_policy_gives_up_after_its_own_budget(run: str, hl: HiLok) -> None:
    outside = hl.acquire(path(run, "t1", "a1"), "write")
    result = tasks.write_budget.delay(run, "t1", "a1")  # hilok_max_retries=2
    with pytest.raises(LockNotAcquired, match=r"gave up after 2 contention retries") as info:
        result.get(timeout=RESULT_TIMEOUT)
    assert (info.value.path, info.value.mode) == (path(run, "t1", "a1"), "write")
    hl.release(outside)


def test_wait_policy_waits_and_gives_up_after_its_timeout(run: str, hl: HiLok) -> None:
    outside = hl.acquire(path(run, "t1", "a1"), "write")
    waiting = tasks.write_wait.delay(run, "t1", "a1")
    wait_for(lambda: hl.status(path(run, "t1", "a1")).waiters, what="the task to wait")
    hl.release(outside)
    assert waiting.get(timeout=RESULT_TIMEOUT) == "write a1"

    outside = hl.acquire(path(run, "t1", "a1"), "write")
    short = tasks.write_short_wait.delay(run, "t1", "a1")
    with pytest.raises(LockNotAcquired, match=r"within 0\.2s"):
        short.get(timeout=RESULT_TIMEOUT)
    hl.release(outside)


def test_fail_policy_fails_at_once(run: str, hl: HiLok, app: Celery) -> None:
    outside = hl.acquire(path(run, "t1"), "read")
    result = tasks.write_fail.delay(run, "t1", "a1")
    with pytest.raises(LockNotAcquired) as info:
        result.get(timeout=RESULT_TIMEOUT)
    assert "at once" in str(info.value) and f"read lock on '{path(run, 't1')}'" in str(info.value)
    assert result.state == "FAILURE"
    # The error came through the (JSON) result backend with what it says about the lock.
    assert app.conf.result_serializer == "json"
    assert info.value.path == path(run, "t1", "a1") and info.value.mode == "write"
    assert info.value.blocker is not None
    assert info.value.blocker.startswith(f"read lock on '{path(run, 't1')}' held by")
    assert str(info.value).endswith(info.value.blocker)
    hl.release(outside)


def test_skip_policy_skips_the_body_logs_the_blocking_path_and_stores_a_result(
    run: str, lab: redis.Redis, hl: HiLok, caplog: pytest.LogCaptureFixture
) -> None:
    outside = hl.acquire(path(run, "t1"), "write")
    with caplog.at_level(logging.INFO, logger="celery_hilok.celery"):
        result = tasks.write_skip.delay(run, "t1", "a1")
        line = wait_for(
            lambda: [
                r
                for r in caplog.records
                if r.name == "celery_hilok.celery" and result.id in r.getMessage()
            ],
            what="the skip log line",
        )
    message = line[0].getMessage()
    assert "skipped" in message and f"write lock on '{path(run, 't1')}' held by" in message
    assert started(lab, run, "write a1") is None  # the body never ran
    # The caller's AsyncResult is ready (not PENDING forever), and says what blocked it.
    skipped = result.get(timeout=RESULT_TIMEOUT)
    assert result.state == "SUCCESS"
    assert skipped["hilok_skipped"] is True
    assert skipped["path"] == path(run, "t1", "a1") and skipped["mode"] == "write"
    assert skipped["blocker"].startswith(f"write lock on '{path(run, 't1')}' held by")
    assert skipped["reason"] == str(message.split("skipped: ", 1)[1])
    hl.release(outside)


def test_skip_policy_stores_nothing_when_the_call_ignores_its_result(run: str, hl: HiLok) -> None:
    outside = hl.acquire(path(run, "t1"), "write")
    ended: dict[str, str | None] = {}

    def on_postrun(task_id: str = "", state: str | None = None, **_: Any) -> None:
        ended[task_id] = state  # the in-process worker's task ended (in this process)

    task_postrun.connect(on_postrun, weak=False)
    try:
        result = tasks.write_skip.apply_async((run, "t1", "a1"), ignore_result=True)
        wait_for(lambda: result.id in ended, what="the task to end")
    finally:
        task_postrun.disconnect(on_postrun)
    assert ended[result.id] == "IGNORED"
    assert result.state == "PENDING"  # the call asked for no result: none was stored
    hl.release(outside)


def test_a_duplicate_delivery_never_frees_the_running_copys_lock(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # The same message delivered twice (as after a visibility timeout): same task id.
    task_id = str(uuid.uuid4())
    first = tasks.write_fail.apply_async((run, "t1", "a1", "copy", "g"), task_id=task_id)
    entry = wait_for(lambda: started(lab, run, "copy"), what="the first copy to start")
    duplicate = tasks.write_fail.apply_async((run, "t1", "a1", "copy", "g"), task_id=task_id)
    wait_for(lambda: duplicate.state == "FAILURE", what="the duplicate to be refused")
    # The refused copy had a handle of its own: the running copy still holds its lock.
    assert [h.handle for h in hl.status(path(run, "t1", "a1")).holders] == [entry["handle"]]
    open_gate(lab, run, "g")
    # (Not first.state: the backend caches the duplicate's FAILURE for the shared id.)
    wait_for(
        lambda: any(e["kind"] == "end" for e in events(lab, run)), what="the first copy to end"
    )
    wait_for(lambda: is_free(hl, path(run, "t1")), what="the lock to be released")
    assert first.id == task_id


# -- ways out -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["raise", "reject", "ignore"])
def test_locks_are_released_when_the_body_fails_rejects_or_ignores(
    how: str, run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = tasks.exit.delay(run, "t1", "a1", how)
    wait_for(lambda: started(lab, run, how), what="the task to start")
    wait_for(lambda: is_free(hl, path(run, "t1")), what="the lock to be released")
    if how == "raise":
        with pytest.raises(ValueError, match="the body failed"):
            result.get(timeout=RESULT_TIMEOUT)


def test_a_retried_task_gives_up_its_lock_and_takes_it_again(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = tasks.flaky.delay(run, "t1", "a1", fail_times=1)
    assert result.get(timeout=RESULT_TIMEOUT) == "done after 2 tries"
    runs = [e for e in events(lab, run) if e["kind"] == "start"]
    assert len(runs) == 2
    first, second = (r["tokens"][path(run, "t1", "a1")] for r in runs)
    assert second > first  # a new grant, so a new (larger) fencing token
    wait_for(lambda: is_free(hl, path(run, "t1")), what="the lock to be released")


def test_a_lost_lease_is_signalled_and_visible_to_the_task(
    run: str, lab: redis.Redis, hl: HiLok, app: Celery
) -> None:
    seen: list[Any] = []

    def on_lost(
        sender: Any = None, task_id: str = "", lease: Any = None, why: str = "", **_: Any
    ) -> None:
        seen.append((sender.name, task_id, lease.path, why))

    hilok_lease_lost.connect(on_lost)
    try:
        result = tasks.lose.delay(run, "t1", "a1")
        entry = wait_for(lambda: started(lab, run, "lose"), what="the task to start")
        # Someone with the handle releases the lock behind the task's back.
        from celery_hilok.inspect import leases_of, snapshot

        grants = [g for g in snapshot(hl, path(run, "t1")).grants]
        assert [g.handle for g in grants] == [entry["handle"]]
        for lease in leases_of(hl, grants):
            hl.release(lease)
        wait_for(lambda: seen, timeout=60, what="hilok_lease_lost")
        ran_out = "its lease ran out before it was refreshed"
        assert seen == [("hilok_tests.lose", result.id, path(run, "t1", "a1"), ran_out)]
        open_gate(lab, run, "lost")
        assert result.get(timeout=RESULT_TIMEOUT) == "lose"
        after = [e for e in events(lab, run) if e["kind"] == "lost?"]
        assert after[0]["lost"] is True
        assert after[0]["check"] == (
            f"lock lost while the task ran ({ran_out}): write '{path(run, 't1', 'a1')}'"
        )
    finally:
        hilok_lease_lost.disconnect(on_lost)


def test_a_force_release_from_the_command_line_is_reported_as_such(
    run: str,
    lab: redis.Redis,
    hl: HiLok,
    hilok_config: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    def on_lost(why: str = "", **_: Any) -> None:
        seen.append(why)

    hilok_lease_lost.connect(on_lost)
    try:
        with caplog.at_level(logging.WARNING, logger="celery_hilok.celery"):
            result = tasks.lose.delay(run, "t1", "a1")
            wait_for(lambda: started(lab, run, "lose"), what="the task to start")
            command = CliRunner().invoke(
                hilok_command,
                [
                    "--url",
                    hilok_config["hilok_redis_url"],
                    "--namespace",
                    hilok_config["hilok_namespace"],
                    "release",
                    path(run, "t1"),
                    "--force",
                    "--yes",
                ],
            )
            assert command.exit_code == 0, command.output
            assert "released 1 grant(s)" in command.output
            wait_for(lambda: seen, timeout=60, what="hilok_lease_lost")
        forced = "released by force from the command line (celery hilok release --force by "
        assert seen[0].startswith(forced)
        logged = [r.getMessage() for r in caplog.records if result.id in r.getMessage()]
        assert any(
            f"lost its write lock on '{path(run, 't1', 'a1')}' ({forced}" in m for m in logged
        )
        open_gate(lab, run, "lost")
        assert result.get(timeout=RESULT_TIMEOUT) == "lose"
        after = [e for e in events(lab, run) if e["kind"] == "lost?"]
        assert after[0]["check"].startswith(
            f"lock lost while the task ran: write '{path(run, 't1', 'a1')}' ({forced}"
        )
    finally:
        hilok_lease_lost.disconnect(on_lost)
