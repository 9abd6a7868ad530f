"""Redis Sentinel: URL parsing, and real failovers under load.

The failover tests run one master, one replica and three sentinels (quorum 2) on 127.0.0.1
(tests/_sentinel.py). A HiLok and an AsyncHiLok on the group's ``sentinel://`` URL take and
give back locks in a loop while the master is failed over, by ``SENTINEL FAILOVER`` (managed)
or by killing it (crash). During the switch a call either succeeds or fails with a
HiLokError, and within a bounded time; after it, the clients work on the new master. A lease
granted with ``wait_replicas=1`` before the failover is still held on the new master; one
granted without it is only reported (asynchronous replication allows it to be lost).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from celery_hilok import AsyncHiLok, HiLok, HiLokError, Lease
from celery_hilok._redis import parse_sentinel_url
from celery_hilok.celery._runtime import Runtime
from celery_hilok.celery.config import redis_url
from celery_hilok.errors import InvalidArgument
from tests._sentinel import MASTER_NAME, SentinelGroup, info, quick_client, wait_for

#: No call may take longer than this, whatever the failover does (a generous bound: it only
#: proves that nothing hangs; socket timeouts are 5 s).
NO_HANG = 15.0
#: Longest wait for the sentinels to switch masters (down-after is 1 s).
SWITCH_TIMEOUT = 20.0


def test_kombu_style_url_is_parsed() -> None:
    hosts, master, skw, conn = parse_sentinel_url(
        "sentinel://:pw@127.0.0.1:26379/2;sentinel://127.0.0.1:26380?master_name=m",
        {"sentinel_kwargs": {"password": "s"}},
    )
    assert hosts == [("127.0.0.1", 26379), ("127.0.0.1", 26380)]
    assert master == "m"
    assert skw == {"password": "s"}
    assert conn == {"password": "pw", "db": 2}


def test_master_name_is_required() -> None:
    with pytest.raises(InvalidArgument, match="master_name"):
        parse_sentinel_url("sentinel://127.0.0.1:26379", {})


def test_celery_broker_sentinel_url_is_taken_with_its_master_name() -> None:
    conf = {
        "broker_url": "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380",
        "broker_transport_options": {"master_name": "mymaster"},
    }
    url = redis_url(conf)
    assert url.endswith("?master_name=mymaster")
    assert parse_sentinel_url(url, {})[1] == "mymaster"


# -- real sentinels -----------------------------------------------------------------------


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    with SentinelGroup() as servers:
        yield servers


class Load:
    """Acquire and release in a loop until stopped, recording every call's outcome.

    ``run`` is one acquire+release (sync); each outcome is "ok" or an exception's class
    name, with the call's duration. Anything that is not a HiLokError is kept to fail on.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: Counter[str] = Counter()
        self.longest = 0.0
        self.unexpected: list[BaseException] = []
        self.ok_after: float | None = None  # monotonic time of the first success after mark()
        self._mark: float | None = None
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def record(self, started: float, error: BaseException | None) -> None:
        now = time.monotonic()
        with self._lock:
            self.longest = max(self.longest, now - started)
            if error is None:
                self.outcomes["ok"] += 1
                if self._mark is not None and started >= self._mark and self.ok_after is None:
                    self.ok_after = now
            else:
                self.outcomes[type(error).__name__] += 1
                if not isinstance(error, HiLokError):
                    self.unexpected.append(error)

    def mark(self) -> None:
        """From now on, note the first call that starts and succeeds."""
        with self._lock:
            self._mark = time.monotonic()

    @property
    def ok(self) -> int:
        return self.outcomes["ok"]


def _sync_load(hl: HiLok, load: Load) -> None:
    i = 0
    while not load.stop.is_set():
        started = time.monotonic()
        try:
            lease = hl.acquire(f"load/{i % 4}", "write", timeout=2.0, ttl=5.0)
            hl.release(lease)
            load.record(started, None)
        except BaseException as exc:
            load.record(started, exc)
            # Slow the loop after an error only by waiting on the stop event, not a sleep.
            load.stop.wait(0.02)
        i += 1


