"""The Celery app of the Celery tests: tasks that record what they did in Redis.

Used three ways: by an in-process worker (``start_worker``, threads pool), by a real worker
subprocess (``celery -A tests.celery.app worker -P prefork``, configured through the
``HILOK_TEST_CELERY_CONFIG`` environment variable), and in eager mode (``register`` on an
app with ``task_always_eager``).

Every task takes a ``run`` argument, unique per test, that prefixes its lock paths (so each
test has its own lock tree) and its records. Records are JSON lines pushed to the Redis
list ``lab:<run>:events`` of the hilok database: ``{"kind": "start"|"end"|..., "name",
"handle", "tokens", "pid", "retries", "t"}``; tests read them back with :func:`events`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.signals import worker_ready

from celery_hilok import HiLokTask, LockLost

CONFIG_ENV = "HILOK_TEST_CELERY_CONFIG"
READY_ENV = "HILOK_TEST_READY_KEY"
GATE_TIMEOUT = 60  # seconds a gated task waits for its gate before failing

ACCOUNT = "{run}/tenants/{tenant}/accounts/{account}"
TENANT = "{run}/tenants/{tenant}"
FAST_RETRY = {"hilok_retry_backoff": 0.05, "hilok_retry_backoff_max": 0.2}

_clients: dict[tuple[int, str], redis.Redis] = {}


def lab(app: Celery) -> redis.Redis:
    """A client on the records' database (one per process): ``lab_redis_url``, by default
    the hilok database of ``app``."""
    url = app.conf.get("lab_redis_url") or app.conf.hilok_redis_url
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        # no socket timeout shorter than a gate (redis-py 8 defaults to 5 s)
        client = _clients[key] = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=GATE_TIMEOUT + 10
        )
    return client


def record(task: Task, run: str, kind: str, name: str, **extra: Any) -> None:
    locks = getattr(task, "hilok", None)
    handle = locks.handle if locks is not None else _header_handle(task)
    entry = {
        "kind": kind,
        "name": name,
        "task": task.name,
        "id": task.request.id,
        "handle": handle,
        "tokens": locks.tokens if locks is not None else {},
        "lost": bool(locks is not None and locks.lost),
        "pid": os.getpid(),
        "retries": task.request.retries,
        "t": time.time(),
        **extra,
    }
    lab(task.app).rpush(f"lab:{run}:events", json.dumps(entry))


def _header_handle(task: Task) -> str | None:
    header = (task.request.headers or {}).get("hilok")
    return header.get("handle") if isinstance(header, dict) else None


def events(client: redis.Redis, run: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.lrange(f"lab:{run}:events", 0, -1)]


def open_gate(client: redis.Redis, run: str, gate: str, times: int = 1) -> None:
    client.rpush(f"lab:{run}:gate:{gate}", *(["go"] * times))


def wait_gate(task: Task, run: str, gate: str) -> None:
    if lab(task.app).blpop([f"lab:{run}:gate:{gate}"], timeout=GATE_TIMEOUT) is None:
        raise TimeoutError(f"gate {gate!r} of run {run} was not opened")


def body(task: Task, run: str, name: str, gate: str | None, work: float) -> str:
    """What every locking task does: record start, work or wait for a gate, record end."""
    record(task, run, "start", name)
    if work:
        time.sleep(work)  # the task's work, not synchronisation
    if gate:
        wait_gate(task, run, gate)
    record(task, run, "end", name)
    return name


def register(app: Celery) -> SimpleNamespace:
    """Define the test tasks on ``app``; returns them by short name."""

    def task(name: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        decorator: Callable[[Callable[..., Any]], Any] = app.task(
            name=f"hilok_tests.{name}", bind=True, shared=False, **options
        )
        return decorator

    def write(
        self: Task,
        run: str,
        tenant: str,
        account: str,
        name: str = "",
        gate: str | None = None,
        work: float = 0.0,
    ) -> str:
        return body(self, run, name or f"write {account}", gate, work)

    def read(
        self: Task,
        run: str,
        tenant: str,
        name: str = "",
        gate: str | None = None,
        work: float = 0.0,
    ) -> str:
        return body(self, run, name or f"read {tenant}", gate, work)

    t = SimpleNamespace()
    for policy in ("park", "retry", "wait", "fail", "skip"):
        setattr(
            t,
            f"write_{policy}",
            task(
                f"write_{policy}",
                base=HiLokTask,
                hilok_write=ACCOUNT,
                hilok_on_contention=policy,
                **FAST_RETRY,
            )(write),
        )
    t.read = task("read", base=HiLokTask, hilok_read=TENANT, hilok_on_contention="wait")(read)
    t.write_budget = task(
        "write_budget",
        base=HiLokTask,
        hilok_write=ACCOUNT,
        hilok_on_contention="retry",
        hilok_max_retries=2,
        **FAST_RETRY,
    )(write)
    t.write_park_timeout = task(
        "write_park_timeout",
        base=HiLokTask,
        hilok_write=ACCOUNT,
        hilok_on_contention="park",
        hilok_timeout=1.0,
    )(write)
    t.write_short_wait = task(
        "write_short_wait",
        base=HiLokTask,
        hilok_write=ACCOUNT,
        hilok_on_contention="wait",
        hilok_timeout=0.2,
    )(write)

    t.write_bounded_wait = task(
        "write_bounded_wait",
        base=HiLokTask,
        hilok_write=ACCOUNT,
        hilok_on_contention="wait",
        hilok_timeout=10.0,
        **FAST_RETRY,
    )(write)

    @task("keep_step", base=HiLokTask, hilok_write=ACCOUNT, hilok_keep=True, **FAST_RETRY)
    def keep_step(
        self: Task, previous: Any, run: str, tenant: str, account: str, step: str, gate: str = ""
    ) -> str:
        return body(self, run, step, gate or None, 0.0)

    @task("last_step", base=HiLokTask, hilok_write=ACCOUNT, **FAST_RETRY)
    def last_step(self: Task, previous: Any, run: str, tenant: str, account: str, step: str) -> str:
        return body(self, run, step, None, 0.0)

    @task("pass_step", base=HiLokTask, hilok_keep=True)
    def pass_step(self: Task, previous: Any, run: str, step: str) -> str:
        """No lock spec of its own: runs under (and passes on) what it was handed."""
        return body(self, run, step, None, 0.0)

    @task("plain_step")
    def plain_step(self: Task, previous: Any, run: str, step: str) -> str:
        """Not a HiLokTask at all."""
        return body(self, run, step, None, 0.0)

    @task(
        "flaky",
        base=HiLokTask,
        hilok_write=ACCOUNT,
        hilok_on_contention="retry",
        max_retries=1,
        **FAST_RETRY,
    )
    def flaky(self: Task, run: str, tenant: str, account: str, fail_times: int) -> str:
        """Retries itself (self.retry) ``fail_times`` times, then succeeds."""
        tries = lab(self.app).incr(f"lab:{run}:tries")
        record(self, run, "start", f"try {tries}")
        if tries <= fail_times:
            record(self, run, "retrying", f"try {tries}")
            raise self.retry(countdown=0)
        record(self, run, "end", f"try {tries}")
        return f"done after {tries} tries"

    @task("exit", base=HiLokTask, hilok_write=ACCOUNT, **FAST_RETRY)
    def exit_task(self: Task, run: str, tenant: str, account: str, how: str) -> str:
        """Leaves by ``how``: raise, reject, ignore, or block on a gate (to be killed)."""
        record(self, run, "start", how)
        if how == "raise":
            raise ValueError("the body failed")
        if how == "reject":
            raise Reject("rejected by the body", requeue=False)
        if how == "ignore":
            raise Ignore()
        if how == "block":
            wait_gate(self, run, "never")
        return how

    @task("lose", base=HiLokTask, hilok_write=ACCOUNT, hilok_ttl=0.6)
    def lose(self: Task, run: str, tenant: str, account: str) -> str:
        """Holds its lock (renewed every 0.2 s) until the gate opens; reports if it was lost."""
        record(self, run, "start", "lose")
        wait_gate(self, run, "lost")
        try:
            self.hilok.check()
            checked = "ok"
        except LockLost as exc:
            checked = str(exc)
        record(self, run, "lost?", "lose", check=checked)
        return "lose"

    @task("graceful", base=HiLokTask, hilok_write=ACCOUNT)
    def graceful(self: Task, run: str, tenant: str, account: str, cleanup: float) -> str:
        """Blocks on a gate until cancelled gracefully (SIGUSR1: SoftTimeLimitExceeded), then
        runs a cleanup of ``cleanup`` seconds, still under its lock."""
        record(self, run, "start", "graceful")
        try:
            wait_gate(self, run, "never")
        except SoftTimeLimitExceeded:
            record(self, run, "cleanup", "graceful")
            time.sleep(cleanup)  # the cleanup's work, not synchronisation
        record(self, run, "end", "graceful")
        return "cleaned up"

    @task("stubborn", base=HiLokTask, hilok_write=ACCOUNT)
    def stubborn(self: Task, run: str, tenant: str, account: str) -> str:
        """Ignores SIGTERM and keeps working (a record every 2 ms) until it is killed."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record(self, run, "start", "stubborn")
        for _ in range(GATE_TIMEOUT * 500):
            time.sleep(0.002)  # the task's work, not synchronisation
            record(self, run, "tick", "stubborn")
        return "not killed"

    @task(
        "multi",
        base=HiLokTask,
        hilok_write=[ACCOUNT, "{run}/audit/{account}"],
        hilok_read=lambda run, tenant, account: f"{run}/config",
    )
    def multi(self: Task, run: str, tenant: str, account: str) -> str:
        return body(self, run, "multi", None, 0.0)

    # -- unique tasks (hilok_unique) ------------------------------------------------------

    def unique_body(
        self: Task, run: str, tenant: str, account: str, how: str = "done", gate: str = ""
    ) -> str:
        """Leaves by ``how`` ("done", "raise", "block" on a gate to be killed, "retry" once
        then go on), after waiting for ``gate`` if one is given."""
        record(self, run, "start", how)
        if how == "retry" and not self.request.retries:
            raise self.retry(countdown=0)
        if gate:
            wait_gate(self, run, gate)
        if how == "raise":
            raise ValueError("the body failed")
        if how == "block":
            wait_gate(self, run, "never")
        record(self, run, "end", how)
        return how

    # Unique per run and account: the tenant, how and gate do not make another call.
    t.unique = task("unique", base=HiLokTask, hilok_unique=("run", "account"), max_retries=1)(
        unique_body
    )
    t.unique_raise = task(
        "unique_raise", base=HiLokTask, hilok_unique=True, hilok_unique_on_duplicate="raise"
    )(unique_body)
    t.unique_locked = task(
        "unique_locked",
        base=HiLokTask,
        hilok_unique="{run}/{account}",
        hilok_write=ACCOUNT,
        hilok_on_contention="retry",
        **FAST_RETRY,
    )(unique_body)

    t.unique_park = task(
        "unique_park",
        base=HiLokTask,
        hilok_unique="{run}/{account}",
        hilok_write=ACCOUNT,
    )(unique_body)

    t.unique_skip = task(
        "unique_skip",
        base=HiLokTask,
        hilok_unique=("run", "account"),
        hilok_write=ACCOUNT,
        hilok_on_contention="skip",
    )(unique_body)

    @task("unique_nested", base=HiLokTask, hilok_unique=("run",))
    def unique_nested(self: Task, run: str) -> str:
        """Sends itself again while it runs: returns the id that call got."""
        record(self, run, "start", "nested")
        again: str = self.apply_async((run,)).id
        return again

    t.unique_nested = unique_nested

    t.keep_step, t.last_step, t.pass_step, t.plain_step = (
        keep_step,
        last_step,
        pass_step,
        plain_step,
    )
    t.flaky, t.exit, t.multi, t.lose = flaky, exit_task, multi, lose
    t.graceful, t.stubborn = graceful, stubborn
    return t


def make_app(name: str = "tests.celery.app") -> Celery:
    celery_app = Celery(name, set_as_current=False)
    celery_app.conf.update(
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        task_send_sent_event=False,
    )
    raw = os.environ.get(CONFIG_ENV)
    if raw:
        celery_app.conf.update(json.loads(raw))
    return celery_app


app = make_app()
tasks = register(app)


def _announce_ready(sender: Any = None, **_: Any) -> None:
    key = os.environ.get(READY_ENV)
    if key:
        lab(app).set(key, os.getpid(), ex=600)


worker_ready.connect(_announce_ready, weak=False)
