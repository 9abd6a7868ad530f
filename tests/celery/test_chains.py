"""hilok_keep chains and explicit handles, on a real worker and in eager mode."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery, chain, group

from celery_hilok import HiLok, LockNotAcquired
from celery_hilok.celery.signals import hilok_lock_refused
from tests._wait import wait_for
from tests.celery import app as test_app
from tests.celery.app import events, open_gate, tasks

RESULT_TIMEOUT = 30.0


def account(run: str) -> str:
    return f"{run}/tenants/t1/accounts/a1"


def order(lab: redis.Redis, run: str) -> list[str]:
    return [f"{e['kind']} {e['name']}" for e in events(lab, run)]


def handles(lab: redis.Redis, run: str) -> dict[str, str | None]:
    return {e["name"]: e["handle"] for e in events(lab, run) if e["kind"] == "start"}


class Outsider:
    """Another client that wants the account's write lock and notes when it gets it."""

    def __init__(self, hl: HiLok, lab: redis.Redis, run: str) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(hl, lab, run), daemon=True)

    def start(self) -> Outsider:
        self._thread.start()
        return self

    def _run(self, hl: HiLok, lab: redis.Redis, run: str) -> None:
        try:
            with hl.write(account(run), timeout=RESULT_TIMEOUT):
                lab.rpush(f"lab:{run}:events", json.dumps({"kind": "got", "name": "outsider"}))
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self) -> None:
        self._thread.join(RESULT_TIMEOUT)
        assert not self._thread.is_alive() and self.error is None, self.error


def three_steps(t: SimpleNamespace, run: str, gate: str = "") -> Any:
    return chain(
        t.keep_step.s(None, run, "t1", "a1", "step 1", gate),
        t.keep_step.s(run, "t1", "a1", "step 2"),
        t.last_step.s(run, "t1", "a1", "step 3"),
    )


@pytest.mark.usefixtures("inproc_worker")
def test_chain_holds_its_lock_across_steps_with_no_gap(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    result = three_steps(tasks, run, gate="s1").delay()
    wait_for(lambda: "start step 1" in order(lab, run), what="step 1 to start")
    outsider = Outsider(hl, lab, run).start()
    wait_for(lambda: hl.status(account(run)).waiters, what="the outsider to queue")
    open_gate(lab, run, "s1")
    assert result.get(timeout=RESULT_TIMEOUT) == "step 3"
    outsider.join()
    assert order(lab, run) == [
        "start step 1",
        "end step 1",
        "start step 2",
        "end step 2",
        "start step 3",
        "end step 3",
        "got outsider",
    ]
    held = handles(lab, run)
    assert held["step 1"] is not None
    assert held["step 1"] == held["step 2"] == held["step 3"]  # one holder throughout
    tokens = [e["tokens"][account(run)] for e in events(lab, run) if e["kind"] == "start"]
    assert tokens[0] == tokens[1] == tokens[2]  # one grant, never given up in between
    wait_for(lambda: not hl.status(account(run)).holders, what="the release")


@pytest.mark.usefixtures("inproc_worker")
def test_a_second_delivery_of_a_chain_step_never_runs_as_the_chains_holder(
    run: str, lab: redis.Redis, hl: HiLok, hilok_config: dict[str, Any]
) -> None:
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "step 1"),
        tasks.keep_step.s(run, "t1", "a1", "step 2", "g2"),
        tasks.last_step.s(run, "t1", "a1", "step 3"),
    ).delay()
    step2 = wait_for(lambda: started(lab, run, "step 2"), what="step 2 to start")
    handle = step2["handle"]
    # The broker delivers step 2's message again (same id, same headers) while it runs.
    token = step2["tokens"][account(run)]
    header = {"handle": handle, "locks": [[account(run), "write", token]], "claim": True}
    parked: list[str] = []

    def on_refused(task_id: str = "", action: str = "", **_: Any) -> None:
        if action == "park":
            parked.append(task_id)

    hilok_lock_refused.connect(on_refused)
    try:
        tasks.keep_step.apply_async(
            ("step 1", run, "t1", "a1", "step 2", "g2"),
            task_id=step2["id"],
            headers={"hilok": header},
        )
        wait_for(lambda: step2["id"] in parked, what="the second delivery to wait its turn")
    finally:
        hilok_lock_refused.disconnect(on_refused)
    assert [h.handle for h in hl.status(account(run)).holders] == [handle]
    open_gate(lab, run, "g2", times=2)
    assert result.get(timeout=RESULT_TIMEOUT) == "step 3"
    wait_for(lambda: order(lab, run).count("end step 2") == 2, what="the second delivery")
    assert order(lab, run) == [
        "start step 1",
        "end step 1",
        "start step 2",
        "end step 2",
        "start step 3",
        "end step 3",
        "start step 2",
        "end step 2",
    ]
    second = [e for e in events(lab, run) if e["kind"] == "start"][-1]
    assert second["handle"] != handle  # a holder of its own, after the chain was done
    wait_for(lambda: not hl.status(account(run)).holders, what="the release")
    claims = f"{hilok_config['hilok_namespace']}:celery:claims:{handle}"
    # Forgotten at the end of the chain, by the last step's way out, just after its release
    # (which may come after the result, and after the second delivery ran).
    wait_for(lambda: not lab.exists(claims), what="the chain's claims to be forgotten")


