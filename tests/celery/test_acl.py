"""The Celery integration under the minimal Redis ACL (docs/operations.md): the engine's
commands plus ``del``, on the namespace's keys and channels, run a real worker's locked
tasks and chains; without ``del`` the end of a chain says what it could not do. Unique
tasks need ``pttl`` too."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_hilok import HiLokError
from tests._redis import RedisServer
from tests._wait import wait_for
from tests.celery.app import tasks
from tests.celery.conftest import WorkerProcess, run_keep_chain
from tests.test_acl import ENGINE_COMMANDS

pytestmark = pytest.mark.celery_worker

CELERY_COMMANDS = ("del", "get", "zrank")
"""What a Celery worker needs on top of the engine's commands: dropping a finished chain's
hand-over claims and its process's holder directory, reading the note a forced release
left when it finds a lease lost, and parking tasks (reading the parked records, a parked
task's place in the queue)."""

PASSWORD = "celery-acl-pw"
RESULT_TIMEOUT = 60.0
RELEASE_TIMEOUT = 15.0  # half the default 30 s lease


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


def acl_user(server: RedisServer, namespace: str, commands: tuple[str, ...]) -> str:
    """A new ACL user (password PASSWORD) allowed only ``commands``, on the namespace's keys
    and channels; its name."""
    admin = server.client()
    user = f"u{uuid.uuid4().hex[:8]}"
    rules = ["on", f">{PASSWORD}", "resetkeys", f"~{namespace}:*", "resetchannels"]
    rules += [f"&{namespace}:*", "-@all", *(f"+{c}" for c in commands)]
    admin.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    admin.close()
    return user


def worker_with(
    server: RedisServer, config: dict[str, Any], namespace: str, commands: tuple[str, ...]
) -> WorkerProcess:
    user = acl_user(server, namespace, commands)
    return WorkerProcess(
        {
            **config,
            "hilok_namespace": namespace,
            "hilok_redis_url": f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0",
            "lab_redis_url": config["hilok_redis_url"],
        },
        2,
        pool="threads",
    )


def run_chain(worker: WorkerProcess, lab: redis.Redis) -> None:
    run_keep_chain(worker.queue, lab, RESULT_TIMEOUT)
    plain = tasks.write_wait.apply_async(("r-plain", "t1", "a2"), queue=worker.queue)
    assert plain.get(timeout=RESULT_TIMEOUT) == "write a2"


def test_a_worker_runs_locked_tasks_and_chains_under_the_minimal_acl(
    server: RedisServer, hilok_config: dict[str, Any], lab: redis.Redis
) -> None:
    namespace = f"a{uuid.uuid4().hex[:8]}"
    worker = worker_with(server, hilok_config, namespace, ENGINE_COMMANDS + CELERY_COMMANDS)
    try:
        worker.start(lab)
        run_chain(worker, lab)
        admin = server.client()
        wait_for(
            lambda: not admin.keys(f"{namespace}:celery:*"),
            what="the claims and the holder directory to be dropped",
        )
        admin.close()
        log = worker.log()
        assert "NOPERM" not in log and "ACL does not allow" not in log, log
    finally:
        worker.stop()


def test_without_del_the_end_of_a_chain_warns_and_the_locks_still_go(
    server: RedisServer, hilok_config: dict[str, Any], lab: redis.Redis
) -> None:
    namespace = f"a{uuid.uuid4().hex[:8]}"
    worker = worker_with(server, hilok_config, namespace, ENGINE_COMMANDS)
    try:
        worker.start(lab)
        run_chain(worker, lab)
        wait_for(
            lambda: "could not drop the hand-over claims" in worker.log(),
            what="the warning about the claims",
        )
        admin = server.client()

        def lock_keys() -> list[bytes]:
            found: list[bytes] = admin.keys(f"{namespace}:{{*")  # type: ignore[assignment]
            return [k for k in found if not k.endswith(b"::n")]  # token counters stay

        # A result is visible before the task's way out releases its locks (docs/celery.md,
        # Caveats): wait for the release rather than assume it came first. Within half the
        # 30 s lease, so that locks found gone were released, not left to run out.
        wait_for(
            lambda: not lock_keys(),
            timeout=RELEASE_TIMEOUT,
            what="every lock (the chain's and r-plain's) to be released",
        )
        admin.close()
    finally:
        worker.stop()


UNIQUE_COMMANDS = ("pttl",)
"""What unique tasks (hilok_unique) need on top of a worker's: the claim script reads how
long a duplicate's claim has left."""


def eager_tasks_with(server: RedisServer, lab_url: str, commands: tuple[str, ...]) -> Any:
    """The test tasks on an eager app whose locks and claims live under an ACL user."""
    from celery import Celery

    from tests.celery import app as test_app

    namespace = f"a{uuid.uuid4().hex[:8]}"
    user = acl_user(server, namespace, commands)
    app = Celery(f"tests.celery.acl-{namespace}", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=False,
        hilok_redis_url=f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0",
        hilok_namespace=namespace,
        lab_redis_url=lab_url,  # the tasks' records
    )
    return test_app.register(app)


def test_unique_tasks_run_under_the_minimal_acl_with_pttl(
    server: RedisServer, hilok_config: dict[str, Any]
) -> None:
    t = eager_tasks_with(
        server, hilok_config["hilok_redis_url"], ENGINE_COMMANDS + CELERY_COMMANDS + UNIQUE_COMMANDS
    )
    result = t.unique_nested.delay("r-acl")  # claims, meets its own claim, gives it back
    assert result.get() == result.id
    assert t.unique_nested.hilok_unique_holder(("r-acl",)) is None


def test_without_pttl_a_duplicate_says_what_the_acl_refused(
    server: RedisServer, hilok_config: dict[str, Any]
) -> None:
    t = eager_tasks_with(server, hilok_config["hilok_redis_url"], ENGINE_COMMANDS + CELERY_COMMANDS)
    with pytest.raises(HiLokError, match="ACL does not allow"):
        t.unique_nested.delay("r-acl").get()
    assert t.unique_nested.hilok_unique_holder(("r-acl",)) is None  # given back all the same
