"""Lock metrics (:mod:`celery_hilok.metrics`): observers, events, Prometheus, OpenTelemetry."""

from __future__ import annotations

import asyncio
import logging
import pickle
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from celery_hilok import AsyncHiLok, HiLok, Lease, LockLost, LockNotAcquired, metrics
from celery_hilok.metrics import Acquired, Lost, Observer, Refused, Released

LIMIT = 10.0  # generous upper bound on any wait in these tests


class Recorder(Observer):
    """Records the events of one test's lock tree (paths under ``root``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.events: list[Any] = []
        self._cond = threading.Condition()

    def _add(self, event: Any) -> None:
        if event.path == self.root or event.path.startswith(self.root + "/"):
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    on_acquired = on_refused = on_released = on_lost = _add

    def of(self, kind: type[Any]) -> list[Any]:
        with self._cond:
            return [e for e in self.events if isinstance(e, kind)]

    def wait_for_any(self, limit: float) -> None:
        """Return at the next event, or after ``limit`` seconds."""
        with self._cond:
            self._cond.wait(limit)

    def wait_for(self, kind: type[Any], count: int = 1, limit: float = LIMIT) -> list[Any]:
        """The first ``count`` events of ``kind``, waiting for them (bounded)."""
        deadline = time.monotonic() + limit
        with self._cond:
            while True:
                found = [e for e in self.events if isinstance(e, kind)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {count} {kind.__name__} event(s) in {limit}s: {self.events}")
                self._cond.wait(left)


@pytest.fixture
def root() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


@pytest.fixture
def recorder(root: str) -> Iterator[Recorder]:
    rec = Recorder(root)
    metrics.add_observer(rec)
    try:
        yield rec
    finally:
        metrics.remove_observer(rec)


@pytest.fixture
def hl(redis_url: str, namespace: str) -> Iterator[HiLok]:
    locks = HiLok(redis_url, namespace=namespace, ttl=10.0)
    try:
        yield locks
    finally:
        locks.close()


@pytest.fixture
async def ahl(redis_url: str, namespace: str) -> AsyncIterator[AsyncHiLok]:
    locks = AsyncHiLok(redis_url, namespace=namespace, ttl=10.0)
    try:
        yield locks
    finally:
        await locks.close()


def wait_until(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + LIMIT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


# -- the sync driver --------------------------------------------------------------------------


def test_no_observer_registered_by_default() -> None:
    assert metrics.observers() == ()


def test_uncontended_acquire_and_release(hl: HiLok, recorder: Recorder, root: str) -> None:
    lease = hl.acquire(f"{root}/tenants/42", "write")
    [acquired] = recorder.of(Acquired)
    assert (acquired.path, acquired.mode, acquired.prefix) == (f"{root}/tenants/42", "write", root)
    assert acquired.lease is lease and not acquired.contended
    assert 0.0 <= acquired.wait < LIMIT
    assert lease.granted_at is not None and lease.waited == acquired.wait
    assert lease.contended is False
    assert recorder.of(Released) == []

    lease.release()
    [released] = recorder.of(Released)
    assert released.lease is lease and not released.lost
    assert released.hold is not None and 0.0 <= released.hold < LIMIT
    lease.release()  # idempotent: no second event
    assert len(recorder.of(Released)) == 1
    assert recorder.of(Refused) == recorder.of(Lost) == []


def test_multi_lock_acquire_gives_one_event_per_lease(
    hl: HiLok, recorder: Recorder, root: str
) -> None:
    leases = hl.acquire_many([(f"{root}/a", "write"), (f"{root}/b/c", "read")])
    assert [(e.path, e.mode) for e in recorder.of(Acquired)] == [
        (f"{root}/a", "write"),
        (f"{root}/b/c", "read"),
    ]
    hl.release(*leases)
    assert {e.lease for e in recorder.of(Released)} == set(leases)


def test_contended_acquire_waits_and_says_so(hl: HiLok, recorder: Recorder, root: str) -> None:
    path = f"{root}/accounts/7"
    holder = hl.acquire(path, "write")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(hl.acquire, path, "read", timeout=LIMIT)
        wait_until(lambda: hl.status(path).waiters, "the reader to queue up")
        hl.release(holder)
        lease = waiting.result(timeout=LIMIT)
    first, second = recorder.wait_for(Acquired, 2)
    assert first.lease is holder and not first.contended
    assert second.lease is lease and second.contended and second.mode == "read"
    assert 0.0 < second.wait < LIMIT
    assert lease.contended is True
    [released] = recorder.of(Released)
    assert released.lease is holder and released.hold is not None
    hl.release(lease)


def test_refusals(hl: HiLok, recorder: Recorder, root: str) -> None:
    path = f"{root}/x"
    holder = hl.acquire(path, "write")
    with pytest.raises(LockNotAcquired):
        hl.acquire(f"{path}/y", "read", block=False)
    with pytest.raises(LockNotAcquired):
        hl.acquire(path, "write", timeout=0.05)
    now, timed_out = recorder.of(Refused)
    assert (now.path, now.mode, now.prefix, now.block) == (f"{path}/y", "read", root, False)
    assert (timed_out.path, timed_out.mode, timed_out.block) == (path, "write", True)
    for event in (now, timed_out):
        assert event.blocker is not None and holder.handle[:6] in event.blocker
        assert holder.handle not in event.blocker  # only a prefix of the secret
        assert 0.0 <= event.wait < LIMIT
    assert len(recorder.of(Acquired)) == 1  # the holder's
    hl.release(holder)


def test_lease_lost_under_keep_alive(hl: HiLok, recorder: Recorder, root: str) -> None:
    lease = hl.acquire(f"{root}/job", "write", ttl=0.9)
    hl.keep_alive(lease)  # renewed every 0.3 s
    copy = pickle.loads(pickle.dumps(lease))
    assert copy.granted_at is None and copy.waited is None and copy.contended is None
    # Shorten the lease on the server behind the refresher's back: it runs out within a
    # millisecond, and the next tick finds it gone. (Should a tick renew it in between,
    # shorten it again.)
    deadline = time.monotonic() + LIMIT
    while not recorder.of(Lost):
        assert time.monotonic() < deadline, "the refresher never reported the lease lost"
        hl.refresh(copy, ttl=0.001)
        recorder.wait_for_any(0.5)
    [lost] = recorder.of(Lost)
    assert lost.lease is lease and lost.found_by == "refresher" and lease.lost
    assert lost.hold is not None and 0.0 <= lost.hold < LIMIT
    with pytest.raises(LockLost):
        hl.release(lease)
    [released] = recorder.of(Released)
    assert released.lost
    assert len(recorder.of(Lost)) == 1  # found once, reported once


def run_out(hl: HiLok, path: str) -> Lease:
    """A lease of ``path`` whose (tiny) lease has run out on the server, unreleased."""
    lease = hl.acquire(path, "read", ttl=0.05)
    wait_until(lambda: not hl.status(path).holders, "the lease to run out")
    return lease


def test_release_of_a_gone_lease_reports_it_lost(hl: HiLok, recorder: Recorder, root: str) -> None:
    lease = hl.acquire(f"{root}/a", "read")
    copy = pickle.loads(pickle.dumps(lease))
    hl.release(copy)  # released elsewhere (another copy): no grant time known for it
    [released_copy] = recorder.of(Released)
    assert released_copy.lease is copy and released_copy.hold is None and not released_copy.lost
    hl.release(lease)  # the grant was released already: no second event, nothing lost
    assert len(recorder.of(Released)) == 1 and not recorder.of(Lost)
    gone = run_out(hl, f"{root}/b")
    with pytest.raises(LockLost):
        hl.release(gone)
    [lost] = recorder.of(Lost)
    assert lost.lease is gone and lost.found_by == "release"
    assert recorder.of(Released)[1].lost


def test_explicit_refresh_reports_a_lost_lease(hl: HiLok, recorder: Recorder, root: str) -> None:
    lease = hl.acquire(f"{root}/a", "read")
    hl.release(pickle.loads(pickle.dumps(lease)))
    with pytest.raises(LockLost):
        hl.refresh(lease)
    with pytest.raises(LockLost):
        hl.refresh(lease)
    [lost] = recorder.of(Lost)
    assert lost.found_by == "refresh"


def test_a_failing_observer_never_breaks_locking(
    hl: HiLok, recorder: Recorder, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Observer):
        def on_acquired(self, event: Acquired) -> None:
            raise RuntimeError("observer bug")

        on_released = on_refused = on_acquired  # type: ignore[assignment]

    broken = Broken()
    metrics.add_observer(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="celery_hilok"):
            lease = hl.acquire(f"{root}/a", "write")
            with pytest.raises(LockNotAcquired):
                hl.acquire(f"{root}/a", "write", block=False)
            hl.release(lease)
    finally:
        metrics.remove_observer(broken)
    assert not hl.status(f"{root}/a").held
    assert "observer bug" in caplog.text
    # The observer after it still got every event.
    assert [type(e) for e in recorder.events] == [Acquired, Refused, Released]


def test_add_twice_counts_once_and_remove_stops_events(hl: HiLok, root: str) -> None:
    rec = Recorder(root)
    metrics.add_observer(rec)
    metrics.add_observer(rec)
    try:
        assert metrics.observers().count(rec) == 1
        hl.acquire(f"{root}/a", "read").release()
        assert len(rec.events) == 2
    finally:
        metrics.remove_observer(rec)
    metrics.remove_observer(rec)  # not registered: nothing happens
    hl.acquire(f"{root}/a", "read").release()
    assert len(rec.events) == 2


def test_prefix_depth(hl: HiLok, recorder: Recorder, root: str) -> None:
    try:
        metrics.set_prefix_depth(3)
        hl.acquire(f"{root}/tenants/42/invoices/7", "write").release()
        hl.acquire(f"{root}/x", "write").release()
    finally:
        metrics.set_prefix_depth(1)
    assert [e.prefix for e in recorder.of(Acquired)] == [f"{root}/tenants/42", f"{root}/x"]
    with pytest.raises(ValueError):
        metrics.set_prefix_depth(0)


def test_context_manager_events(hl: HiLok, recorder: Recorder, root: str) -> None:
    with hl.write(f"{root}/a") as lease:
        assert [e.lease for e in recorder.of(Acquired)] == [lease]
    assert [e.lease for e in recorder.of(Released)] == [lease]


# -- the asyncio driver -----------------------------------------------------------------------


async def test_async_events(ahl: AsyncHiLok, recorder: Recorder, root: str) -> None:
    path = f"{root}/accounts/1"
    holder = await ahl.acquire(path, "write")
    with pytest.raises(LockNotAcquired):
        await ahl.acquire(path, "read", block=False)
    waiting = asyncio.create_task(ahl.acquire(path, "read", timeout=LIMIT))
    deadline = time.monotonic() + LIMIT
    while not (await ahl.status(path)).waiters:
        assert time.monotonic() < deadline, "the reader never queued up"
        await asyncio.sleep(0.01)
    await ahl.release(holder)
    lease = await asyncio.wait_for(waiting, LIMIT)
    await ahl.release(lease)

    first, second = recorder.of(Acquired)
    assert first.lease is holder and not first.contended
    assert second.lease is lease and second.contended and 0.0 < second.wait < LIMIT
    [refused] = recorder.of(Refused)
    assert refused.mode == "read" and not refused.block and refused.prefix == root
    released = recorder.of(Released)
    assert [e.lease for e in released] == [holder, lease]
    assert all(e.hold is not None and 0.0 <= e.hold < LIMIT and not e.lost for e in released)

    gone = await ahl.acquire(f"{root}/b", "read", ttl=0.05)
    await asyncio.sleep(0.1)  # let the lease run out: time itself is what is awaited
    with pytest.raises(LockLost):
        await ahl.release(gone)
    [lost] = recorder.of(Lost)
    assert lost.lease is gone and lost.found_by == "release"


async def test_async_lease_lost_under_keep_alive(
    ahl: AsyncHiLok, recorder: Recorder, root: str
) -> None:
    lease = await ahl.acquire(f"{root}/job", "write", ttl=0.9)
    ahl.keep_alive(lease)
    copy = pickle.loads(pickle.dumps(lease))
    deadline = time.monotonic() + LIMIT
    while not recorder.of(Lost):
        assert time.monotonic() < deadline, "the refresher never reported the lease lost"
        await ahl.refresh(copy, ttl=0.001)
        for _ in range(50):  # up to 0.5 s, until the refresher's next tick reports it
            if recorder.of(Lost):
                break
            await asyncio.sleep(0.01)
    [lost] = recorder.of(Lost)
    assert lost.lease is lease and lost.found_by == "refresher"


# -- Prometheus -------------------------------------------------------------------------------


def test_prometheus_observer(hl: HiLok, root: str) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    observer = metrics.PrometheusObserver(registry=registry)
    metrics.add_observer(observer)
    try:
        holder = hl.acquire(f"{root}/a/1", "write")
        with pytest.raises(LockNotAcquired):
            hl.acquire(f"{root}/a", "read", block=False)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(hl.acquire, f"{root}/a/1", "write", timeout=LIMIT)
            wait_until(lambda: hl.status(f"{root}/a/1").waiters, "the writer to queue up")
            hl.release(holder)
            second = waiting.result(timeout=LIMIT)
        hl.release(second)
        copy = hl.acquire(f"{root}/c", "read")
        hl.release(pickle.loads(pickle.dumps(copy)))  # released through a copy
        hl.release(copy)  # released already: not counted again
        gone = run_out(hl, f"{root}/b")
        with pytest.raises(LockLost):
            hl.release(gone)
    finally:
        metrics.remove_observer(observer)

    def value(name: str, mode: str) -> float | None:
        sample: float | None = registry.get_sample_value(name, {"prefix": root, "mode": mode})
        return sample

    assert value("hilok_acquired_total", "write") == 2
    assert value("hilok_acquired_total", "read") == 2  # the copied one and the one run out
    assert value("hilok_refused_total", "read") == 1
    assert value("hilok_contended_total", "read") == 1  # the refusal
    assert value("hilok_contended_total", "write") == 1  # the waiting writer
    assert value("hilok_released_total", "write") == 2
    assert value("hilok_released_total", "read") == 2  # the copy and the lost lease
    assert value("hilok_lost_total", "read") == 1
    assert value("hilok_acquire_wait_seconds_count", "write") == 2
    wait_sum = value("hilok_acquire_wait_seconds_sum", "write")
    assert wait_sum is not None and 0.0 < wait_sum < 2 * LIMIT
    assert value("hilok_hold_seconds_count", "write") == 2
    assert value("hilok_hold_seconds_count", "read") is None  # no known hold time of a read


def test_prometheus_observer_needs_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"celery-hilok\[metrics\]"):
        metrics.PrometheusObserver()


# -- OpenTelemetry ----------------------------------------------------------------------------


def test_opentelemetry_observer(hl: HiLok, root: str) -> None:
    pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    observer = metrics.OpenTelemetryObserver(provider.get_meter("test"))
    metrics.add_observer(observer)
    try:
        lease = hl.acquire(f"{root}/a", "write")
        with pytest.raises(LockNotAcquired):
            hl.acquire(f"{root}/a/b", "write", timeout=0.01)
        hl.release(lease)
    finally:
        metrics.remove_observer(observer)
        provider.shutdown()

    data = reader.get_metrics_data()
    assert data is not None
    points: dict[tuple[str, str], Any] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes or {})
                    if attrs.get("hilok.prefix") == root:
                        points[(metric.name, str(attrs["hilok.mode"]))] = point
    assert points[("hilok.acquired", "write")].value == 1
    assert points[("hilok.refused", "write")].value == 1
    assert points[("hilok.contended", "write")].value == 1
    assert points[("hilok.released", "write")].value == 1
    assert points[("hilok.acquire.wait", "write")].count == 1
    assert points[("hilok.hold", "write")].count == 1
    assert 0.0 <= points[("hilok.hold", "write")].sum < LIMIT
    assert ("hilok.lost", "write") not in points


def test_opentelemetry_observer_needs_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"celery-hilok\[metrics\]"):
        metrics.OpenTelemetryObserver()


def test_restored_lease_has_no_grant_time(hl: HiLok, root: str) -> None:
    lease = hl.acquire(f"{root}/a", "read")
    restored: Lease = pickle.loads(pickle.dumps(lease))
    assert lease.granted_at is not None and restored.granted_at is None
    hl.release(restored)