@pytest.mark.usefixtures("inproc_worker")
def test_a_chain_step_that_retries_keeps_the_chains_lock(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # flaky retries itself once (self.retry); what was handed to it goes with the retry.
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "locker"),
        tasks.flaky.si(run, "t1", "a1", fail_times=1),
    ).delay()
    assert result.get(timeout=RESULT_TIMEOUT) == "done after 2 tries"
    starts = [e for e in events(lab, run) if e["kind"] == "start"]
    assert [e["name"] for e in starts] == ["locker", "try 1", "try 2"]
    assert len({e["handle"] for e in starts}) == 1
    assert len({e["tokens"][account(run)] for e in starts}) == 1  # one grant throughout
    wait_for(lambda: not hl.status(account(run)).holders, what="the release")


def started(lab: redis.Redis, run: str, name: str) -> dict[str, Any] | None:
    for e in events(lab, run):
        if e["kind"] == "start" and e["name"] == name:
            return e
    return None


@pytest.mark.usefixtures("inproc_worker")
def test_steps_without_a_spec_run_under_the_handed_handle(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    # keep_step -> pass_step (HiLokTask, no spec, keeps) -> plain_step (not a HiLokTask)
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "locker"),
        tasks.pass_step.s(run, "passer"),
        tasks.plain_step.s(run, "plain"),
    ).delay()
    assert result.get(timeout=RESULT_TIMEOUT) == "plain"
    held = handles(lab, run)
    assert held["locker"] == held["passer"] == held["plain"]
    tokens = {e["name"]: e["tokens"] for e in events(lab, run) if e["kind"] == "start"}
    assert list(tokens["passer"]) == [account(run)]  # it holds what it was handed
    wait_for(lambda: not hl.status(account(run)).holders, what="the last step's release")


@pytest.mark.usefixtures("inproc_worker")
def test_the_first_failure_releases_the_chain_lock(run: str, lab: redis.Redis, hl: HiLok) -> None:
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "locker"),
        tasks.exit.si(run, "t1", "a1", "raise"),
        tasks.last_step.s(run, "t1", "a1", "never"),
    ).delay()
    with pytest.raises(ValueError, match="the body failed"):
        result.get(timeout=RESULT_TIMEOUT)
    wait_for(lambda: not hl.status(account(run)).holders, what="the release")
    assert "start never" not in order(lab, run)


@pytest.mark.usefixtures("inproc_worker")
def test_a_group_as_next_step_gets_no_hand_over(run: str, lab: redis.Redis, hl: HiLok) -> None:
    # One exclusive holder cannot become several parallel tasks: the keeper releases, and
    # each task of the group takes its own locks.
    result = chain(
        tasks.keep_step.s(None, run, "t1", "a1", "locker"),
        group(tasks.last_step.s(run, "t1", "a1", f"member {i}") for i in range(2)),
    ).delay()
    assert sorted(result.get(timeout=RESULT_TIMEOUT)) == ["member 0", "member 1"]
    held = handles(lab, run)
    assert held["member 0"] != held["locker"] != held["member 1"]
    wait_for(lambda: not hl.status(account(run)).holders, what="the release")