def _async_load(url: str, namespace: str, load: Load, ports: list[int]) -> None:
    async def main() -> None:
        async with AsyncHiLok(url, namespace=namespace) as hl:
            i = 0
            while not load.stop.is_set():
                started = time.monotonic()
                try:
                    lease = await hl.acquire(f"aload/{i % 4}", "read", timeout=2.0, ttl=5.0)
                    await hl.release(lease)
                    load.record(started, None)
                except Exception as exc:
                    load.record(started, exc)
                    await asyncio.sleep(0.02)
                i += 1
            # Where the async client's connections go now.
            ports.append(int((await hl.redis.info("server"))["tcp_port"]))

    asyncio.run(main())


def _fail_over(
    group: SentinelGroup,
    namespace: str,
    trigger: Callable[[], Any],
    label: str,
    settle: Callable[[int], Any] = lambda old: None,
) -> dict[str, Any]:
    """Run the loads, fail over with ``trigger``, wait for the switch and for ``settle(old
    master's port)``, then check what the issue asks for."""
    old_port = group.master_port()
    url = group.url
    report: dict[str, Any] = {"old": old_port}
    with (
        HiLok(url, namespace=namespace) as hl,
        HiLok(url, namespace=namespace, wait_replicas=1, wait_timeout=2.0) as durable,
    ):
        assert int(hl.redis.info("server")["tcp_port"]) == old_port
        # Leases held across the failover: one acknowledged by the replica, one not.
        kept = durable.acquire("kept/a", "write", ttl=60.0)
        plain = hl.acquire("plain/a", "write", ttl=60.0)

        loads = [Load("sync"), Load("async")]
        async_ports: list[int] = []
        threads = [
            threading.Thread(target=_sync_load, args=(hl, loads[0]), daemon=True),
            threading.Thread(
                target=_async_load, args=(url, namespace, loads[1], async_ports), daemon=True
            ),
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: all(ld.ok >= 20 for ld in loads), NO_HANG, "the loads to run")
            with group.switch_watch() as switched:
                trigger()
                new_port = switched(SWITCH_TIMEOUT)
            assert new_port != old_port
            # Right after the switch: a client may still be connected to the old master.
            window_plain = _try(lambda: hl.acquire("window/plain", "write", ttl=60.0))
            window_durable = _try(lambda: durable.acquire("window/kept", "write", ttl=60.0))
            # Straight on the old master, if it still runs: it is no master for the
            # sentinels any more, but until they demote it, it grants what it is asked for.
            on_old = group.server_on(old_port).running
            if on_old:
                stale_plain = _grant_on(old_port, namespace, "stale/plain", 0)
                stale_durable = _grant_on(old_port, namespace, "stale/kept", 1)
            settling = time.monotonic()
            settle(old_port)
            report["settle_s"] = round(time.monotonic() - settling, 2)
            for load in loads:
                load.mark()
            # Both clients find the new master and work on it.
            wait_for(
                lambda: all(ld.ok_after is not None for ld in loads),
                NO_HANG,
                f"acquire+release to succeed on the new master ({[ld.outcomes for ld in loads]})",
            )
        finally:
            for load in loads:
                load.stop.set()
            for thread in threads:
                thread.join(NO_HANG)
        assert not any(thread.is_alive() for thread in threads), "a load hung"
        for load in loads:
            assert not load.unexpected, f"{load.name}: not a HiLokError: {load.unexpected!r}"
            assert load.longest < NO_HANG, f"{load.name}: a call took {load.longest:.1f}s"
            report[load.name] = dict(load.outcomes)
            report[f"{load.name}_longest"] = round(load.longest, 3)

        # The clients' connections now go to the new master.
        assert int(hl.redis.info("server")["tcp_port"]) == new_port
        assert int(durable.redis.info("server")["tcp_port"]) == new_port
        assert async_ports == [new_port]
        assert hl.redis.info("replication")["role"] == "master"
        lease = hl.acquire("after/a", "write", block=False)
        hl.release(lease)

        # A grant the replica acknowledged (WAIT) survives the failover...
        holders = durable.status("kept/a").holders
        assert [(h.handle, h.mode) for h in holders] == [(kept.handle, "write")]
        durable.refresh(kept)
        durable.release(kept)
        # ...one without WAIT may be lost: asynchronous replication. Report, don't assert.
        report["plain_lease_survived"] = _still_held(hl, plain)
        # Granted just after the switch: without WAIT it may have gone to the old master and
        # be lost; with WAIT it was refused unless a replica of its master acknowledged it.
        report["window_plain"] = _outcome(hl, window_plain)
        report["window_durable"] = _outcome(durable, window_durable)
        if on_old:
            # A lease granted by the demoted master is gone: the failover lost it. With
            # WAIT it was never handed out (the old master has no replica left).
            report["stale_plain"] = _outcome(hl, stale_plain)
            report["stale_durable"] = _outcome(durable, stale_durable)
            assert report["stale_plain"] in ("lost", "HiLokError", "HiLokConnectionError")
            assert report["stale_durable"] in (
                "LockNotReplicated",
                "HiLokError",
                "HiLokConnectionError",
            ), report
        assert report["window_durable"] in (
            "LockNotReplicated",
            "HiLokConnectionError",
            "survived",
        ), report
        new = group.server_on(new_port)
        assert new.running
    report["new"] = new_port
    print(f"[sentinel] {label}: {report}")
    return report


