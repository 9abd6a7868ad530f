"""Lock state in Celery task events (``task-hilok``), the lock signals, and ``hilok_metrics``.

Task events are read back the way a monitor (Flower) reads them: a real event receiver on
the broker, listening while a real worker started with ``-E`` runs the tasks. The signals
are caught in this process, where the in-process worker runs its tasks.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import WorkerLostError

from celery_hilok import HiLok, HiLokTask, LockNotAcquired, metrics
from celery_hilok.celery import hilok_lock_acquired, hilok_lock_refused, hilok_lock_released
from celery_hilok.celery._runtime import runtime
from celery_hilok.inspect import leases_of, snapshot
from tests._wait import wait_for
from tests.celery.app import events, open_gate, tasks
from tests.celery.conftest import WorkerProcess

RESULT_TIMEOUT = 30.0
EVENT_TIMEOUT = 30.0


def account(run: str, name: str = "a1") -> str:
    return f"{run}/tenants/t1/accounts/{name}"


class EventCapture:
    """A real event receiver (as Flower runs one) in a thread, recording every event."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._connection = app.connection_for_read()
        self._receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._run, name="event-capture", daemon=True)
        self.error: BaseException | None = None

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # reported by the test that waits
            self.error = exc

    def start(self) -> EventCapture:
        """Start listening; returns once an event sent from here was received."""
        self._thread.start()
        probe = uuid.uuid4().hex
        deadline = time.monotonic() + EVENT_TIMEOUT
        while not self.matching(type="hilok-probe", uuid=probe):
            assert self.error is None, f"the event receiver failed: {self.error!r}"
            assert time.monotonic() < deadline, "the event receiver never got its probe"
            with self.app.events.default_dispatcher() as dispatcher:
                dispatcher.send("hilok-probe", uuid=probe)
            with self._cond:
                self._cond.wait(0.2)
        return self

    def stop(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.release()

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]

    def wait(self, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        """The events with ``fields`` once there are ``count`` of them (bounded wait)."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        with self._cond:
            while True:
                found = [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]
                if len(found) >= count:
                    return found
                assert self.error is None, f"the event receiver failed: {self.error!r}"
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} event(s) with {fields} in {EVENT_TIMEOUT}s")
                self._cond.wait(left)


@pytest.fixture
def capture(app: Celery) -> Iterator[EventCapture]:
    receiver = EventCapture(app).start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def events_worker(hilok_config: dict[str, Any]) -> Iterator[WorkerProcess]:
    """A prefork worker (2 pool processes) that sends task events (``-E``)."""
    client = redis.Redis.from_url(hilok_config["hilok_redis_url"], decode_responses=True)
    worker = WorkerProcess(hilok_config, 2, "-E")
    try:
        yield worker.start(client)
    finally:
        worker.stop()
        client.close()


def hilok_events(capture: EventCapture, task_id: str, state: str, count: int = 1) -> Any:
    return capture.wait(count, type="task-hilok", uuid=task_id, hilok=state)


def started_entry(lab: redis.Redis, run: str) -> dict[str, Any] | None:
    return next((e for e in events(lab, run) if e["kind"] == "start"), None)


# -- task-hilok events ----------------------------------------------------------------------


@pytest.mark.celery_worker
def test_events_of_a_task_that_acquires_and_releases(
    run: str,
    lab: redis.Redis,
    app: Celery,
    capture: EventCapture,
    events_worker: WorkerProcess,
) -> None:
    result = tasks.write_retry.apply_async((run, "t1", "a1"), queue=events_worker.queue)
    assert result.get(timeout=RESULT_TIMEOUT) == "write a1"
    [acquired] = hilok_events(capture, result.id, "acquired")
    [released] = hilok_events(capture, result.id, "released")
    handle = events(lab, run)[0]["handle"]
    assert isinstance(handle, str) and len(handle) > 6

    [lock] = acquired["hilok_locks"]
    assert lock["path"] == account(run) and lock["mode"] == "write"
    assert isinstance(lock["token"], int) and lock["token"] > 0
    assert lock["handle"] == handle[:6]
    assert acquired["hilok_contended"] is False and acquired["hilok_retries"] == 0
    assert 0.0 <= acquired["hilok_wait"] < RESULT_TIMEOUT
    assert acquired["hostname"].startswith(events_worker.queue)

    assert released["hilok_locks"] == acquired["hilok_locks"]
    assert released["hilok_why"] == "SUCCESS"
    assert 0.0 <= released["hilok_hold"] < RESULT_TIMEOUT
    for event in (acquired, released):
        assert handle not in json.dumps(event)  # handles are secrets: a prefix only

    # What a monitor makes of them: Celery's event state (Flower's base) merges the lock
    # fields into the task's record.
    wait_for(lambda: capture.matching(type="task-succeeded", uuid=result.id), what="success")
    state = app.events.State()
    for event in capture.matching(uuid=result.id):
        state.event(event)
    task = state.tasks[result.id]
    assert task.state == "SUCCESS"
    assert task.hilok_locks == acquired["hilok_locks"] and task.hilok_why == "SUCCESS"


@pytest.mark.celery_worker
def test_events_of_a_task_retried_on_contention(
    run: str, hl: HiLok, capture: EventCapture, events_worker: WorkerProcess
) -> None:
    holder = hl.acquire(account(run), "write")
    result = tasks.write_retry.apply_async((run, "t1", "a1"), queue=events_worker.queue)
    # The first refusal; the task keeps retrying (every 0.05-0.2 s) until the release, so
    # more of them may be in by the time this returns.
    contended = hilok_events(capture, result.id, "contended")[0]
    hl.release(holder)
    assert result.get(timeout=RESULT_TIMEOUT) == "write a1"
    assert contended["hilok_action"] == "retry"
    assert (contended["hilok_path"], contended["hilok_mode"]) == (account(run), "write")
    assert holder.handle[:6] in contended["hilok_blocker"]
    assert holder.handle not in json.dumps(contended)
    assert 0.0 < contended["hilok_countdown"] <= 0.2  # FAST_RETRY's backoff cap
    assert contended["hilok_retries"] == 0
    [acquired] = hilok_events(capture, result.id, "acquired")
    retries = len(capture.matching(type="task-hilok", uuid=result.id, hilok="contended"))
    assert acquired["hilok_retries"] == retries >= 1
    # Celery's own retry events tell the same story (sent by the main process, which may
    # be later than the retried execution's events from a pool process).
    capture.wait(type="task-retried", uuid=result.id)


@pytest.mark.celery_worker
def test_events_of_tasks_parked_on_contention(
    run: str, hl: HiLok, capture: EventCapture, events_worker: WorkerProcess
) -> None:
    holder = hl.acquire(account(run), "write")
    try:
        first = tasks.write_park.apply_async((run, "t1", "a1"), queue=events_worker.queue)
        [one] = hilok_events(capture, first.id, "contended")
        second = tasks.write_park.apply_async((run, "t1", "a1"), queue=events_worker.queue)
        [two] = hilok_events(capture, second.id, "contended")
    finally:
        hl.release(holder)
    assert first.get(timeout=RESULT_TIMEOUT) == second.get(timeout=RESULT_TIMEOUT) == "write a1"
    assert one["hilok_action"] == two["hilok_action"] == "park"
    assert (one["hilok_position"], two["hilok_position"]) == (0, 1)  # places in the queue
    assert holder.handle[:6] in one["hilok_blocker"] and one["hilok_countdown"] is None
    # sent again holding the lock: "acquired" says how long it was parked
    for result in (first, second):
        [acquired] = hilok_events(capture, result.id, "acquired")
        assert acquired["hilok_contended"] is True and acquired["hilok_wait"] > 0
        assert acquired["hilok_retries"] == 0


@pytest.mark.celery_worker
def test_events_of_tasks_skipped_or_failed_on_contention(
    run: str, hl: HiLok, capture: EventCapture, events_worker: WorkerProcess
) -> None:
    holder = hl.acquire(account(run), "write")
    try:
        skipped = tasks.write_skip.apply_async((run, "t1", "a1"), queue=events_worker.queue)
        failed = tasks.write_fail.apply_async((run, "t1", "a1"), queue=events_worker.queue)
        [skip] = hilok_events(capture, skipped.id, "contended")
        [fail] = hilok_events(capture, failed.id, "contended")
        with pytest.raises(LockNotAcquired):
            failed.get(timeout=RESULT_TIMEOUT)
    finally:
        hl.release(holder)
    assert skip["hilok_action"] == "skip" and fail["hilok_action"] == "fail"
    for event in (skip, fail):
        assert event["hilok_path"] == account(run)
        assert holder.handle[:6] in event["hilok_blocker"]
        assert event["hilok_countdown"] is None
    assert not capture.matching(type="task-hilok", uuid=skipped.id, hilok="acquired")


@pytest.mark.celery_worker
def test_event_of_a_lost_lease(
    run: str, lab: redis.Redis, hl: HiLok, capture: EventCapture, events_worker: WorkerProcess
) -> None:
    result = tasks.lose.apply_async((run, "t1", "a1"), queue=events_worker.queue)
    entry = wait_for(lambda: started_entry(lab, run), what="the task to start")
    grants = snapshot(hl, f"{run}/tenants/t1").grants
    assert [g.handle for g in grants] == [entry["handle"]]
    for lease in leases_of(hl, grants):
        hl.release(lease)  # someone with the handle releases it behind the task's back
    [lost] = hilok_events(capture, result.id, "lost")
    open_gate(lab, run, "lost")
    assert result.get(timeout=RESULT_TIMEOUT) == "lose"
    [lock] = lost["hilok_locks"]
    assert (lock["path"], lock["mode"], lock["handle"]) == (
        account(run),
        "write",
        entry["handle"][:6],
    )


@pytest.mark.celery_worker
def test_event_of_a_release_by_the_main_process(
    run: str, lab: redis.Redis, hl: HiLok, capture: EventCapture, events_worker: WorkerProcess
) -> None:
    result = tasks.exit.apply_async((run, "t1", "a1", "block"), queue=events_worker.queue)
    entry = wait_for(lambda: started_entry(lab, run), what="the task to start")
    os.kill(entry["pid"], signal.SIGKILL)
    with pytest.raises(WorkerLostError):
        result.get(timeout=RESULT_TIMEOUT)
    [released] = hilok_events(capture, result.id, "released")
    assert released["hilok_why"].startswith("worker process lost")
    assert released["hilok_locks"] == [
        {"path": account(run), "mode": "write", "token": None, "handle": entry["handle"][:6]}
    ]
    assert entry["handle"] not in json.dumps(released)
    wait_for(lambda: not hl.status(account(run)).held, what="the lock to be free")


@pytest.mark.usefixtures("inproc_worker")
@pytest.mark.celery_worker
def test_no_lock_events_from_a_worker_without_task_events(
    run: str, capture: EventCapture, events_worker: WorkerProcess
) -> None:
    quiet = tasks.write_retry.delay(run, "t1", "a1")  # the in-process worker: no -E
    assert quiet.get(timeout=RESULT_TIMEOUT) == "write a1"
    loud = tasks.write_retry.apply_async((run, "t1", "a2"), queue=events_worker.queue)
    assert loud.get(timeout=RESULT_TIMEOUT) == "write a2"
    # Events reach the receiver in the order they were published: an event of the quiet
    # task, sent before its result, would be here before the loud task's.
    hilok_events(capture, loud.id, "acquired")
    assert capture.matching(uuid=quiet.id) == []


# -- signals (the in-process worker runs its tasks in this process) -----------------------


class Signals:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    def receiver(self, name: str) -> Any:
        def receive(sender: Any = None, **kwargs: Any) -> None:
            with self._lock:
                self.calls.append((name, {"sender": sender, **kwargs}))

        return receive

    def of(self, name: str, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [kw for n, kw in self.calls if n == name and kw["task_id"] == task_id]


@pytest.fixture
def signals() -> Iterator[Signals]:
    seen = Signals()
    pairs = [
        (hilok_lock_acquired, seen.receiver("acquired")),
        (hilok_lock_refused, seen.receiver("refused")),
        (hilok_lock_released, seen.receiver("released")),
    ]
    for sig, receiver in pairs:
        sig.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        for sig, receiver in pairs:
            sig.disconnect(receiver)


@pytest.mark.usefixtures("inproc_worker")
def test_signals_of_a_task_retried_on_contention(run: str, hl: HiLok, signals: Signals) -> None:
    holder = hl.acquire(account(run), "write")
    result = tasks.write_retry.delay(run, "t1", "a1")
    wait_for(lambda: signals.of("refused", result.id), what="hilok_lock_refused")
    hl.release(holder)
    assert result.get(timeout=RESULT_TIMEOUT) == "write a1"
    wait_for(lambda: signals.of("released", result.id), what="hilok_lock_released")

    refused = signals.of("refused", result.id)[0]
    assert refused["sender"].name == "hilok_tests.write_retry"
    assert refused["action"] == "retry" and 0.0 < refused["countdown"] <= 0.2
    assert isinstance(refused["error"], LockNotAcquired)
    assert refused["error"].path == account(run)
    [acquired] = signals.of("acquired", result.id)
    [lease] = acquired["leases"]
    assert lease.path == account(run) and lease.mode == "write"
    assert acquired["contended"] is False  # the "retry" policy never waits in place
    assert 0.0 <= acquired["wait"] < RESULT_TIMEOUT
    assert acquired["locks"].handle == lease.handle
    [released] = signals.of("released", result.id)
    assert released["leases"] == [lease] and released["why"] == "SUCCESS"
    assert 0.0 <= released["hold"] < RESULT_TIMEOUT


@pytest.mark.usefixtures("inproc_worker")
def test_signals_of_a_task_that_waits(run: str, hl: HiLok, signals: Signals) -> None:
    holder = hl.acquire(account(run), "write")
    result = tasks.write_wait.delay(run, "t1", "a1")
    wait_for(lambda: hl.status(account(run)).waiters, what="the task to queue up")
    hl.release(holder)
    assert result.get(timeout=RESULT_TIMEOUT) == "write a1"
    [acquired] = signals.of("acquired", result.id)
    assert acquired["contended"] is True and 0.0 < acquired["wait"] < RESULT_TIMEOUT
    assert signals.of("refused", result.id) == []

    holder = hl.acquire(account(run), "write")
    try:
        timed_out = tasks.write_short_wait.delay(run, "t1", "a1")
        with pytest.raises(LockNotAcquired):
            timed_out.get(timeout=RESULT_TIMEOUT)
    finally:
        hl.release(holder)
    [refused] = signals.of("refused", timed_out.id)
    assert refused["action"] == "fail" and refused["countdown"] is None


# -- hilok_metrics --------------------------------------------------------------------------


def test_hilok_metrics_installs_a_prometheus_observer(hilok_config: dict[str, Any]) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    app = Celery("metrics-test", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        hilok_redis_url=hilok_config["hilok_redis_url"],
        hilok_namespace=hilok_config["hilok_namespace"],
        hilok_metrics="prometheus",
        hilok_metrics_prefix_depth=2,
    )

    def body(self: Any, run: str, job: str) -> str:
        return job

    job: Any = app.task(base=HiLokTask, bind=True, hilok_write="{run}/jobs/{job}", shared=False)(
        body
    )

    run = f"r{uuid.uuid4().hex[:10]}"
    before = set(metrics.observers())
    try:
        assert job.delay(run, "j1").get(timeout=RESULT_TIMEOUT) == "j1"
        assert job.delay(run, "j2").get(timeout=RESULT_TIMEOUT) == "j2"
        installed = [o for o in metrics.observers() if o not in before]
        assert [type(o).__name__ for o in installed] == ["PrometheusObserver"]
    finally:
        for observer in set(metrics.observers()) - before:
            metrics.remove_observer(observer)
        metrics.set_prefix_depth(1)
        runtime(app).close()
    labels = {"prefix": f"{run}/jobs", "mode": "write"}
    registry = prometheus_client.REGISTRY
    assert registry.get_sample_value("hilok_acquired_total", labels) == 2
    assert registry.get_sample_value("hilok_released_total", labels) == 2
    assert registry.get_sample_value("hilok_hold_seconds_count", labels) == 2


def test_hilok_metrics_rejects_unknown_backends() -> None:
    from celery_hilok.celery._events import metrics_kinds

    assert metrics_kinds(False) == metrics_kinds(None) == []
    assert metrics_kinds(True) == ["prometheus"]
    assert metrics_kinds(["prometheus", "opentelemetry"]) == ["prometheus", "opentelemetry"]
    with pytest.raises(ValueError, match="hilok_metrics"):
        metrics_kinds("statsd")