@pytest.mark.usefixtures("inproc_worker")
def test_a_task_runs_under_a_handle_given_by_the_caller(
    run: str, lab: redis.Redis, hl: HiLok
) -> None:
    mine = hl.acquire(account(run), "write")
    # Anyone else is kept out ...
    with pytest.raises(LockNotAcquired):
        tasks.write_fail.delay(run, "t1", "a1").get(timeout=RESULT_TIMEOUT)
    # ... but a task given the handle runs under the caller's lock, and (its spec naming
    # that very lock) releases it when it ends.
    sig = tasks.write_fail.s(run, "t1", "a1", name="given").set(hilok_handle=mine.handle)
    assert sig.delay().get(timeout=RESULT_TIMEOUT) == "given"
    assert handles(lab, run)["given"] == mine.handle
    wait_for(lambda: not hl.status(account(run)).holders, what="the release")

    # A task without a spec reports the handle it was given and leaves the caller's locks.
    other = hl.acquire(f"{run}/tenants/t2", "read")
    tasks.pass_step.apply_async((None, run, "bare"), hilok_handle=other.handle).get(
        timeout=RESULT_TIMEOUT
    )
    assert handles(lab, run)["bare"] == other.handle
    assert [h.handle for h in hl.status(f"{run}/tenants/t2").holders] == [other.handle]
    hl.release(other)


# -- eager mode ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager(hilok_config: dict[str, Any]) -> Iterator[SimpleNamespace]:
    """The same tasks on an app with task_always_eager (no worker, no messages)."""
    app = Celery("tests.celery.eager", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=False,  # errors show on .get(), retries run
        hilok_redis_url=hilok_config["hilok_redis_url"],
        hilok_namespace=hilok_config["hilok_namespace"],
    )
    yield test_app.register(app)


def test_eager_chain_hands_over_like_a_worker(
    run: str, lab: redis.Redis, hl: HiLok, eager: SimpleNamespace
) -> None:
    seen: list[list[Any]] = []
    lease_left: list[float] = []

    # In eager mode the steps run in this thread: look at the lock between steps from a
    # task_postrun receiver (after a step's way out, before the next starts).
    from celery.signals import task_postrun

    def between(task: Any = None, **_: Any) -> None:
        if task.name in ("hilok_tests.keep_step", "hilok_tests.last_step"):
            holders = hl.status(account(run)).holders
            seen.append([h.handle for h in holders])
            lease_left.extend(h.ttl for h in holders)

    task_postrun.connect(between)
    try:
        result = three_steps(eager, run).apply_async()
    finally:
        task_postrun.disconnect(between)
    assert result.get() == "step 3"
    held = handles(lab, run)
    assert held["step 1"] == held["step 2"] == held["step 3"] is not None
    assert seen == [[held["step 1"]], [held["step 1"]], []]  # kept, kept, released
    # Between steps the lease is hilok_keep_ttl (300 s), not the running ttl (30 s).
    assert len(lease_left) == 2 and all(left > 30 for left in lease_left)


def test_eager_keep_without_a_next_step_releases(
    run: str, lab: redis.Redis, hl: HiLok, eager: SimpleNamespace
) -> None:
    assert eager.keep_step.delay(None, run, "t1", "a1", "alone").get() == "alone"
    assert not hl.status(account(run)).holders


def test_eager_policies_and_ways_out(
    run: str, lab: redis.Redis, hl: HiLok, eager: SimpleNamespace
) -> None:
    outside = hl.acquire(account(run), "write")
    with pytest.raises(LockNotAcquired, match="at once"):
        eager.write_fail.delay(run, "t1", "a1").get()
    assert eager.write_skip.delay(run, "t1", "a1").state == "IGNORED"
    with pytest.raises(LockNotAcquired, match="gave up after 2 contention retries"):
        eager.write_budget.delay(run, "t1", "a1").get()
    # retry waits in place (Celery runs an eager retry at once, ignoring its countdown)
    releaser = threading.Timer(0.3, hl.release, (outside,))
    releaser.start()
    assert eager.write_retry.delay(run, "t1", "a1", name="late").get() == "late"
    releaser.join()
    # park waits in place too (no pool slot to give back in the caller's thread)
    outside = hl.acquire(account(run), "write")
    releaser = threading.Timer(0.3, hl.release, (outside,))
    releaser.start()
    assert eager.write_park.delay(run, "t1", "a1", name="parked").get() == "parked"
    releaser.join()
    with pytest.raises(ValueError, match="the body failed"):
        eager.exit.delay(run, "t1", "a1", "raise").get()
    assert eager.exit.delay(run, "t1", "a1", "reject").state == "REJECTED"
    assert eager.flaky.delay(run, "t1", "a1", fail_times=1).get() == "done after 2 tries"
    assert not hl.status(account(run)).holders
    given = hl.acquire(account(run), "write")
    assert eager.write_fail.apply_async((run, "t1", "a1"), hilok_handle=given.handle).get()
    assert not hl.status(account(run)).holders