def _grant_on(port: int, namespace: str, path: str, wait: int) -> Lease | HiLokError:
    """A write lease on ``path`` from the server on ``port`` itself (not via the sentinels)."""
    with HiLok(f"redis://127.0.0.1:{port}/0", namespace=namespace, wait_replicas=wait) as hl:
        return _try(lambda: hl.acquire(path, "write", ttl=60.0, block=False))


def _try(call: Callable[[], Lease]) -> Lease | HiLokError:
    try:
        return call()
    except HiLokError as exc:
        return exc


def _outcome(hl: HiLok, result: Lease | HiLokError) -> str:
    if isinstance(result, HiLokError):
        return type(result).__name__
    return "survived" if _still_held(hl, result) else "lost"


def _still_held(hl: HiLok, lease: Lease) -> bool:
    held = any(h.handle == lease.handle for h in hl.status(lease.path).holders)
    try:
        hl.release(lease)
    except HiLokError:
        pass
    return held


@pytest.mark.slow
def test_managed_failover_under_load(group: SentinelGroup, namespace: str) -> None:
    def demoted(old_port: int) -> None:
        # Sentinel announces the switch before it turns the old master into a replica of
        # the new one: until then the old master still takes writes from clients that are
        # connected to it (they see no error), and loses them when it is demoted.
        wait_for(
            lambda: info(old_port, "replication")["role"] == "slave",
            SWITCH_TIMEOUT,
            "the old master to become a replica",
        )

    _fail_over(group, namespace, group.failover, "SENTINEL FAILOVER", settle=demoted)


@pytest.mark.slow
def test_master_crash_under_load(group: SentinelGroup, namespace: str) -> None:
    report = _fail_over(group, namespace, group.crash_master, "master killed")
    assert not group.server_on(report["old"]).running


@pytest.mark.slow
def test_celery_settings_with_a_sentinel_broker(namespace: str) -> None:
    with SentinelGroup() as group:
        hosts = ";".join(f"sentinel://127.0.0.1:{s.port}" for s in group.sentinels)
        app = Celery("sentinel", set_as_current=False)
        app.conf.update(
            broker_url=hosts,
            broker_transport_options={"master_name": MASTER_NAME},
            hilok_namespace=namespace,
            hilok_wait_replicas=1,
        )
        url = redis_url(app.conf)
        assert url.startswith(hosts) and url.endswith(f"?master_name={MASTER_NAME}")
        runtime = Runtime(app)  # the worker's lock client, built from the broker's sentinels
        try:
            hl = runtime.hilok
            assert hl.wait_replicas == 1
            with hl.write("tenants/42") as lease:
                assert hl.status("tenants/42").holders[0].handle == lease.handle
                # Acknowledged by the replica before the block started.
                probe = quick_client(group.data.replicas[0].port)
                try:
                    assert probe.keys(f"{namespace}*"), "nothing of the grant on the replica"
                finally:
                    probe.close()
            assert int(hl.redis.info("server")["tcp_port"]) == group.master_port()
        finally:
            runtime.hilok.close()
