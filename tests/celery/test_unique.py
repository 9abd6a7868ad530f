"""Unique tasks (hilok_unique): one queued-or-running call per task and chosen arguments.

On real workers (the in-process threads worker; a prefork subprocess for the ways a pool
process dies), in eager mode, and with a broker that cannot be reached. A claim found gone
within a few seconds was given back by someone: its ttl is a day.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.result import AsyncResult
from celery.signals import task_retry
from click.testing import CliRunner
from kombu.exceptions import OperationalError

from celery_hilok import DuplicateTask, HiLok, HiLokConnectionError, HiLokTask, InvalidArgument
from celery_hilok.cli import hilok as hilok_command
from tests._wait import wait_for
from tests.celery import app as test_app
from tests.celery.app import events, open_gate, tasks
from tests.celery.conftest import WorkerProcess

RESULT_TIMEOUT = 30.0
RELEASE_TIMEOUT = 15.0


def started(lab: redis.Redis, run: str, how: str, retries: int = 0) -> Callable[[], Any]:
    def find() -> dict[str, Any] | None:
        for e in events(lab, run):
            if e["kind"] == "start" and e["name"] == how and e["retries"] == retries:
                return e
        return None

    return find


def holder(task: Any, run: str, account: str = "a1") -> str | None:
    result: str | None = task.hilok_unique_holder((run, "t1", account))
    return result


def released(task: Any, run: str, what: str, account: str = "a1") -> None:
    wait_for(lambda: holder(task, run, account) is None, timeout=RELEASE_TIMEOUT, what=what)


@pytest.fixture
def broker(hilok_config: dict[str, Any]) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(hilok_config["broker_url"])
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def side_queue(app: Celery, inproc_worker: Any, broker: redis.Redis) -> Iterator[Any]:
    """A queue nobody consumes yet, so its messages stay queued; ``consume()`` has the
    in-process worker start on it (``add_consumer``, a control command)."""
    name = f"side-{uuid.uuid4().hex[:8]}"
    consuming = False

    def consume() -> None:
        nonlocal consuming
        replies = app.control.add_consumer(
            name, destination=[inproc_worker.hostname], reply=True, timeout=10.0
        )
        assert replies, "the worker did not answer add_consumer"
        consuming = True

    try:
        yield name, consume
    finally:
        if consuming:
            app.control.cancel_consumer(
                name, destination=[inproc_worker.hostname], reply=True, timeout=10.0
            )
        broker.delete(name)


# -- the key ---------------------------------------------------------------------------------


def test_the_key_is_the_task_and_the_chosen_arguments(app: Celery) -> None:
    namespace = app.conf.hilok_namespace
    key = tasks.unique.hilok_unique_key(("r1", "t1", "a1"))
    assert re.fullmatch(rf"{namespace}:celery:unique:hilok_tests\.unique:[0-9a-f]{{64}}", key)
    # Arguments it does not choose, positions, keywords and defaults make no other call ...
    assert tasks.unique.hilok_unique_key(("r1", "t2", "a1", "raise", "g")) == key
    assert tasks.unique.hilok_unique_key((), {"account": "a1", "run": "r1", "tenant": "x"}) == key
    # ... the chosen ones and the task do.
    assert tasks.unique.hilok_unique_key(("r1", "t1", "a2")) != key
    assert tasks.unique_raise.hilok_unique_key(("r1", "t1", "a1")) != key
    # Values are hashed as JSON, never joined: no value reaches into another's place.
    everything = tasks.unique_raise.hilok_unique_key
    assert everything(("r1", "t:1", "a")) != everything(("r1", "t", "1:a"))
    assert everything(("r1", "t1", "a1", "done")) == everything(("r1", "t1", "a1"))
    assert everything(("r1", "t1", "a1", "raise")) != everything(("r1", "t1", "a1"))
    # A template over the arguments, as in lock specs.
    locked = tasks.unique_locked.hilok_unique_key
    assert locked(("r1", "t1", "a1")) == locked(("r1", "t2", "a1", "raise"))
    assert locked(("r1", "t1", "a1")) != locked(("r1/t1", "t1", "a1"))
    with pytest.raises(InvalidArgument, match="JSON can encode"):
        tasks.unique.hilok_unique_key(("r1", "t1", object()))


def test_bad_unique_specs_are_refused_when_the_task_is_defined() -> None:
    app = Celery("unique-definition", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.finalize()

    def define(**options: Any) -> None:
        def sync(tenant: str, account: str) -> None: ...

        app.task(shared=False, base=HiLokTask, name=f"sync-{uuid.uuid4().hex}", **options)(sync)

    with pytest.raises(InvalidArgument, match=r"names 'acount', which is not an argument"):
        define(hilok_unique=("tenant", "acount"))
    with pytest.raises(InvalidArgument, match=r"template '\{tenent\}' names 'tenent'"):
        define(hilok_unique="{tenent}")
    with pytest.raises(InvalidArgument, match=r"names no argument: .*\('tenant',\)"):
        define(hilok_unique="tenant")
    with pytest.raises(InvalidArgument, match="must be True, a list of argument names"):
        define(hilok_unique=42)
    with pytest.raises(InvalidArgument, match="hilok_unique_on_duplicate must be one of"):
        define(hilok_unique=True, hilok_unique_on_duplicate="skip")
    with pytest.raises(InvalidArgument, match="hilok_unique_ttl must be seconds > 0"):
        define(hilok_unique=True, hilok_unique_ttl=0)
    define(hilok_unique=())  # one call of the task at a time
    define(hilok_unique=lambda tenant, account: None)


# -- queued, running, done --------------------------------------------------------------------


def test_a_duplicate_of_a_queued_call_returns_it_and_sends_nothing(
    run: str, lab: redis.Redis, broker: redis.Redis, side_queue: Any
) -> None:
    queue, consume = side_queue
    first = tasks.unique.apply_async((run, "t1", "a1"), queue=queue)
    again = tasks.unique.apply_async((run, "t2", "a1", "done", ""), queue=queue)
    assert isinstance(again, AsyncResult) and again.id == first.id
    assert tasks.unique.delay(run, "t1", account="a1").id == first.id  # any queue, any form
    other = tasks.unique.apply_async((run, "t1", "a2"), queue=queue)  # another account
    assert other.id != first.id
    assert broker.llen(queue) == 2  # the duplicates sent nothing
    assert holder(tasks.unique, run) == first.id
    assert holder(tasks.unique, run, "a2") == other.id
    consume()
    assert first.get(timeout=RESULT_TIMEOUT) == "done"
    assert other.get(timeout=RESULT_TIMEOUT) == "done"
    released(tasks.unique, run, "the claim to be given back")
    released(tasks.unique, run, "the other claim to be given back", "a2")
    assert len([e for e in events(lab, run) if e["kind"] == "start"]) == 2


def test_a_duplicate_of_a_running_call_returns_it_and_a_new_call_runs_after(
    run: str, lab: redis.Redis, inproc_worker: Any
) -> None:
    first = tasks.unique.delay(run, "t1", "a1", "done", "g")
    wait_for(started(lab, run, "done"), what="the call to start")
    assert tasks.unique.delay(run, "t1", "a1").id == first.id
    open_gate(lab, run, "g")
    assert first.get(timeout=RESULT_TIMEOUT) == "done"
    released(tasks.unique, run, "the claim to be given back after SUCCESS")
    second = tasks.unique.delay(run, "t1", "a1")
    assert second.id != first.id
    assert second.get(timeout=RESULT_TIMEOUT) == "done"


def test_after_a_failure_a_new_call_runs(run: str, lab: redis.Redis, inproc_worker: Any) -> None:
    first = tasks.unique.delay(run, "t1", "a1", "raise")
    with pytest.raises(ValueError, match="the body failed"):
        first.get(timeout=RESULT_TIMEOUT)
    released(tasks.unique, run, "the claim to be given back after FAILURE")
    second = tasks.unique.delay(run, "t1", "a1", "done")
    assert second.id != first.id
    assert second.get(timeout=RESULT_TIMEOUT) == "done"


def test_the_raise_policy_raises_duplicate_task(
    run: str, lab: redis.Redis, inproc_worker: Any
) -> None:
    first = tasks.unique_raise.delay(run, "t1", "a1", "done", "g")
    wait_for(started(lab, run, "done"), what="the call to start")
    with pytest.raises(DuplicateTask) as info:
        tasks.unique_raise.delay(run, "t1", "a1", "done", "g")
    error = info.value
    assert (error.task, error.task_id) == ("hilok_tests.unique_raise", first.id)
    assert error.ttl is not None and 0 < error.ttl <= 86400
    assert f"already queued or running as {first.id}" in str(error)
    # Per call, either way.
    again = tasks.unique_raise.apply_async(
        (run, "t1", "a1", "done", "g"), hilok_unique_on_duplicate="return"
    )
    assert again.id == first.id
    second = tasks.unique.delay(run, "t1", "a1", "done", "g2")
    with pytest.raises(DuplicateTask):
        tasks.unique.apply_async((run, "t1", "a1"), hilok_unique_on_duplicate="raise")
    open_gate(lab, run, "g")
    open_gate(lab, run, "g2")
    assert first.get(timeout=RESULT_TIMEOUT) == second.get(timeout=RESULT_TIMEOUT) == "done"


def test_a_skipped_call_gives_its_claim_back(run: str, hl: HiLok, inproc_worker: Any) -> None:
    outside = hl.acquire(f"{run}/tenants/t1/accounts/a1", "write")
    try:
        skipped = tasks.unique_skip.delay(run, "t1", "a1")
        assert skipped.get(timeout=RESULT_TIMEOUT)["hilok_skipped"] is True
        released(tasks.unique_skip, run, "the skipped call's claim to be given back")
    finally:
        hl.release(outside)
    second = tasks.unique_skip.delay(run, "t1", "a1")
    assert second.id != skipped.id
    assert second.get(timeout=RESULT_TIMEOUT) == "done"


# -- retries keep the claim -----------------------------------------------------------------


def test_a_retry_is_the_same_call_and_keeps_the_claim(
    run: str, lab: redis.Redis, inproc_worker: Any
) -> None:
    first = tasks.unique.delay(run, "t1", "a1", "retry", "g")
    wait_for(started(lab, run, "retry", retries=1), what="the retried execution to start")
    assert holder(tasks.unique, run) == first.id
    assert tasks.unique.delay(run, "t1", "a1").id == first.id
    open_gate(lab, run, "g")
    assert first.get(timeout=RESULT_TIMEOUT) == "retry"
    released(tasks.unique, run, "the claim to be given back after the retried run")


def test_contention_retries_keep_the_claim(
    run: str, lab: redis.Redis, hl: HiLok, inproc_worker: Any
) -> None:
    retried = threading.Event()

    def on_retry(request: Any = None, **_: Any) -> None:
        if request is not None and list(request.args or ())[:1] == [run]:
            retried.set()

    outside = hl.acquire(f"{run}/tenants/t1/accounts/a1", "write")
    task_retry.connect(on_retry)
    try:
        result = tasks.unique_locked.delay(run, "t1", "a1")
        assert retried.wait(RESULT_TIMEOUT), "the task did not retry on contention"
        assert tasks.unique_locked.hilok_unique_holder((run, "t1", "a1")) == result.id
        assert tasks.unique_locked.delay(run, "t2", "a1").id == result.id
    finally:
        task_retry.disconnect(on_retry)
        hl.release(outside)
    assert result.get(timeout=RESULT_TIMEOUT) == "done"
    released(tasks.unique_locked, run, "the claim to be given back")


def test_a_parked_call_keeps_the_claim(
    run: str, lab: redis.Redis, hl: HiLok, inproc_worker: Any
) -> None:
    outside = hl.acquire(f"{run}/tenants/t1/accounts/a1", "write")
    try:
        result = tasks.unique_park.delay(run, "t1", "a1")
        wait_for(lambda: result.state == "PARKED", what="the call to park")
        assert tasks.unique_park.hilok_unique_holder((run, "t1", "a1")) == result.id
        assert tasks.unique_park.delay(run, "t2", "a1").id == result.id
    finally:
        hl.release(outside)
    assert result.get(timeout=RESULT_TIMEOUT) == "done"
    assert [e["kind"] for e in events(lab, run)] == ["start", "end"]  # ran once
    released(tasks.unique_park, run, "the claim to be given back")


# -- revoked, killed -----------------------------------------------------------------------


def test_revoking_a_queued_call_frees_its_claim(
    run: str, lab: redis.Redis, app: Celery, side_queue: Any
) -> None:
    queue, consume = side_queue
    first = tasks.unique.apply_async((run, "t1", "a1"), queue=queue)
    first.revoke()
    consume()  # the worker takes the message, finds it revoked and drops it
    released(tasks.unique, run, "the worker to give the revoked call's claim back")
    assert started(lab, run, "done")() is None
    second = tasks.unique.delay(run, "t1", "a1")
    assert second.id != first.id
    assert second.get(timeout=RESULT_TIMEOUT) == "done"


@pytest.mark.celery_worker
@pytest.mark.parametrize("how", ["SIGKILL", "revoke-terminate", "hard-time-limit"])
def test_a_dead_pool_process_frees_its_claim(
    prefork_worker: WorkerProcess, run: str, lab: redis.Redis, how: str
) -> None:
    q = prefork_worker.queue
    limit = 1 if how == "hard-time-limit" else None
    first = tasks.unique.apply_async((run, "t1", "a1", "block"), queue=q, time_limit=limit)
    entry = wait_for(started(lab, run, "block"), what="the call to start")
    assert entry["pid"] != prefork_worker.pid
    if how == "SIGKILL":
        os.kill(entry["pid"], signal.SIGKILL)  # what the OOM killer does
        with pytest.raises(WorkerLostError):
            first.get(timeout=RESULT_TIMEOUT)
    elif how == "hard-time-limit":
        with pytest.raises(TimeLimitExceeded):
            first.get(timeout=RESULT_TIMEOUT)
    else:
        first.revoke(terminate=True)
        wait_for(lambda: first.state == "REVOKED", what="the REVOKED state")
    released(tasks.unique, run, "the main process to give the dead call's claim back")
    second = tasks.unique.apply_async((run, "t1", "a1"), queue=q)
    assert second.id != first.id
    assert second.get(timeout=RESULT_TIMEOUT) == "done"


# -- eager mode, publish failures ----------------------------------------------------------


@pytest.fixture(scope="module")
def eager_tasks(hilok_config: dict[str, Any]) -> Any:
    app = Celery("tests.celery.unique-eager", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=False,
        hilok_redis_url=hilok_config["hilok_redis_url"],
        hilok_namespace=hilok_config["hilok_namespace"],
    )
    return test_app.register(app)


def test_eager_calls_are_unique_while_they_run(
    run: str, lab: redis.Redis, eager_tasks: Any
) -> None:
    result = eager_tasks.unique_nested.delay(run)
    assert result.get() == result.id  # sent again while it ran: the same call
    assert [e["name"] for e in events(lab, run)] == ["nested"]  # and it did not run twice
    assert eager_tasks.unique_nested.hilok_unique_holder((run,)) is None
    assert eager_tasks.unique_nested.delay(run).id != result.id
    with pytest.raises(ValueError, match="the body failed"):
        eager_tasks.unique.delay(run, "t1", "a1", "raise").get()
    assert eager_tasks.unique.delay(run, "t1", "a1", "retry").get() == "retry"
    assert holder(eager_tasks.unique, run) is None


def test_a_call_that_cannot_be_published_gives_its_claim_back(
    run: str, hilok_config: dict[str, Any]
) -> None:
    def tasks_on(hilok_redis_url: str) -> Any:
        app = Celery(f"tests.celery.unique-{uuid.uuid4().hex[:6]}", set_as_current=False)
        app.conf.update(
            broker_url="redis://127.0.0.1:1/0",  # nothing listens there
            broker_connection_retry=False,
            broker_transport_options={"max_retries": 0},
            hilok_redis_url=hilok_redis_url,
            hilok_namespace=hilok_config["hilok_namespace"],
        )
        return test_app.register(app)

    t = tasks_on(hilok_config["hilok_redis_url"])
    with pytest.raises(OperationalError):
        t.unique.apply_async((run, "t1", "a1"), retry=False)
    assert holder(t.unique, run) is None
    # With the claims' Redis unreachable, nothing is sent: a clear error instead.
    t = tasks_on("redis://127.0.0.1:1/0")
    with pytest.raises(HiLokConnectionError, match=r"the unique claim of hilok_tests\.unique"):
        t.unique.apply_async((run, "t1", "a1"), retry=False)


# -- celery hilok unique -----------------------------------------------------------------------


def test_the_command_lists_and_releases_claims(
    run: str, hilok_config: dict[str, Any], side_queue: Any
) -> None:
    queue, _ = side_queue
    first = tasks.unique.apply_async((run, "t1", "a1"), queue=queue)
    base = [
        "--url",
        hilok_config["hilok_redis_url"],
        "--namespace",
        hilok_config["hilok_namespace"],
    ]
    runner = CliRunner()
    listed = runner.invoke(hilok_command, [*base, "unique", "--task", "hilok_tests.unique"])
    assert listed.exit_code == 0, listed.output
    assert f"hilok_tests.unique[{first.id}]  ttl " in listed.output
    released_ = runner.invoke(hilok_command, [*base, "unique", "--release", first.id])
    assert released_.exit_code == 0 and "released 1 claim(s)" in released_.output
    assert holder(tasks.unique, run) is None
    again = runner.invoke(hilok_command, [*base, "unique", "--release", first.id])
    assert again.exit_code == 1 and "holds no claim" in again.output
